"""`billing codec-server`: decrypted payloads for the Temporal UI and CLI, on request.

With `BILLING_ENCRYPTION_KEYS` set, Temporal stores ciphertext. The Temporal UI
and the `temporal` CLI ask a codec server to turn payloads back into what the
workflows saw (`--ui-codec-endpoint`, `--codec-endpoint`). This one speaks
their protocol: `POST /{namespace}/encode` and `POST /{namespace}/decode`
with `{"payloads": [{"metadata": {...}, "data": ...}]}`, bytes in base64 (the
protobuf JSON form of `temporal.api.common.v1.Payloads`).

Who may ask (docs/temporal-connection.md, "The codec server"):
- with `BILLING_CODEC_SERVER_TOKEN` set, every encode and decode must carry
  `Authorization: Bearer <token>`, compared in constant time;
- without it, the server only listens on a loopback address, so only programs
  on the same machine reach it, and browsers only get answers for the origins
  in `BILLING_CODEC_CORS_ORIGINS` (the UI's). Bodies must be JSON, which makes
  every cross-origin call a preflighted one.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payload, Payloads

from billing.config import Settings
from billing.encryption import EncryptionCodec, PayloadDecryptionError
from billing.temporal_client import encryption_codec

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
ALLOWED_HEADERS = "authorization, content-type, x-namespace"

Transform = Callable[[Iterable[Payload]], Awaitable[list[Payload]]]


class CodecServerError(Exception):
    """The codec server cannot start as configured; the message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_startup(settings: Settings, host: str) -> EncryptionCodec:
    """The codec to serve, or why serving it would be pointless or unsafe."""
    codec = encryption_codec(settings)
    if not codec.encrypts:
        raise CodecServerError(
            "BILLING_ENCRYPTION_KEYS is not set: there is nothing to encode or decode."
        )
    if settings.billing_codec_server_token is None and not is_loopback(host):
        raise CodecServerError(
            f"Refusing to listen on {host} without BILLING_CODEC_SERVER_TOKEN: anyone who "
            "reaches the port could decrypt payloads. Set a token, or listen on 127.0.0.1."
        )
    return codec


def _origins(settings: Settings) -> frozenset[str]:
    return frozenset(
        origin.strip().rstrip("/")
        for origin in settings.billing_codec_cors_origins.split(",")
        if origin.strip()
    )


def create_codec_app(settings: Settings, codec: EncryptionCodec) -> Starlette:
    """The codec server's routes over `codec`; `check_startup` decides whether to serve it."""
    origins = _origins(settings)
    secret = settings.billing_codec_server_token
    expected = f"Bearer {secret.get_secret_value()}".encode() if secret else None

    def cors(request: Request, response: Response) -> Response:
        origin = request.headers.get("origin", "").rstrip("/")
        if origin and origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Vary"] = "Origin"
        return response

    def error(request: Request, status: int, message: str) -> Response:
        return cors(request, JSONResponse({"error": message}, status_code=status))

    async def preflight(request: Request) -> Response:
        return cors(request, Response(status_code=204))

    async def apply(request: Request, transform: Transform, verb: str) -> Response:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error(request, 401, "A valid `Authorization: Bearer <token>` is required.")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(request, 415, "The body must be JSON (Content-Type: application/json).")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error(request, 413, "The body is too large.")
        try:
            payloads = json_format.Parse(body, Payloads())
        except json_format.ParseError as err:
            return error(request, 400, f"The body is not a payload list: {err}.")
        try:
            result = await transform(payloads.payloads)
        except PayloadDecryptionError as err:
            log.warning("codec %s refused: %s", verb, err)
            return error(request, 400, str(err))
        document = json_format.MessageToDict(Payloads(payloads=result))
        document.setdefault("payloads", [])
        return cors(request, JSONResponse(document))

    async def encode(request: Request) -> Response:
        return await apply(request, codec.encode, "encode")

    async def decode(request: Request) -> Response:
        return await apply(request, codec.decode, "decode")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{namespace}/encode", encode, methods=["POST"]),
            Route("/{namespace}/decode", decode, methods=["POST"]),
            Route("/{path:path}", preflight, methods=["OPTIONS"]),
        ]
    )
