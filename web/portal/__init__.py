"""The release manager portal: server-rendered pages with htmx, under ``/``.

Pages live in one module each; ``portal_router`` combines them. The
start-a-release router comes before the release pages, so that
``/releases/new`` is not read as a release id.
"""

from __future__ import annotations

from fastapi import APIRouter

from web.portal import (
    audit_log,
    auth,
    device_page,
    devices,
    firmware,
    release_actions,
    release_start,
    releases,
    tokens,
    users,
)


def portal_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    for module in (
        auth,
        release_start,
        releases,
        release_actions,
        devices,
        device_page,
        firmware,
        audit_log,
        tokens,
        users,
    ):
        router.include_router(module.router)
    return router
