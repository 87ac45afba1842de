"""``GET /healthz``: a liveness check that needs no token and no Temporal."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from otaflow.heartbeats import INGEST, INGEST_STALE_AFTER_S, heartbeat_age_s
from web.deps import EngineDep
from web.errors import ApiError, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description="ok, or degraded when the ingest is not live.")
    database: str
    ingest: str = Field(
        description=(
            "live, stale (no heartbeat for a while: device reports are not being"
            " written) or unknown (the ingest never ran against this database)."
        )
    )
    ingest_heartbeat_age_s: float | None = None


@router.get(
    "/healthz",
    summary="Check the database and whether the ingest writes device reports",
    responses=error_responses(503),
)
def healthz(engine: EngineDep) -> Health:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        logger.warning("health check: database unreachable: %s", error)
        raise ApiError(
            503, "the database is unreachable; check OTAFLOW_DATABASE_URL"
        ) from error
    age = heartbeat_age_s(engine, INGEST)
    if age is None:
        ingest = "unknown"
    elif age <= INGEST_STALE_AFTER_S:
        ingest = "live"
    else:
        ingest = "stale"
    # The app itself is healthy while the ingest is away, so this stays 200;
    # monitoring can alert on status "degraded".
    status = "ok" if ingest == "live" else "degraded"
    return Health(
        status=status, database="ok", ingest=ingest, ingest_heartbeat_age_s=age
    )
