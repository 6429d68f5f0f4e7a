"""Deterministic orchestration only: no I/O, no settings, no clocks but workflow.now()."""

from workflows.org_billing import OrgBillingWorkflow
from workflows.provision_missing import ProvisionMissingOrgsWorkflow

ALL_WORKFLOWS = [OrgBillingWorkflow, ProvisionMissingOrgsWorkflow]

__all__ = ["ALL_WORKFLOWS", "OrgBillingWorkflow", "ProvisionMissingOrgsWorkflow"]
