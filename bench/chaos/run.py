"""One chaos month from start to verdict: stack up, faults on, month driven, invariants counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from billing.auth import TokenRules
from billing.config import Settings
from billing.db.session import make_engine, make_session_factory
from billing.encryption import KEYS_VARIABLE, new_key_entry
from billing.temporal_client import TemporalConfigError, TemporalUnavailableError, connect_client

from . import encryption
from .checks import Checker
from .faults import PLANS, EmulatorControl, FaultInjector
from .metrics import RssSampler, WebhookLatency
from .processes import Stack, create_database
from .report import Report
from .scenario import DeadlineExceeded, Say, Scenario

FINAL_SETTLE_SECONDS = 120.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class ChaosOptions:
    """What to run: how many orgs, which faults, and how long it may take."""

    orgs: int = 100
    seed: int = 1
    faults: str = "full"
    deadline_seconds: float = 600.0
    step_timeout: float = 180.0
    elsewhere_share: float = 0.1
    failing_share: float = 0.1
    workdir: Path | None = None
    keep: bool = False
    capture_histories: Path | None = None
    # Every process encrypts workflow payloads with a fresh key; one more invariant.
    encrypt: bool = False


def _quiet_runtime() -> Runtime:
    """The harness's own client keeps quiet while Temporal is down on purpose."""
    quiet = LoggingConfig(filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))
    return Runtime(telemetry=TelemetryConfig(logging=quiet))


async def _connect(address: str, timeout: float = 60) -> Client:
    """The product's own client (encryption keys from the environment, as the stack's)."""
    deadline = time.monotonic() + timeout
    runtime = _quiet_runtime()
    settings = Settings(temporal_address=address, temporal_namespace="default")
    while True:
        try:
            return await connect_client(settings, runtime=runtime)
        except TemporalConfigError:
            raise
        except TemporalUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds > 0 else "-"


def _requests(stats: dict[str, Any]) -> int:
    return sum(int(n) for n in stats.get("requests", {}).values())


