"""The page of one device: what it runs, whether it is a lab device, its boot logs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from starlette.responses import Response

from otaflow.errors import NotFoundError
from otaflow.models import BootLog, Device
from web.portal.access import PortalDep, ViewerDep
from web.portal.errors import PortalRoute
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

# The ingest keeps the last 10 boot logs of a device; the page shows them all.
BOOT_LOGS_SHOWN = 10


@router.get("/devices/{device_id}", name="device")
def device_page(
    device_id: str, request: Request, user: ViewerDep, portal: PortalDep
) -> Response:
    device, boot_logs = load_device(portal.engine, device_id)
    return render(request, "device.html", {"device": device, "boot_logs": boot_logs})


def load_device(engine: Engine, device_id: str) -> tuple[Device, list[BootLog]]:
    """Read a device and its newest boot logs; raise ``NotFoundError`` if unknown."""
    with Session(engine) as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError("device", device_id)
        boot_logs = session.exec(
            select(BootLog)
            .where(BootLog.device_id == device_id)
            .order_by(col(BootLog.seq).desc())
            .limit(BOOT_LOGS_SHOWN)
        ).all()
    return device, list(boot_logs)
