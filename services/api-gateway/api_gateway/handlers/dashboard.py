"""``/``: the dashboard, plain static files of this package (no build step, no CDN).

The page (``static/dashboard``) asks for an API key, reads the REST API with it and follows
live updates from the WebSocket broadcaster, which listens on another origin: its URL comes from
``/dashboard/config.json``, and the page's Content-Security-Policy allows exactly that origin in
``connect-src`` besides ``'self'``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from api_gateway.state import SETTINGS

STATIC_DIR: Final = Path(str(files("api_gateway") / "static" / "dashboard"))
ASSETS: Final = {
    "app.js": "application/javascript",
    "style.css": "text/css",
}
DEFAULT_WS_PORT: Final = 8081
WS_PATH: Final = "/v1/ws"
# Revalidated on every load: the files change with the gateway's version.
NO_CACHE: Final = {"Cache-Control": "no-cache"}


def ws_url(request: web.Request) -> str:
    """The broadcaster's URL: the setting, else the page's host on the broadcaster's port."""
    configured = request.app[SETTINGS].dashboard_ws_url
    if configured:
        return configured
    scheme = "wss" if request.scheme == "https" else "ws"
    host = request.url.host or "127.0.0.1"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{DEFAULT_WS_PORT}{WS_PATH}"


def content_security_policy(ws: str) -> str:
    parts = urlsplit(ws)
    origin = f"{parts.scheme}://{parts.netloc}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {origin}; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


async def dashboard_page(request: web.Request) -> web.FileResponse:
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": content_security_policy(ws_url(request)),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        **NO_CACHE,
    }
    return web.FileResponse(STATIC_DIR / "index.html", headers=headers)


async def dashboard_config(request: web.Request) -> web.Response:
    return web.json_response({"ws_url": ws_url(request)}, headers=NO_CACHE)


async def dashboard_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    headers = {"Content-Type": content_type, "X-Content-Type-Options": "nosniff", **NO_CACHE}
    return web.FileResponse(STATIC_DIR / name, headers=headers)
