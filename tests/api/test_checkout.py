"""`POST /api/payments/stripe/checkout`: roles, the mode the org's subscription calls for,
the session Stripe gets, and the answers when there is no checkout to give."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import stripe
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from billing.domain import BillingStatus, OrgBillingState, SubscriptionStatus
from billing.stripe_gateway import StripeGateway, make_stripe_client
from stripe_emulator.server import EmulatorServer
from tests.api.conftest import Api
from tests.api.support import bearer, make_api_settings, org_workflow_with_state, serve
from tests.factories.orgs import add_member, make_org_with_member, make_user

URL = "/api/payments/stripe/checkout"
SUCCESS = "https://console.example/billing?paid={CHECKOUT_SESSION_ID}"
CANCEL = "https://console.example/billing"


async def _api(
    settings: Settings,
    env: WorkflowEnvironment,
    factory: sessionmaker[Session],
    emulator: EmulatorServer,
    client: stripe.StripeClient,
) -> AsyncIterator[Api]:
    app = create_app(settings, temporal_client=env.client, session_factory=factory)
    async with serve(app) as http:
        yield Api(app, http, settings, env.client, factory, emulator, client)


@pytest_asyncio.fixture
async def shop(
    database_url: str,
    emulator: EmulatorServer,
    task_queue: str,
    catalog: dict[str, str],
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> AsyncIterator[Api]:
    """The API with the catalog's prices, promotion codes and automatic tax on."""
    settings = make_api_settings(
        database_url=database_url,
        stripe_api_base=emulator.url,
        temporal_task_queue=task_queue,
        stripe_checkout_success_url=SUCCESS,
        stripe_checkout_cancel_url=CANCEL,
        stripe_allow_promotion_codes=True,
        stripe_automatic_tax=True,
        **catalog,
    )
    async for api in _api(settings, temporal_dev_env, session_factory, emulator, stripe_client):
        yield api


def _org(
    api: Api, status: SubscriptionStatus, *, role: str = "owner", **fields: Any
) -> tuple[int, int, str]:
    """An org whose row names a customer and a subscription in `status`; (org, user, customer)."""
    customer = api.stripe.v1.customers.create(
        {"email": "owner@example.com", "metadata": {"source": "org-billing"}}
    ).id
    org, user = make_org_with_member(
        api.session_factory,
        role=role,
        stripe_customer_id=customer,
        stripe_subscription_id=f"sub_{customer}",
        subscription_status=status,
        **fields,
    )
    if role != "owner":
        owner = make_user(api.session_factory)
        add_member(api.session_factory, org.id, owner.id, role="owner")
    return org.id, user.id, customer


def _session(api: Api, url: str) -> stripe.checkout.Session:
    session_id = url.rsplit("/", 1)[-1]
    return api.stripe.v1.checkout.sessions.retrieve(session_id)


def _sessions_created(api: Api) -> int:
    requests = httpx.get(f"{api.emulator.url}/_emulator/stats").json()["requests"]
    return sum(n for k, n in requests.items() if k.startswith("POST /v1/checkout/sessions 200"))


@pytest.mark.parametrize("role", ["owner", "billing_admin"])
@pytest.mark.parametrize(
    "status", [SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED]
)
async def test_an_ended_subscription_gets_a_subscription_session(
    shop: Api, role: str, status: SubscriptionStatus
) -> None:
    org_id, user_id, customer = _org(shop, status, role=role)

    answer = await shop.http.post(URL, headers=bearer(user_id, org_id))

    assert answer.status_code == 200, answer.text
    assert answer.json()["mode"] == "subscription"
    session = _session(shop, answer.json()["url"])
    assert answer.json()["url"] == f"{shop.emulator.url}/c/pay/{session.id}"
    assert session.mode == "subscription" and session.customer == customer
    assert session.success_url == SUCCESS and session.cancel_url == CANCEL
    assert session.allow_promotion_codes is True
    assert session.automatic_tax.enabled is True
    assert session.billing_address_collection == "required"
    with shop.session_factory() as db:
        from billing.db.orgs import org_uid

        uid = org_uid(db, org_id)
    identity = {"org_id": str(org_id), "org_uid": uid, "source": "org-billing"}
    assert session.to_dict()["metadata"] == identity
    items = shop.stripe.v1.checkout.sessions.line_items.list(session.id)
    assert [(i.price.id if i.price else None, i.quantity) for i in items.data] == [
        (shop.settings.stripe_price_id, 1),
        (shop.settings.stripe_users_price_id, None),
        (shop.settings.stripe_requests_price_id, None),
    ]
    # The subscription it makes carries the same identity (subscription_data.metadata).
    paid = httpx.post(
        str(session.url),
        data={"cardNumber": "4242424242424242", "country": "US", "postalCode": "94107"},
    )
    assert paid.status_code == 303
    done = shop.stripe.v1.checkout.sessions.retrieve(session.id)
    sub = shop.stripe.v1.subscriptions.retrieve(str(done.subscription))
    assert sub.to_dict()["metadata"] == identity
    assert sub.automatic_tax.enabled is True


@pytest.mark.parametrize("status", [SubscriptionStatus.TRIALING, SubscriptionStatus.PAUSED])
async def test_a_trialing_or_paused_org_gets_a_setup_session(
    shop: Api, status: SubscriptionStatus
) -> None:
    org_id, user_id, customer = _org(shop, status)

    answer = await shop.http.post(URL, headers=bearer(user_id, org_id))

    assert answer.status_code == 200, answer.text
    assert answer.json()["mode"] == "setup"
    session = _session(shop, answer.json()["url"])
    assert session.mode == "setup" and session.customer == customer
    assert session.currency == "usd" and session.subscription is None
    assert session.to_dict()["metadata"]["org_id"] == str(org_id)


