"""The dashboard's files (``synapse/ui/``), served by every node at ``/ui/``.

The files hold no data: the page asks for a token and calls the API with it, so serving them
needs none (as Nomad's and Consul's UIs load before their token prompt), and what the page
shows is exactly what that token may read. Only the files the package ships are served, by
name — nothing under ``/ui/`` reaches the filesystem otherwise. The Content-Security-Policy
lets the page run only its own script and talk only to the node that served it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from synapse.api.common import ApiError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load: after an upgrade the browser runs the new page, never a
    # cached old one against the new API.
    "Cache-Control": "no-cache",
}


def _shipped() -> dict[str, tuple[bytes, str]]:
    """Every file of the dashboard, read once: name -> (bytes, content type)."""
    if not UI_DIR.is_dir():
        return {}
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in UI_DIR.iterdir() if p.suffix in _TYPES}


_FILES = _shipped()


async def ui_file(request: web.Request) -> web.Response:
    name = request.match_info.get("file") or "index.html"
    shipped = _FILES.get(name)
    if shipped is None:
        raise ApiError(404, "not_found", f"the dashboard has no file {name!r}; open /ui/")
    body, content_type = shipped
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


async def to_dashboard(request: web.Request) -> web.Response:
    # Returned, not raised: the pipeline answers a raised HTTPException as a JSON error.
    return web.Response(status=302, headers={"Location": "/ui/"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", to_dashboard)
    app.router.add_get("/ui", to_dashboard)
    app.router.add_get("/ui/", ui_file)
    app.router.add_get("/ui/{file}", ui_file)
