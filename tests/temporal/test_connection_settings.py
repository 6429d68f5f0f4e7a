"""Temporal's environment configuration, resolved as the Temporal CLI resolves it (no server).

What a process would connect to, and every configuration mistake an operator
can make before a byte goes over the network, each one sentence naming the
variable or file to fix.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from billing.temporal_client import TemporalConfigError, load_target, temporal_environment
from tests.factories.tls import SERVER_NAME, TlsFiles
from tests.temporal.conftest import MakeSettings


def test_without_configuration_the_local_defaults_apply(environment: MakeSettings) -> None:
    target = load_target(environment())

    assert (target.address, target.namespace, target.tls) == ("localhost:7233", "default", False)
    assert target.describe() == "localhost:7233 (namespace default, no TLS)"


def test_the_settings_names_keep_working(environment: MakeSettings) -> None:
    target = load_target(environment(TEMPORAL_ADDRESS="temporal:7233", TEMPORAL_NAMESPACE="prod"))

    assert (target.address, target.namespace, target.tls) == ("temporal:7233", "prod", False)


def test_an_api_key_turns_tls_on_unless_told_otherwise(environment: MakeSettings) -> None:
    settings = environment(
        TEMPORAL_ADDRESS="billing.a1b2c.tmprl.cloud:7233",
        TEMPORAL_NAMESPACE="billing.a1b2c",
        TEMPORAL_API_KEY="key-123",
    )
    target = load_target(settings)

    assert target.api_key == "key-123"
    assert target.tls is True
    assert "key-123" not in repr(target) and "key-123" not in repr(settings)
    assert (
        target.describe()
        == "billing.a1b2c.tmprl.cloud:7233 (namespace billing.a1b2c, TLS, API key)"
    )

    assert load_target(environment(TEMPORAL_TLS="false")).tls is False


def test_mtls_from_files(environment: MakeSettings, tls_files: TlsFiles) -> None:
    target = load_target(
        environment(
            TEMPORAL_ADDRESS="temporal.internal:7233",
            TEMPORAL_TLS_CLIENT_CERT_PATH=str(tls_files.client_cert),
            TEMPORAL_TLS_CLIENT_KEY_PATH=str(tls_files.client_key),
            TEMPORAL_TLS_SERVER_CA_CERT_PATH=str(tls_files.ca),
            TEMPORAL_TLS_SERVER_NAME=SERVER_NAME,
        )
    )

    assert isinstance(target.tls, TLSConfig)
    assert target.tls.client_cert == tls_files.client_cert.read_bytes()
    assert target.tls.client_private_key == tls_files.client_key.read_bytes()
    assert target.tls.server_root_ca_cert == tls_files.ca.read_bytes()
    assert target.tls.domain == SERVER_NAME
    assert target.security == "mTLS"


def test_mtls_from_data(environment: MakeSettings, tls_files: TlsFiles) -> None:
    target = load_target(
        environment(
            TEMPORAL_TLS_CLIENT_CERT_DATA=tls_files.client_cert.read_text(),
            TEMPORAL_TLS_CLIENT_KEY_DATA=tls_files.client_key.read_text(),
        )
    )

    assert isinstance(target.tls, TLSConfig)
    assert target.tls.client_cert == tls_files.client_cert.read_bytes()
    assert target.tls.server_root_ca_cert is None  # the system's roots, as for Temporal Cloud


def test_a_profile_file_and_variables_over_it(
    environment: MakeSettings, tls_files: TlsFiles, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(
        f"""
[profile.default]
address = "localhost:7233"

[profile.prod]
address = "temporal.internal:7233"
namespace = "billing-prod"

