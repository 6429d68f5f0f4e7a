"""The Temporal UI screenshots of docs/operations.md "Finding stuck orgs", from a real run.

Starts `billing dev` in a fresh home on free ports, makes two orgs stuck beside
a healthy one, and opens the Temporal UI in headless Chromium:

- Globex pays with a declined card; past its trial it is `past_due`
  (`payment_failed`);
- Initech's row names a customer of another environment (a database restored
  from staging), so provisioning stops (`adoption_refused`).

It saves `stuck-orgs-list.png` (the list `billing dev` links to: running org
workflows with a `BillingProblem`) and `stuck-org-details.png` (Globex's
workflow, with its current details), prints what `billing orgs list --problem`
says, and stops the stack. Needs Chromium (`apt-get install -y chromium`) and
the dev extra (Playwright).

    .venv/bin/python bench/stuck_org_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import stripe
from sqlalchemy.engine import make_url

from billing.config import Settings
from billing.constants import org_workflow_id
from billing.problems import PROBLEM_ORGS_QUERY
from billing.temporal_client import connect_client
from tooling.devstack import workflows_link

BILLING = str(Path(sys.executable).parent / "billing")
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
# The workflow page below the navigation: its header and the metadata panels.
DETAILS_CLIP = {"x": 256, "y": 48, "width": 1024, "height": 600}
ROOT = Path(__file__).resolve().parent.parent
# The UI's workflow list columns (its own setting, kept in the browser): the
# billing search attributes instead of the run id and the type.
COLUMNS = [
    {"label": "Status", "pinned": True},
    {"label": "Workflow ID", "pinned": True},
    {"label": "BillingStatus", "pinned": False},
    {"label": "BillingProblem", "pinned": False},
    {"label": "StripeCustomerId", "pinned": False},
    {"label": "Start", "pinned": False},
]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Stack:
    """`billing dev` in a home of its own; `billing ...` commands against it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.api, self.temporal, self.ui, self.emulator = free_ports(4)
        self.env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
        self.env.update({"BILLING_HOME": str(home), "COLUMNS": "160"})
        self.log = home.parent / "dev.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        ports = {
            "--api-port": self.api,
            "--temporal-port": self.temporal,
            "--ui-port": self.ui,
            "--emulator-port": self.emulator,
        }
        self.process = subprocess.Popen(
            [BILLING, "dev", *(str(part) for pair in ports.items() for part in pair)],
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while "Ready in" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"billing dev did not start:\n{self.log.read_text()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(60)

    def billing(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [BILLING, *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and done.returncode != 0:
            raise SystemExit(f"billing {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def settings(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for line in self.billing("dev", "env").splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                values[key] = value.strip("'")
        return values

    def create_org(self, name: str, email: str, env: dict[str, str] | None = None) -> int:
        created = json.loads(
            self.billing(
                "orgs", "create", "--name", name, "--owner-email", email, "--json", env=env
            )
        )
        return int(created["org"]["id"])


def make_stuck_orgs(stack: Stack) -> dict[str, int]:
    settings = stack.settings()
    acme = stack.create_org("Acme", "ada@acme.test")
    globex = stack.create_org("Globex", "hank@globex.test")
    # Saved while Temporal is out of reach: no workflow yet, so the row can be
    # made to name staging's customer before provisioning reads it.
    offline = {"TEMPORAL_ADDRESS": f"127.0.0.1:{free_ports(1)[0]}"}
    initech = stack.create_org("Initech", "bill@initech.test", env=offline)
    base = settings["STRIPE_API_BASE"]
    client = stripe.StripeClient(
        settings["STRIPE_SECRET_KEY"],
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
    )
    staging = client.v1.customers.create(
        {
            "email": "ops@staging.test",
            "metadata": {"org_id": str(initech), "org_uid": str(uuid.uuid4()), "source": "staging"},
        }
    )
    dsn = make_url(settings["DATABASE_URL"]).set(drivername="postgresql")
    with psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute("UPDATE orgs SET stripe_customer_id = %s WHERE id = %s", (staging.id, initech))
    stack.billing("provision", str(initech), "--timeout", "20", check=False)

    stack.billing("provision", str(acme))
    stack.billing("provision", str(globex))
    stack.billing("emulator", "card", str(acme), "--working")
    stack.billing("emulator", "card", str(globex), "--failing")
    stack.billing("emulator", "advance", "--to", "period-end", "--org", str(globex))
    return {"acme": acme, "globex": globex, "initech": initech}


async def run_id_of(address: str, org_id: int) -> str:
    client = await connect_client(Settings.model_validate({"temporal_address": address}))
    description = await client.get_workflow_handle(org_workflow_id(org_id)).describe()
    return description.run_id


def shoot(stack: Stack, orgs: dict[str, int], out: Path) -> list[Path]:
    """The problem list, then each stuck org's current details (its "User Metadata" tab)."""
    from playwright.sync_api import sync_playwright

    ui = f"http://127.0.0.1:{stack.ui}"
    address = f"127.0.0.1:{stack.temporal}"
    stuck = {"globex": "payment_failed", "initech": "adoption_refused"}
    run_ids = {name: asyncio.run(run_id_of(address, orgs[name])) for name in stuck}
    out.mkdir(parents=True, exist_ok=True)
    saved = [out / "stuck-orgs-list.png"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
        columns = json.dumps({"default": COLUMNS})
        page.add_init_script(
            f"localStorage.setItem('namespace-workflow-table-columns', {json.dumps(columns)});"
        )
        page.goto(workflows_link(ui, "default", PROBLEM_ORGS_QUERY))
        for name in stuck:
            page.get_by_text(org_workflow_id(orgs[name])).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(saved[0]))
        for name, code in stuck.items():
            workflow_id = org_workflow_id(orgs[name])
            page.goto(f"{ui}/namespaces/default/workflows/{workflow_id}/{run_ids[name]}/history")
            page.get_by_text("User Metadata").first.click()
            # The UI renders each metadata panel (markdown) in a frame; current details last.
            details = page.frame_locator("iframe >> nth=-1").locator("strong", has_text=code)
            details.first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            saved.append(out / f"stuck-org-{code.replace('_', '-')}.png")
            page.screenshot(path=str(saved[-1]), clip=DETAILS_CLIP)  # type: ignore[arg-type]
        browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="billing-screenshots-"))
    stack = Stack(work / "home")
    try:
        stack.start()
        orgs = make_stuck_orgs(stack)
        print(stack.billing("orgs", "list", "--problem"))
        for path in shoot(stack, orgs, args.out):
            print(f"saved {path} ({path.stat().st_size // 1024} KB)")
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
