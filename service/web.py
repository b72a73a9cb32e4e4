"""The browser page (`GET /` and its three static files: two scripts and a stylesheet, no build)
and the API docs (`GET /docs`: the Swagger UI files the `fastapi-offline` package ships, served from
this process so the docs work without network access).

Files are served from a fixed allow-list (no client-given paths) with a strict Content Security
Policy: scripts and styles only from this origin, images from this origin, `data:` (the
restored image arrives base64 in the JSON answer) and `blob:` (the local preview); media
from this origin and `blob:` (the restored video, fetched with the API key header).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

# name -> media type; the only files this router ever reads.
_STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "video.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; media-src 'self' blob:; object-src 'none'; "
        "base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Re-validate on every load (ETag/Last-Modified make that cheap), so a new release shows up.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The upload page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers=_SECURITY_HEADERS,
    )


def _static_route(name: str, media_type: str) -> None:
    path = STATIC_DIR / name

    def serve() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers=_SECURITY_HEADERS)

    router.add_api_route(f"/static/{name}", serve, methods=["GET"], name=f"static:{name}")


for _name, _media_type in _STATIC_FILES.items():
    _static_route(_name, _media_type)


# --- API docs ------------------------------------------------------------------------------------

SWAGGER_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
# name -> media type; the only files of the bundle served.
_SWAGGER_FILES: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}


@router.get("/docs")
def docs() -> HTMLResponse:
    """Swagger UI for /openapi.json, every asset from this server."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="OSDFace API",
        swagger_js_url="/docs/static/swagger-ui-bundle.js",
        swagger_css_url="/docs/static/swagger-ui.css",
        swagger_favicon_url="/docs/static/favicon.png",
    )


@router.get("/docs/static/{name}")
def docs_static(name: str) -> FileResponse:
    if name not in _SWAGGER_FILES:
        raise HTTPException(404, f"no docs file {name!r}")
    return FileResponse(
        SWAGGER_DIR / name,
        media_type=_SWAGGER_FILES[name],
        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
