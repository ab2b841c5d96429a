"""The playground: a static page of the app (``playground/`` at the repository's root) served from an
allow-list of names, with a strict Content-Security-Policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import NotFoundError

PLAYGROUND_DIR = Path(__file__).resolve().parents[2] / "playground"

# The playground's files: the only names GET /api/playground/{file} serves, and their media types.
PLAYGROUND_FILES = {
    "playground.css": "text/css",
    "playground.js": "text/javascript",
    "icon.svg": "image/svg+xml",
}


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class FileResponse:
    """A response that is a file of the app (the playground), not JSON."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def playground_page(url: str = "") -> FileResponse:
    """``GET /api/playground``: the page, from ``playground/index.html``. The host also routes
    ``/api/playground/`` here, where the page's relative URLs (``playground/playground.css``)
    would miss: ``url`` (the request's) ending in ``/`` gets a 308 to the page's own URL instead."""
    parts = urlsplit(url)
    if parts.path.endswith("/"):
        # relative, so that it holds behind a proxy that rewrites the path prefix (API Management)
        location = "../playground" + (f"?{parts.query}" if parts.query else "")
        return FileResponse(308, b"", "text/html", {"Location": location, "Cache-Control": "no-cache"})
    return FileResponse(200, (PLAYGROUND_DIR / "index.html").read_bytes(), "text/html", _headers())


def playground_file(name: str) -> FileResponse:
    """``GET /api/playground/{file}``: one allow-listed file of ``playground/``; any other name is 404.

    Raises:
        NotFoundError: ``name`` is not on the allow-list.
    """
    media_type = PLAYGROUND_FILES.get(name)
    if media_type is None:  # the allow-list, not the file system, decides: no path ever comes from the caller
        raise NotFoundError("no such playground file")
    return FileResponse(200, (PLAYGROUND_DIR / name).read_bytes(), media_type, _headers())
