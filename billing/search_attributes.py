"""The search attributes every org workflow keeps (all Keyword), named once.

Names are public contracts (docs/contracts.md): the dev server, the compose
file, the workflows and the queries all take them from here.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

ORG_ID_KEY = SearchAttributeKey.for_keyword("OrgId")
BILLING_STATUS_KEY = SearchAttributeKey.for_keyword("BillingStatus")
STRIPE_CUSTOMER_ID_KEY = SearchAttributeKey.for_keyword("StripeCustomerId")
# Unset while nothing needs a person, else a `billing.domain.BillingProblem` code.
BILLING_PROBLEM_KEY = SearchAttributeKey.for_keyword("BillingProblem")
SEARCH_ATTRIBUTE_KEYS = (
    ORG_ID_KEY,
    BILLING_STATUS_KEY,
    STRIPE_CUSTOMER_ID_KEY,
    BILLING_PROBLEM_KEY,
)
SEARCH_ATTRIBUTES = tuple(key.name for key in SEARCH_ATTRIBUTE_KEYS)
