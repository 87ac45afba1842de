"""Firmware routes: builds that releases stored in the object store."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import Session, col, select

from otaflow.models import Firmware
from web.api.schemas import FirmwarePage, FirmwarePublic
from web.deps import EngineDep, PaginationDep, ReadAccess
from web.errors import error_responses

router = APIRouter(
    prefix="/firmware",
    tags=["firmware"],
    dependencies=[ReadAccess],
    responses=error_responses(401, 403),
)


@router.get("", summary="List stored firmware builds, newest first")
def list_firmware(
    engine: EngineDep,
    page: PaginationDep,
    product: Annotated[str | None, Query(description="Product name.")] = None,
    hardware: Annotated[str | None, Query(description="Hardware model.")] = None,
) -> FirmwarePage:
    conditions: list[Any] = []
    if product is not None:
        conditions.append(col(Firmware.product) == product)
    if hardware is not None:
        conditions.append(col(Firmware.hardware) == hardware)
    with Session(engine) as session:
        total = session.exec(
            select(func.count()).select_from(Firmware).where(*conditions)
        ).one()
        rows = session.exec(
            select(Firmware)
            .where(*conditions)
            .order_by(col(Firmware.created_at).desc(), col(Firmware.id).desc())
            .limit(page.limit)
            .offset(page.offset)
        ).all()
    items = [FirmwarePublic.model_validate(row) for row in rows]
    return FirmwarePage.build(items, total, page.limit, page.offset)
