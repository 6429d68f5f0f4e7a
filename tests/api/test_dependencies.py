"""Every handler and dependency runs on the event loop, none in the thread pool.

FastAPI runs a plain `def` endpoint or dependency in the thread pool: a hop
through a worker thread on every request, which under a burst of webhooks cost
more than the work itself. Blocking work goes through `api.store.bounded`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.main import create_app
from tests.api.support import make_api_settings


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def _runs_on_the_loop(call: Any) -> bool:
    if inspect.iscoroutinefunction(call):
        return True
    # A class instance (e.g. HTTPBearer) with an `async def __call__`.
    return not inspect.isfunction(call) and inspect.iscoroutinefunction(type(call).__call__)


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # Included routers (FastAPI keeps the router itself in `original_router`).
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _api_routes(included.routes)


def test_no_endpoint_or_dependency_runs_in_the_thread_pool() -> None:
    app = create_app(make_api_settings())
    routes = list(_api_routes(app.router.routes))
    assert "/api/webhooks/stripe" in {route.path for route in routes}

    offenders = [
        f"{route.path}: {getattr(call, '__qualname__', call)!r}"
        for route in routes
        for call in (route.endpoint, *_calls(route.dependant))
        if not _runs_on_the_loop(call)
    ]

    assert offenders == []
