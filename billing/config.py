"""Settings read from the environment (and `.env`), as listed in docs/configuration.md."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Letters, digits and `_ . -`: the source is quoted inside Stripe search queries.
BILLING_SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"


class StripeNotConfiguredError(RuntimeError):
    """A Stripe secret the process needs is missing; the message names it."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        names = " and ".join(missing)
        super().__init__(f"Stripe is not configured: set {names}.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "billing"
    # Temporal's own environment configuration, read by the SDK as the Temporal CLI
    # reads it (billing/temporal_client.py; docs/temporal-connection.md).
    temporal_api_key: SecretStr | None = None
    temporal_tls: str | None = None
    temporal_tls_client_cert_path: str | None = None
    temporal_tls_client_cert_data: str | None = None
    temporal_tls_client_key_path: str | None = None
    temporal_tls_client_key_data: SecretStr | None = None
    temporal_tls_server_ca_cert_path: str | None = None
    temporal_tls_server_ca_cert_data: str | None = None
    temporal_tls_server_name: str | None = None
    temporal_config_file: str | None = None
    temporal_profile: str | None = None
    # Payload encryption: "kid2:BASE64,kid1:BASE64", the first encrypts, all decrypt.
    billing_encryption_keys: SecretStr | None = None
    # `billing codec-server`: the bearer token it demands, and the web origins it answers.
    billing_codec_server_token: SecretStr | None = None
    billing_codec_cors_origins: str = "http://localhost:8233,http://127.0.0.1:8233"
    # Members' bearer tokens (billing/auth.py): HS256 secret of at least 32 bytes,
    # the `aud` and `iss` every token must carry, and the longest lifetime accepted.
    auth_jwt_secret: str = ""
    auth_jwt_audience: str = Field(default="org-billing", min_length=1, max_length=255)
    auth_jwt_issuer: str = Field(default="org-billing", min_length=1, max_length=255)
    auth_jwt_max_ttl_seconds: int = Field(default=3600, ge=60, le=86400)
    # Tokens of the console's identity provider (billing/jwks.py): RS256/ES256 verified
    # with the keys at this URL; their `aud`/`iss` (empty: the AUTH_JWT_ ones); the claim
    # naming the user (`sub`: the user's external id, or `email`) and the org.
    auth_jwks_url: str = ""
    auth_jwks_audience: str = Field(default="", max_length=255)
    auth_jwks_issuer: str = Field(default="", max_length=255)
    auth_jwt_user_claim: Literal["sub", "email"] = "sub"
    auth_jwt_org_claim: str = Field(default="org_id", min_length=1, max_length=64)
    # Keys are kept this long, and fetched again on an unknown `kid` at most this often.
    auth_jwks_cache_seconds: float = Field(default=300.0, ge=0, le=86400)
    auth_jwks_refresh_seconds: float = Field(default=30.0, ge=0, le=3600)

    # The service API (console backends): bearer keys, comma-separated so a new
    # key can be added before the old one is removed. Unset: the routes answer 503.
    billing_service_api_keys: SecretStr | None = None
    # What closing an org does to its Stripe subscription: end it now, after a
    # final usage report of the period so far, or at the end of the period.
    org_close_cancels: Literal["immediately", "period_end"] = "immediately"

    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_price_id: str = ""
    stripe_users_price_id: str = ""
    stripe_requests_price_id: str = ""
    # Meter event names; they are part of every meter identifier (at most 100 characters).
    stripe_users_dimension: str = Field(default="additional_users", min_length=1, max_length=48)
    stripe_requests_dimension: str = Field(
        default="additional_requests", min_length=1, max_length=48
    )
    stripe_trial_days: int = Field(default=30, ge=0, le=730)
    stripe_allow_promotion_codes: bool = False
    stripe_automatic_tax: bool = False
    stripe_api_base: str | None = None
    stripe_portal_return_url: str = "http://localhost:3000/settings/billing"
    # Checkout (docs/checkout.md): where Stripe sends the customer after paying
    # (`{CHECKOUT_SESSION_ID}` is filled in by Stripe) or after going back.
    stripe_checkout_success_url: str = (
        "http://localhost:3000/settings/billing?checkout=success&session_id={CHECKOUT_SESSION_ID}"
    )
    stripe_checkout_cancel_url: str = "http://localhost:3000/settings/billing?checkout=canceled"
    # What a trial ending without a payment method does to new subscriptions
    # (Stripe's `trial_settings.end_behavior.missing_payment_method`).
    stripe_trial_end_behavior: Literal["create_invoice", "pause", "cancel"] = "create_invoice"

    # One budget of Stripe requests per second shared by every worker process of
    # the environment (billing/stripe_budget.py): 25 is test mode's limit, live 100.
    stripe_requests_per_second: float = Field(default=25.0, gt=0, le=10_000)
    # Deprecated: the old limit counted Stripe activities, not requests. Accepted
    # so old deployments still start; the worker warns and ignores it.
    stripe_activities_per_second: float | None = Field(default=None, gt=0)
    # The worker's Prometheus endpoint (Temporal SDK metrics and ours); unset: none.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # Org workflows a worker process keeps in memory between tasks (sticky cache).
    worker_max_cached_workflows: int = Field(default=500, ge=0, le=100_000)

    # Operational knobs (not part of the seed's contract).
    backfill_interval_seconds: int = Field(default=300, ge=10)
    usage_report_lead_seconds: int = Field(default=3600, ge=0)
    usage_report_grace_seconds: int = Field(default=300, ge=0)
    resync_interval_seconds: int = Field(default=86400, ge=60)
    # The environment's name: written on every customer and subscription, and part of
    # the customer lookup, idempotency keys and meter identifiers (docs/contracts.md).
    billing_source: str = Field(default="org-billing", pattern=BILLING_SOURCE_PATTERN)
    # Customers of the implementation this one replaces carry metadata `orgId`, `orgUid`
    # and one of these `source`s (comma-separated; empty: none recognized), and are
    # adopted by `billing adopt` (docs/legacy-adoption.md).
    billing_legacy_sources: str = "flotorch_console"
    # A slow client cannot hold the API: headers and each body chunk must arrive in time.
    api_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    api_body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Entitlement (billing/entitlement.py): a past-due org keeps access this long
    # after its first failed payment.
    past_due_grace_days: int = Field(default=7, ge=0, le=365)
    # Notifications to the console (docs/notifications.md): where, signed with what
    # (Standard Webhooks, `whsec_` + base64), and how delivery retries. Unset URL:
    # nothing is recorded or sent.
    billing_notify_url: str | None = None
    billing_notify_secret: SecretStr | None = None
    billing_notify_retry_initial_seconds: float = Field(default=30.0, gt=0, le=86400)
    billing_notify_retry_max_seconds: float = Field(default=3600.0, gt=0, le=86400)
    # Past this age an undelivered notification is recorded as failed (3 days).
    billing_notify_give_up_seconds: float = Field(default=259200.0, gt=0)
    billing_notify_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    billing_notify_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # Emulator only: new customers are attached to this test clock (set by `billing dev`).
    stripe_test_clock: str | None = None

    @field_validator("stripe_checkout_success_url", "stripe_checkout_cancel_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        """Stripe only redirects to absolute http(s) URLs; say so at startup."""
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or len(value) > 5000:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator(
        "worker_metrics_port",
        "stripe_activities_per_second",
        "billing_notify_url",
        "billing_notify_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`WORKER_METRICS_PORT=` (as `.env.example` has it) means no endpoint."""
        return None if isinstance(value, str) and not value.strip() else value

    def legacy_sources(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.billing_legacy_sources.split(",") if p.strip())

    @field_validator("billing_notify_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("BILLING_NOTIFY_URL must be an http:// or https:// URL")
        return value

    def service_api_keys(self) -> list[bytes]:
        """The service API keys (empty entries dropped), as bytes for constant-time compares."""
        if self.billing_service_api_keys is None:
            return []
        raw = self.billing_service_api_keys.get_secret_value()
        return [key.strip().encode() for key in raw.split(",") if key.strip()]

    def missing_stripe_settings(self) -> list[str]:
        missing = []
        if not self.stripe_secret_key:
            missing.append("STRIPE_SECRET_KEY")
        if not self.stripe_webhook_secret:
            missing.append("STRIPE_WEBHOOK_SECRET")
        return missing

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give them back.

        For processes started from this one that read their settings from the
        environment (the worker processes of `billing api --workers N`).
        """
        values: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            values[name.upper()] = str(value)
        return values

    def require_notify(self) -> None:
        """With `BILLING_NOTIFY_URL` set, the secret must be a usable `whsec_` secret."""
        if self.billing_notify_url:
            from billing.notify import signer_of

            signer_of(self)

    def require_stripe(self) -> None:
        """Fail at startup, naming the variable, instead of at the first request."""
        missing = self.missing_stripe_settings()
        if missing:
            raise StripeNotConfiguredError(missing)


@lru_cache
def get_settings() -> Settings:
    return Settings()
