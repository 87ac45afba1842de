"""Device routes: the fleet as last reported by the devices' health messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from otaflow.errors import NotFoundError
from otaflow.models import Device
from web.api.schemas import DevicePage, DevicePublic
from web.deps import EngineDep, Pagination, PaginationDep, ReadAccess
from web.errors import error_responses

router = APIRouter(
    prefix="/devices",
    tags=["devices"],
    dependencies=[ReadAccess],
    responses=error_responses(401, 403),
)


@dataclass(frozen=True)
class DeviceFilters:
    product: Annotated[str | None, Query(description="Product name.")] = None
    hardware: Annotated[str | None, Query(description="Hardware model.")] = None
    version: Annotated[str | None, Query(description="Running version.")] = None
    group: Annotated[str | None, Query(description="Device group.")] = None
    online: Annotated[bool | None, Query(description="Online now.")] = None


DeviceFiltersDep = Annotated[DeviceFilters, Depends()]


@router.get("", summary="List devices by id")
def list_devices(
    engine: EngineDep, filters: DeviceFiltersDep, page: PaginationDep
) -> DevicePage:
    rows, total = find_devices(engine, filters, page)
    items = [DevicePublic.model_validate(row) for row in rows]
    return DevicePage.build(items, total, page.limit, page.offset)


@router.get("/{device_id}", summary="Show a device", responses=error_responses(404))
def get_device(device_id: str, engine: EngineDep) -> DevicePublic:
    with Session(engine) as session:
        device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError("device", device_id)
    return DevicePublic.model_validate(device)


def find_devices(
    engine: Engine, filters: DeviceFilters, page: Pagination
) -> tuple[list[Device], int]:
    """Query one page of the devices that match ``filters``, and count them all."""
    conditions: list[Any] = []
    if filters.product is not None:
        conditions.append(col(Device.product) == filters.product)
    if filters.hardware is not None:
        conditions.append(col(Device.hardware) == filters.hardware)
    if filters.version is not None:
        conditions.append(col(Device.current_version) == filters.version)
    if filters.group is not None:
        conditions.append(col(Device.group_name) == filters.group)
    if filters.online is not None:
        conditions.append(col(Device.online) == filters.online)
    with Session(engine) as session:
        total = session.exec(
            select(func.count()).select_from(Device).where(*conditions)
        ).one()
        rows = session.exec(
            select(Device)
            .where(*conditions)
            .order_by(col(Device.device_id))
            .limit(page.limit)
            .offset(page.offset)
        ).all()
    return list(rows), total
