"""The start-a-release form, for teams that publish builds without CI.

The upload goes through the API's streaming form parser and the service
layer's ``start_release``, so it is stored, validated and started exactly as
``POST /api/v1/releases`` does it. Each field is checked on its own, so every
invalid field gets its message. The form is sent by htmx, which adds the
CSRF header, because the CSRF check does not read multipart bodies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from otaflow.errors import ConflictError, InvalidInputError, StorageError
from otaflow.identifiers import parse_name, parse_version
from otaflow.models import Release
from otaflow.release_inputs import (
    ReleaseDraft,
    parse_policy,
    parse_release_draft,
    parse_security_version,
    parse_sha256,
)
from otaflow.releases import WorkflowServiceError
from web.api.release_form import receive_release_form
from web.errors import ApiError
from web.portal.access import CsrfChecked, ManagerDep, Portal, PortalDep
from web.portal.errors import PortalRoute
from web.portal.rendering import is_htmx, render, url_path
from workflows.policy import RolloutPolicy

logger = logging.getLogger(__name__)

router = APIRouter(route_class=PortalRoute)

DEFAULT_POLICY = "default"
PASTED_POLICY = "paste"
RELEASE_POLICY_PREFIX = "release:"
RECENT_RELEASES_SCANNED = 100
MAX_POLICY_CHOICES = 10
GROUP_SEPARATOR_RE = re.compile(r"[\s,]+")
# Fields that the form must not leave empty, with an example value each.
REQUIRED_FIELDS = {
    "product": "gateway",
    "hardware": "gw-r2",
    "version": "1.4.0",
}


@dataclass(frozen=True)
class PolicyChoice:
    value: str
    label: str


@router.get("/releases/new", name="release_start")
async def start_page(request: Request, user: ManagerDep, portal: PortalDep) -> Response:
    return await _render_form(request, portal, {"policy_source": DEFAULT_POLICY}, {})


@router.post("/releases/new", dependencies=[CsrfChecked])
async def start_release(
    request: Request, user: ManagerDep, portal: PortalDep
) -> Response:
    limit = portal.settings.max_image_bytes
    values: dict[str, str] = {}
    try:
        async with receive_release_form(request, limit) as form:
            values = {name: entries[0] for name, entries in form.fields.items()}
            values["target_groups"] = ",".join(form.fields.get("target_groups", []))
            draft, errors = await run_in_threadpool(_validate, portal.engine, values)
            if form.image is None:
                errors["image"] = "choose the firmware image file to upload"
            if errors or draft is None or form.image is None:
                return await _render_form(request, portal, values, errors, 422)
            started = await portal.releases.start_release(draft, form.image, user.actor)
    except ApiError as error:
        return _upload_rejected(request, error)
    except (
        InvalidInputError,
        ConflictError,
        StorageError,
        WorkflowServiceError,
    ) as error:
        status, errors = _start_errors(error)
        return await _render_form(request, portal, values, errors, status)
    return _go_to_release(request, started.release.id)


def _validate(
    engine: Engine, values: dict[str, str]
) -> tuple[ReleaseDraft | None, dict[str, str]]:
    """Check each field on its own; return the draft, or None and every error."""
    errors: dict[str, str] = {}
    checks: dict[str, Callable[[str], object]] = {
        "product": lambda text: parse_name("product", text),
        "hardware": lambda text: parse_name("hardware", text),
        "version": lambda text: parse_version("version", text),
        "security_version": lambda text: parse_security_version(text or "0"),
        "sha256": lambda text: parse_sha256("sha256", text) if text.strip() else None,
        "target_groups": lambda text: [
            parse_name("target_groups", group) for group in _groups(text)
        ],
    }
    for name, check in checks.items():
        text = values.get(name, "").strip()
        if not text and name in REQUIRED_FIELDS:
            errors[name] = (
                f"missing {name}: enter one, such as {REQUIRED_FIELDS[name]!r}"
            )
            continue
        try:
            check(text)
        except InvalidInputError as error:
            errors[name] = error.message
    policy_text = None
    try:
        policy_text = _policy_text(engine, values)
    except InvalidInputError as error:
        field = f" ({error.field})" if error.field != "policy" else ""
        errors["policy"] = f"{error.message}{field}"
    if errors:
        return None, errors
    draft = parse_release_draft(
        product=values["product"].strip(),
        hardware=values["hardware"].strip(),
        version=values["version"].strip(),
        security_version=values.get("security_version", "").strip() or 0,
        sha256=values.get("sha256", "").strip() or None,
        policy_text=policy_text,
        allow_downgrade=values.get("allow_downgrade", "") == "true",
        target_groups=_groups(values.get("target_groups", "")),
    )
    return draft, errors


def _groups(text: str) -> list[str]:
    return [group for group in GROUP_SEPARATOR_RE.split(text.strip()) if group]


def _policy_text(engine: Engine, values: dict[str, str]) -> str | None:
    """Return the chosen policy's YAML, validated; None means the default policy."""
    source = values.get("policy_source", DEFAULT_POLICY)
    if source == DEFAULT_POLICY:
        return None
    if source == PASTED_POLICY:
        text = values.get("policy", "")
        if not text.strip():
            raise InvalidInputError(
                "policy", text, "paste a rollout policy in YAML, or choose one above"
            )
    elif source.startswith(RELEASE_POLICY_PREFIX):
        text = _release_policy(engine, source.removeprefix(RELEASE_POLICY_PREFIX))
    else:
        raise InvalidInputError("policy", source, f"unknown policy choice {source!r}")
    parse_policy(text)
    return text


