"""The browser page: `GET /` and its two static files, plain HTML + JS + CSS with no build step.

Files are served from a fixed allow-list (no client-given paths) with a strict Content Security
Policy: scripts and styles only from this origin, images from this origin, `data:` (the
restored image arrives base64 in the JSON answer) and `blob:` (the local preview); media
from this origin and `blob:` (the restored video, fetched with the API key header).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

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