async def test_a_new_session_expires_the_org_s_open_one(shop: Api) -> None:
    org_id, user_id, _ = _org(shop, SubscriptionStatus.CANCELED)
    first = await shop.http.post(URL, headers=bearer(user_id, org_id))
    second = await shop.http.post(URL, headers=bearer(user_id, org_id))

    assert _session(shop, first.json()["url"]).status == "expired"
    assert _session(shop, second.json()["url"]).status == "open"


async def test_the_workflow_state_decides_over_the_row(shop: Api) -> None:
    """The row lags the workflow: its state (here, just canceled) decides the mode."""
    org_id, user_id, customer = _org(shop, SubscriptionStatus.ACTIVE)
    state = OrgBillingState(
        org_id=org_id,
        status=BillingStatus.CANCELED,
        stripe_customer_id=customer,
        stripe_subscription_id=f"sub_{customer}",
        subscription_status=SubscriptionStatus.CANCELED,
    )
    async with org_workflow_with_state(shop.temporal, shop.settings.temporal_task_queue, state):
        answer = await shop.http.post(URL, headers=bearer(user_id, org_id))
    assert answer.status_code == 200 and answer.json()["mode"] == "subscription"


async def test_plain_member_is_403_and_no_session_is_created(shop: Api) -> None:
    org_id, user_id, _ = _org(shop, SubscriptionStatus.CANCELED, role="member")
    before = _sessions_created(shop)

    answer = await shop.http.post(URL, headers=bearer(user_id, org_id))

    assert answer.status_code == 403
    assert _sessions_created(shop) == before


async def test_no_token_is_401(shop: Api) -> None:
    assert (await shop.http.post(URL)).status_code == 401


@pytest.mark.parametrize(
    "status",
    [
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.INCOMPLETE,
    ],
)
async def test_a_live_subscription_is_409_pointing_to_the_portal(
    shop: Api, status: SubscriptionStatus
) -> None:
    org_id, user_id, _ = _org(shop, status)
    before = _sessions_created(shop)

    answer = await shop.http.post(URL, headers=bearer(user_id, org_id))

    assert answer.status_code == 409
    detail = answer.json()["detail"]
    assert f"status {status.value}" in detail["description"]
    assert "/api/payments/stripe/portal" in detail["description"]
    assert _sessions_created(shop) == before


async def test_an_org_not_billed_through_stripe_or_not_set_up_is_409(shop: Api) -> None:
    org_id, user_id, _ = _org(shop, SubscriptionStatus.CANCELED, aws_account_id="123456789012")
    answer = await shop.http.post(URL, headers=bearer(user_id, org_id))
    assert answer.status_code == 409 and "marketplace" in answer.json()["detail"]["description"]

    org, user = make_org_with_member(shop.session_factory, role="owner")
    answer = await shop.http.post(URL, headers=bearer(user.id, org.id))
    assert answer.status_code == 409 and "not set up" in answer.json()["detail"]["description"]


async def test_a_customer_gone_from_stripe_is_404(shop: Api) -> None:
    org, user = make_org_with_member(
        shop.session_factory,
        role="owner",
        stripe_customer_id="cus_gone",
        stripe_subscription_id="sub_gone",
        subscription_status=SubscriptionStatus.CANCELED,
    )
    answer = await shop.http.post(URL, headers=bearer(user.id, org.id))
    assert answer.status_code == 404


async def test_missing_prices_are_named(
    database_url: str,
    emulator: EmulatorServer,
    task_queue: str,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    settings = make_api_settings(
        database_url=database_url, stripe_api_base=emulator.url, temporal_task_queue=task_queue
    )
    async for api in _api(settings, temporal_dev_env, session_factory, emulator, stripe_client):
        org_id, user_id, _ = _org(api, SubscriptionStatus.CANCELED)
        answer = await api.http.post(URL, headers=bearer(user_id, org_id))
        assert answer.status_code == 500
        assert "STRIPE_PRICE_ID" in answer.json()["detail"]["description"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stripe_checkout_success_url", "/billing"),
        ("stripe_checkout_success_url", "ftp://console.example/"),
        ("stripe_checkout_cancel_url", "console.example/billing"),
        ("stripe_trial_end_behavior", "later"),
    ],
)
def test_bad_checkout_settings_are_refused_at_startup(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate({name: value})
    assert name in str(refused.value)


@pytest.mark.parametrize("behavior", ["pause", "cancel", "create_invoice"])
async def test_trial_end_behavior_goes_on_new_subscriptions(
    emulator: EmulatorServer, catalog: dict[str, str], behavior: str
) -> None:
    from billing.domain import OrgProfile

    settings = Settings.model_validate(
        {
            "stripe_secret_key": "sk_test_gateway",
            "stripe_webhook_secret": "whsec_gateway",
            "stripe_api_base": emulator.url,
            "stripe_trial_end_behavior": behavior,
            **catalog,
        }
    )
    client = make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base)
    gateway = StripeGateway(client, settings)
    org = OrgProfile(org_id=1, org_uid="u-1", name="Acme", owner_email="a@example.com")
    customer = await gateway.create_customer(org)

    snapshot = await gateway.create_subscription(customer, org)

    sub = (await client.v1.subscriptions.retrieve_async(snapshot.id)).to_dict()
    assert sub["trial_settings"]["end_behavior"]["missing_payment_method"] == behavior
