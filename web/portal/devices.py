"""The devices page: search and filter the fleet, and its version distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select
from starlette.responses import Response

from otaflow.models import Device
from web.portal.access import PortalDep, ViewerDep
from web.portal.errors import PortalRoute
from web.portal.paging import EmptyIsNone, FilterText, page_count
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

DEVICE_PAGE_SIZE = 50
# The chart shows this many versions and folds the rest into "other".
MAX_CHART_VERSIONS = 12
MAX_FILTER_OPTIONS = 200
ONLINE_CHOICES = {"yes": True, "no": False}


@dataclass(frozen=True)
class DeviceSearch:
    q: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    product: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    hardware: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    version: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    group: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    online: Annotated[Literal["yes", "no"] | None, EmptyIsNone, Query()] = None
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1

    def params(self) -> dict[str, object]:
        return {
            "q": self.q,
            "product": self.product,
            "hardware": self.hardware,
            "version": self.version,
            "group": self.group,
            "online": self.online,
        }


@dataclass(frozen=True)
class VersionShare:
    version: str
    count: int
    percent: float


@router.get("/devices", name="devices")
def devices_page(
    request: Request,
    user: ViewerDep,
    portal: PortalDep,
    search: Annotated[DeviceSearch, Depends()],
) -> Response:
    rows, total = find_devices(portal.engine, search)
    context = {
        "rows": rows,
        "total": total,
        "pages": page_count(total, DEVICE_PAGE_SIZE),
        "search": search,
        "params": search.params(),
        "chart": version_distribution(portal.engine, search),
        "options": filter_options(portal.engine),
    }
    return render(request, "devices.html", context)


def _conditions(search: DeviceSearch, *, with_version: bool = True) -> list[Any]:
    conditions: list[Any] = []
    if search.q:
        escaped = search.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(col(Device.device_id).like(f"%{escaped}%", escape="\\"))
    if search.product:
        conditions.append(col(Device.product) == search.product)
    if search.hardware:
        conditions.append(col(Device.hardware) == search.hardware)
    if search.version and with_version:
        conditions.append(col(Device.current_version) == search.version)
    if search.group:
        conditions.append(col(Device.group_name) == search.group)
    if search.online:
        conditions.append(col(Device.online) == ONLINE_CHOICES[search.online])
    return conditions


def find_devices(engine: Engine, search: DeviceSearch) -> tuple[list[Device], int]:
    """Read one page of matching devices by id, and count all that match."""
    conditions = _conditions(search)
    with Session(engine) as session:
        total = session.exec(
            select(func.count()).select_from(Device).where(*conditions)
        ).one()
        rows = session.exec(
            select(Device)
            .where(*conditions)
            .order_by(col(Device.device_id))
            .limit(DEVICE_PAGE_SIZE)
            .offset((search.page - 1) * DEVICE_PAGE_SIZE)
        ).all()
    return list(rows), total


def version_distribution(engine: Engine, search: DeviceSearch) -> list[VersionShare]:
    """Count devices per running version under every filter except the version.

    The largest ``MAX_CHART_VERSIONS`` are listed and the rest summed as
    "other", so the chart stays readable on a fleet with many versions.
    """
    with Session(engine) as session:
        rows = session.exec(
            select(Device.current_version, func.count())
            .where(*_conditions(search, with_version=False))
            .group_by(col(Device.current_version))
            .order_by(func.count().desc(), col(Device.current_version))
        ).all()
    total = sum(count for _, count in rows) or 1
    listed = [(version, count) for version, count in rows[:MAX_CHART_VERSIONS]]
    rest = sum(count for _, count in rows[MAX_CHART_VERSIONS:])
    if rest:
        listed.append(("other", rest))
    return [
        VersionShare(version, count, 100 * count / total) for version, count in listed
    ]


def filter_options(engine: Engine) -> dict[str, list[str]]:
    """Read the distinct values offered in each filter's drop-down list."""
    columns = {
        "product": Device.product,
        "hardware": Device.hardware,
        "group": Device.group_name,
    }
    options: dict[str, list[str]] = {}
    with Session(engine) as session:
        for name, column in columns.items():
            options[name] = list(
                session.exec(
                    select(column).distinct().order_by(column).limit(MAX_FILTER_OPTIONS)
                ).all()
            )
    return options
