"""What each `BillingProblem` code means and what fixes it, said once.

The workflow's current details (the Temporal UI's detail page), `billing orgs
list --problem`, `billing orgs show` and the table in docs/operations.md
("BillingProblem codes") all read this mapping (a test checks the docs against
it). Pure: no I/O, so the workflow may call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from billing.constants import ORG_BILLING_WORKFLOW
from billing.domain import BillingProblem, OrgBillingState
from billing.search_attributes import BILLING_PROBLEM_KEY

# Visibility queries: every running org workflow, and those that need a person
# (a continue-as-new leaves closed runs behind with the attributes they had).
RUNNING_ORGS_QUERY = f'ExecutionStatus="Running" AND WorkflowType="{ORG_BILLING_WORKFLOW}"'
PROBLEM_ORGS_QUERY = f"{RUNNING_ORGS_QUERY} AND {BILLING_PROBLEM_KEY.name} IS NOT NULL"
# Where the org's id goes in a fix (docs show it as is).
ORG_ID = "ORG_ID"
# The longest error shown in the one-line details.
DETAILS_ERROR_CHARS = 160


@dataclass(frozen=True)
class ProblemHelp:
    """`means`: what happened; `fix`: what a person does (`ORG_ID` stands for the org's id)."""

    means: str
    fix: str

    def fix_for(self, org_id: int | str) -> str:
        return self.fix.replace(ORG_ID, str(org_id))


PROBLEM_HELP: dict[BillingProblem, ProblemHelp] = {
    BillingProblem.PROVISIONING_FAILED: ProblemHelp(
        means="Stripe refused to create the customer or subscription (bad price id, "
        "invalid request, auth), or the org has no owner; the error is in `last_error`",
        fix="fix the setting or the org, then `billing provision ORG_ID`",
    ),
    BillingProblem.ADOPTION_REFUSED: ProblemHelp(
        means="provisioning stopped: the Stripe customer the org row names (or one found "
        "for it) is not provably the org's; the refusal is in `refused_adoptions` and the "
        "event log",
        fix="correct the org row's customer (or the customer's `org_uid`/`source` metadata "
        "in Stripe), then `billing provision ORG_ID`",
    ),
    BillingProblem.STRIPE_AUTH: ProblemHelp(
        means="Stripe answered 401/403 to a usage report: the secret key was rotated, "
        "revoked or lacks permissions. Reports are retried every 30 s to 5 minutes",
        fix="put a working key in `STRIPE_SECRET_KEY` and restart the workers; the pending "
        "usage goes out at the next retry (`billing usage report ORG_ID` at once), before "
        "the invoice finalizes if within the hour after the period's end",
    ),
    BillingProblem.USAGE_REPORT_FAILING: ProblemHelp(
        means="Stripe refused a usage report for another reason (a meter that does not "
        "exist for `STRIPE_USERS_DIMENSION`/`STRIPE_REQUESTS_DIMENSION`, an invalid "
        "request). Retried the same way",
        fix="fix the meter or the setting (`billing dev` and the catalog create the "
        "meters); `billing usage report ORG_ID` retries at once",
    ),
    BillingProblem.EVENT_FAILED: ProblemHelp(
        means="a Stripe event could not be applied (its re-read or the row write was "
        "refused); it is kept unseen in `failed_events` (one per Stripe object) and "
        "retried with backoff up to an hour",
        fix="read the error; once the cause is fixed the retry applies it, or "
        "`billing reconcile ORG_ID` re-reads the subscription at once",
    ),
    BillingProblem.PAYMENT_FAILED: ProblemHelp(
        means="the subscription is `past_due` or `unpaid`: Stripe's dunning is retrying "
        "the customer's card",
        fix="ask the owner to update the card in the billing portal "
        "(`POST /api/payments/stripe/portal`), then `billing reconcile ORG_ID`",
    ),
}


def problem_help(problem: BillingProblem) -> ProblemHelp:
    return PROBLEM_HELP[problem]


def hint(problem: BillingProblem, org_id: int | str) -> str:
    """One line: the code and its fix for this org."""
    return f"{problem.value}: {problem_help(problem).fix_for(org_id)}"


def _day(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d")


def _clip(text: str, limit: int = DETAILS_ERROR_CHARS) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def current_details(state: OrgBillingState) -> str:
    """One line for the Temporal UI: what the org is doing, and if stuck, why and the fix.

    E.g. "past_due, period to 2031-03-01 · problem payment_failed: ask the owner
    to update the card … then `billing reconcile 42`".
    """
    parts = [state.status.value]
    if state.current_period_end is not None:
        parts[0] += f", period to {_day(state.current_period_end)}"
    if state.stripe_subscription_id:
        parts.append(f"subscription {state.stripe_subscription_id}")
    elif state.stripe_customer_id:
        parts.append(f"customer {state.stripe_customer_id}")
    problem = state.problem
    if problem is None:
        return " · ".join(parts)
    parts.append(
        f"problem **{problem.value}** — fix: {problem_help(problem).fix_for(state.org_id)}"
    )
    if state.last_error:
        parts.append(f"last error: {_clip(state.last_error)}")
    return " · ".join(parts)


def docs_table() -> str:
    """The codes table of docs/operations.md ("BillingProblem codes"), as it must read."""
    rows = ["| code | means | fix |", "|---|---|---|"]
    rows += [f"| `{code.value}` | {h.means} | {h.fix} |" for code, h in PROBLEM_HELP.items()]
    return "\n".join(rows)
