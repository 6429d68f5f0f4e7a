"""The service API: the console's backend keeps orgs, members and usage in step.

Authenticated by a service API key (`api.service_auth`). Each route writes
through `billing.db.orgs` (the one owner of org data), commits, then hands the
org's workflow what it must act on: a new org is provisioned, a changed name or
owner reaches the Stripe customer, new or removed marketplace ids start or stop
Stripe billing, a closed org has its subscription ended. Contracts:
docs/contracts.md, section "Service API"; examples: docs/console.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api import store
from api.deps import SessionFactoryDep, SettingsDep, TemporalDep
from api.errors import ErrorPublic, responses, temporal_unavailable
from api.service_auth import require_service_key
from api.temporal import TemporalLink, TemporalUnavailableError, is_unreachable
from billing.config import Settings
from billing.constants import CLOSE_ORG_SIGNAL, ORG_CHANGED_SIGNAL, org_workflow_id
from billing.db import orgs
from billing.domain import (
    BillingStatus,
    MembershipRole,
    OrgCloseCancels,
    OrgCloseSignal,
    row_billing_status,
)
from billing.logging import bind_log_context
from billing.orchestration import StartSignal, start_org_workflow, start_provisioning, tuning_of

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api/orgs",
    tags=["service"],
    dependencies=[Depends(require_service_key)],
)

OrgId = Annotated[
    int,
    Path(
        ge=1,
        le=orgs.MAX_ID,
        description="The console's id of the org",
        openapi_examples={"org": {"summary": "The console's org 42", "value": 42}},
    ),
]
# Routed as `{user_external_id}`: an id holding `/` (an identity provider's
# subject such as `auth0|x/y`) arrives whole, sent as `%2F` or as `/` alike.
UserExternalId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=orgs.MAX_EXTERNAL_ID,
        description="The console's id of the user, percent-encoded (encodeURIComponent); "
        "it may hold `/` (`%2F` and `/` name the same user)",
        openapi_examples={
            "plain": {"summary": "A console user id", "value": "user-1001"},
            "subject": {
                "summary": "An identity provider's subject holding `/` (sent as `%2F`)",
                "value": "auth0|x/y",
            },
        },
    ),
]
SIGNAL_TIMEOUT_SECONDS = 5.0
T = TypeVar("T")


# Models ------------------------------------------------------------------------------


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    """A body that does not fit the route's schema: every problem found."""

    detail: list[ValidationProblem]


class OwnerIn(BaseModel):
    email: str = Field(max_length=orgs.MAX_EMAIL, description="The owner's email (Stripe's too)")
    first_name: str = Field(default="", max_length=orgs.MAX_NAME)
    last_name: str = Field(default="", max_length=orgs.MAX_NAME)


class OrgIn(BaseModel):
    """The org as the console has it; the marketplace ids are null unless billed there."""

    uid: str = Field(max_length=orgs.MAX_UID, description="The console's uid; never changes")
    name: str = Field(max_length=orgs.MAX_NAME)
    owner: OwnerIn
    aws_account_id: str | None = Field(default=None, max_length=orgs.MAX_NAME)
    azure_subscription_id: str | None = Field(default=None, max_length=orgs.MAX_NAME)


class OwnerOut(BaseModel):
    email: str
    first_name: str
    last_name: str


class OrgOut(BaseModel):
    """The org as stored: `billing_status` from its row, `closed_at` once it was closed."""

    id: int
    uid: str
    name: str
    owner: OwnerOut | None
    aws_account_id: str | None
    azure_subscription_id: str | None
    billing_status: BillingStatus
    created_at: datetime
    closed_at: datetime | None


class OrgClosedOut(BaseModel):
    id: int
    closed_at: datetime
    cancels: OrgCloseCancels = Field(description="ORG_CLOSE_CANCELS: how the subscription ends")


class MemberIn(BaseModel):
    email: str = Field(max_length=orgs.MAX_EMAIL)
    first_name: str = Field(default="", max_length=orgs.MAX_NAME)
    last_name: str = Field(default="", max_length=orgs.MAX_NAME)
    role: Literal["owner", "billing_admin", "member"] = "member"


class MemberOut(BaseModel):
    user_external_id: str
    email: str
    first_name: str
    last_name: str
    role: MembershipRole


class UsageIn(BaseModel):
    """Up to 1,000 items `{"id", "count", "at"}`; each is checked on its own."""

    items: list[Any] = Field(max_length=orgs.MAX_USAGE_ITEMS)


