"""The interactive API reference at ``/docs``: Swagger UI served from ``/static``.

FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a CDN, so the
app turns them off and serves Swagger UI from ``web/static/swagger`` (see
``web/static/VENDORED.md``). The page gets a Content Security Policy of its
own. It allows the one inline script that starts Swagger UI by its SHA-256
and, unlike the portal's policy, inline styles, because Swagger UI's React
components set ``style`` attributes.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

DOCS_PATH = "/docs"
SWAGGER_STATIC = "/static/swagger"
# validatorUrl None stops Swagger UI from loading its validity badge from
# validator.swagger.io, which would be sent the schema's URL.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
INLINE_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@router.get(DOCS_PATH)
def api_docs(request: Request) -> HTMLResponse:
    html = _swagger_ui_html(
        request.app.openapi_url or "/openapi.json", request.app.title
    )
    headers = {
        "Content-Security-Policy": docs_content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    return HTMLResponse(html, headers=headers)


@cache
def _swagger_ui_html(openapi_url: str, title: str) -> str:
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} API",
        swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )
    return bytes(page.body).decode()


def docs_content_security_policy(html: str) -> str:
    """Build the page's policy, allowing its inline scripts by their SHA-256."""
    hashes = " ".join(
        f"'sha256-{_sha256_base64(script)}'"
        for script in INLINE_SCRIPT_RE.findall(html)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'"
        " 'unsafe-inline'; img-src 'self' data:; connect-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def _sha256_base64(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
