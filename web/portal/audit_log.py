"""The audit log page: who did what and when, newest first, read-only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select
from starlette.responses import Response

from otaflow.models import AuditEntry
from web.portal.access import PortalDep, ViewerDep
from web.portal.errors import PortalRoute
from web.portal.paging import EmptyIsNone, FilterText, page_count
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

AUDIT_PAGE_SIZE = 50
ACTION_GROUPS = ("login", "logout", "release", "token", "user", "portal")


@router.get("/audit", name="audit")
def audit_page(
    request: Request,
    user: ViewerDep,
    portal: PortalDep,
    action: Annotated[FilterText | None, EmptyIsNone, Query()] = None,
    actor: Annotated[FilterText | None, EmptyIsNone, Query()] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> Response:
    rows, total = find_entries(portal.engine, action, actor, page)
    context = {
        "rows": rows,
        "total": total,
        "page": page,
        "pages": page_count(total, AUDIT_PAGE_SIZE),
        "params": {"action": action, "actor": actor},
        "action_groups": ACTION_GROUPS,
    }
    return render(request, "audit.html", context)


def find_entries(
    engine: Engine, action: str | None, actor: str | None, page: int
) -> tuple[list[AuditEntry], int]:
    """Read one page of entries, newest first.

    ``action`` matches a whole action or a group (``release`` matches
    ``release.approve``); ``actor`` matches exactly.
    """
    conditions: list[Any] = []
    if action:
        conditions.append(
            (col(AuditEntry.action) == action)
            | col(AuditEntry.action).startswith(f"{action}.")
        )
    if actor:
        conditions.append(col(AuditEntry.actor) == actor)
    with Session(engine) as session:
        total = session.exec(
            select(func.count()).select_from(AuditEntry).where(*conditions)
        ).one()
        rows = session.exec(
            select(AuditEntry)
            .where(*conditions)
            .order_by(col(AuditEntry.id).desc())
            .limit(AUDIT_PAGE_SIZE)
            .offset((page - 1) * AUDIT_PAGE_SIZE)
        ).all()
    return list(rows), total
