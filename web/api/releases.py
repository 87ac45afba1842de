"""Release routes: start a release, follow it, and act on its gates.

Release ids look like ``gateway:gw-r2:1.4.0``. They contain no ``/``, so the
default path parameter matches them whole.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from otaflow.releases import ReleaseAction
from web.api.release_form import draft_from_form, receive_release_form, require_image
from web.api.schemas import (
    AbortBody,
    ApproveBody,
    PauseBody,
    RejectBody,
    ReleaseDetail,
    ReleasePage,
    ReleaseStarted,
    ReleaseStartForm,
    release_detail,
    release_links,
    release_summary,
)
from web.deps import (
    ApproveActor,
    PaginationDep,
    ReadAccess,
    ReleaseServiceDep,
    SettingsDep,
    WriteActor,
)
from web.errors import error_responses
from workflows.messages import (
    AbortRequest,
    ActionResult,
    GateApproval,
    GateRejection,
    PauseRequest,
    ReleasePhase,
    ResumeRequest,
)

router = APIRouter(
    prefix="/releases",
    tags=["releases"],
    dependencies=[ReadAccess],
    responses=error_responses(401, 403),
)

ACTION_RESPONSES = error_responses(404, 409, 422, 503)

# FastAPI cannot describe a streamed multipart body from the handler's
# parameters, so the form's schema is given here.
START_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": ReleaseStartForm.model_json_schema()}
        },
    }
}


@router.post(
    "",
    status_code=201,
    summary="Start a release",
    description=(
        "Upload a firmware image and start its release. A retry with the same"
        " SHA-256 returns the existing release with 200; a different SHA-256"
        " for the same version is a 409. A release that failed starts again."
    ),
    responses={
        200: {"model": ReleaseStarted, "description": "Release already started"},
        **error_responses(409, 413, 422, 503),
    },
    openapi_extra=START_REQUEST_BODY,
)
async def start_release(
    request: Request,
    response: Response,
    actor: WriteActor,
    service: ReleaseServiceDep,
    settings: SettingsDep,
) -> ReleaseStarted:
    async with receive_release_form(request, settings.max_image_bytes) as form:
        draft = draft_from_form(form)
        started = await service.start_release(draft, require_image(form), actor)

    if not started.created:
        response.status_code = 200
    release = started.release
    return ReleaseStarted(
        release_id=release.id,
        phase=ReleasePhase(release.state),
        links=release_links(settings, release.id),
    )


@router.get("", summary="List releases, newest first")
def list_releases(
    service: ReleaseServiceDep,
    settings: SettingsDep,
    page: PaginationDep,
    state: Annotated[ReleasePhase | None, Query(description="Phase.")] = None,
    product: Annotated[str | None, Query(description="Product name.")] = None,
) -> ReleasePage:
    rows, total = service.list_releases(
        state=state, product=product, limit=page.limit, offset=page.offset
    )
    items = [release_summary(row, settings) for row in rows]
    return ReleasePage.build(items, total, page.limit, page.offset)


@router.get(
    "/{release_id}",
    summary="Show a release with its waves, timeline and live progress",
    responses=error_responses(404),
)
async def get_release(
    release_id: str, service: ReleaseServiceDep, settings: SettingsDep
) -> ReleaseDetail:
    details = await run_in_threadpool(service.load_release_details, release_id)
    live = await service.live_progress(details.release)
    return release_detail(details, live, settings)


@router.post(
    "/{release_id}/approve",
    summary="Approve the gate that waits for a decision",
    description=(
        "Needs the releases:approve scope. The four-eyes rule rejects an"
        " approval by the token or user that started the release."
    ),
    responses=ACTION_RESPONSES,
)
async def approve_release(
    release_id: str, body: ApproveBody, actor: ApproveActor, service: ReleaseServiceDep
) -> ActionResult:
    approval = GateApproval(actor=actor, sha256=body.sha256, comment=body.comment)
    return await service.act(release_id, ReleaseAction.APPROVE, approval)


@router.post(
    "/{release_id}/reject",
    summary="Reject the waiting gate and roll the release back",
    description="Needs the releases:approve scope.",
    responses=ACTION_RESPONSES,
)
async def reject_release(
    release_id: str, body: RejectBody, actor: ApproveActor, service: ReleaseServiceDep
) -> ActionResult:
    rejection = GateRejection(actor=actor, comment=body.comment)
    return await service.act(release_id, ReleaseAction.REJECT, rejection)


@router.post(
    "/{release_id}/pause",
    summary="Pause the release before its next wave",
    responses=ACTION_RESPONSES,
)
async def pause_release(
    release_id: str,
    actor: WriteActor,
    service: ReleaseServiceDep,
    body: Annotated[PauseBody | None, Body()] = None,
) -> ActionResult:
    comment = body.comment if body else ""
    pause = PauseRequest(actor=actor, comment=comment)
    return await service.act(release_id, ReleaseAction.PAUSE, pause)


@router.post(
    "/{release_id}/resume",
    summary="Resume a paused release",
    responses=ACTION_RESPONSES,
)
async def resume_release(
    release_id: str, actor: WriteActor, service: ReleaseServiceDep
) -> ActionResult:
    resume = ResumeRequest(actor=actor)
    return await service.act(release_id, ReleaseAction.RESUME, resume)


@router.post(
    "/{release_id}/abort",
    summary="Abort the release, optionally rolling devices back",
    responses=ACTION_RESPONSES,
)
async def abort_release(
    release_id: str, body: AbortBody, actor: WriteActor, service: ReleaseServiceDep
) -> ActionResult:
    abort = AbortRequest(actor=actor, comment=body.comment, roll_back=body.roll_back)
    return await service.act(release_id, ReleaseAction.ABORT, abort)