async def _run(options: ChaosOptions, say: Say) -> Report:
    """Start the stack, run the month with faults, count the invariants, stop it all."""
    report = Report(orgs=options.orgs, seed=options.seed, faults=options.faults)
    began = time.monotonic()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="billing-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"chaos month: {options.orgs} orgs, seed {options.seed}, faults {options.faults}")
    say(f"work folder (logs, Temporal and emulator state): {workdir}")
    if options.encrypt:
        # Read by every child of the stack and by the harness's client below.
        os.environ[KEYS_VARIABLE] = new_key_entry("chaos")
        say(f"payloads encrypted: {KEYS_VARIABLE} set for every process")
    database = await asyncio.to_thread(create_database, workdir)
    stack = Stack(workdir, database)
    engine = make_engine(database.url, pool_size=5)
    rss = RssSampler(lambda: stack.workers)
    latency = WebhookLatency()
    injector: FaultInjector | None = None
    try:
        await asyncio.to_thread(stack.start)
        say(
            f"stack up in {time.monotonic() - began:.1f} s: Temporal {stack.temporal_address}, "
            f"emulator {stack.emulator_url}, API {stack.api_url}, {len(stack.workers)} workers"
        )
        client = await _connect(stack.temporal_address)
        stripe_client = stack.stripe()
        emulator = EmulatorControl(stack.emulator_url)
        rss.start()
        plan = PLANS.get(options.faults)
        if plan is not None:
            injector = FaultInjector(stack, plan, options.seed, latency, say)
        scenario = Scenario(
            client=client,
            stripe_client=stripe_client,
            session_factory=make_session_factory(engine),
            emulator=emulator,
            injector=injector,
            clock_id=stack.clock_id,
            rng=random.Random(options.seed),
            deadline=time.monotonic() + options.deadline_seconds,
            say=say,
            step_timeout=options.step_timeout,
            source=stack.values["BILLING_SOURCE"],
            base_price=stack.values["STRIPE_PRICE_ID"],
            api_url=stack.api_url,
            token_rules=TokenRules.of(
                Settings(auth_jwt_secret=stack.values["AUTH_JWT_SECRET"], _env_file=None)
            ),
        )
        before = await asyncio.to_thread(emulator.stats)
        drive_began = time.monotonic()
        if injector is not None:
            injector.start()
        try:
            scenario.plan_orgs(options.orgs, options.elsewhere_share, options.failing_share)
            await scenario.create_orgs(uuid.uuid4().hex[:6])
            await scenario.wait_provisioned()
            scenario.log("orgs provisioned")
            await scenario.create_dashboard_subscriptions()
            await scenario.attach_cards()
            await scenario.drive()
        except DeadlineExceeded as exceeded:
            report.error = f"the run's {options.deadline_seconds:.0f} s bound ran out ({exceeded})"
        finally:
            if injector is not None:
                scenario.log("faults off; every process back up")
                await asyncio.to_thread(injector.stop)
        scenario.deadline = time.monotonic() + FINAL_SETTLE_SECONDS
        with contextlib.suppress(DeadlineExceeded):  # what did not land shows in the checks
            await scenario.settle("the end of the month", None)
        drive_seconds = time.monotonic() - drive_began
        after = await asyncio.to_thread(emulator.stats)
        rss.sample()
        metrics_text = await asyncio.to_thread(stack.api_metrics)
        if metrics_text is not None:
            latency.add_scrape(metrics_text)

        scenario.log("checking the invariants")
        checker = Checker(
            scenario=scenario,
            client=client,
            stripe_client=stripe_client,
            session_factory=make_session_factory(engine),
            prices={
                "users": stack.values["STRIPE_USERS_PRICE_ID"],
                "requests": stack.values["STRIPE_REQUESTS_PRICE_ID"],
            },
            state_file=stack.state_file,
            emulator_stats=after,
            periods_billed=scenario.months_invoiced,
            source=stack.values["BILLING_SOURCE"],
        )
        report.invariants = await checker.run()
        if options.encrypt:
            report.invariants.append(await encryption.check(client, checker.executions))
        p99, p50 = latency.quantile(0.99), latency.quantile(0.5)
        events = after.get("events_emitted", 0) - before.get("events_emitted", 0)
        hooks = after["webhooks"].get("attempted", 0) - before["webhooks"].get("attempted", 0)
        requests = _requests(after) - _requests(before)
        runs = checker.executions
        report.figures = {
            "webhook ack p99": f"{p99 * 1000:.0f} ms (p50 {p50 * 1000:.0f} ms, "
            f"{latency.count:.0f} answers)"
            if p99 is not None and p50 is not None
            else "no webhook answered",
            "events/s": f"{_rate(events, drive_seconds)} ({events} Stripe events)",
            "webhook deliveries/s": f"{_rate(hooks, drive_seconds)} ({hooks} attempts)",
            "Stripe requests/s": f"{_rate(requests, drive_seconds)} ({requests} requests)",
            "worker peak RSS": f"{rss.peak_bytes / MIB:.0f} MiB",
            "largest history length": checker.largest_history(),
            "workflow runs": f"{len(runs)} ({len({e.id for e in runs})} workflows)",
            "month driven in": f"{drive_seconds:.0f} s",
            "whole run": f"{time.monotonic() - began:.0f} s",
        }
        report.notes = {
            "steps settled": f"{sum(s.settled for s in scenario.steps)}/{len(scenario.steps)}",
            "billing periods invoiced": scenario.months_invoiced,
            "manual usage reports": scenario.manual_reports,
            **checker.notes,
        }
        if injector is not None:
            report.fault_counts = dict(injector.log.counts)
            report.notes["Temporal down"] = f"{injector.log.temporal_down_seconds:.0f} s"
        report.unsettled = scenario.unsettled
        if options.capture_histories is not None:
            from .histories import capture

            report.histories = await capture(
                client, checker.executions, scenario.orgs, options.capture_histories
            )
    except Exception as err:
        report.error = f"{type(err).__name__}: {err}"
        raise
    finally:
        rss.stop()
        await asyncio.to_thread(stack.stop)
        engine.dispose()
        if not options.keep:
            database.drop()
            if report.ok and options.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return report


def run_chaos(options: ChaosOptions, say: Say = print) -> Report:
    """Run one chaos month and return its report (the stack is gone when this returns)."""
    return asyncio.run(_run(options, say))
