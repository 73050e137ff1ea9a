"""The web page at `/`: a chat on the server's own OpenAI-compatible endpoint beside a live view of
the Virtual Experts (per-layer residency, swaps, hit rate, memory against the budget, the budget and
τ knobs). Three static files shipped in the package (static/: one HTML, one JS, one CSS, no build
step, nothing fetched from elsewhere); the page reads GET /swapmoe/state and POSTs /swapmoe/budget.

As llama-server, the page's files need no API key (PAGE_PATHS); everything they call does, and the
page asks for the key once. llama-server's web UI also answers /sw.js, /manifest.webmanifest and
/_app/version.json; so does this one: a browser that once ran llama-server's UI on this address
keeps its service worker, and the sw.js here removes it (llama-server's own answer when its UI is
replaced).
"""
from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .core import Core

FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/webui.js": ("webui.js", "text/javascript; charset=utf-8"), "/webui.css": ("webui.css", "text/css; charset=utf-8")}
SW_REMOVE = """self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil((async () => {
    await self.registration.unregister();
    for (const key of await caches.keys()) await caches.delete(key);
    for (const c of await self.clients.matchAll({ type: 'window' })) c.navigate(c.url);
})()));
"""
PAGE_PATHS = frozenset(FILES) | {"/sw.js", "/manifest.webmanifest", "/_app/version.json"}


def read(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def public_paths(ui: bool) -> frozenset[str]:
    """The paths the API key does not guard."""
    return PAGE_PATHS if ui else frozenset({"/sw.js"})


def router(core: Core, ui: bool = True) -> APIRouter:
    """The page's routes; with `ui` off (--no-ui) only /sw.js, as llama-server."""
    r = APIRouter()

    @r.get("/sw.js", include_in_schema=False)
    async def service_worker() -> Response:
        return Response(SW_REMOVE, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    if not ui:
        return r
    # read once: the files ship with the package and do not change while serving
    pages = {path: (read(name), ctype) for path, (name, ctype) in FILES.items()}
    no_cache = {"Cache-Control": "no-cache"}

    def page(path: str) -> Any:
        async def get() -> Response:
            body, ctype = pages[path]
            return Response(body, media_type=ctype, headers=no_cache)
        return get

    for path in FILES:
        r.add_api_route(path, page(path), methods=["GET"], include_in_schema=False)

    @r.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> JSONResponse:
        return JSONResponse({"name": f"swapmoe-gguf: {core.alias}", "short_name": "swapmoe", "start_url": "/",
                             "display": "standalone", "icons": []}, media_type="application/manifest+json",
                            headers=no_cache)

    @r.get("/_app/version.json", include_in_schema=False)
    async def version() -> JSONResponse:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            v = dist_version("swapmoe-gguf")
        except PackageNotFoundError:
            v = "0"
        return JSONResponse({"version": v}, headers=no_cache)

    return r
