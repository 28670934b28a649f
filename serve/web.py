"""The web page of the Serve app: static HTML/JS/CSS from ``serve/static/``, served by the same ingress.

Routes (added to the ingress's FastAPI app by :func:`mount`)::

    GET /                 the page (serve/static/index.html)
    GET /static/{file}    its script and style sheet (a fixed list of files; nothing else on disk is reachable)
    GET /api              the routes of the OpenAPI document as a plain HTML page (works offline; FastAPI's
                          /docs loads Swagger UI's scripts from a CDN and stays blank without network)

The page calls only the JSON routes of :mod:`serve.app` (``/v1/models`` and
``/v1/models/{name}/<operation>``) with relative URLs, so it works under any
``route_prefix`` and every request passes the same validation and limits as curl's.
No JavaScript library, no CDN, no build step.
"""
from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

STATIC = Path(__file__).resolve().parent / "static"
#: the files the page is made of -> content type (only these are served)
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
NO_CACHE = {"cache-control": "no-cache"}


def _file(name: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=FILES[name], headers=NO_CACHE)


def api_page(spec: dict) -> str:
    """An HTML list of the OpenAPI document's operations (method, path, summary, body fields)."""
    rows = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {})
            fields = []
            for ctype, c in body.items():
                props = c.get("schema", {}).get("properties", {})
                if props:
                    fields.append(f"{html.escape(ctype)}: " + ", ".join(html.escape(k) for k in props))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{'<br>'.join(fields)}</td></tr>")
    info = spec.get("info", {})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', 'API'))} API"
            "</title><link rel='icon' href='data:,'><link rel='stylesheet' href='static/style.css'></head><body>"
            f"<header><h1>{html.escape(info.get('title', ''))} API</h1><nav><a href='./'>page</a> "
            "<a href='openapi.json'>openapi.json</a> <a href='docs'>Swagger UI (needs network)</a></nav></header>"
            f"<main class='api'><p>{html.escape(info.get('description', ''))}</p><table><thead><tr><th>method</th>"
            "<th>path</th><th>what</th><th>body fields</th></tr></thead><tbody>" + "".join(rows) +
            "</tbody></table></main></body></html>")


def mount(app: FastAPI):
    """Add the page's routes to ``app`` (call before ``serve.ingress(app)`` wraps it)."""

    @app.get("/", include_in_schema=False)
    async def index():
        return _file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES:
            return JSONResponse({"detail": {"field": "name", "message": f"name: no static file {name!r}; "
                                                                        f"the page's files: {sorted(FILES)}"}},
                                status_code=404)
        return _file(name)

    @app.get("/api", include_in_schema=False, response_class=HTMLResponse)
    async def api(request: Request):
        return HTMLResponse(api_page(request.app.openapi()))
