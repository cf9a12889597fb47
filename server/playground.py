"""The browser playground: ``GET /`` serves one static page (server/static/, shipped as package
data: no build step, no CDN) that talks to the server's own OpenAI API from the browser.

The page holds no secrets and needs no server state, so it is open even when auth is on; it
asks for the API key when /v1/models answers 401 and sends it like any other client.
``serve-llm --no-playground`` leaves both routes out (404).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_PATH = "/playground"  # the page's script and stylesheet


def add_playground(app: FastAPI, sampling_defaults: Mapping[str, Any]) -> None:
    """Serve the page at /, its assets under /playground/, and the server's request defaults
    (from generation_config.json), which the page shows, at /playground/defaults.json."""
    defaults = dict(sampling_defaults)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(ASSETS_PATH + "/defaults.json", include_in_schema=False)
    async def request_defaults() -> JSONResponse:
        return JSONResponse(defaults)

    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="playground")
