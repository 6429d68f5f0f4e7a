"""Member tokens of the console's identity provider: RS256/ES256 checked with a JWKS.

The JWKS is served over HTTP from a thread of the test, keys are generated with
`cryptography`, and tokens go through the real API (Postgres, Temporal, the
Stripe emulator) to `GET /api/orgs/{org_id}/billing`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
import stripe
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from billing.db.models import User
from billing.jwks import JwksKeys
from stripe_emulator.server import EmulatorServer
from tests.api.support import bearer, free_port, make_api_settings, serve
from tests.factories.orgs import add_member, make_org, make_user

AUDIENCE = "console-api"
ISSUER = "https://idp.example.test/"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        if isinstance(self.private, rsa.RSAPrivateKey):
            text = RSAAlgorithm.to_jwk(self.private.public_key())
        else:
            text = ECAlgorithm.to_jwk(self.private.public_key())
        data: dict[str, Any] = json.loads(text)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Jwks:
    """A JWKS endpoint: the keys it publishes, how often it was asked, and an outage switch."""

    keys: list[SigningKey]
    url: str = ""
    fetches: int = 0
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    state = Jwks(keys=[rsa_key("rsa-1"), ec_key("ec-1")])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.fetches += 1
                down = state.down
                body = json.dumps({"keys": [k.jwk() for k in state.keys]}).encode()
            if down:
                self.send_response(503)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def sign(key: SigningKey, *, kid: str | None = None, **overrides: object) -> str:
    """A token as the identity provider signs it (claims changed or removed with None)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "console-user-1",
        "email": "ada@example.com",
        "org_id": 0,
        "iat": now,
        "exp": now + 600,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    claims.update(overrides)
    payload = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": kid or key.kid})


@dataclass
class Member:
    org_id: int
    user_id: int
    external_id: str
    email: str


def make_member(factory: sessionmaker[Session]) -> Member:
    org = make_org(factory)
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    user = make_user(factory, email=email)
    external_id = f"console-user-{uuid.uuid4().hex[:8]}"
    with factory.begin() as session:
        row = session.get(User, user.id)
        assert row is not None
        row.external_id = external_id
    add_member(factory, org.id, user.id)
    return Member(org.id, user.id, external_id, email)


@dataclass
class Stack:
    http: httpx.AsyncClient
    keys: JwksKeys
    factory: sessionmaker[Session]


def jwks_settings(
    database_url: str, emulator: EmulatorServer, url: str, **more: object
) -> Settings:
    return make_api_settings(
        database_url=database_url,
        stripe_api_base=emulator.url,
        auth_jwks_url=url,
        auth_jwks_audience=AUDIENCE,
        auth_jwks_issuer=ISSUER,
        **more,
    )


@pytest_asyncio.fixture
async def make_stack(
    database_url: str,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
) -> AsyncIterator[Any]:
    """Start the API with JWKS settings (given per test); closed after the test."""
    stacks: list[Any] = []

    async def start(url: str, **more: object) -> Stack:
        app = create_app(
            jwks_settings(database_url, emulator, url, **more),
            temporal_client=temporal_dev_env.client,
            session_factory=session_factory,
            stripe_client=stripe_client,
        )
        context = serve(app)
        http = await context.__aenter__()
        stacks.append(context)
        keys = app.state.services.jwks
        assert isinstance(keys, JwksKeys)
        return Stack(http=http, keys=keys, factory=session_factory)

    yield start
    for context in reversed(stacks):
        await context.__aexit__(None, None, None)


