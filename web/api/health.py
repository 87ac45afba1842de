"""``GET /healthz``: a liveness check that needs no token and no Temporal."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from web.deps import EngineDep
from web.errors import ApiError, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


@router.get(
    "/healthz",
    summary="Check that the app runs and reaches its database",
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
    return Health(status="ok", database="ok")
