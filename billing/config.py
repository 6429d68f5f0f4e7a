"""Settings read from the environment (and `.env`), as listed in docs/configuration.md."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

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
    worker_max_cached_workflows: int = Field(default=1000, ge=0, le=100_000)

    # Operational knobs (not part of the seed's contract).
    backfill_interval_seconds: int = Field(default=300, ge=10)
    usage_report_lead_seconds: int = Field(default=3600, ge=0)
    usage_report_grace_seconds: int = Field(default=300, ge=0)
    resync_interval_seconds: int = Field(default=86400, ge=60)
    # The environment's name: written on every customer and subscription, and part of
    # the customer lookup, idempotency keys and meter identifiers (docs/contracts.md).
    billing_source: str = Field(default="org-billing", pattern=BILLING_SOURCE_PATTERN)
    # A slow client cannot hold the API: headers and each body chunk must arrive in time.
    api_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    api_body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Emulator only: new customers are attached to this test clock (set by `billing dev`).
    stripe_test_clock: str | None = None

    @field_validator("worker_metrics_port", "stripe_activities_per_second", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`WORKER_METRICS_PORT=` (as `.env.example` has it) means no endpoint."""
        return None if isinstance(value, str) and not value.strip() else value

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

    def require_stripe(self) -> None:
        """Fail at startup, naming the variable, instead of at the first request."""
        missing = self.missing_stripe_settings()
        if missing:
            raise StripeNotConfiguredError(missing)


@lru_cache
def get_settings() -> Settings:
    return Settings()