class UsageItemOut(BaseModel):
    id: str | None = Field(description="The item's id (null when it had none)")
    outcome: Literal["recorded", "duplicate", "rejected", "late"]
    detail: str | None = None


class UsageOut(BaseModel):
    items: list[UsageItemOut]


def _org_out(summary: orgs.OrgSummary) -> OrgOut:
    owner = None
    if summary.owner_email is not None:
        owner = OwnerOut(
            email=summary.owner_email,
            first_name=summary.owner_first_name,
            last_name=summary.owner_last_name,
        )
    return OrgOut(
        id=summary.id,
        uid=summary.uid,
        name=summary.name,
        owner=owner,
        aws_account_id=summary.aws_account_id,
        azure_subscription_id=summary.azure_subscription_id,
        billing_status=row_billing_status(
            billed_elsewhere=summary.billed_elsewhere,
            stripe_subscription_id=summary.stripe_subscription_id,
            subscription_status=summary.subscription_status,
        ),
        created_at=summary.created_at,
        closed_at=summary.closed_at,
    )


# Plumbing ----------------------------------------------------------------------------


async def _write(factory: store.SessionFactory, work: Callable[[Session], T]) -> T:
    """One transaction in the thread pool; expected refusals become 4xx with the reason."""

    def run() -> T:
        with factory.begin() as session:
            return work(session)

    try:
        return await store.bounded(run)
    except orgs.NotFoundError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(err)) from None
    except orgs.ConflictError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(err)) from None
    except orgs.ServiceError as err:
        raise HTTPException(422, detail=str(err)) from None


async def _client(link: TemporalLink) -> Client:
    try:
        return await link.ready_client()
    except TemporalUnavailableError:
        raise temporal_unavailable("no server") from None


async def _tell(link: TemporalLink, org_id: int, send: Callable[[Client], Any]) -> None:
    """Hand the org's workflow its work; a failure is a 503 (the write is kept: retry)."""
    client = await _client(link)
    try:
        async with asyncio.timeout(SIGNAL_TIMEOUT_SECONDS):
            await send(client)
    except (RPCError, RuntimeError, OSError, TimeoutError) as err:
        if is_unreachable(err):
            link.mark(False, f"{type(err).__name__}: {err}")
        log.warning("Temporal refused the org's work: %s", type(err).__name__)
        raise temporal_unavailable(type(err).__name__) from None
    link.mark(True)


async def _org_changed(link: TemporalLink, settings: Settings, org_id: int) -> None:
    await _tell(
        link,
        org_id,
        lambda client: start_org_workflow(
            client,
            settings.temporal_task_queue,
            org_id,
            signal=StartSignal(ORG_CHANGED_SIGNAL),
            tuning=tuning_of(settings),
        ),
    )


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def _with_examples(
    answers: dict[int | str, dict[str, Any]],
    examples: dict[int, dict[str, dict[str, Any]]],
) -> dict[int | str, dict[str, Any]]:
    """`answers` (OpenAPI responses) with named examples of each code's JSON body."""
    merged = {code: dict(entry) for code, entry in answers.items()}
    for code, named in examples.items():
        merged.setdefault(code, {})["content"] = {"application/json": {"examples": named}}
    return merged


ERRORS = responses(401, 404, 503)
# Routes with a body: one that is not JSON is a 422 (`json_invalid`, with the
# position); only bytes that are not UTF-8 are a 400.
BODY_ERRORS = responses(400, 401, 404, 503)
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorPublic, "description": "Conflicts with the org's state"}
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorPublic | ValidationErrorPublic,
        "description": "A malformed body (a list of problems), or a value that cannot be "
        "stored (one sentence)",
    }
}

