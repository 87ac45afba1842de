"""The JSON error body, the catch-all 500, request ids and the OpenAPI document."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from otaflow.db import session_scope
from otaflow.heartbeats import INGEST, INGEST_STALE_AFTER_S, record_heartbeat
from otaflow.models import ServiceHeartbeat, utc_now
from otaflow.settings import Settings
from web.app import create_app


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def _operations(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, methods in openapi["paths"].items()
        for method, operation in methods.items()
    ]


def test_unknown_route_is_json_404(client: TestClient) -> None:
    response = client.get("/api/v1/nothing-here")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(client: TestClient) -> None:
    response = client.delete("/api/v1/releases")

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_unhandled_error_is_generic_500(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with (
        TestClient(app, raise_server_exceptions=False) as test_client,
        caplog.at_level(logging.ERROR, logger="web.errors"),
    ):
        response = test_client.get("/boom", headers={"X-Request-ID": "req-42"})

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "req-42" in response.json()["error"]["message"]
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["X-Request-ID"] == "req-42"
    assert "request req-42" in caplog.text
    assert "secret internals" in caplog.text


def test_request_id_generated_when_absent(client: TestClient) -> None:
    response = client.get("/healthz")

    assert len(response.headers["X-Request-ID"]) == 32


def test_request_id_with_unsafe_characters_is_replaced(client: TestClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "bad id\twith tab"})

    assert response.headers["X-Request-ID"] != "bad id\twith tab"


def test_docs_page_is_served(client: TestClient) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def test_openapi_operations_have_summaries(openapi: dict[str, Any]) -> None:
    missing = [
        f"{method} {path}"
        for path, method, operation in _operations(openapi)
        if not operation.get("summary")
    ]

    assert missing == []


def test_openapi_api_operations_require_bearer(openapi: dict[str, Any]) -> None:
    unprotected = [
        f"{method} {path}"
        for path, method, operation in _operations(openapi)
        if path.startswith("/api/v1")
        and operation.get("security") != [{"bearerAuth": []}]
    ]

    assert unprotected == []
    assert openapi["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_openapi_healthz_is_public(openapi: dict[str, Any]) -> None:
    assert "security" not in openapi["paths"]["/healthz"]["get"]


def test_openapi_operations_document_responses(openapi: dict[str, Any]) -> None:
    undocumented = [
        f"{method} {path}"
        for path, method, operation in _operations(openapi)
        if not any(
            "$ref" in str(response.get("content", {}))
            for status, response in operation["responses"].items()
            if status.startswith("2")
        )
    ]

    assert undocumented == []


def test_openapi_errors_use_error_body(openapi: dict[str, Any]) -> None:
    responses = openapi["paths"]["/api/v1/releases"]["post"]["responses"]

    for status in ("401", "403", "409", "413", "422", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse"), status


def test_openapi_start_release_is_multipart(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/api/v1/releases"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]

    assert schema["properties"]["image"]["format"] == "binary"
    assert set(schema["required"]) == {"image", "product", "hardware", "version"}


def test_healthz_reports_live_ingest(client: TestClient, engine: Engine) -> None:
    record_heartbeat(engine, INGEST, "test")
    body = client.get("/healthz").json()
    assert body["ingest"] == "live"
    assert body["status"] == "ok"


def test_healthz_reports_stale_ingest(client: TestClient, engine: Engine) -> None:
    stale = utc_now() - timedelta(seconds=INGEST_STALE_AFTER_S + 60)
    with session_scope(engine) as session:
        session.merge(ServiceHeartbeat(name=INGEST, instance="test", beat_at=stale))
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["ingest"] == "stale"
    assert response.json()["status"] == "degraded"
