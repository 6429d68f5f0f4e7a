"""How every process connects to Temporal."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter


async def connect_temporal(address: str, namespace: str) -> Client:
    """The one way every process connects: with the pydantic data converter."""
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter
    )