async def billing(stack: Stack, org_id: int, token: str) -> httpx.Response:
    return await stack.http.get(
        f"/api/orgs/{org_id}/billing", headers={"Authorization": f"Bearer {token}"}
    )


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
async def test_rs256_and_es256_tokens_map_sub_to_the_users_external_id(
    make_stack: Any, jwks: Jwks, kid: str
) -> None:
    stack: Stack = await make_stack(jwks.url)
    member = make_member(stack.factory)
    key = next(k for k in jwks.keys if k.kid == kid)

    ok = await billing(
        stack, member.org_id, sign(key, sub=member.external_id, org_id=member.org_id)
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["org_id"] == member.org_id

    # Another user's external id, or none known: the same answer as for a non-member.
    stranger = await billing(stack, member.org_id, sign(key, sub="nobody", org_id=member.org_id))
    assert (stranger.status_code, stranger.json()["detail"]) == (
        403,
        "Not a member of this organization",
    )
    # The org comes from the token: another org's id in the path is refused.
    other = make_org(stack.factory)
    wrong_org = await billing(
        stack, other.id, sign(key, sub=member.external_id, org_id=member.org_id)
    )
    assert wrong_org.status_code == 403


async def test_email_and_a_custom_org_claim_name_the_member(make_stack: Any, jwks: Jwks) -> None:
    stack: Stack = await make_stack(
        jwks.url, auth_jwt_user_claim="email", auth_jwt_org_claim="https://console/org"
    )
    member = make_member(stack.factory)
    key = jwks.keys[0]
    token = sign(
        key,
        email=member.email.upper(),
        sub=None,
        org_id=None,
        **{"https://console/org": str(member.org_id)},
    )
    ok = await billing(stack, member.org_id, token)
    assert ok.status_code == 200, ok.text

    missing = await billing(
        stack, member.org_id, sign(key, email=member.email, org_id=member.org_id)
    )
    assert missing.status_code == 401
    assert missing.json()["detail"] == "Token is missing the 'https://console/org' claim"


async def test_refusals_name_their_reason(make_stack: Any, jwks: Jwks) -> None:
    stack: Stack = await make_stack(jwks.url)
    member = make_member(stack.factory)
    key = jwks.keys[0]
    now = int(time.time())
    good: dict[str, Any] = {"sub": member.external_id, "org_id": member.org_id}

    async def reason(token: str) -> str:
        response = await billing(stack, member.org_id, token)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        detail: str = response.json()["detail"]
        return detail

    assert await reason(sign(key, **good, exp=now - 5, iat=now - 600)) == "Token has expired"
    assert "audience" in await reason(sign(key, **good, aud="someone-else"))
    assert "issuer" in await reason(sign(key, **good, iss="https://evil.example/"))
    assert await reason(sign(key, **good, aud=None)) == "Token is missing the 'aud' claim"
    assert await reason(sign(key, **good, iss=None)) == "Token is missing the 'iss' claim"
    # Signed by a key the provider does not publish, under a published key id.
    impostor = SigningKey("rsa-1", "RS256", rsa.generate_private_key(65537, 2048))
    assert await reason(sign(impostor, **good)) == "Token signature is invalid"
    # An EC key id with an RS256 header: the key's type decides, not the header.
    ec_as_rsa = SigningKey("ec-1", "RS256", impostor.private)
    assert await reason(sign(ec_as_rsa, **good)) == "Token key 'ec-1' is not a RS256 key"
    unsigned = jwt.api_jws.encode(
        json.dumps({**good, "aud": AUDIENCE, "iss": ISSUER}).encode(), "", algorithm="none"
    )
    assert "algorithm is not allowed" in await reason(unsigned)
    no_kid = jwt.encode({**good, "aud": AUDIENCE, "iss": ISSUER}, key.private, algorithm="RS256")
    assert await reason(no_kid) == "Token header has no key id ('kid')"


async def test_unknown_kid_refreshes_once_and_rotation_is_picked_up(
    make_stack: Any, jwks: Jwks
) -> None:
    stack: Stack = await make_stack(jwks.url, auth_jwks_refresh_seconds=0)
    member = make_member(stack.factory)
    good: dict[str, Any] = {"sub": member.external_id, "org_id": member.org_id}

    first = await billing(stack, member.org_id, sign(jwks.keys[0], **good))
    assert first.status_code == 200
    assert jwks.fetches == 1
    # Known keys come from the cache.
    again = await billing(stack, member.org_id, sign(jwks.keys[1], **good))
    assert again.status_code == 200
    assert jwks.fetches == 1

    # The provider rotates: a new key appears; a token naming it triggers one refresh.
    rotated = rsa_key("rsa-2")
    with jwks.lock:
        jwks.keys = [rotated, jwks.keys[1]]
    new = await billing(stack, member.org_id, sign(rotated, **good))
    assert new.status_code == 200, new.text
    assert jwks.fetches == 2

    # A kid the provider never published: refreshed, still unknown, refused with the reason.
    ghost = await billing(stack, member.org_id, sign(rotated, kid="ghost", **good))
    assert ghost.status_code == 401
    assert ghost.json()["detail"] == (
        "Token key id 'ghost' is not among the identity provider's keys (AUTH_JWKS_URL)"
    )
    assert jwks.fetches == 3


async def test_a_flood_of_unknown_kids_costs_the_provider_one_request(
    make_stack: Any, jwks: Jwks
) -> None:
    stack: Stack = await make_stack(jwks.url, auth_jwks_refresh_seconds=60)
    member = make_member(stack.factory)
    good: dict[str, Any] = {"sub": member.external_id, "org_id": member.org_id}
    key = jwks.keys[0]
    assert (await billing(stack, member.org_id, sign(key, **good))).status_code == 200
    assert jwks.fetches == 1

    responses = [
        await billing(stack, member.org_id, sign(key, kid=f"made-up-{i}", **good))
        for i in range(25)
    ]
    assert {r.status_code for r in responses} == {401}
    assert jwks.fetches == 1
    # Known keys keep working meanwhile.
    assert (await billing(stack, member.org_id, sign(key, **good))).status_code == 200


async def test_an_unreachable_provider_is_503_with_the_reason_not_500(
    make_stack: Any, jwks: Jwks
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/jwks.json"
    stack: Stack = await make_stack(nowhere)
    member = make_member(stack.factory)
    token = sign(jwks.keys[0], sub=member.external_id, org_id=member.org_id)
    response = await billing(stack, member.org_id, token)
    assert response.status_code == 503
    assert response.json()["detail"]["title"] == "Identity provider unavailable"
    assert "AUTH_JWKS_URL" in response.json()["detail"]["description"]
    assert response.headers["retry-after"] == "5"
    # Within the refresh interval no new attempt is made, and the answer stays 503.
    again = await billing(stack, member.org_id, token)
    assert again.status_code == 503
    assert stack.keys.fetches == 1

    # An endpoint that answers with an error is the same.
    with jwks.lock:
        jwks.down = True
    down: Stack = await make_stack(jwks.url)
    assert (await billing(down, member.org_id, token)).status_code == 503


async def test_cached_keys_outlive_an_outage_of_the_provider(make_stack: Any, jwks: Jwks) -> None:
    stack: Stack = await make_stack(
        jwks.url, auth_jwks_cache_seconds=0, auth_jwks_refresh_seconds=0
    )
    member = make_member(stack.factory)
    token = sign(jwks.keys[0], sub=member.external_id, org_id=member.org_id)
    assert (await billing(stack, member.org_id, token)).status_code == 200
    with jwks.lock:
        jwks.down = True
    # The cache is stale and the refresh fails: the keys already known stay in use.
    assert (await billing(stack, member.org_id, token)).status_code == 200
    assert jwks.fetches == 2


async def test_hs256_tokens_still_work_beside_the_jwks(make_stack: Any, jwks: Jwks) -> None:
    stack: Stack = await make_stack(jwks.url)
    member = make_member(stack.factory)
    ok = await stack.http.get(
        f"/api/orgs/{member.org_id}/billing", headers=bearer(member.user_id, member.org_id)
    )
    assert ok.status_code == 200, ok.text
    # The JWKS was not needed for it.
    assert jwks.fetches == 0


async def test_without_a_secret_hs256_is_refused_and_jwks_alone_is_enough(
    make_stack: Any, jwks: Jwks
) -> None:
    stack: Stack = await make_stack(jwks.url, auth_jwt_secret="")
    member = make_member(stack.factory)
    hs = await stack.http.get(
        f"/api/orgs/{member.org_id}/billing", headers=bearer(member.user_id, member.org_id)
    )
    assert hs.status_code == 401
    assert "algorithm is not allowed" in hs.json()["detail"]
    token = sign(jwks.keys[1], sub=member.external_id, org_id=member.org_id)
    assert (await billing(stack, member.org_id, token)).status_code == 200
