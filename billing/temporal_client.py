"""How every process connects to Temporal: one function, Temporal's own configuration.

`connect_client(settings)` is the only way the API, the worker, the CLI,
`billing dev` and the benchmarks get a client. It reads Temporal's environment
configuration through `temporalio.envconfig`, the code the Temporal CLI and the
other SDKs share: `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`,
`TEMPORAL_TLS`, `TEMPORAL_TLS_CLIENT_CERT_PATH`/`_DATA`,
`TEMPORAL_TLS_CLIENT_KEY_PATH`/`_DATA`, `TEMPORAL_TLS_SERVER_CA_CERT_PATH`/`_DATA`,
`TEMPORAL_TLS_SERVER_NAME`, and a TOML profile from `TEMPORAL_CONFIG_FILE` (or
the default path) chosen by `TEMPORAL_PROFILE`. Variables override the profile.
The values come from `Settings`, so `.env` and `billing dev`'s home settings
work for them as for every other setting.

Every client carries the pydantic data converter and, when
`BILLING_ENCRYPTION_KEYS` is set, the encryption codec (billing/encryption.py).

Anything that goes wrong is a `TemporalUnavailableError` with one sentence
that says what to fix; `TemporalConfigError`, its subclass, means retrying
will not help (a missing file, a key that does not match its certificate, a
server certificate the CA does not vouch for, refused credentials). See
docs/temporal-connection.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from billing.config import Settings
from billing.encryption import EncryptionCodec, EncryptionKeyError, parse_keys

CONNECT_TIMEOUT_SECONDS = 10.0

# Settings fields that are Temporal's own variables, handed to envconfig under their names.
_TEMPORAL_FIELDS = (
    "temporal_address",
    "temporal_namespace",
    "temporal_api_key",
    "temporal_tls",
    "temporal_tls_client_cert_path",
    "temporal_tls_client_cert_data",
    "temporal_tls_client_key_path",
    "temporal_tls_client_key_data",
    "temporal_tls_server_ca_cert_path",
    "temporal_tls_server_ca_cert_data",
    "temporal_tls_server_name",
    "temporal_config_file",
    "temporal_profile",
)
# These have defaults in Settings; only a value someone set may override a profile.
_DEFAULTED_FIELDS = frozenset({"temporal_address", "temporal_namespace"})
_PATH_VARIABLES = (
    "TEMPORAL_TLS_CLIENT_CERT_PATH",
    "TEMPORAL_TLS_CLIENT_KEY_PATH",
    "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
    "TEMPORAL_CONFIG_FILE",
)


class TemporalUnavailableError(RuntimeError):
    """Temporal cannot be used right now; the message says why in one sentence."""


class TemporalConfigError(TemporalUnavailableError):
    """The connection settings are wrong: retrying will not help until they are fixed."""


@dataclass(frozen=True)
class TemporalTarget:
    """Where and how to connect, once the environment and profile are resolved."""

    address: str
    namespace: str
    tls: bool | TLSConfig
    api_key: str | None = field(default=None, repr=False)
    rpc_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def security(self) -> str:
        """Plain words for the transport: what an operator checks first."""
        if self.tls is False:
            kind = "no TLS"
        elif isinstance(self.tls, TLSConfig) and self.tls.client_cert:
            kind = "mTLS"
        else:
            kind = "TLS"
        return f"{kind}, API key" if self.api_key else kind

    def describe(self) -> str:
        return f"{self.address} (namespace {self.namespace}, {self.security})"


def temporal_environment(settings: Settings) -> dict[str, str]:
    """The `TEMPORAL_*` variables as the settings hold them, for envconfig to read."""
    env: dict[str, str] = {}
    for name in _TEMPORAL_FIELDS:
        if name in _DEFAULTED_FIELDS and name not in settings.model_fields_set:
            continue
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value:
            env[name.upper()] = str(value)
    return env


def _check_files(env: Mapping[str, str]) -> None:
    for variable in _PATH_VARIABLES:
        path = env.get(variable)
        if path is None:
            continue
        if not Path(path).is_file():
            raise TemporalConfigError(f"{variable} names {path}, which is not a file.")
        if not os.access(path, os.R_OK):
            raise TemporalConfigError(f"{variable} names {path}, which this process cannot read.")


def _origin(env: Mapping[str, str], what: str, profile: str) -> str:
    """Where a TLS item came from, to name it in an error."""
    for suffix in ("_PATH", "_DATA"):
        if f"TEMPORAL_TLS_{what}{suffix}" in env:
            return f"TEMPORAL_TLS_{what}{suffix}"
    return f"the {what.lower().replace('_', ' ')} of Temporal profile '{profile}'"


def _check_tls(tls: TLSConfig, env: Mapping[str, str], profile: str) -> None:
    """Certificates parse and the client key belongs to the client certificate."""
    cert_from = _origin(env, "CLIENT_CERT", profile)
    key_from = _origin(env, "CLIENT_KEY", profile)
    if tls.server_root_ca_cert is not None:
        try:
            x509.load_pem_x509_certificates(tls.server_root_ca_cert)
        except ValueError:
            ca_from = _origin(env, "SERVER_CA_CERT", profile)
            raise TemporalConfigError(f"{ca_from} holds no PEM certificate.") from None
    if (tls.client_cert is None) != (tls.client_private_key is None):
        given, missing = (
            (cert_from, "TEMPORAL_TLS_CLIENT_KEY_PATH or _DATA")
            if tls.client_cert
            else (key_from, "TEMPORAL_TLS_CLIENT_CERT_PATH or _DATA")
        )
        raise TemporalConfigError(
            f"{given} is set but not its pair: mTLS needs the client certificate and its "
            f"key; set {missing}."
        )
    if tls.client_cert is None or tls.client_private_key is None:
        return
    try:
        cert = x509.load_pem_x509_certificates(tls.client_cert)[0]
    except ValueError:
        raise TemporalConfigError(f"{cert_from} holds no PEM certificate.") from None
    try:
        key = serialization.load_pem_private_key(tls.client_private_key, password=None)
    except (ValueError, TypeError):
        raise TemporalConfigError(f"{key_from} holds no unencrypted PEM private key.") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if cert.public_key().public_bytes(pem, raw) != key.public_key().public_bytes(pem, raw):
        raise TemporalConfigError(
            f"The client key ({key_from}) does not match the client certificate ({cert_from})."
        )


def load_target(settings: Settings) -> TemporalTarget:
    """Resolve the environment and the profile as the Temporal CLI does, or say what is wrong."""
    env = temporal_environment(settings)
    _check_files(env)
    profile_name = settings.temporal_profile or "default"
    try:
        profile = ClientConfigProfile.load(profile=settings.temporal_profile, override_env_vars=env)
        config = profile.to_client_connect_config()
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise TemporalConfigError(
            f"A file named by Temporal profile '{profile_name}' cannot be read{where}: "
            f"{error.strerror or error}."
        ) from None
    except (RuntimeError, ValueError, TypeError) as error:
        raise TemporalConfigError(
            f"Temporal's connection settings are invalid: {str(error).rstrip('.')}."
        ) from None
    tls = config.get("tls", False)
    if isinstance(tls, TLSConfig):
        _check_tls(tls, env, profile_name)
    return TemporalTarget(
        address=config.get("target_host") or settings.temporal_address,
        namespace=config.get("namespace") or settings.temporal_namespace,
        tls=tls,
        api_key=config.get("api_key"),
        rpc_metadata=dict(config.get("rpc_metadata") or {}),
    )


def encryption_codec(settings: Settings) -> EncryptionCodec:
    """The codec for `BILLING_ENCRYPTION_KEYS`; with none set it encrypts nothing."""
    value = settings.billing_encryption_keys
    try:
        return EncryptionCodec(parse_keys(value.get_secret_value() if value else ""))
    except EncryptionKeyError as error:
        raise TemporalConfigError(str(error)) from None


def data_converter(settings: Settings) -> DataConverter:
    """Pydantic payloads; encrypted, failure messages included, when keys are set.

    The codec is there even without keys, so a payload encrypted elsewhere is an
    error that names its key id rather than an unknown encoding.
    """
    codec = encryption_codec(settings)
    if not codec.encrypts:
        return dataclasses.replace(pydantic_data_converter, payload_codec=codec)
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


# What the SDK's core says when the server's certificate or our credentials are refused.
_SERVER_CERT_UNTRUSTED = ("UnknownIssuer", "UnknownCA", "BadSignature")
_CLIENT_CERT_REFUSED = (
    "CertificateRequired",
    "BadCertificate",
    "CertificateUnknown",
    "AccessDenied",
    "HandshakeFailure",
)
# The connection dropped just after the handshake: with TLS 1.3 that is how a
# server that refuses the client certificate looks from the client.
_DROPPED = (
    "close_notify",
    "UnexpectedEof",
    "BrokenPipe",
    "ConnectionReset",
    "connection closed",
)


def _reason(message: str, target: TemporalTarget) -> tuple[str, bool]:
    """One sentence for a failed connect, and whether it is the configuration's fault."""

    def has(*needles: str) -> bool:
        return any(needle in message for needle in needles)

    tls = target.tls is not False
    if has(*_SERVER_CERT_UNTRUSTED):
        return (
            "the server's certificate is not signed by a CA this process trusts; set "
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH to the CA that signed it",
            True,
        )
    if has("NotValidForName"):
        return (
            "the server's certificate is not valid for that name; set TEMPORAL_TLS_SERVER_NAME "
            "to a name the certificate holds",
            True,
        )
    if has("Expired"):
        return "a certificate has expired", True
    if has("KeyMismatch"):
        return "the client key does not match the client certificate", True
    if has("InvalidContentType", "CorruptMessage", "InvalidMessage"):
        return "the server does not speak TLS; set TEMPORAL_TLS=false", True
    if has("Unauthenticated", "PermissionDenied"):
        if target.api_key:
            return (
                "the server refused the API key (TEMPORAL_API_KEY): it is wrong, expired or "
                f"not allowed on namespace {target.namespace}",
                True,
            )
        return "the server refused this client's credentials", True
    if tls and (has(*_CLIENT_CERT_REFUSED) or (has("after connection") and has(*_DROPPED))):
        if isinstance(target.tls, TLSConfig) and target.tls.client_cert is not None:
            return (
                "the server refused our client certificate (is it signed by the CA the server "
                "trusts for clients?)",
                True,
            )
        return (
            "the server closed the TLS handshake: it requires a client certificate; set "
            "TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH",
            True,
        )
    if not tls and has("after connection") and has(*_DROPPED, "broken pipe"):
        return "the server closed the connection; if it requires TLS set TEMPORAL_TLS=true", True
    if has("ConnectionRefused", "Connection refused"):
        return "nothing is listening there", False
    if has("dns error"):
        return "the host name does not resolve", False
    detail = message.removeprefix("Failed client connect: ").splitlines()[0][:200]
    return detail or "the connection failed", False


async def connect_client(
    settings: Settings,
    *,
    timeout: float = CONNECT_TIMEOUT_SECONDS,
    runtime: Runtime | None = None,
) -> Client:
    """A connected client for these settings, within `timeout` seconds, or a clear error."""
    target = load_target(settings)
    converter = data_converter(settings)
    try:
        return await asyncio.wait_for(
            Client.connect(
                target.address,
                namespace=target.namespace,
                api_key=target.api_key,
                tls=target.tls,
                rpc_metadata=target.rpc_metadata,
                data_converter=converter,
                runtime=runtime,
            ),
            timeout,
        )
    except TimeoutError:
        raise TemporalUnavailableError(
            f"Temporal is not reachable at {target.describe()}: no answer within {timeout:g} s."
        ) from None
    except (RuntimeError, OSError) as error:
        reason, config_fault = _reason(str(error), target)
        if config_fault:
            raise TemporalConfigError(
                f"Temporal at {target.describe()} cannot be used: {reason}."
            ) from error
        raise TemporalUnavailableError(
            f"Temporal is not reachable at {target.describe()}: {reason}."
        ) from error
