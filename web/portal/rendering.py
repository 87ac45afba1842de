"""Jinja2 rendering of portal pages: the template environment, filters, headers.

Every portal response goes through ``render`` or ``render_fragment``, which add
the signed-in user, the CSRF token and the security headers. The Content
Security Policy allows scripts and styles from the portal's own origin only,
so templates use no inline scripts or ``style`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from otaflow.models import utc_now

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
# Colour class of each state badge; states not listed are shown as neutral.
STATE_TONES = {
    "completed": "good",
    "succeeded": "good",
    "promoted": "good",
    "promote": "good",
    "hold": "attention",
    "rollback": "bad",
    "awaiting_approval": "attention",
    "held": "attention",
    "gate": "attention",
    "paused": "attention",
    "failed": "bad",
    "rolled_back": "bad",
    "rolling_back": "bad",
    "rejected": "bad",
    "aborted": "bad",
    "stopped": "bad",
    "verifying": "active",
    "signing": "active",
    "storing": "active",
    "planning": "active",
    "dispatching": "active",
    "monitoring": "active",
    "baking": "active",
    "downloading": "active",
    "downloaded": "active",
    "installing": "active",
    "rebooting": "active",
    "verified": "active",
    "received": "active",
    "dispatched": "active",
    "online": "good",
    "offline": "muted",
    "skipped": "muted",
    "planned": "muted",
    "pending": "muted",
}


def state_tone(state: str | None) -> str:
    return STATE_TONES.get(state or "", "neutral")


def state_label(state: str | None) -> str:
    return (state or "unknown").replace("_", " ")


def format_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


def format_age(value: datetime | None, now: datetime | None = None) -> str:
    """Describe how long ago ``value`` was, in the largest whole unit."""
    if value is None:
        return "—"
    seconds = max(0, int(((now or utc_now()) - value).total_seconds()))
    for unit_s, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= unit_s:
            return f"{seconds // unit_s} {unit} ago"
    return f"{seconds} s ago"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def format_percent(fraction: float | None) -> str:
    if fraction is None or math.isnan(fraction):
        return "—"
    return f"{fraction * 100:.0f}%"


def url_path(value: str) -> str:
    """Quote an id for a portal path; ``:`` stays, as in release ids."""
    return quote(value, safe=":")


def query_string(params: Mapping[str, object], **changes: object) -> str:
    """Build ``?a=1&b=2`` from ``params`` with ``changes``, leaving out empty values."""
    merged = {**params, **changes}
    present = {key: value for key, value in merged.items() if value not in (None, "")}
    return "?" + urlencode(present) if present else ""


def _make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    environment = templates.env
    environment.filters.update(
        tone=state_tone,
        state_label=state_label,
        time=format_time,
        age=format_age,
        bytes=format_bytes,
        percent=format_percent,
        url_path=url_path,
    )
    environment.globals["query_string"] = query_string
    environment.trim_blocks = True
    environment.lstrip_blocks = True
    return templates


templates = _make_templates()


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """Render a page or fragment with the request's user and CSRF token."""
    values = {
        "user": getattr(request.state, "portal_user", None),
        "csrf_token": getattr(request.state, "csrf_token", ""),
        "request_id": getattr(request.state, "request_id", ""),
        **(context or {}),
    }
    response = templates.TemplateResponse(
        request, template, values, status_code=status_code
    )
    response.headers.update({**SECURITY_HEADERS, **(headers or {})})
    return response


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"
