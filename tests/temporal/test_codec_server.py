"""`billing codec-server`: the Temporal codec-server protocol, CORS for the UI, and who may ask."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from billing.config import Settings
from billing.encryption import new_key_entry
from tooling.codec_server import CodecServerError, check_startup, create_codec_app

KEYS = f"{new_key_entry('kid2')},{new_key_entry('kid1')}"
UI = "http://127.0.0.1:8233"
TOKEN = "codec-token-0123456789"


def settings(**values: Any) -> Settings:
    return Settings.model_validate(
        {"billing_encryption_keys": KEYS, "billing_codec_cors_origins": UI, **values}
    )


@pytest_asyncio.fixture
async def codec_http() -> AsyncIterator[httpx.AsyncClient]:
    config = settings()
    app = create_codec_app(config, check_startup(config, "127.0.0.1"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as http:
        yield http


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(*data: bytes) -> dict[str, Any]:
    return {
        "payloads": [{"metadata": {"encoding": b64(b"json/plain")}, "data": b64(d)} for d in data]
    }


async def test_encode_then_decode_gives_the_payloads_back(codec_http: httpx.AsyncClient) -> None:
    original = body(b'{"email":"ada@example.com"}', b'"cus_123"')

    encoded = await codec_http.post("/default/encode", json=original)

    assert encoded.status_code == 200, encoded.text
    sealed = encoded.json()["payloads"]
    assert [base64.b64decode(p["metadata"]["encryption-key-id"]) for p in sealed] == [b"kid2"] * 2
    assert "ada@example.com" not in str(base64.b64decode(sealed[0]["data"]))
    decoded = await codec_http.post("/default/decode", json=encoded.json())
    assert decoded.json() == original


async def test_an_empty_list_and_plaintext_pass(codec_http: httpx.AsyncClient) -> None:
    assert (await codec_http.post("/default/decode", json={"payloads": []})).json() == {
        "payloads": []
    }
    assert (await codec_http.post("/default/decode", json=body(b"1"))).json() == body(b"1")


async def test_a_payload_under_an_unknown_key_is_a_400_naming_it(
    codec_http: httpx.AsyncClient,
) -> None:
    other = settings(billing_encryption_keys=new_key_entry("kid9"))
    other_app = create_codec_app(other, check_startup(other, "127.0.0.1"))
    transport = httpx.ASGITransport(app=other_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as elsewhere:
        sealed = (await elsewhere.post("/default/encode", json=body(b"1"))).json()

    response = await codec_http.post("/default/decode", json=sealed)

    assert response.status_code == 400
    assert "key 'kid9'" in response.json()["error"]


async def test_the_ui_origin_may_read_answers_and_others_may_not(
    codec_http: httpx.AsyncClient,
) -> None:
    preflight = await codec_http.options(
        "/default/decode",
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == UI
    assert "x-namespace" in preflight.headers["access-control-allow-headers"]
    answer = await codec_http.post("/default/decode", json=body(b"1"), headers={"Origin": UI})
    assert answer.headers["access-control-allow-origin"] == UI

    stranger = await codec_http.options(
        "/default/decode",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in stranger.headers
    answer = await codec_http.post(
        "/default/decode", json=body(b"1"), headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in answer.headers


async def test_only_json_bodies_are_read(codec_http: httpx.AsyncClient) -> None:
    """A form or text POST (what a page may send without a preflight) is refused."""
    response = await codec_http.post(
        "/default/decode", content=b'{"payloads": []}', headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415

    garbage = await codec_http.post(
        "/default/decode", content=b"[1,2]", headers={"Content-Type": "application/json"}
    )
    assert garbage.status_code == 400


async def test_with_a_token_every_call_must_carry_it() -> None:
    config = settings(billing_codec_server_token=TOKEN)
    app = create_codec_app(config, check_startup(config, "0.0.0.0"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as http:
        missing = await http.post("/default/decode", json=body(b"1"))
        wrong = await http.post(
            "/default/decode", json=body(b"1"), headers={"Authorization": "Bearer nope"}
        )
        right = await http.post(
            "/default/decode", json=body(b"1"), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        preflight = await http.options(
            "/default/decode", headers={"Origin": UI, "Access-Control-Request-Method": "POST"}
        )

    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert preflight.status_code == 204  # browsers send no credentials on a preflight


def test_it_refuses_to_start_without_keys_or_exposed_without_a_token() -> None:
    with pytest.raises(CodecServerError, match="BILLING_ENCRYPTION_KEYS is not set"):
        check_startup(Settings.model_validate({"billing_encryption_keys": None}), "127.0.0.1")
    with pytest.raises(CodecServerError, match=r"Refusing to listen on 0\.0\.0\.0"):
        check_startup(settings(), "0.0.0.0")
    assert check_startup(settings(), "localhost").key_ids == ("kid2", "kid1")
    assert check_startup(settings(billing_codec_server_token=TOKEN), "0.0.0.0").encrypts
