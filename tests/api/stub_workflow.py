"""A stand-in `OrgBilling` that only holds a state and answers the `state` query.

The API reads the workflow's state through that query; this lets API tests
give the workflow a known state without running provisioning against Stripe.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from billing.constants import ORG_BILLING_WORKFLOW, STATE_QUERY, STRIPE_EVENT_SIGNAL
    from billing.domain import OrgBillingInput, OrgBillingState, StripeEventSignal


@workflow.defn(name=ORG_BILLING_WORKFLOW)
class StateOnlyOrgBilling:
    @workflow.init
    def __init__(self, data: OrgBillingInput) -> None:
        self._state = data.state or OrgBillingState(org_id=data.org_id)

    @workflow.run
    async def run(self, data: OrgBillingInput) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.query(name=STATE_QUERY)
    def state(self) -> OrgBillingState:
        return self._state

    @workflow.signal(name=STRIPE_EVENT_SIGNAL)
    def stripe_event(self, event: StripeEventSignal) -> None:
        self._state.last_event_id = event.event_id