def _release_policy(engine: Engine, release_id: str) -> str:
    with Session(engine) as session:
        release = session.get(Release, release_id)
    if release is None:
        raise InvalidInputError(
            "policy", release_id, f"release {release_id!r} no longer exists"
        )
    # A resolved policy in JSON is valid YAML with every field explicit.
    return release.policy_json


def _policy_choices(engine: Engine) -> list[PolicyChoice]:
    """List the default policy, then the policies of recent releases, one per name."""
    with Session(engine) as session:
        rows = session.exec(
            select(Release.id, Release.policy_json)
            .order_by(col(Release.created_at).desc())
            .limit(RECENT_RELEASES_SCANNED)
        ).all()
    choices = [PolicyChoice(DEFAULT_POLICY, "Default policy")]
    seen: set[str] = set()
    for release_id, policy_json in rows:
        try:
            name = RolloutPolicy.model_validate_json(policy_json).name
        except ValueError:
            continue
        if name in seen or len(choices) > MAX_POLICY_CHOICES:
            continue
        seen.add(name)
        label = f"Policy '{name}' as used by {release_id}"
        choices.append(PolicyChoice(RELEASE_POLICY_PREFIX + release_id, label))
    choices.append(PolicyChoice(PASTED_POLICY, "Paste a policy (YAML)"))
    return choices


async def _render_form(
    request: Request,
    portal: Portal,
    values: dict[str, str],
    errors: dict[str, str],
    status_code: int = 200,
) -> Response:
    choices = await run_in_threadpool(_policy_choices, portal.engine)
    context: dict[str, Any] = {
        "values": values,
        "errors": errors,
        "policy_choices": choices,
        "max_image_bytes": portal.settings.max_image_bytes,
    }
    template = "releases/_start_form.html" if is_htmx(request) else "releases/new.html"
    return render(request, template, context, status_code=status_code)


def _start_errors(error: Exception) -> tuple[int, dict[str, str]]:
    if isinstance(error, InvalidInputError):
        field = error.field if error.field in ("image", "sha256") else "form"
        return 422, {field: error.message}
    if isinstance(error, ConflictError):
        return 409, {"version": str(error)}
    logger.warning("starting a release from the portal failed: %s", error)
    return 503, {"form": str(error)}


def _upload_rejected(request: Request, error: ApiError) -> Response:
    """Show a rejected upload (too large) next to the image field.

    The rest of the form may not have been read, so htmx swaps only the
    message and the browser keeps what the user typed.
    """
    headers = {"HX-Retarget": "#error-image", "HX-Reswap": "innerHTML"}
    return render(
        request,
        "partials/field_error.html",
        {"message": error.message},
        status_code=error.status_code,
        headers=headers,
    )


def _go_to_release(request: Request, release_id: str) -> Response:
    location = f"/releases/{url_path(release_id)}"
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)
