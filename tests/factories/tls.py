"""A secured Temporal for tests: certificates made on the spot and a TLS proxy that wants mTLS.

The dev server speaks plain gRPC only. `TlsProxy` terminates TLS (ALPN `h2`, as
gRPC requires), demands a client certificate signed by the test CA, and pipes
the decrypted bytes to the dev server, so clients meet what a secured
self-hosted cluster or Temporal Cloud's mTLS endpoint shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROXY_HOST = "127.0.0.1"
SERVER_NAME = "temporal.billing.test"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Authority:
    """A certificate authority that signs server and client certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return _pem_cert(self.cert)

    def issue(self, common_name: str, *, server: bool) -> tuple[bytes, bytes]:
        """A leaf certificate and its key (PEM), for a server name or a client identity."""
        key = _key()
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(common_name),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address(PROXY_HOST)),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem_cert(cert), _pem_key(key)


@dataclass(frozen=True)
class TlsFiles:
    """Everything a secured deployment hands out, written as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_key: Path
    untrusted_client_cert: Path
    untrusted_client_key: Path


def write_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server and a client certificate from it, and a second, unrelated CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = Authority.create("billing test CA")
    other = Authority.create("somebody else's CA")
    server_cert, server_key = ca.issue(SERVER_NAME, server=True)
    client_cert, client_key = ca.issue("billing-worker", server=False)
    untrusted_cert, untrusted_key = other.issue("billing-worker", server=False)
    files = {
        "ca": ca.pem,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_ca": other.pem,
        "other_client_key": _pem_key(_key()),
        "untrusted_client_cert": untrusted_cert,
        "untrusted_client_key": untrusted_key,
    }
    paths: dict[str, Path] = {}
    for name, data in files.items():
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return TlsFiles(**paths)


class TlsProxy:
    """TLS in front (client certificate required), plain TCP to the dev server behind."""

    def __init__(self, files: TlsFiles, backend: str) -> None:
        host, _, port = backend.rpartition(":")
        self._backend = (host or PROXY_HOST, int(port))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.server_cert, files.server_key)
        context.load_verify_locations(files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{PROXY_HOST}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, PROXY_HOST, 0, ssl=self._context, ssl_handshake_timeout=10
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Runs only after a handshake with a trusted client certificate."""
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._backend)
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
        except (OSError, asyncio.CancelledError):
            pass  # the backend is gone, or the proxy is stopping
        finally:
            self._pipes.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class RefusingGrpcServer:
    """A TLS gRPC endpoint that refuses every call's credentials, as Temporal Cloud refuses
    a revoked or mistyped API key: HTTP/2, `grpc-status` 16 (UNAUTHENTICATED).

    It records the `authorization` header it was sent, so a test can see the key arrived.
    """

    def __init__(self, files: TlsFiles) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.server_cert, files.server_key)
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.authorizations: list[str] = []

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{PROXY_HOST}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, PROXY_HOST, 0, ssl=self._context)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        connection.initiate_connection()
        try:
            writer.write(connection.data_to_send())
            while data := await reader.read(65536):
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = {str(k): str(v) for k, v in event.headers or []}
                        self.authorizations.append(headers.get("authorization", ""))
                        connection.send_headers(
                            event.stream_id,
                            [
                                (":status", "200"),
                                ("content-type", "application/grpc"),
                                ("grpc-status", "16"),
                                ("grpc-message", "Request unauthorized."),
                            ],
                            end_stream=True,
                        )
                writer.write(connection.data_to_send())
                await writer.drain()
        except (OSError, asyncio.CancelledError, h2.exceptions.ProtocolError):
            pass
        finally:
            self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()
