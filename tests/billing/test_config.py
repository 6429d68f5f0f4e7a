"""Settings handed to child processes through the environment come back unchanged."""

from __future__ import annotations

import pytest

from billing.config import Settings


def test_settings_read_back_from_their_environment_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings.model_validate(
        {
            "database_url": "postgresql+psycopg://billing:p%40ss@db:5432/billing",
            "temporal_api_key": "key-with-$pecial=chars",
            "temporal_tls_client_cert_data": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END",
            "stripe_secret_key": "sk_test_123",
            "stripe_webhook_secret": "whsec_abc",
            "stripe_trial_days": 14,
            "stripe_automatic_tax": True,
            "stripe_allow_promotion_codes": False,
            "stripe_activities_per_second": 12.5,
            "api_header_timeout_seconds": 0.75,
            "stripe_api_base": None,
        }
    )
    environment = settings.environment()
    assert "STRIPE_API_BASE" not in environment  # unset stays unset
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert Settings(_env_file=None) == settings
