"""The otaflow web app: the CI REST API, ``/healthz`` and the portal.

The REST API for CI is under ``/api/v1``, with its reference at ``/docs``;
the release manager portal (HTML pages with htmx) has every other path, with
its assets under ``/static``.

``create_app`` builds one engine, one firmware store and one Temporal
connection per app. The store and the Temporal client connect on first use,
so the app starts, and ``/healthz`` responds, while those services are down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from otaflow.db import make_engine
from otaflow.releases import ReleaseService, TemporalConnector
from otaflow.settings import Settings, load_settings
from web import docs
from web.api import devices, enrollment, firmware, health, releases
from web.deps import AppResources
from web.errors import install_error_handling
from web.portal import portal_router
from web.portal.access import Portal
from web.portal.errors import install_portal_error_pages
from web.portal.sessions import SessionSigner, load_session_secret

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# Routes that devices call, authenticated by an enrollment token or their
# certificate instead of a CI bearer token.
DEVICE_API_PREFIX = "/api/device/v1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
FAVICON = STATIC_DIR / "favicon.ico"


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
        # The default pages load Swagger UI and ReDoc from a CDN; web.docs
        # serves Swagger UI from /static instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.resources = resources
    app.state.portal = Portal(
        settings=settings,
        engine=engine,
        releases=resources.releases,
        signer=SessionSigner(load_session_secret(settings)),
    )
    install_error_handling(app)
    install_portal_error_pages(app)
    app.include_router(health.router)
    app.include_router(docs.router)
    app.add_api_route("/favicon.ico", favicon, include_in_schema=False)
    app.include_router(api_router())
    app.include_router(enrollment.router, prefix=DEVICE_API_PREFIX)
    app.include_router(portal_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    router.include_router(releases.router)
    router.include_router(devices.router)
    router.include_router(firmware.router)
    return router


def favicon() -> FileResponse:
    """Serve the icon that browsers request at ``/favicon.ico`` on their own."""
    return FileResponse(
        FAVICON,
        media_type="image/vnd.microsoft.icon",
        headers={"Cache-Control": "public, max-age=86400"},
    )
