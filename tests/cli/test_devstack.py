"""`billing dev` end to end: ready fast, data kept across restarts, nothing left behind.

Starts the real stack (embedded Postgres, Temporal dev server, emulator, worker,
API) as a subprocess on free ports; select with `-m devstack`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

pytestmark = [pytest.mark.devstack, pytest.mark.timeout(120)]

BILLING = str(Path(sys.executable).parent / "billing")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _clean_env(home: Path) -> dict[str, str]:
    """No stack of the developer's: the dev command must choose everything itself."""
    from billing.config import Settings

    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env["BILLING_HOME"] = str(home)
    env["COLUMNS"] = "200"
    return env


class DevProcess:
    def __init__(self, home: Path, ports: list[int], env: dict[str, str], *extra: str) -> None:
        api, temporal, ui, emulator = ports
        self.api_url = f"http://127.0.0.1:{api}"
        self.home = home
        self.output = home.parent / f"dev-{time.monotonic_ns()}.log"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [
                BILLING,
                "dev",
                "--api-port",
                str(api),
                "--temporal-port",
                str(temporal),
                "--ui-port",
                str(ui),
                "--emulator-port",
                str(emulator),
                *extra,
            ],
            env=env,
            stdout=self.output.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output.read_text()
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200:
                    text = self.output.read_text()
                    if "Ready in" in text:
                        return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s:\n{self.output.read_text()}")

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack: the children, and Postgres (detached by pg_ctl)."""
        found: list[psutil.Process] = psutil.Process(self.process.pid).children(recursive=True)
        pid_file = self.home / "pgdata" / "postmaster.pid"
        if pid_file.exists():
            found.append(psutil.Process(int(pid_file.read_text().split()[0])))
            found.extend(found[-1].children(recursive=True))
        return found

    def interrupt(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


def _still_running(processes: list[psutil.Process], timeout: float = 5) -> list[str]:
    """What is left after `timeout` (a zombie waiting to be reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(process.cmdline()))
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _billing(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def dev_home() -> Iterator[Path]:
    """Outside pytest's temp root: concurrent pytest runs reset that root to 0700, and
    the embedded Postgres runs as another user that must traverse the path."""
    base = Path(tempfile.mkdtemp(prefix="billing-dev-test-"))
    yield base / "home"
    shutil.rmtree(base, ignore_errors=True)


def test_dev_starts_keeps_data_and_stops_every_child(dev_home: Path) -> None:
    home = dev_home
    ports = _free_ports(4)
    env = _clean_env(home)

    first = DevProcess(home, ports, env)
    try:
        elapsed = first.wait_ready()
        children = first.processes()
        created = _billing(
            env, "orgs", "create", "--name", "Acme", "--owner-email", "ada@acme.test", "--json"
        )
    finally:
        code = first.interrupt()

    print(f"billing dev ready after {elapsed:.1f} s")
    assert code == 0, first.output.read_text()
    assert created.returncode == 0, created.stderr
    assert len(children) >= 5, [p.pid for p in children]
    assert _still_running(children) == []
    assert (home / "settings.env").is_file()

    second = DevProcess(home, ports, env)
    try:
        second.wait_ready()
        listed = _billing(env, "orgs", "list", "--json")
        children = second.processes()
    finally:
        assert second.interrupt() == 0, second.output.read_text()
    assert [o["name"] for o in json.loads(listed.stdout)] == ["Acme"]
    assert _still_running(children) == []
    # A new home suggests creating an org; a restart uses the org it has.
    fresh, restarted = first.output.read_text(), second.output.read_text()
    assert "orgs create --name Acme" in fresh
    assert "orgs create" not in restarted, restarted
    assert "orgs show 1" in restarted and "token 1 --email ada@acme.test" in restarted
    ui = f"http://127.0.0.1:{ports[2]}/namespaces/default/workflows?query="
    assert f"Running org workflows in the Temporal UI: {ui}ExecutionStatus%3D%22Running" in fresh
    assert f"Orgs with a BillingProblem in the Temporal UI: {ui}ExecutionStatus" in fresh
    assert "%20AND%20BillingProblem%20IS%20NOT%20NULL\n" in fresh


def test_dev_replaces_a_jwt_secret_too_short_for_the_api(dev_home: Path) -> None:
    """A home written when any secret would do: the API refuses one under 32 bytes, so
    `billing dev` makes a new one, and the tokens it mints are accepted."""
    from tooling.home import write_settings_file

    write_settings_file(dev_home, {"AUTH_JWT_SECRET": "short-old-secret"})
    env = _clean_env(dev_home)
    dev = DevProcess(dev_home, _free_ports(4), env)
    try:
        dev.wait_ready()
        created = _billing(
            env, "orgs", "create", "--name", "Acme", "--owner-email", "ada@acme.test", "--json"
        )
        org_id = json.loads(created.stdout)["org"]["id"]
        token = _billing(env, "token", str(org_id), "--email", "ada@acme.test")
        billing = httpx.get(
            f"{dev.api_url}/api/orgs/{org_id}/billing",
            headers={"Authorization": f"Bearer {token.stdout.strip()}"},
            timeout=10,
        )
    finally:
        code = dev.interrupt()

    assert code == 0, dev.output.read_text()
    secret = _dev_settings(dev_home)["AUTH_JWT_SECRET"]
    assert len(secret.encode()) >= 32 and secret != "short-old-secret"
    assert token.returncode == 0, token.stderr
    assert billing.status_code == 200, billing.text


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    ports = _free_ports(4)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[3]))
        busy.listen()
        result = subprocess.run(
            [
                BILLING,
                "dev",
                "--api-port",
                str(ports[0]),
                "--temporal-port",
                str(ports[1]),
                "--ui-port",
                str(ports[2]),
                "--emulator-port",
                str(ports[3]),
            ],
            env=_clean_env(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert result.returncode != 0
    assert f"Port {ports[3]} (Stripe emulator" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()


def _show(env: dict[str, str], org_id: int) -> dict[str, object]:
    shown = _billing(env, "orgs", "show", str(org_id), "--json")
    assert shown.returncode == 0, shown.stderr
    document: dict[str, object] = json.loads(shown.stdout)
    return document


def _wait_for_status(
    env: dict[str, str], org_id: int, status: str, timeout: float = 45
) -> dict[str, object]:
    """Until `orgs show --json` reports `status`, both in the row and the workflow."""
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        last = _show(env, org_id)
        org = last["org"]
        workflow = last["workflow"]
        assert isinstance(org, dict) and isinstance(workflow, dict)
        state = workflow.get("state") or {}
        if org["subscription_status"] == status and state.get("status") == status:
            return last
        time.sleep(0.5)
    raise AssertionError(f"org {org_id} never reached {status}: {last}")


def test_a_failing_card_takes_a_new_org_from_trialing_to_past_due(dev_home: Path) -> None:
    env = _clean_env(dev_home)
    dev = DevProcess(dev_home, _free_ports(4), env)
    try:
        dev.wait_ready()
        children = dev.processes()
        created = _billing(
            env, "orgs", "create", "--name", "Globex", "--owner-email", "hank@globex.test", "--json"
        )
        assert created.returncode == 0, created.stderr
        org_id = int(json.loads(created.stdout)["org"]["id"])

        shown = _wait_for_status(env, org_id, "trialing")
        workflow = shown["workflow"]
        assert isinstance(workflow, dict)
        trial_end = str(workflow["state"]["trial_end"])
        carded = _billing(env, "emulator", "card", str(org_id), "--failing")
        assert carded.returncode == 0, carded.stderr

        # Past the trial end and the invoice's finalization hour: the payment fails.
        from datetime import datetime, timedelta

        target = datetime.fromisoformat(trial_end.replace("Z", "+00:00")) + timedelta(hours=2)
        advanced = _billing(env, "emulator", "advance", "--to", target.isoformat())
        assert advanced.returncode == 0, advanced.stderr
        _wait_for_status(env, org_id, "past_due")
    finally:
        code = dev.interrupt()
    assert code == 0, dev.output.read_text()
    assert _still_running(children) == []


def _dev_settings(home: Path) -> dict[str, str]:
    lines = (home / "settings.env").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip().strip("'\"") for key, value in pairs}


def test_one_advance_across_a_period_end_bills_the_usage_of_that_period(dev_home: Path) -> None:
    """The walkthrough: requests recorded now are billed after one `emulator advance`."""
    from datetime import datetime, timedelta

    from stripe_emulator.client import make_client

    env = _clean_env(dev_home)
    dev = DevProcess(dev_home, _free_ports(4), env)
    try:
        dev.wait_ready()
        created = _billing(
            env,
            "orgs",
            "create",
            "--name",
            "Initech",
            "--owner-email",
            "bill@initech.test",
            "--json",
        )
        assert created.returncode == 0, created.stderr
        org_id = int(json.loads(created.stdout)["org"]["id"])
        shown = _wait_for_status(env, org_id, "trialing")
        workflow = shown["workflow"]
        assert isinstance(workflow, dict)
        trial_end = datetime.fromisoformat(
            str(workflow["state"]["trial_end"]).replace("Z", "+00:00")
        )
        assert _billing(env, "emulator", "card", str(org_id), "--working").returncode == 0
        ended = _billing(
            env, "emulator", "advance", "--to", (trial_end + timedelta(hours=2)).isoformat()
        )
        assert ended.returncode == 0, ended.stderr
        _wait_for_status(env, org_id, "active")

        assert (
            _billing(env, "members", "add", str(org_id), "--email", "peter@initech.test").returncode
            == 0
        )
        recorded = _billing(env, "requests", "record", str(org_id), "--count", "7")
        assert recorded.returncode == 0, recorded.stderr
        period_end = trial_end + timedelta(days=31)  # the first paid month ends within it
        moved = _billing(
            env, "emulator", "advance", "--to", (period_end + timedelta(hours=2)).isoformat()
        )
        assert moved.returncode == 0, moved.stderr
        assert "no final usage report" not in moved.stderr

        settings = _dev_settings(dev_home)
        stripe_client = make_client(settings["STRIPE_API_BASE"], settings["STRIPE_SECRET_KEY"])
        row = json.loads(_billing(env, "orgs", "show", str(org_id), "--json").stdout)["org"]
        quantities = {}
        for invoice in stripe_client.v1.invoices.list({"customer": row["stripe_customer_id"]}).data:
            data = invoice.to_dict()
            for line in data["lines"]["data"]:
                price = line["pricing"]["price_details"]["price"]
                if data["status"] != "draft" and line["period"]["start"] == int(
                    trial_end.timestamp()
                ):
                    quantities[price] = line["quantity"]
        assert quantities[settings["STRIPE_USERS_PRICE_ID"]] == 2
        assert quantities[settings["STRIPE_REQUESTS_PRICE_ID"]] == 7
    finally:
        assert dev.interrupt() == 0, dev.output.read_text()


def test_with_encryption_keys_dev_runs_a_codec_server_for_its_ui(dev_home: Path) -> None:
    from billing.encryption import new_key_entry

    ports = _free_ports(5)
    env = {**_clean_env(dev_home), "BILLING_ENCRYPTION_KEYS": new_key_entry("dev1")}
    dev = DevProcess(dev_home, ports[:4], env, "--codec-port", str(ports[4]))
    try:
        dev.wait_ready()
        codec = f"http://127.0.0.1:{ports[4]}"
        health = httpx.get(f"{codec}/healthz", timeout=2)
        ui_origin = f"http://127.0.0.1:{ports[2]}"
        preflight = httpx.options(
            f"{codec}/default/decode",
            headers={"Origin": ui_origin, "Access-Control-Request-Method": "POST"},
            timeout=2,
        )
        argv = [" ".join(p.cmdline()) for p in dev.processes() if "start-dev" in p.cmdline()]
        ui_settings = httpx.get(f"{ui_origin}/api/v1/settings", timeout=5).json()
        # Another terminal, same home, no keys exported: it reads them from the home's
        # settings, so it decodes the state the worker wrote.
        terminal = _clean_env(dev_home)
        created = _billing(
            terminal, "orgs", "create", "--name", "Sealed", "--owner-email", "ada@sealed.test",
            "--json",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        org_id = int(json.loads(created.stdout)["org"]["id"])
        shown = _wait_for_status(terminal, org_id, "trialing")
    finally:
        assert dev.interrupt() == 0, dev.output.read_text()
    output = dev.output.read_text()
    assert health.status_code == 200
    assert preflight.headers.get("access-control-allow-origin") == ui_origin
    assert len(argv) == 1 and f"--ui-codec-endpoint {codec}/default" in argv[0], argv
    assert ui_settings["Codec"]["Endpoint"] == f"{codec}/default", ui_settings
    assert f"{codec}/default" in output
    assert _dev_settings(dev_home)["BILLING_ENCRYPTION_KEYS"] == env["BILLING_ENCRYPTION_KEYS"]
    workflow = shown["workflow"]
    assert isinstance(workflow, dict) and workflow["state"]["status"] == "trialing"


def test_without_keys_dev_says_how_to_turn_encryption_on(dev_home: Path) -> None:
    ports = _free_ports(4)
    dev = DevProcess(dev_home, ports, _clean_env(dev_home))
    try:
        dev.wait_ready()
        argv = [" ".join(p.cmdline()) for p in dev.processes() if "start-dev" in p.cmdline()]
    finally:
        assert dev.interrupt() == 0, dev.output.read_text()
    assert "BILLING_ENCRYPTION_KEYS=" in dev.output.read_text()
    assert argv and "--ui-codec-endpoint" not in argv[0]


# Supervision: a child killed with SIGKILL comes back, and nothing is lost --------------

SUPERVISED = {
    # Console name -> how to find its process among the stack's.
    "worker": "tooling.cli worker",
    "API": "tooling.cli api",
    "Stripe emulator": "emulator serve",
    "Temporal dev server": "server start-dev",
    "embedded Postgres": "",  # the postmaster, from its pid file
}


def _pid_of(dev: DevProcess, name: str) -> int:
    if not SUPERVISED[name]:
        return int((dev.home / "pgdata" / "postmaster.pid").read_text().split()[0])
    for child in psutil.Process(dev.process.pid).children():
        if SUPERVISED[name] in " ".join(child.cmdline()):
            return int(child.pid)
    raise AssertionError(f"no {name} among the children of billing dev")


def _wait_for_line(dev: DevProcess, *lines: str, timeout: float = 60) -> str:
    """Until the console shows one of `lines`; billing dev must stay up meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = dev.output.read_text()
        for line in lines:
            if line in text:
                return line
        assert dev.process.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(f"never saw {lines}:\n{dev.output.read_text()}")


def _create_org(env: dict[str, str], name: str) -> dict[str, object]:
    """A new org, once its workflow has a Stripe customer and a trialing subscription."""
    email = f"owner@{name.lower().replace(' ', '-')}.test"
    created = _billing(env, "orgs", "create", "--name", name, "--owner-email", email, "--json")
    assert created.returncode == 0, created.stderr
    org_id = int(json.loads(created.stdout)["org"]["id"])
    shown = _wait_for_status(env, org_id, "trialing")
    # A new row is `trialing` by default, and the workflow reports trialing as soon as
    # Stripe answered, a moment before its activity writes the ids to the row.
    deadline = time.monotonic() + 30
    while True:
        org = shown["org"]
        assert isinstance(org, dict)
        if org["stripe_customer_id"] and org["stripe_subscription_id"]:
            return org
        assert time.monotonic() < deadline, f"org {org_id} never got its Stripe ids: {shown}"
        time.sleep(0.2)
        shown = _show(env, org_id)


@pytest.mark.timeout(600)
def test_each_killed_child_is_restarted_and_the_stack_keeps_its_data() -> None:
    """One stack, each child killed in turn: the stack recovers every time.

    One test rather than one per child, so parallel workers never start a
    stack each for what one stack shows.
    """
    base = Path(tempfile.mkdtemp(prefix="billing-dev-test-"))
    home = base / "home"
    env = _clean_env(home)
    dev = DevProcess(home, _free_ports(4), env)
    try:
        dev.wait_ready()
        for name in SUPERVISED:
            _kill_and_recover(dev, env, name)
    finally:
        code = dev.interrupt()
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0


def _kill_and_recover(dev: DevProcess, env: dict[str, str], name: str) -> None:
    from stripe_emulator.client import make_client

    before = _create_org(env, f"Before {name}")
    time.sleep(0.5)  # the emulator writes its state file within 0.2 s
    pid = _pid_of(dev, name)

    os.kill(pid, signal.SIGKILL)

    crashed = "stopped" if name == "embedded Postgres" else "was killed by SIGKILL"
    _wait_for_line(dev, f"The {name} {crashed}; restarting it in")
    _wait_for_line(dev, f"The {name} is back.", f"The {name} is running again.")
    assert _pid_of(dev, name) != pid, name
    deadline = time.monotonic() + 30
    while not _ready(dev) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ready(dev), f"{name}: {dev.output.read_text()}"

    # Rows, the Stripe customer and the workflow from before the kill are all there.
    listed = _billing(env, "orgs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {org["id"]: org for org in json.loads(listed.stdout)}
    assert rows[before["id"]]["stripe_subscription_id"] == before["stripe_subscription_id"]
    settings = _dev_settings(dev.home)
    stripe_client = make_client(settings["STRIPE_API_BASE"], settings["STRIPE_SECRET_KEY"])
    customer = stripe_client.v1.customers.retrieve(str(before["stripe_customer_id"]))
    assert customer.to_dict()["metadata"]["org_id"] == str(before["id"])
    # The workflow answers its query again (once the restarted worker polls).
    _wait_for_status(env, int(str(before["id"])), "trialing")

    # And the whole stack still works: a new org goes all the way to trialing.
    _create_org(env, f"After {name}")


def _ready(dev: DevProcess) -> bool:
    try:
        return httpx.get(f"{dev.api_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_child_that_keeps_crashing_stops_the_stack(dev_home: Path) -> None:
    env = _clean_env(dev_home)
    dev = DevProcess(dev_home, _free_ports(4), env)
    try:
        dev.wait_ready()
        children = dev.processes()
        killed: list[int] = []
        deadline = time.monotonic() + 90
        while dev.process.poll() is None and time.monotonic() < deadline:
            try:
                pid = _pid_of(dev, "worker")
            except (AssertionError, psutil.NoSuchProcess):
                time.sleep(0.1)  # between a crash and its restart, or stopping
                continue
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)
        code = dev.process.wait(30)
    finally:
        if dev.process.poll() is None:
            dev.interrupt()

    output = dev.output.read_text()
    assert code == 1, output
    assert len(killed) == 6, (killed, output)
    assert output.count("The worker was killed by SIGKILL; restarting it in") == 5
    assert "it crashed 6 times within 60 s, so it is not started again" in output
    assert "Traceback" not in output
    assert _still_running(children) == []
