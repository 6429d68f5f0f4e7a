"""The worker's own Prometheus endpoint (`WORKER_METRICS_PORT`), scraped while it works."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.constants import BACKFILL_SCHEDULE_ID, REPORT_USAGE_UPDATE, org_workflow_id
from billing.domain import BillingStatus, UsageReportResult
from billing.orchestration import RETRY_PROVISIONING, start_org_workflow
from stripe_emulator.server import EmulatorServer
from tests.factories.live import free_port
from tests.factories.stack import create_org, eventually, make_settings, wait_for_status
from worker import run_worker

pytestmark = pytest.mark.asyncio
_SAMPLE = re.compile(r"^(\w+)(\{[^}]*\})? ([0-9.eE+-]+)$", re.MULTILINE)


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    found = 0.0
    for metric, label_text, value in _SAMPLE.findall(text):
        if metric == name and all(f'{k}="{v}"' in (label_text or "") for k, v in labels.items()):
            found += float(value)
    return found


async def test_the_worker_serves_sdk_and_billing_metrics(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    settings = make_settings(
        database_url=database_url,
        emulator_url=emulator.url,
        task_queue=task_queue,
        catalog=catalog,
        temporal_address=temporal_dev_env.client.service_client.config.target_host,
        worker_metrics_port=port,
        backfill_interval_seconds=86400,
        # The deprecated variable of older deployments: still accepted, with a warning.
        stripe_activities_per_second=20.0,
    )
    client = temporal_dev_env.client
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="billing.worker")
    running = asyncio.create_task(run_worker(settings, stop=stop))
    try:
        org_id = create_org(session_factory)
        await start_org_workflow(client, task_queue, org_id, signal=RETRY_PROVISIONING)
        await wait_for_status(client, org_id, {BillingStatus.TRIALING})
        report: UsageReportResult = await client.get_workflow_handle(
            org_workflow_id(org_id)
        ).execute_update(REPORT_USAGE_UPDATE, result_type=UsageReportResult)
        sent = sum(p.meter_events_sent for p in report.periods)
        assert sent >= 1  # the owner: one user

        async def scrape() -> str:
            answer = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
            answer.raise_for_status()
            return answer.text

        # Counters reach the exporter asynchronously: wait until ours show the report.
        text = await eventually(
            scrape, lambda t: total(t, "billing_meter_events_sent_total") >= sent, timeout=15
        )
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await client.get_schedule_handle(BACKFILL_SCHEDULE_ID).delete()

    # Ours: every Stripe request of provisioning (search, create, list, create) and the
    # meter events, counted by answer; the budget's waits.
    assert total(text, "billing_stripe_requests_total", status="200") >= 4 + sent
    assert total(text, "billing_stripe_requests_total", status="429") == 0
    assert total(text, "billing_meter_events_sent_total", outcome="sent") == sent
    assert total(text, "billing_stripe_budget_wait_count") >= 4 + sent
    # The SDK's: task latencies, slots and the sticky cache, per task queue.
    assert total(text, "temporal_activity_execution_latency_count", activity_type="db_load_org")
    assert total(text, "temporal_workflow_task_execution_latency_count") > 0
    assert "temporal_worker_task_slots_available" in text
    assert "temporal_sticky_cache_size" in text
    assert any("STRIPE_ACTIVITIES_PER_SECOND is deprecated" in r.message for r in caplog.records)
