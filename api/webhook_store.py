"""The webhook route's database work, batched across the events in flight.

Routing asks the database two questions per event (which org holds this
customer id, does this org exist) and the route writes one log row per event.
Asked one event at a time, from the thread pool, these were most of the API's
time under a burst of webhooks; here every event in flight shares one round
trip per kind (`api.batching.Batcher`). Callers still get their own answer, and
`record` returns only once the row is committed.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine

from api import store
from api.batching import Batcher
from billing.db import orgs


class WebhookStore:
    """The webhook route's database work: every event in flight shares each round trip.

    `routing_facts` answers what routing asks the database (the org holding a
    customer id, whether an org exists) and `record` writes the log row; each
    returns only once its batch has returned (for `record`: committed).
    """

    def __init__(self, factory: store.SessionFactory) -> None:
        bind = factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("the session factory must be bound to an Engine")
        # Each batch is one statement: in autocommit it is its own transaction, with
        # no BEGIN and COMMIT round trips around it (a written row is committed).
        engine = bind.execution_options(isolation_level="AUTOCOMMIT")

        def lookup(pairs: Sequence[tuple[str | None, int | None]]) -> list[orgs.RoutingFacts]:
            with engine.connect() as connection:
                return orgs.routing_facts(connection, pairs)

        def write(events: Sequence[store.EventRecord]) -> list[None]:
            with engine.connect() as connection:
                store.record_events(connection, events)
            return [None] * len(events)

        self._lookups = Batcher("routing lookups", lookup)
        self._records = Batcher("event log writes", write)

    async def routing_facts(self, customer_id: str | None, org_id: int | None) -> orgs.RoutingFacts:
        return await self._lookups.submit((customer_id, org_id))

    async def record(self, event: store.EventRecord) -> None:
        await self._records.submit(event)
