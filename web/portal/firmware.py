"""The firmware page: every stored build and the releases that shipped it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select
from starlette.responses import Response

from otaflow.models import Firmware, Release
from web.portal.access import PortalDep, ViewerDep
from web.portal.errors import PortalRoute
from web.portal.paging import EmptyIsNone, FilterText, page_count
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

FIRMWARE_PAGE_SIZE = 25


@router.get("/firmware", name="firmware")
def firmware_page(
    request: Request,
    user: ViewerDep,
    portal: PortalDep,
    product: Annotated[FilterText | None, EmptyIsNone, Query()] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> Response:
    rows, total = find_firmware(portal.engine, product, page)
    context = {
        "rows": rows,
        "used_by": releases_by_sha256(portal.engine, [row.sha256 for row in rows]),
        "total": total,
        "page": page,
        "pages": page_count(total, FIRMWARE_PAGE_SIZE),
        "params": {"product": product},
        "products": firmware_products(portal.engine),
    }
    return render(request, "firmware.html", context)


def find_firmware(
    engine: Engine, product: str | None, page: int
) -> tuple[list[Firmware], int]:
    conditions = [col(Firmware.product) == product] if product else []
    with Session(engine) as session:
        total = session.exec(
            select(func.count()).select_from(Firmware).where(*conditions)
        ).one()
        rows = session.exec(
            select(Firmware)
            .where(*conditions)
            .order_by(col(Firmware.created_at).desc(), col(Firmware.id).desc())
            .limit(FIRMWARE_PAGE_SIZE)
            .offset((page - 1) * FIRMWARE_PAGE_SIZE)
        ).all()
    return list(rows), total


def releases_by_sha256(
    engine: Engine, digests: list[str]
) -> dict[str, list[tuple[str, str]]]:
    """Map each build's SHA-256 to the (id, state) of the releases that shipped it."""
    if not digests:
        return {}
    with Session(engine) as session:
        rows = session.exec(
            select(Release.sha256, Release.id, Release.state)
            .where(col(Release.sha256).in_(set(digests)))
            .order_by(col(Release.created_at))
        ).all()
    used_by: dict[str, list[tuple[str, str]]] = {}
    for sha256, release_id, state in rows:
        used_by.setdefault(sha256, []).append((release_id, state))
    return used_by


def firmware_products(engine: Engine) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(Firmware.product).distinct().order_by(col(Firmware.product))
        ).all()
    return list(rows)
