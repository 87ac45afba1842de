"""docs/protocol.md embeds the JSON schema of every protocol model, unchanged.

Run with ``OTAFLOW_UPDATE_PROTOCOL_DOC=1`` to rewrite the schema blocks from
the models after a deliberate protocol change.
"""

from __future__ import annotations

import os

import pytest

from tests.device_sim.protocol_doc import (
    DOC_PATH,
    DOCUMENTED_MODELS,
    SchemaViolationError,
    load_doc_schemas,
    render_doc,
    validate,
)


@pytest.fixture(scope="module", autouse=True)
def _update_doc_on_request() -> None:
    if os.environ.get("OTAFLOW_UPDATE_PROTOCOL_DOC") == "1":
        DOC_PATH.write_text(render_doc(DOC_PATH.read_text()))


def test_protocol_doc_documents_every_model() -> None:
    assert set(load_doc_schemas()) == set(DOCUMENTED_MODELS)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_MODELS))
def test_protocol_doc_schema_matches_model(name: str) -> None:
    documented = load_doc_schemas()[name]
    assert documented == DOCUMENTED_MODELS[name].model_json_schema(), (
        f"the {name} schema in {DOC_PATH} is stale; rerun this test with"
        " OTAFLOW_UPDATE_PROTOCOL_DOC=1 to regenerate it"
    )


def test_protocol_doc_topics_are_versioned() -> None:
    text = DOC_PATH.read_text()
    for channel in ("commands", "status", "health", "presence"):
        assert f"`otaflow/v1/devices/{{device_id}}/{channel}`" in text


def test_schema_validator_accepts_status_report() -> None:
    schema = load_doc_schemas()["StatusReport"]
    report = {
        "device_id": "sim-0001",
        "release_id": "r1",
        "state": "failed",
        "seq": 3,
        "reason": "hash_mismatch",
        "sent_at": "2026-01-31T12:00:00Z",
    }
    validate(report, schema)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("state", "exploded"),
        ("seq", -1),
        ("progress", 1.5),
        ("reason", "bad_luck"),
        ("sent_at", "2026-01-31T12:00:00"),
        ("release_id", ""),
    ],
)
def test_schema_validator_rejects_invalid_field(field: str, value: object) -> None:
    schema = load_doc_schemas()["StatusReport"]
    report = {
        "device_id": "sim-0001",
        "release_id": "r1",
        "state": "received",
        "seq": 0,
        "sent_at": "2026-01-31T12:00:00Z",
        field: value,
    }
    with pytest.raises(SchemaViolationError):
        validate(report, schema)


def test_schema_validator_rejects_missing_required() -> None:
    schema = load_doc_schemas()["HealthReport"]
    with pytest.raises(SchemaViolationError, match="missing required"):
        validate({"device_id": "sim-0001"}, schema)


def test_schema_validator_rejects_unknown_keyword() -> None:
    with pytest.raises(SchemaViolationError, match="not supported"):
        validate("x", {"oneOf": [{"type": "string"}]})