UNAUTHORIZED_EXAMPLES = {
    "missing": _example(
        "No key", {"detail": "Missing service API key: send Authorization: Bearer <key>"}
    ),
    "wrong": _example("A key that is not configured", {"detail": "Invalid service API key"}),
    "member": _example(
        "A member's token",
        {"detail": "Member tokens are not accepted here: use a service API key"},
    ),
}
NOT_FOUND_EXAMPLES = {"org": _example("No such org", {"detail": "Org 42 does not exist."})}
NOT_JSON_EXAMPLES = {
    "not_utf8": _example(
        "A body that is not UTF-8", {"detail": "There was an error parsing the body"}
    )
}
UNAVAILABLE_EXAMPLES = {
    "temporal": _example(
        "Temporal did not take the org's work (what was written stays written: retry)",
        {
            "detail": {
                "title": "Temporal unavailable",
                "description": "The Temporal server did not accept the request "
                "(RPCError); retry later.",
            }
        },
    )
}
INVALID_EXAMPLES = {
    "not_json": _example(
        "A body that is not JSON",
        {
            "detail": [
                {
                    "type": "json_invalid",
                    "loc": ["body", 1],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": "Expecting property name enclosed in double quotes"},
                }
            ]
        },
    ),
    "schema": _example(
        "A body that does not fit",
        {
            "detail": [
                {
                    "type": "missing",
                    "loc": ["body", "owner"],
                    "msg": "Field required",
                    "input": {"uid": "2f0c6b1e", "name": "Acme"},
                }
            ]
        },
    ),
    "value": _example(
        "A value that cannot be stored", {"detail": "The org name must not be empty."}
    ),
}
ORG_OUT_EXAMPLE = {
    "id": 42,
    "uid": "2f0c6b1e-7d4a-4a8e-9a61-3f1d2c9b8e70",
    "name": "Acme",
    "owner": {"email": "ada@acme.example", "first_name": "Ada", "last_name": "Lovelace"},
    "aws_account_id": None,
    "azure_subscription_id": None,
    "billing_status": "trialing",
    "created_at": "2026-11-30T12:00:00Z",
    "closed_at": None,
}
MEMBER_OUT_EXAMPLE = {
    "user_external_id": "auth0|x/y",
    "email": "grace@acme.example",
    "first_name": "Grace",
    "last_name": "Hopper",
    "role": "member",
}
COMMON_EXAMPLES = {401: UNAUTHORIZED_EXAMPLES, 404: NOT_FOUND_EXAMPLES, 503: UNAVAILABLE_EXAMPLES}
BODY_EXAMPLES = COMMON_EXAMPLES | {400: NOT_JSON_EXAMPLES, 422: INVALID_EXAMPLES}

PUT_ORG_ANSWERS = _with_examples(
    {
        201: {"model": OrgOut, "description": "Created"},
        **BODY_ERRORS,
        **CONFLICT,
        **INVALID,
    },
    BODY_EXAMPLES
    | {
        200: {"updated": _example("The org existed: updated", ORG_OUT_EXAMPLE)},
        201: {"created": _example("A new org: its billing starts", ORG_OUT_EXAMPLE)},
        409: {
            "uid": _example(
                "Another uid",
                {
                    "detail": "Org 42 has the uid 2f0c6b1e-7d4a-4a8e-9a61-3f1d2c9b8e70, not "
                    "another-uid: an org's uid never changes."
                },
            ),
            "closed": _example(
                "A closed org", {"detail": "Org 42 was closed at 2026-11-30T12:00:00+00:00."}
            ),
        },
    },
)
DELETE_ORG_ANSWERS = _with_examples(
    {**ERRORS, **INVALID},
    COMMON_EXAMPLES
    | {
        202: {
            "closed": _example(
                "Closed; the subscription ends now",
                {"id": 42, "closed_at": "2026-11-30T12:00:00Z", "cancels": "immediately"},
            )
        },
        422: {
            "org_id": _example(
                "An org id out of range",
                {
                    "detail": [
                        {
                            "type": "greater_than_equal",
                            "loc": ["path", "org_id"],
                            "msg": "Input should be greater than or equal to 1",
                            "input": "0",
                            "ctx": {"ge": 1},
                        }
                    ]
                },
            )
        },
    },
)
PUT_MEMBER_ANSWERS = _with_examples(
    {
        201: {"model": MemberOut, "description": "Added"},
        **BODY_ERRORS,
        **CONFLICT,
        **INVALID,
    },
    BODY_EXAMPLES
    | {
        200: {"updated": _example("An existing member, updated", MEMBER_OUT_EXAMPLE)},
        201: {"added": _example("The user joined the org", MEMBER_OUT_EXAMPLE)},
        409: {
            "owner": _example(
                "The owner given another role",
                {
                    "detail": "grace@acme.example owns org 42: make another member the owner "
                    "first (the org keeps exactly one owner)."
                },
            )
        },
    },
)
DELETE_MEMBER_ANSWERS = _with_examples(
    {**ERRORS, **CONFLICT, **INVALID},
    COMMON_EXAMPLES
    | {
        409: {
            "owner": _example(
                "The owner",
                {
                    "detail": "auth0|x/y owns org 42 and cannot be removed: make another "
                    "member the owner first."
                },
            )
        }
    },
)
USAGE_ANSWERS = _with_examples(
    {**BODY_ERRORS, **INVALID},
    BODY_EXAMPLES
    | {
        200: {
            "outcomes": _example(
                "Each item's outcome, in order",
                {
                    "items": [
                        {"id": "req-7-1733000000", "outcome": "recorded", "detail": None},
                        {
                            "id": "req-7-1733000060",
                            "outcome": "duplicate",
                            "detail": "already recorded; nothing added",
                        },
                        {
                            "id": "req-7-1730000000",
                            "outcome": "late",
                            "detail": "period already invoiced: recorded, not billed",
                        },
                        {
                            "id": "req-7-x",
                            "outcome": "rejected",
                            "detail": "count must be an integer",
                        },
                    ]
                },
            )
        },
        422: {
            "too_many": _example(
                "More than 1,000 items",
                {
                    "detail": [
                        {
                            "type": "too_long",
                            "loc": ["body", "items"],
                            "msg": "List should have at most 1000 items after validation, not 1001",
                            "input": [],
                            "ctx": {
                                "field_type": "List",
                                "max_length": 1000,
                                "actual_length": 1001,
                            },
                        }
                    ]
                },
            )
        },
    },
)

