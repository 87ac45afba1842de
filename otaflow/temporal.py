"""Temporal client set-up and the custom search attributes of release workflows."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

from otaflow.settings import Settings

PRODUCT_ATTRIBUTE = SearchAttributeKey.for_keyword("OtaflowProduct")
HARDWARE_ATTRIBUTE = SearchAttributeKey.for_keyword("OtaflowHardware")
VERSION_ATTRIBUTE = SearchAttributeKey.for_keyword("OtaflowVersion")
PHASE_ATTRIBUTE = SearchAttributeKey.for_keyword("OtaflowPhase")

# Registered by ``otaflow dev up`` (``temporal server start-dev --search-attribute``)
# and by the test environments, so on-call engineers can filter releases in the
# Temporal UI, for example ``OtaflowProduct = "gateway" AND OtaflowPhase = "held"``.
SEARCH_ATTRIBUTES = (
    PRODUCT_ATTRIBUTE,
    HARDWARE_ATTRIBUTE,
    VERSION_ATTRIBUTE,
    PHASE_ATTRIBUTE,
)


async def connect_temporal(settings: Settings) -> Client:
    """Connect to Temporal with the pydantic converter that workflow models need."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
