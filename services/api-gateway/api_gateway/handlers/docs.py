"""``/openapi.json`` and ``/docs``: Swagger UI served from the installed package, no CDN.

The assets come from the ``swagger-ui-py`` wheel (Swagger UI 5, which reads OpenAPI 3.1); the
page loads nothing from another origin, and its Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from aiohttp import web

from api_gateway.state import OPENAPI

ASSETS_DIR: Final = Path(str(files("swagger_ui") / "static"))
ASSETS: Final = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "application/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

DOCS_HTML: Final = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>tokvel API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

INIT_JS: Final = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null
  });
});
"""

# Everything from this origin; Swagger UI sets inline styles and uses data: images.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def docs_page(_: web.Request) -> web.Response:
    return web.Response(
        text=DOCS_HTML,
        content_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


async def docs_init(_: web.Request) -> web.Response:
    return web.Response(text=INIT_JS, content_type="application/javascript")


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.FileResponse(
        ASSETS_DIR / name,
        headers={"Content-Type": content_type, "Cache-Control": "public, max-age=86400"},
    )
