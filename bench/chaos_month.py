"""A chaos month: N orgs billed for two months while workers, the API and Temporal die.

Starts the product as separate processes on this machine (a fresh Postgres
database, the Temporal dev server, the Stripe emulator, the API and two
workers), creates the orgs, drives the Stripe test clock through the trial and
two billing periods, and meanwhile kills and degrades the stack on a seeded
schedule. Then it prints each invariant as a count (all must be 0) and the
figures of the run, and exits non-zero if any count is not 0.

    .venv/bin/python bench/chaos_month.py [--orgs 100] [--seed 1] [--faults full]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from chaos import ChaosOptions, run_chaos


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every process of the stack is stopped on the way out."""
    raise KeyboardInterrupt


def main() -> int:
    """Parse the options, run the month, print the report; the exit code is the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orgs", type=int, default=100, help="how many orgs (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    parser.add_argument(
        "--faults",
        choices=["full", "light", "none"],
        default="full",
        help="how hard the fault injector hits (default full)",
    )
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="seconds the month may take (default 600)"
    )
    parser.add_argument(
        "--step-timeout", type=float, default=180.0, help="seconds one clock step may take"
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and server state here")
    parser.add_argument("--keep", action="store_true", help="keep the database and work folder")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument(
        "--capture-histories",
        type=Path,
        metavar="DIR",
        help="save replayable workflow histories of the run to DIR (e.g. tests/histories)",
    )
    parser.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every workflow payload with a fresh BILLING_ENCRYPTION_KEYS "
        "(adds the invariant that no payload is in clear)",
    )
    args = parser.parse_args()
    if args.encrypt and args.capture_histories is not None:
        parser.error(
            "--capture-histories saves histories the tests replay without a key: "
            "run it without --encrypt"
        )
    options = ChaosOptions(
        orgs=args.orgs,
        seed=args.seed,
        faults=args.faults,
        deadline_seconds=args.deadline,
        step_timeout=args.step_timeout,
        workdir=args.workdir,
        keep=args.keep,
        capture_histories=args.capture_histories,
        encrypt=args.encrypt,
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        report = run_chaos(options, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("Interrupted: the stack is stopped, no invariant was checked.", file=sys.stderr)
        return 130
    print(report.render(), flush=True)
    if args.json is not None:
        args.json.write_text(report.to_json())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