[profile.prod.tls]
client_cert_path = "{tls_files.client_cert}"
client_key_path = "{tls_files.client_key}"
server_ca_cert_path = "{tls_files.ca}"
server_name = "{SERVER_NAME}"
"""
    )
    settings = environment(TEMPORAL_CONFIG_FILE=str(config), TEMPORAL_PROFILE="prod")
    target = load_target(settings)

    assert (target.address, target.namespace, target.security) == (
        "temporal.internal:7233",
        "billing-prod",
        "mTLS",
    )
    # A variable wins over the profile, as with the Temporal CLI.
    assert load_target(environment(TEMPORAL_NAMESPACE="billing-staging")).namespace == (
        "billing-staging"
    )


def test_the_default_profile_file_is_read(environment: MakeSettings) -> None:
    folder = Path(os.environ["HOME"]) / ".config" / "temporalio"
    folder.mkdir(parents=True)
    (folder / "temporal.toml").write_text('[profile.default]\naddress = "from-profile:7233"\n')

    assert load_target(environment()).address == "from-profile:7233"
    assert temporal_environment(environment()) == {}  # defaults never hide a profile


@pytest.mark.parametrize(
    "variable", ["TEMPORAL_TLS_CLIENT_CERT_PATH", "TEMPORAL_TLS_SERVER_CA_CERT_PATH"]
)
def test_a_missing_file_is_named(environment: MakeSettings, variable: str) -> None:
    with pytest.raises(TemporalConfigError) as caught:
        load_target(environment(**{variable: "/nowhere/cert.pem"}))

    assert str(caught.value) == f"{variable} names /nowhere/cert.pem, which is not a file."


def test_a_key_that_is_not_the_certificates_is_named(
    environment: MakeSettings, tls_files: TlsFiles
) -> None:
    settings = environment(
        TEMPORAL_TLS_CLIENT_CERT_PATH=str(tls_files.client_cert),
        TEMPORAL_TLS_CLIENT_KEY_PATH=str(tls_files.other_client_key),
    )

    with pytest.raises(TemporalConfigError) as caught:
        load_target(settings)

    assert str(caught.value) == (
        "The client key (TEMPORAL_TLS_CLIENT_KEY_PATH) does not match the client certificate "
        "(TEMPORAL_TLS_CLIENT_CERT_PATH)."
    )


def test_a_certificate_without_its_key(environment: MakeSettings, tls_files: TlsFiles) -> None:
    with pytest.raises(TemporalConfigError, match="set TEMPORAL_TLS_CLIENT_KEY_PATH or _DATA"):
        load_target(environment(TEMPORAL_TLS_CLIENT_CERT_PATH=str(tls_files.client_cert)))


def test_a_file_that_holds_no_certificate(
    environment: MakeSettings, tls_files: TlsFiles, tmp_path: Path
) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")

    with pytest.raises(TemporalConfigError) as caught:
        load_target(environment(TEMPORAL_TLS_SERVER_CA_CERT_PATH=str(junk)))

    assert str(caught.value) == "TEMPORAL_TLS_SERVER_CA_CERT_PATH holds no PEM certificate."


def test_path_and_data_together_are_refused(environment: MakeSettings, tls_files: TlsFiles) -> None:
    settings = environment(
        TEMPORAL_TLS_CLIENT_CERT_PATH=str(tls_files.client_cert),
        TEMPORAL_TLS_CLIENT_CERT_DATA=tls_files.client_cert.read_text(),
    )

    with pytest.raises(TemporalConfigError, match="Cannot specify both"):
        load_target(settings)


def test_an_unknown_profile_is_named(environment: MakeSettings, tmp_path: Path) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text('[profile.default]\naddress = "localhost:7233"\n')

    with pytest.raises(TemporalConfigError, match="Profile 'prod' not found"):
        load_target(environment(TEMPORAL_CONFIG_FILE=str(config), TEMPORAL_PROFILE="prod"))


def test_a_profile_naming_a_missing_file(environment: MakeSettings, tmp_path: Path) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(
        '[profile.default]\naddress = "x:7233"\n[profile.default.tls]\n'
        'client_cert_path = "/nowhere/client.pem"\nclient_key_path = "/nowhere/client.key"\n'
    )

    with pytest.raises(TemporalConfigError) as caught:
        load_target(environment(TEMPORAL_CONFIG_FILE=str(config)))

    assert "Temporal profile 'default'" in str(caught.value)
    assert "/nowhere/client.pem" in str(caught.value)


def test_bad_encryption_keys_never_show_the_key(environment: MakeSettings) -> None:
    from billing.temporal_client import data_converter

    short = base64.b64encode(b"sixteen byte key").decode()
    with pytest.raises(TemporalConfigError) as caught:
        data_converter(environment(BILLING_ENCRYPTION_KEYS=f"kid1:{short}"))

    assert "key 'kid1' is 16 bytes; AES-256 needs 32" in str(caught.value)
    assert short not in str(caught.value)
