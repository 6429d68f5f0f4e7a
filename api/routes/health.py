"""Operations endpoints: liveness, readiness (database and Temporal), Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api import store
from api.deps import MetricsDep, SessionFactoryDep, TemporalDep
from api.errors import answer_example

router = APIRouter(tags=["operations"])

DB_CHECK_TIMEOUT_SECONDS = 3.0


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessPublic(BaseModel):
    """Each dependency's state (`ok` or why not); `unavailable` names the failing ones."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    unavailable: list[str]


@router.get(
    "/healthz",
    response_model=HealthPublic,
    responses=answer_example(200, "The process answers", {"status": "ok"}),
    summary="Liveness",
)
async def healthz() -> HealthPublic:
    """The process answers; says nothing about its dependencies (see /readyz)."""
    return HealthPublic()


async def _check_database(factory: store.SessionFactory) -> str | None:
    try:
        await asyncio.wait_for(run_in_threadpool(store.ping, factory), DB_CHECK_TIMEOUT_SECONDS)
    except Exception as err:
        return f"database did not answer SELECT 1: {type(err).__name__}"
    return None


@router.get(
    "/readyz",
    response_model=ReadinessPublic,
    responses={
        **answer_example(
            200,
            "Ready",
            {"status": "ready", "checks": {"database": "ok", "temporal": "ok"}, "unavailable": []},
        ),
        503: {
            "model": ReadinessPublic,
            "description": "A dependency is unavailable",
            **answer_example(
                503,
                "Temporal does not answer",
                {
                    "status": "unavailable",
                    "checks": {
                        "database": "ok",
                        "temporal": "Temporal is not reachable at temporal.internal:7233 "
                        "(namespace billing-prod, mTLS): no answer within 10 s.",
                    },
                    "unavailable": ["temporal"],
                },
            )[503],
        },
    },
    summary="Readiness",
)
async def readyz(factory: SessionFactoryDep, link: TemporalDep) -> JSONResponse:
    """Ready when the database answers `SELECT 1` and the Temporal server answers a health check."""
    database, temporal = await asyncio.gather(_check_database(factory), link.check())
    failures = {"database": database, "temporal": temporal}
    unavailable = [name for name, reason in failures.items() if reason is not None]
    body = ReadinessPublic(
        status="unavailable" if unavailable else "ready",
        checks={name: reason or "ok" for name, reason in failures.items()},
        unavailable=unavailable,
    )
    code = status.HTTP_503_SERVICE_UNAVAILABLE if unavailable else status.HTTP_200_OK
    return JSONResponse(body.model_dump(), status_code=code)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
    summary="Prometheus metrics",
)
async def metrics(billing_metrics: MetricsDep) -> Response:
    """This process's metrics in Prometheus' text format."""
    body, content_type = billing_metrics.render()
    return Response(content=body, media_type=content_type)