ORG_EXAMPLES = {
    "create": {
        "summary": "An org billed through Stripe",
        "value": {
            "uid": "2f0c6b1e-7d4a-4a8e-9a61-3f1d2c9b8e70",
            "name": "Acme",
            "owner": {"email": "ada@acme.example", "first_name": "Ada", "last_name": "Lovelace"},
            "aws_account_id": None,
            "azure_subscription_id": None,
        },
    },
    "marketplace": {
        "summary": "The same org, now billed through AWS Marketplace",
        "value": {
            "uid": "2f0c6b1e-7d4a-4a8e-9a61-3f1d2c9b8e70",
            "name": "Acme",
            "owner": {"email": "ada@acme.example", "first_name": "Ada", "last_name": "Lovelace"},
            "aws_account_id": "123456789012",
            "azure_subscription_id": None,
        },
    },
}
MEMBER_EXAMPLES = {
    "member": {
        "summary": "A member",
        "value": {
            "email": "grace@acme.example",
            "first_name": "Grace",
            "last_name": "Hopper",
            "role": "member",
        },
    },
    "new_owner": {
        "summary": "Make the user the owner (the previous owner becomes a billing admin)",
        "value": {
            "email": "grace@acme.example",
            "first_name": "Grace",
            "last_name": "Hopper",
            "role": "owner",
        },
    },
}
USAGE_EXAMPLES = {
    "batch": {
        "summary": "Two request counts",
        "value": {
            "items": [
                {"id": "req-7-1733000000", "count": 120, "at": "2026-11-30T12:00:00Z"},
                {"id": "req-7-1733000060", "count": 5, "at": "2026-11-30T12:01:00Z"},
            ]
        },
    }
}


# Routes ------------------------------------------------------------------------------


@router.put(
    "/{org_id}",
    response_model=OrgOut,
    status_code=status.HTTP_200_OK,
    responses=PUT_ORG_ANSWERS,
    summary="Create or update an org (service API)",
)
async def put_org(
    org_id: OrgId,
    body: Annotated[OrgIn, Body(openapi_examples=ORG_EXAMPLES)],
    response: Response,
    factory: SessionFactoryDep,
    link: TemporalDep,
    settings: SettingsDep,
) -> OrgOut:
    """201 with the org when it is new (its billing starts), 200 when it existed.

    Idempotent: a repeated PUT changes nothing. A changed name or owner reaches
    the Stripe customer, marketplace ids start or stop Stripe billing, through
    the org's workflow. A uid other than the org's is a 409, as is a closed org.
    """
    bind_log_context(org_id=org_id)
    data = orgs.OrgInput(
        uid=body.uid,
        name=body.name,
        owner=orgs.OwnerInput(
            email=body.owner.email,
            first_name=body.owner.first_name,
            last_name=body.owner.last_name,
        ),
        aws_account_id=body.aws_account_id,
        azure_subscription_id=body.azure_subscription_id,
    )
    result = await _write(factory, lambda s: orgs.put_org(s, org_id, data))
    unbilled = result.org.stripe_subscription_id is None and not result.org.billed_elsewhere
    if result.created or unbilled:
        # New, or not billed yet (a start that failed before is made up for):
        # provisioning starts, or a running workflow is reminded.
        await _tell(link, org_id, lambda client: start_provisioning(client, settings, org_id))
    if not result.created and (result.customer_changed or result.marketplace_changed):
        await _org_changed(link, settings, org_id)
    for other in result.also_changed:
        await _org_changed(link, settings, other)
    if result.created:
        response.status_code = status.HTTP_201_CREATED
    return _org_out(result.org)


