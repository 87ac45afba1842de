"""The otaflow web app: the REST API for CI under ``/api/v1`` and ``/healthz``.

``create_app`` builds one engine, one firmware store and one Temporal
connection per app. The store and the Temporal client connect on first use,
so the app starts, and ``/healthz`` responds, while those services are down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from otaflow.db import make_engine
from otaflow.releases import ReleaseService, TemporalConnector
from otaflow.settings import Settings, load_settings
from web.api import devices, firmware, health, releases
from web.deps import AppResources
from web.errors import install_error_handling

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings``, read from the environment when None."""
    settings = settings or load_settings()
    engine = make_engine(settings.resolved_database_url)
    temporal = TemporalConnector(settings)
    resources = AppResources(
        settings=settings,
        engine=engine,
        temporal=temporal,
        releases=ReleaseService(settings, engine, temporal),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info("web app serving %s", settings.portal_url)
        yield
        engine.dispose()
        logger.info("web app stopped")

    app = FastAPI(
        title="otaflow",
        summary="Firmware release pipeline: start, follow and steer releases.",
        version="1",
        lifespan=lifespan,
    )
    app.state.resources = resources
    install_error_handling(app)
    app.include_router(health.router)
    app.include_router(api_router())
    # TODO: include the portal's HTML page router here once it exists.
    return app


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    router.include_router(releases.router)
    router.include_router(devices.router)
    router.include_router(firmware.router)
    return router
