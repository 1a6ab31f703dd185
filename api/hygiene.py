"""HTTP hygiene: trusted Host headers, no state change without a credential header, the admin
response header, and /docs with Swagger UI served locally (no CDN)."""

from __future__ import annotations

import swagger_ui_bundle  # type: ignore[import-untyped]
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import ADMIN_HEADER
from api.errors import error_response
from sluice.config import Settings

# A browser sends a cross-site form (multipart or urlencoded) or a text/plain POST without a
# preflight, with the victim's ambient credentials; it cannot add an Authorization header
# without one. So a state change must carry that header, even with auth off.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DOCS_ASSETS = "/docs-assets"
# Orchestrators probe and scrape by address (Host: 10.1.2.3:8000, never a configured name);
# these paths answer any Host: they need no key and show no owner's data.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def host_of(header: str) -> str:
    """The host of a Host header, lower case, without the port ("[::1]:80" -> "::1")."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact names, "*" (any), or "*.example.com" (its subdomains)."""
    for name in allowed:
        if name == "*" or host == name:
            return True
        if name.startswith("*.") and host.endswith(name[1:]):
            return True
    return False


class Hygiene:
    """Pure ASGI middleware (no body buffering): Host check, credential header, admin header."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.allowed = settings.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        host = host_of(headers.get("host", b"").decode("latin-1"))
        probe = scope["path"] in PROBE_PATHS
        if not probe and (not host or not host_allowed(host, self.allowed)):
            # DNS rebinding: a page on evil.example resolving to this API's address.
            response = error_response(
                400,
                "the Host header names no host this API serves (SLUICE_TRUSTED_HOSTS)",
                code="invalid_host",
                param="Host",
            )
            await response(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and not headers.get("authorization"):
            response = error_response(
                401,
                "requests that change state need an `Authorization: Bearer <key>` header",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start" and scope.get("state", {}).get(
                "sluice_admin"
            ):
                # Admin keys read every owner's resources: the answer says so.
                message["headers"] = [
                    *message.get("headers", []),
                    (ADMIN_HEADER.lower().encode(), b"all-owners"),
                ]
            await send(message)

        await self.app(scope, receive, send_marked)


def install_docs(app: FastAPI) -> None:
    """/docs from files in the swagger-ui-bundle package (the page works offline)."""
    app.mount(
        DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="docs"
    )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def install(app: FastAPI, settings: Settings) -> None:
    """Add the middleware and the local docs."""
    app.add_middleware(Hygiene, settings=settings)
    install_docs(app)
