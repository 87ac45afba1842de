"""Gate actions from the release page: approve, reject, pause, resume, abort.

Each action goes to the workflow as an update through ``ReleaseService.act``,
so the workflow's validator decides (gate waiting, SHA-256, four-eyes rule),
and its message is shown next to the buttons. Every form carries a one-time
nonce that is spent before the update is sent, so a double click or a resent
form reaches the workflow once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.models import Release
from otaflow.release_inputs import parse_sha256
from otaflow.releases import (
    ActionRequest,
    ReleaseAction,
    ReleaseActionRejectedError,
    WorkflowServiceError,
)
from web.portal.access import CsrfChecked, ManagerDep, Portal, PortalDep, PortalUser
from web.portal.errors import PortalRoute
from web.portal.rendering import is_htmx, render, url_path
from web.portal.sessions import consume_nonce
from workflows.messages import (
    FINAL_PHASES,
    AbortRequest,
    GateApproval,
    GateRejection,
    PauseRequest,
    ReleasePhase,
    ResumeRequest,
)
from workflows.policy import RolloutPolicy

logger = logging.getLogger(__name__)

router = APIRouter(route_class=PortalRoute)

MAX_COMMENT_CHARS = 2000
RELEASE_CHANGED_EVENT = "release-changed"


@dataclass(frozen=True)
class ActionPanel:
    """The action buttons of a release page, with the outcome of the last action."""

    release_id: str
    sha256: str
    can_act: bool
    running: bool
    paused: bool
    waiting_wave: str | None
    four_eyes_applies: bool
    nonce: str
    notice: str | None = None
    error: str | None = None
    field_errors: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)

    @property
    def state_key(self) -> tuple[object, ...]:
        """What decides which buttons show."""
        return (self.can_act, self.running, self.paused, self.waiting_wave)

    @property
    def fingerprint(self) -> str:
        """Digest of ``state_key``, which the page sends back with each live poll."""
        return hashlib.sha256(repr(self.state_key).encode()).hexdigest()[:32]


class ActionForm(BaseModel):
    """The fields of every action form; each action reads the ones it needs."""

    model_config = ConfigDict(extra="ignore")

    nonce: str = Field(default="", max_length=500)
    sha256: str = Field(default="", max_length=200)
    comment: str = Field(default="", max_length=20_000)
    roll_back: bool = False


class ActionFormError(Exception):
    def __init__(self, field_errors: dict[str, str]) -> None:
        self.field_errors = field_errors
        super().__init__("; ".join(field_errors.values()))


def action_panel(
    portal: Portal,
    user: PortalUser,
    release: Release,
    *,
    phase: str,
    paused: bool,
    waiting_wave: str | None,
    four_eyes: bool,
) -> ActionPanel:
    return ActionPanel(
        release_id=release.id,
        sha256=release.sha256,
        can_act=user.can("release_manager"),
        running=phase not in FINAL_PHASES,
        paused=paused,
        waiting_wave=waiting_wave,
        four_eyes_applies=four_eyes and release.started_by == user.actor,
        nonce=portal.signer.issue_nonce(user.id),
    )


async def load_action_panel(
    portal: Portal, user: PortalUser, release: Release
) -> ActionPanel:
    """Build the panel from the workflow's live progress, or the row when final."""
    live = await portal.releases.live_progress(release)
    progress = live.progress
    waiting_wave = None
    if progress is not None and progress.waiting_gate is not None:
        names = {wave.index: wave.name for wave in progress.waves}
        waiting_wave = names.get(progress.waiting_gate, f"wave {progress.waiting_gate}")
    return action_panel(
        portal,
        user,
        release,
        phase=progress.phase if progress else release.state,
        paused=progress.paused if progress else release.state == ReleasePhase.PAUSED,
        waiting_wave=waiting_wave,
        four_eyes=_four_eyes(release),
    )


def _four_eyes(release: Release) -> bool:
    try:
        return RolloutPolicy.model_validate_json(release.policy_json).four_eyes
    except ValueError:
        return True