@router.delete(
    "/{org_id}",
    response_model=OrgClosedOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=DELETE_ORG_ANSWERS,
    summary="Close an org (service API)",
)
async def delete_org(
    org_id: OrgId, factory: SessionFactoryDep, link: TemporalDep, settings: SettingsDep
) -> OrgClosedOut:
    """202: the org is closed; its workflow ends the subscription (`ORG_CLOSE_CANCELS`).

    Rows are kept. A second DELETE answers 202 again and changes nothing.
    """
    bind_log_context(org_id=org_id)
    closed = await _write(factory, lambda s: orgs.close_org(s, org_id))
    cancels = OrgCloseCancels(settings.org_close_cancels)
    close = OrgCloseSignal(closed_at=closed.closed_at, cancels=cancels)
    if closed.newly:
        await _tell(
            link,
            org_id,
            lambda client: start_org_workflow(
                client,
                settings.temporal_task_queue,
                org_id,
                signal=StartSignal(CLOSE_ORG_SIGNAL, (close,)),
                tuning=tuning_of(settings),
            ),
        )
    else:
        # A workflow still ending the subscription hears it again (no change);
        # one that finished is left alone.
        client = await _client(link)
        try:
            await client.get_workflow_handle(org_workflow_id(org_id)).signal(
                CLOSE_ORG_SIGNAL, close
            )
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise temporal_unavailable(type(err).__name__) from None
    return OrgClosedOut(id=org_id, closed_at=closed.closed_at, cancels=cancels)


@router.put(
    "/{org_id}/members/{user_external_id:path}",
    response_model=MemberOut,
    responses=PUT_MEMBER_ANSWERS,
    summary="Add or update a member (service API)",
)
async def put_member(
    org_id: OrgId,
    user_external_id: UserExternalId,
    body: Annotated[MemberIn, Body(openapi_examples=MEMBER_EXAMPLES)],
    response: Response,
    factory: SessionFactoryDep,
    link: TemporalDep,
    settings: SettingsDep,
) -> MemberOut:
    """201 when the user joins the org, 200 when an existing member was updated.

    `role: owner` makes the user the org's one owner; the previous owner stays
    as a billing admin. The owner cannot be given another role (409): make
    another member the owner first. A change of the owner reaches the Stripe
    customer.
    """
    bind_log_context(org_id=org_id)
    data = orgs.MemberInput(
        email=body.email, first_name=body.first_name, last_name=body.last_name, role=body.role
    )
    result = await _write(factory, lambda s: orgs.put_member(s, org_id, user_external_id, data))
    if result.customer_changed:
        await _org_changed(link, settings, org_id)
    for other in result.also_changed:
        await _org_changed(link, settings, other)
    if result.created:
        response.status_code = status.HTTP_201_CREATED
    m = result.member
    return MemberOut(
        user_external_id=m.user_external_id,
        email=m.email,
        first_name=m.first_name,
        last_name=m.last_name,
        role=m.role,
    )


@router.delete(
    "/{org_id}/members/{user_external_id:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=DELETE_MEMBER_ANSWERS,
    summary="Remove a member (service API)",
)
async def delete_member(
    org_id: OrgId, user_external_id: UserExternalId, factory: SessionFactoryDep
) -> Response:
    """204: the user is no longer a member (also when they were not one). The owner: 409."""
    bind_log_context(org_id=org_id)
    await _write(factory, lambda s: orgs.delete_member(s, org_id, user_external_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{org_id}/usage",
    response_model=UsageOut,
    responses=USAGE_ANSWERS,
    summary="Record request counts (service API)",
)
async def post_usage(
    org_id: OrgId,
    body: Annotated[UsageIn, Body(openapi_examples=USAGE_EXAMPLES)],
    factory: SessionFactoryDep,
) -> UsageOut:
    """Each item answered on its own, in order: `recorded`, `duplicate` (its id was
    recorded before; nothing added), `late` (recorded, but its period is already
    invoiced: not billed) or `rejected` with the reason (a bad item, a closed org).
    Only a malformed envelope (no `items` list, more than 1,000) is a 422.
    """
    bind_log_context(org_id=org_id)
    outcomes = await _write(factory, lambda s: orgs.record_usage_items(s, org_id, body.items))
    return UsageOut(
        items=[UsageItemOut(id=o.id, outcome=o.outcome, detail=o.detail) for o in outcomes]
    )
