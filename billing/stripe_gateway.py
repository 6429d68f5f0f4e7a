"""The one wrapper around `stripe.StripeClient`.

Every call is typed against the SDK's params, and every POST carries an
idempotency key derived from business identity, so a Temporal retry or a worker
crash replays the first answer instead of creating a second object.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import stripe
from stripe.params import (
    CustomerCreateParams,
    SubscriptionCreateParams,
    SubscriptionCreateParamsItem,
    SubscriptionResumeParams,
)
from stripe.params.billing import MeterEventCreateParams
from stripe.params.billing_portal import ConfigurationCreateParams, SessionCreateParams
from stripe.params.checkout import SessionCreateParams as CheckoutSessionCreateParams
from stripe.params.checkout import SessionCreateParamsLineItem

from billing.config import Settings
from billing.domain import (
    LIVE_SUBSCRIPTION_STATUSES,
    CheckoutOutcome,
    OrgProfile,
    SubscriptionSnapshot,
    SubscriptionStatus,
)
from billing.stripe_budget import BudgetedHTTPXClient, RequestBudget, StripeRequestMetrics
from billing.stripe_keys import (
    customer_create_key,
    meter_event_key,
    portal_configuration_key,
    subscription_create_key,
)

WEBHOOK_TOLERANCE_SECONDS = 300

CheckoutMode = Literal["subscription", "setup"]


def make_stripe_client(
    api_key: str,
    *,
    api_base: str | None = None,
    max_network_retries: int = 0,
    blocking: bool = False,
    budget: RequestBudget | None = None,
    metrics: StripeRequestMetrics | None = None,
) -> stripe.StripeClient:
    """The one way composition roots build a Stripe client.

    `api_base` (`STRIPE_API_BASE`) points every Stripe host at one address, the
    emulator's. The API and the worker call Stripe asynchronously, over HTTPX;
    `blocking=True` gives the SDK's default synchronous HTTP client instead, for
    catalog setup and CLI commands. `max_network_retries` retries connection
    errors, 429s and 5xx inside the SDK. With a `budget` (the worker's), every
    HTTP request first takes a slot of it, and a 429 pauses it for everyone.
    """
    base_addresses: dict[str, str | None] = {}
    if api_base:
        base = api_base.rstrip("/")
        base_addresses = {"api": base, "files": base, "connect": base, "meter_events": base}
    http_client: stripe.HTTPClient | None = None
    if budget is not None:
        if blocking:
            raise ValueError("the request budget is for the asynchronous client")
        http_client = BudgetedHTTPXClient(budget, metrics=metrics)
    elif not blocking:
        http_client = stripe.HTTPXClient()
    return stripe.StripeClient(
        api_key,
        base_addresses=base_addresses,  # type: ignore[arg-type]
        max_network_retries=max_network_retries,
        http_client=http_client,
    )


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


def subscription_end_of(sub: Mapping[str, Any]) -> datetime | None:
    """The rule of docs/contracts.md: cancel_at, else ended/canceled when canceled,
    else the trial end while trialing, else the items' current period end."""
    status = sub.get("status")
    if sub.get("cancel_at"):
        return _ts(sub["cancel_at"])
    if status in ("canceled", "incomplete_expired"):
        return _ts(sub.get("ended_at") or sub.get("canceled_at"))
    if status == "trialing" and sub.get("trial_end"):
        return _ts(sub["trial_end"])
    return _ts(_item_period(sub)[1])


def _item_period(sub: Mapping[str, Any]) -> tuple[int | None, int | None]:
    items = (sub.get("items") or {}).get("data") or []
    starts = [i["current_period_start"] for i in items if i.get("current_period_start")]
    ends = [i["current_period_end"] for i in items if i.get("current_period_end")]
    return (min(starts) if starts else None, max(ends) if ends else None)


def stripe_clock(sub: Mapping[str, Any], read_at: datetime | None) -> datetime | None:
    """Stripe's time for the subscription: its test clock's (when expanded), else `read_at`.

    Objects on a test clock live in the clock's simulated time, which can be
    far from the wall clock; what the read says about "now" must use it.
    """
    clock = sub.get("test_clock")
    if isinstance(clock, Mapping) and clock.get("frozen_time"):
        return _ts(int(clock["frozen_time"]))
    return read_at


def snapshot_of(sub: Mapping[str, Any], *, read_at: datetime | None = None) -> SubscriptionSnapshot:
    """Reduce a Stripe subscription (current API shape) to what the org row keeps.

    `read_at` is when it was read; a test clock's own time replaces it.
    """
    start, end = _item_period(sub)
    customer = sub["customer"]
    metadata = sub.get("metadata") or {}
    return SubscriptionSnapshot(
        id=sub["id"],
        customer_id=customer if isinstance(customer, str) else customer["id"],
        status=SubscriptionStatus(sub["status"]),
        subscription_end=subscription_end_of(sub),
        trial_end=_ts(sub.get("trial_end")),
        current_period_start=_ts(start),
        current_period_end=_ts(end),
        cancel_at=_ts(sub.get("cancel_at")),
        pause_collection=bool(sub.get("pause_collection")),
        org_id=metadata.get("org_id"),
        billing_cycle_anchor=_ts(sub.get("billing_cycle_anchor")),
        read_at=stripe_clock(sub, read_at),
    )


# The legacy implementation's customer metadata (docs/legacy-adoption.md).
LEGACY_ORG_ID_KEY = "orgId"
LEGACY_ORG_UID_KEY = "orgUid"


def search_quoted(value: str) -> str:
    """A value inside single quotes of a Stripe search query."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


MeterOutcome = Literal["sent", "duplicate"]


def is_duplicate_meter_event(err: stripe.StripeError) -> bool:
    """Stripe answers a reused meter event identifier with a 400 naming it."""
    code = getattr(err, "code", None) or ""
    message = (getattr(err, "user_message", None) or str(err)).lower()
    return code in ("duplicate_meter_event", "meter_event_duplicate_identifier") or (
        "identifier" in message and ("already" in message or "duplicate" in message)
    )


class StripeGateway:
    """The operations billing needs from Stripe, and nothing else."""

    def __init__(self, client: stripe.StripeClient, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._portal_configuration_id: str | None = None

    # Customers -----------------------------------------------------------------

    def _identity(self, org: OrgProfile) -> dict[str, str]:
        """The metadata that makes a customer or subscription provably the org's."""
        return {
            "org_id": str(org.org_id),
            "org_uid": org.org_uid,
            "source": self._settings.billing_source,
        }

    def is_the_orgs(self, metadata: Mapping[str, Any], org: OrgProfile) -> bool:
        """Provably the org's: `org_uid` and `source` match, not only the org id.

        Another environment on the same Stripe account has its own org with the
        same id; a customer made in the dashboard names an org id and nothing else.
        """
        return (
            metadata.get("org_uid") == org.org_uid
            and metadata.get("source") == self._settings.billing_source
        )

    async def find_customer_for_org(self, org: OrgProfile) -> str | None:
        """The org's customer in this environment, by `org_uid` and `source`."""
        query = (
            f"metadata['org_uid']:'{search_quoted(org.org_uid)}' AND "
            f"metadata['source']:'{search_quoted(self._settings.billing_source)}'"
        )
        result = await self._client.v1.customers.search_async({"query": query, "limit": 10})
        # Search compares case-insensitively; the metadata must match exactly.
        matches = sorted(
            (c for c in result.data if self.is_the_orgs(c.to_dict().get("metadata") or {}, org)),
            key=lambda c: c.created,
        )
        return matches[0].id if matches else None

    async def create_customer(
        self,
        org: OrgProfile,
        *,
        test_clock: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Create the org's customer; the key defaults to the workflow's own."""
        params: CustomerCreateParams = {
            "name": org.customer_name,
            "email": org.owner_email,
            "metadata": self._identity(org),
        }
        if test_clock:
            params["test_clock"] = test_clock
        key = idempotency_key or customer_create_key(
            self._settings.billing_source, org.org_id, org.org_uid, params
        )
        customer = await self._client.v1.customers.create_async(params, {"idempotency_key": key})
        return customer.id

    async def create_or_get_customer(
        self, org: OrgProfile, *, test_clock: str | None = None
    ) -> str:
        existing = await self.find_customer_for_org(org)
        if existing:
            return existing
        return await self.create_customer(org, test_clock=test_clock)

    async def customer_problem(self, customer_id: str, org: OrgProfile) -> str | None:
        """Why the customer an org row names is not provably the org's (None: it is)."""
        customer = (await self._client.v1.customers.retrieve_async(customer_id)).to_dict()
        if customer.get("deleted"):
            return f"customer {customer_id} is deleted in Stripe"
        metadata = customer.get("metadata") or {}
        if self.is_the_orgs(metadata, org) or self.is_adopted_legacy_customer(metadata, org):
            return None
        return (
            f"customer {customer_id} is not provably org {org.org_id}'s: its metadata has "
            f"org_uid {str(metadata.get('org_uid'))[:40]!r} and "
            f"source {str(metadata.get('source'))[:40]!r}, the org is {org.org_uid!r} "
            f"in {self._settings.billing_source!r}"
        )

    def is_legacy_customer_of(self, metadata: Mapping[str, Any], org: OrgProfile) -> bool:
        """The legacy implementation's customer of the org (docs/legacy-adoption.md).

        `orgUid` is the org's uid, `source` one of `BILLING_LEGACY_SOURCES`, and
        `orgId`, when present, the org's id: what `billing adopt` accepts.
        """
        org_id = metadata.get(LEGACY_ORG_ID_KEY)
        return (
            metadata.get(LEGACY_ORG_UID_KEY) == org.org_uid
            and metadata.get("source") in self._settings.legacy_sources()
            and (org_id is None or str(org_id) == str(org.org_id))
        )

    def is_adopted_legacy_customer(self, metadata: Mapping[str, Any], org: OrgProfile) -> bool:
        """A legacy customer `billing adopt` took over: it added `org_uid` beside the legacy
        `source`, after recording the usage already reported. Only then does provisioning
        link it, so no report runs before that record is in place."""
        return (
            metadata.get("org_uid") == org.org_uid
            and metadata.get("source") in self._settings.legacy_sources()
            and self.is_legacy_customer_of(metadata, org)
        )

    async def customer_metadata(self, customer_id: str) -> dict[str, str] | None:
        """The customer's metadata; None if Stripe has it deleted."""
        customer = (await self._client.v1.customers.retrieve_async(customer_id)).to_dict()
        if customer.get("deleted"):
            return None
        return {str(k): str(v) for k, v in (customer.get("metadata") or {}).items()}

    async def add_customer_metadata(
        self, customer_id: str, keys: Mapping[str, str], *, idempotency_key: str
    ) -> None:
        """Add metadata keys; Stripe merges them, every other key stays as it is."""
        await self._client.v1.customers.update_async(
            customer_id, {"metadata": dict(keys)}, {"idempotency_key": idempotency_key}
        )

    async def customer_org_id(self, customer_id: str) -> str | None:
        """The org a customer belongs to, from its metadata (webhook routing fallback).

        None for another environment's customer (its `source` is not ours).
        """
        try:
            customer = await self._client.v1.customers.retrieve_async(customer_id)
        except stripe.InvalidRequestError:
            return None
        # StripeObject is not a dict in stripe>=15: read metadata from the plain dict.
        metadata = customer.to_dict().get("metadata") or {}
        source = metadata.get("source")
        if source and source != self._settings.billing_source:
            return None
        value = metadata.get("org_id")
        return str(value) if value else None

    # Subscriptions -------------------------------------------------------------

    async def find_live_subscription(self, customer_id: str) -> SubscriptionSnapshot | None:
        read_at = datetime.now(UTC)
        subs = await self._client.v1.subscriptions.list_async(
            {
                "customer": customer_id,
                "status": "all",
                "limit": 100,
                "expand": ["data.test_clock"],
            }
        )
        live = [s for s in subs.data if s.status in LIVE_SUBSCRIPTION_STATUSES]
        if not live:
            return None
        oldest = min(live, key=lambda s: s.created)
        return snapshot_of(oldest.to_dict(), read_at=read_at)

    async def create_subscription(
        self,
        customer_id: str,
        org: OrgProfile,
        *,
        idempotency_key: str | None = None,
        replaces: str | None = None,
    ) -> SubscriptionSnapshot:
        """Create the org's subscription; the key defaults to the workflow's own.

        `replaces`: the org's ended subscription this one follows (it left a
        marketplace); no second trial, and a key of its own.
        """
        s = self._settings
        items: list[SubscriptionCreateParamsItem] = [
            {"price": s.stripe_price_id, "quantity": 1},
            {"price": s.stripe_users_price_id},
            {"price": s.stripe_requests_price_id},
        ]
        params: SubscriptionCreateParams = {
            "customer": customer_id,
            "items": items,
            "metadata": self._identity(org),
            "automatic_tax": {"enabled": s.stripe_automatic_tax},
        }
        if s.stripe_trial_days > 0 and replaces is None:
            params["trial_period_days"] = s.stripe_trial_days
            # Stripe's default (`create_invoice`) is left implicit: the parameters,
            # and so the idempotency key, stay those of earlier versions.
            if s.stripe_trial_end_behavior != "create_invoice":
                params["trial_settings"] = {
                    "end_behavior": {"missing_payment_method": s.stripe_trial_end_behavior}
                }
        key = idempotency_key or subscription_create_key(
            s.billing_source, org.org_id, org.org_uid, params
        )
        if replaces is not None and idempotency_key is None:
            key = f"{key}-after-{replaces}"
        read_at = datetime.now(UTC)
        sub = await self._client.v1.subscriptions.create_async(params, {"idempotency_key": key})
        return snapshot_of(sub.to_dict(), read_at=read_at)

    async def get_subscription(self, subscription_id: str) -> SubscriptionSnapshot:
        read_at = datetime.now(UTC)
        sub = await self._client.v1.subscriptions.retrieve_async(
            subscription_id, {"expand": ["test_clock"]}
        )
        return snapshot_of(sub.to_dict(), read_at=read_at)

    async def set_cancel_at_period_end(
        self, subscription_id: str, cancel: bool, *, idempotency_key: str
    ) -> SubscriptionSnapshot:
        """Ask Stripe to end the subscription when its period ends (or no longer to)."""
        read_at = datetime.now(UTC)
        sub = await self._client.v1.subscriptions.update_async(
            subscription_id,
            {"cancel_at_period_end": cancel, "expand": ["test_clock"]},
            {"idempotency_key": idempotency_key},
        )
        return snapshot_of(sub.to_dict(), read_at=read_at)

    async def cancel_subscription_now(
        self, subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionSnapshot:
        """End the subscription now (a closed org); an ended one is read as it is.

        `invoice_now` bills the usage reported for the period so far at once.
        """
        read_at = datetime.now(UTC)
        current = await self._client.v1.subscriptions.retrieve_async(
            subscription_id, {"expand": ["test_clock"]}
        )
        if current.status in ("canceled", "incomplete_expired"):
            return snapshot_of(current.to_dict(), read_at=read_at)
        await self._client.v1.subscriptions.cancel_async(
            subscription_id, {"invoice_now": True}, {"idempotency_key": idempotency_key}
        )
        return await self.get_subscription(subscription_id)

    async def sync_customer(
        self, customer_id: str, *, name: str, email: str, idempotency_key: str
    ) -> bool:
        """Give the customer this name and email unless it has them; True if it changed."""
        customer = (await self._client.v1.customers.retrieve_async(customer_id)).to_dict()
        if customer.get("name") == name and customer.get("email") == email:
            return False
        await self._client.v1.customers.update_async(
            customer_id, {"name": name, "email": email}, {"idempotency_key": idempotency_key}
        )
        return True

    # Usage ---------------------------------------------------------------------

    async def report_usage(
        self,
        *,
        customer_id: str,
        event_name: str,
        value: int,
        timestamp: datetime,
        identifier: str,
    ) -> MeterOutcome:
        params: MeterEventCreateParams = {
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": identifier,
            "timestamp": int(timestamp.timestamp()),
        }
        try:
            await self._client.v1.billing.meter_events.create_async(
                params, {"idempotency_key": meter_event_key(identifier)}
            )
        except stripe.InvalidRequestError as err:
            if is_duplicate_meter_event(err):
                return "duplicate"
            raise
        return "sent"

    async def meter_id(self, event_name: str) -> str | None:
        """The active meter counting `event_name`, if any."""
        meters = await self._client.v1.billing.meters.list_async({"limit": 100})
        async for meter in meters.auto_paging_iter():
            if meter.event_name == event_name and meter.status == "active":
                return meter.id
        return None

    async def reported_usage(
        self, meter_id: str, customer_id: str, start: datetime, end: datetime
    ) -> int:
        """What the meter holds for the customer from `start` to `end` (Stripe's summary).

        Stripe wants whole minutes: the range is widened to them.
        """
        start_time = int(start.timestamp()) // 60 * 60
        end_time = -(-int(end.timestamp()) // 60) * 60
        if end_time <= start_time:
            return 0
        summaries = await self._client.v1.billing.meters.event_summaries.list_async(
            meter_id,
            {"customer": customer_id, "start_time": start_time, "end_time": end_time},
        )
        total = 0.0
        async for summary in summaries.auto_paging_iter():
            total += float(summary.aggregated_value)
        return int(total)

    # Portal and webhooks -------------------------------------------------------

    async def create_portal_link(self, customer_id: str, *, return_url: str) -> str:
        params: SessionCreateParams = {"customer": customer_id, "return_url": return_url}
        configuration = await self.portal_configuration()
        if configuration:
            params["configuration"] = configuration
        session = await self._client.v1.billing_portal.sessions.create_async(params)
        return session.url

    async def portal_configuration(self) -> str | None:
        """The portal configuration sessions use; None means the account's default.

        With `STRIPE_ALLOW_PROMOTION_CODES`, the portal is the one place our flows
        let a customer enter a promotion code (subscription update, code only), so
        we keep our own configuration with that feature on, found by metadata.
        """
        if not self._settings.stripe_allow_promotion_codes:
            return None
        if self._portal_configuration_id:
            return self._portal_configuration_id
        source = self._settings.billing_source
        found = await self._client.v1.billing_portal.configurations.list_async(
            {"active": True, "limit": 100}
        )
        for config in found.data:
            metadata = config.to_dict().get("metadata") or {}
            if metadata.get("managed_by") == source and metadata.get("promotion_codes") == "on":
                self._portal_configuration_id = config.id
                return config.id
        price = await self._client.v1.prices.retrieve_async(self._settings.stripe_price_id)
        product = price.product if isinstance(price.product, str) else price.product.id
        params: ConfigurationCreateParams = {
            "features": {
                "customer_update": {"enabled": True, "allowed_updates": ["email", "address"]},
                "invoice_history": {"enabled": True},
                "payment_method_update": {"enabled": True},
                "subscription_cancel": {"enabled": True, "mode": "at_period_end"},
                "subscription_update": {
                    "enabled": True,
                    "default_allowed_updates": ["promotion_code"],
                    "products": [{"product": product, "prices": [self._settings.stripe_price_id]}],
                },
            },
            "metadata": {"managed_by": source, "promotion_codes": "on"},
        }
        config = await self._client.v1.billing_portal.configurations.create_async(
            params, {"idempotency_key": portal_configuration_key(source, params)}
        )
        self._portal_configuration_id = config.id
        return config.id

    # Checkout ------------------------------------------------------------------

    async def create_checkout_session(
        self, org: OrgProfile, customer_id: str, mode: CheckoutMode
    ) -> str:
        """A Checkout Session for the org's own customer; returns its URL.

        `subscription`: the three prices, for an org whose subscription ended.
        `setup`: save a card for the trial's end. The org's other open sessions
        are expired first, so at most one can be paid.
        """
        s = self._settings
        identity = self._identity(org)
        await self._expire_open_sessions(customer_id, org)
        params: CheckoutSessionCreateParams = {
            "mode": mode,
            "customer": customer_id,
            "client_reference_id": str(org.org_id),
            "metadata": identity,
            "success_url": s.stripe_checkout_success_url,
            "cancel_url": s.stripe_checkout_cancel_url,
        }
        if mode == "subscription":
            items: list[SessionCreateParamsLineItem] = [
                {"price": s.stripe_price_id, "quantity": 1},
                {"price": s.stripe_users_price_id},
                {"price": s.stripe_requests_price_id},
            ]
            params["line_items"] = items
            params["subscription_data"] = {"metadata": identity}
            if s.stripe_allow_promotion_codes:
                params["allow_promotion_codes"] = True
            if s.stripe_automatic_tax:
                # Tax needs the customer's address: Checkout asks for it and saves it.
                params["automatic_tax"] = {"enabled": True}
                params["billing_address_collection"] = "required"
                params["customer_update"] = {"address": "auto", "name": "auto"}
        else:
            params["currency"] = await self._currency()
            params["setup_intent_data"] = {"metadata": identity}
        session = await self._client.v1.checkout.sessions.create_async(params)
        if not session.url:
            raise ValueError(f"Stripe gave checkout session {session.id} no URL")
        return session.url

    async def _expire_open_sessions(self, customer_id: str, org: OrgProfile) -> None:
        found = await self._client.v1.checkout.sessions.list_async(
            {"customer": customer_id, "status": "open", "limit": 100}
        )
        for session in found.data:
            if self.is_the_orgs(session.to_dict().get("metadata") or {}, org):
                try:
                    await self._client.v1.checkout.sessions.expire_async(session.id)
                except stripe.InvalidRequestError:
                    continue  # completed or expired meanwhile

    async def _currency(self) -> str:
        price = await self._client.v1.prices.retrieve_async(self._settings.stripe_price_id)
        return price.currency

    async def checkout_outcome(
        self, session_id: str, org: OrgProfile, customer_id: str
    ) -> CheckoutOutcome:
        """What a completed session gave the org, once it is proven the org's.

        Proof: the session's customer is the org's, and its metadata names the
        org's `org_uid` and our `source`. A `setup` session's card becomes the
        customer's default payment method (Checkout only attaches it), so the
        trial's end charges it; a subscription a trial without a card paused
        is resumed with it (a new period starts, its invoice charges the card).
        """
        read = await self._client.v1.checkout.sessions.retrieve_async(
            session_id, {"expand": ["setup_intent"]}
        )
        session = read.to_dict()
        subscription_id = _id_of(session.get("subscription"))
        problem = checkout_problem(session, org, customer_id, self._settings.billing_source)
        if problem is not None:
            return CheckoutOutcome(refused=problem, subscription_id=subscription_id)
        mode = str(session.get("mode"))
        if mode == "subscription" and subscription_id:
            return CheckoutOutcome(
                mode=mode, subscription=await self.get_subscription(subscription_id)
            )
        intent = session.get("setup_intent")
        payment_method = _id_of(intent.get("payment_method")) if isinstance(intent, dict) else None
        if mode == "setup" and payment_method:
            await self._client.v1.customers.update_async(
                customer_id,
                {"invoice_settings": {"default_payment_method": payment_method}},
                {"idempotency_key": f"checkout-default-card-{session_id}"},
            )
        live = await self.find_live_subscription(customer_id)
        if mode == "setup" and payment_method and live is not None and live.status == "paused":
            # A trial that ended without a card paused it: with the card, it goes on.
            read_at = datetime.now(UTC)
            # Stripe's default anchor (`now`): a new period starts with the resume.
            resume: SubscriptionResumeParams = {"expand": ["test_clock"]}
            resumed = await self._client.v1.subscriptions.resume_async(
                live.id,
                resume,
                {"idempotency_key": f"checkout-resume-{session_id}"},
            )
            live = snapshot_of(resumed.to_dict(), read_at=read_at)
        return CheckoutOutcome(mode=mode, subscription=live)


def _id_of(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def checkout_problem(
    session: Mapping[str, Any], org: OrgProfile, customer_id: str, source: str
) -> str | None:
    """Why a Checkout Session is not provably the org's completed one (None: it is)."""
    metadata = session.get("metadata") or {}
    named = f"checkout session {session.get('id')}"
    if session.get("status") != "complete":
        return f"{named} is {session.get('status')}, not complete"
    if _id_of(session.get("customer")) != customer_id:
        return (
            f"{named} belongs to customer {_id_of(session.get('customer'))}, "
            f"not to this org's {customer_id}"
        )
    if metadata.get("org_uid") != org.org_uid or metadata.get("source") != source:
        return (
            f"{named} is not provably org {org.org_id}'s: its metadata has org_uid "
            f"{str(metadata.get('org_uid'))[:40]!r} and source {str(metadata.get('source'))[:40]!r}"
        )
    return None


def verify_webhook_signature(payload: bytes, sig_header: str, secret: str) -> dict[str, Any]:
    """Check the signature over the raw body with a 300 s tolerance, then parse it.

    Raises `stripe.SignatureVerificationError` (bad or stale signature) or
    `ValueError` (body not UTF-8 JSON).
    """
    stripe.WebhookSignature.verify_header(
        payload.decode("utf-8"), sig_header, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS
    )
    # orjson: a Stripe event is a few kilobytes of JSON, parsed on every delivery.
    event: dict[str, Any] = orjson.loads(payload)
    return event