@router.post("/releases/{release_id}/{action}", dependencies=[CsrfChecked])
async def act_on_release(
    release_id: str,
    action: ReleaseAction,
    request: Request,
    user: ManagerDep,
    portal: PortalDep,
    form: Annotated[ActionForm, Form()],
) -> Response:
    release = await run_in_threadpool(portal.releases.get_release, release_id)
    if release is None:
        raise NotFoundError("release", release_id)
    outcome = await _send_action(portal, user, release_id, action, form)
    panel = await load_action_panel(portal, user, release)
    panel = replace(
        panel,
        notice=outcome.notice,
        error=outcome.error,
        field_errors=outcome.field_errors,
        values=outcome.values,
    )
    if not is_htmx(request):
        if outcome.status_code == 200:
            return RedirectResponse(f"/releases/{url_path(release_id)}", 303)
        return render(
            request,
            "release/action_result.html",
            {"panel": panel, "release": release},
            status_code=outcome.status_code,
        )
    headers = (
        {"HX-Trigger": RELEASE_CHANGED_EVENT} if outcome.status_code == 200 else {}
    )
    return render(
        request,
        "release/_actions.html",
        {"panel": panel, "release": release},
        status_code=outcome.status_code,
        headers=headers,
    )


@dataclass(frozen=True)
class _Outcome:
    """The HTTP status of an action and what the panel shows about it."""

    status_code: int
    notice: str | None = None
    error: str | None = None
    field_errors: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)


async def _send_action(
    portal: Portal,
    user: PortalUser,
    release_id: str,
    action: ReleaseAction,
    form: ActionForm,
) -> _Outcome:
    """Validate the form, spend its nonce and send the update.

    Invalid input, a spent nonce, a rejected update and an unreachable
    Temporal come back as an outcome for the panel. Other errors propagate.
    """
    values = {
        f"{action}.comment": form.comment,
        f"{action}.roll_back": str(form.roll_back),
    }
    try:
        request = parse_action(action, form, user.actor)
        await run_in_threadpool(
            consume_nonce, portal.engine, portal.signer, form.nonce, user.id
        )
        result = await portal.releases.act(release_id, action, request)
    except ActionFormError as invalid:
        return _Outcome(422, field_errors=invalid.field_errors, values=values)
    except InvalidInputError as error:
        return _Outcome(409, error=error.message)
    except ReleaseActionRejectedError as error:
        return _Outcome(409, error=f"{action} rejected: {error.reason}", values=values)
    except ConflictError as error:
        return _Outcome(409, error=str(error))
    except WorkflowServiceError as error:
        logger.warning(
            "%s of release %s by %s failed: %s", action, release_id, user.actor, error
        )
        return _Outcome(503, error=str(error), values=values)
    return _Outcome(200, notice=result.message)


def parse_action(action: ReleaseAction, form: ActionForm, actor: str) -> ActionRequest:
    """Build the update's input from the form, raising ``ActionFormError``."""
    errors: dict[str, str] = {}
    comment = form.comment.strip()
    if len(comment) > MAX_COMMENT_CHARS:
        errors[f"{action}.comment"] = (
            f"the comment has {len(comment)} characters; shorten it to at most"
            f" {MAX_COMMENT_CHARS}"
        )
    elif not comment and action in (ReleaseAction.REJECT, ReleaseAction.ABORT):
        errors[f"{action}.comment"] = f"enter a comment that says why you {action}"
    sha256 = ""
    if action is ReleaseAction.APPROVE:
        try:
            sha256 = parse_sha256("sha256", form.sha256)
        except InvalidInputError as error:
            errors[f"{action}.sha256"] = error.message
    if errors:
        raise ActionFormError(errors)

    if action is ReleaseAction.APPROVE:
        return GateApproval(actor=actor, sha256=sha256, comment=comment)
    if action is ReleaseAction.REJECT:
        return GateRejection(actor=actor, comment=comment)
    if action is ReleaseAction.PAUSE:
        return PauseRequest(actor=actor, comment=comment)
    if action is ReleaseAction.RESUME:
        return ResumeRequest(actor=actor)
    return AbortRequest(actor=actor, comment=comment, roll_back=form.roll_back)
