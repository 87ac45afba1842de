"""Release pages: the list, the detail page and its live updates.

The detail page polls ``/releases/{id}/live`` every two seconds with htmx.
The request carries fingerprints of what the page shows: ``fp`` of the live
sections, from the poller, and ``afp`` of the actions panel, from a hidden
field inside that panel. While nothing changed the response is 204 No
Content. Otherwise it swaps the changed sections out of band. ``portal.js``
keeps the actions panel while the user types in it or a result message shows,
and the panel's ``afp`` stays old, so the next polls offer it again. Once the
release is final the response replaces the poller with one that no longer
polls, and closing the tab stops it as well.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from otaflow.protocol import DeviceState
from web.portal.access import Portal, PortalDep, PortalUser, ViewerDep
from web.portal.errors import PortalRoute
from web.portal.paging import EmptyIsNone, FilterText, page_count
from web.portal.release_actions import ActionPanel, action_panel
from web.portal.release_views import (
    RELEASE_PAGE_SIZE,
    ReleaseView,
    TargetQuery,
    load_release_view,
    release_products,
    release_progress,
    wave_names,
)
from web.portal.rendering import render, templates
from workflows.messages import ReleasePhase

router = APIRouter(route_class=PortalRoute)

POLL_INTERVAL_S = 2


@dataclass(frozen=True)
class ReleaseFilters:
    state: Annotated[ReleasePhase | None, EmptyIsNone, Query()] = None
    product: Annotated[FilterText | None, EmptyIsNone, Query()] = None
    page: Annotated[int, Query(ge=1, le=100_000)] = 1


def get_target_query(
    target_state: Annotated[DeviceState | None, EmptyIsNone, Query()] = None,
    target_page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> TargetQuery:
    return TargetQuery(state=target_state, page=target_page)


FiltersDep = Annotated[ReleaseFilters, Depends()]
TargetQueryDep = Annotated[TargetQuery, Depends(get_target_query)]


@router.get("/releases", name="releases")
async def releases_page(
    request: Request, user: ViewerDep, portal: PortalDep, filters: FiltersDep
) -> Response:
    rows, total = await run_in_threadpool(
        portal.releases.list_releases,
        state=filters.state,
        product=filters.product,
        limit=RELEASE_PAGE_SIZE,
        offset=(filters.page - 1) * RELEASE_PAGE_SIZE,
    )
    names = await run_in_threadpool(wave_names, portal.engine, [row.id for row in rows])
    products = await run_in_threadpool(release_products, portal.engine)
    context = {
        "rows": [
            (row, names.get((row.id, row.current_wave or 0)), release_progress(row))
            for row in rows
        ],
        "total": total,
        "pages": page_count(total, RELEASE_PAGE_SIZE),
        "filters": filters,
        "products": products,
        "states": list(ReleasePhase),
        "params": {"state": filters.state or "", "product": filters.product or ""},
    }
    return render(request, "releases/list.html", context)


@router.get("/releases/{release_id}", name="release")
async def release_page(
    release_id: str,
    request: Request,
    user: ViewerDep,
    portal: PortalDep,
    query: TargetQueryDep,
) -> Response:
    view = await load_release_view(
        portal.releases, portal.engine, portal.settings, release_id, query
    )
    context = _live_context(view, _panel(portal, user, view))
    context["fingerprint"] = _digest(_render_live_sections(context))
    return render(request, "release/detail.html", context)


@router.get("/releases/{release_id}/live")
async def release_live(
    release_id: str,
    request: Request,
    user: ViewerDep,
    portal: PortalDep,
    query: TargetQueryDep,
    fp: Annotated[str, Query(max_length=64)] = "",
    afp: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    view = await load_release_view(
        portal.releases, portal.engine, portal.settings, release_id, query
    )
    panel = _panel(portal, user, view)
    context = _live_context(view, panel)
    sections = _render_live_sections(context)
    fingerprint = _digest(sections)
    if fingerprint == fp and panel.fingerprint == afp:
        return Response(status_code=204)
    context |= {
        "sections": sections if fingerprint != fp else "",
        "actions_changed": panel.fingerprint != afp,
        "fingerprint": fingerprint,
    }
    return render(request, "release/live.html", context)


def _live_context(view: ReleaseView, panel: ActionPanel) -> dict[str, Any]:
    targets = view.targets
    return {
        "view": view,
        "release": view.release,
        "panel": panel,
        "poll_interval_s": POLL_INTERVAL_S,
        "device_states": list(DeviceState),
        "target_params": {
            "target_state": targets.query.state or "",
            "target_page": targets.query.page,
        },
    }


def _render_live_sections(context: dict[str, Any]) -> str:
    """Render the sections that the live poll swaps, as the poll sends them."""
    template = templates.get_template("release/_live_sections.html")
    return template.render({**context, "oob": True})


def _panel(portal: Portal, user: PortalUser, view: ReleaseView) -> ActionPanel:
    waiting_wave = None
    if view.waiting_gate is not None:
        wave = view.waves_by_index.get(view.waiting_gate)
        waiting_wave = wave.name if wave else f"wave {view.waiting_gate + 1}"
    return action_panel(
        portal,
        user,
        view.release,
        phase=view.phase,
        paused=view.paused,
        waiting_wave=waiting_wave,
        four_eyes=view.four_eyes,
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
