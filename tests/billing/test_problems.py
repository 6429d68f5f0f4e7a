"""The one mapping of `BillingProblem` codes to their meaning and fix, and the one-line details."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from billing.domain import (
    BillingProblem,
    BillingStatus,
    OrgBillingState,
    RefusedAdoption,
)
from billing.problems import (
    DETAILS_ERROR_CHARS,
    PROBLEM_HELP,
    PROBLEM_ORGS_QUERY,
    current_details,
    docs_table,
    hint,
    problem_help,
)
from workflows import decisions

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_code_has_a_meaning_and_a_fix() -> None:
    assert set(PROBLEM_HELP) == set(BillingProblem)
    for problem in BillingProblem:
        help = problem_help(problem)
        assert help.means and help.fix
        assert "|" not in help.means + help.fix  # a table cell each


def test_a_fix_names_the_org() -> None:
    fix = problem_help(BillingProblem.PROVISIONING_FAILED).fix_for(42)
    assert fix.endswith("`billing provision 42`")
    assert "ORG_ID" not in hint(BillingProblem.PAYMENT_FAILED, 42)
    assert hint(BillingProblem.PAYMENT_FAILED, 42).startswith("payment_failed: ask the owner")
    assert "`billing reconcile 42`" in hint(BillingProblem.PAYMENT_FAILED, 42)


def test_the_docs_table_is_the_mapping() -> None:
    text = OPERATIONS.read_text()
    table = re.search(r"\| code \| means \| fix \|\n(?:\|.*\n)+", text)
    assert table is not None, "no codes table in docs/operations.md"
    assert table.group(0).rstrip("\n") == docs_table()


def test_the_problem_query_is_the_one_the_docs_give() -> None:
    assert PROBLEM_ORGS_QUERY == (
        'ExecutionStatus="Running" AND WorkflowType="OrgBilling" AND BillingProblem IS NOT NULL'
    )
    assert f"```\n{PROBLEM_ORGS_QUERY}\n```" in OPERATIONS.read_text()


def test_details_of_a_healthy_org_say_what_it_is_doing() -> None:
    state = OrgBillingState(
        org_id=7,
        status=BillingStatus.ACTIVE,
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        current_period_end=datetime(2031, 3, 1, tzinfo=UTC),
    )
    assert current_details(state) == "active, period to 2031-03-01 · subscription sub_1"
    provisioning = OrgBillingState(org_id=7, stripe_customer_id="cus_1")
    assert current_details(provisioning) == "provisioning · customer cus_1"


def test_details_of_a_stuck_org_say_why_and_the_fix_on_one_line() -> None:
    error = "Stripe said:\n  " + "no such price " * 30
    state = OrgBillingState(
        org_id=42,
        status=BillingStatus.PROVISIONING_FAILED,
        last_error=error,
        problem=BillingProblem.PROVISIONING_FAILED,
    )
    details = current_details(state)
    assert details.startswith("provisioning_failed · problem **provisioning_failed** — fix: ")
    assert "then `billing provision 42` · last error: Stripe said: no such price" in details
    assert "\n" not in details
    shown_error = details.split("last error: ", 1)[1]
    assert len(shown_error) == DETAILS_ERROR_CHARS and shown_error.endswith("…")


@pytest.mark.parametrize(
    ("refusal", "last_error", "status", "expected"),
    [
        (RefusedAdoption(at=datetime.now(UTC), reason="r", customer_id="cus_x"), "r",
         BillingStatus.PROVISIONING_FAILED, True),
        # A refused subscription (from an event) does not stop provisioning.
        (RefusedAdoption(at=datetime.now(UTC), reason="r", subscription_id="sub_x"), "r",
         BillingStatus.PROVISIONING_FAILED, False),
        # Provisioning failed since on something else (a bad price).
        (RefusedAdoption(at=datetime.now(UTC), reason="r", customer_id="cus_x"), "bad price",
         BillingStatus.PROVISIONING_FAILED, False),
        (RefusedAdoption(at=datetime.now(UTC), reason="r", customer_id="cus_x"), "r",
         BillingStatus.TRIALING, False),
        (None, "r", BillingStatus.PROVISIONING_FAILED, False),
    ],
)  # fmt: skip
def test_provisioning_stopped_on_a_refused_adoption(
    refusal: RefusedAdoption | None, last_error: str, status: BillingStatus, expected: bool
) -> None:
    state = OrgBillingState(
        org_id=7,
        status=status,
        last_error=last_error,
        refused_adoptions=[refusal] if refusal else [],
    )
    assert decisions.provisioning_refused(state) is expected
