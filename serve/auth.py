"""Optional API keys of the Serve app: ``Authorization: Bearer <key>`` on every route but the open ones.

Keys come from the environment variable named by ``args.auth.keys_env`` (default
``RAYMANIFOLD_API_KEYS``; keys separated by commas or white space) and/or from the file named by
``args.auth.keys_file`` (one key per line, ``#`` comments), read by the application builder in the
process that builds the app (``raymanifold serve``, or the build task of ``serve deploy``). A key file
inside the repository is refused, so keys never get committed; keys shorter than
:data:`MIN_KEY_CHARS` are refused too.

Only SHA-256 digests of the keys leave the builder (the ingress's init arguments); a request's key is
hashed and compared with :func:`hmac.compare_digest` against every digest (no early exit), so neither
the key's length nor which key matched shows in the timing. Keys are never printed, logged, nor sent
to MLflow; a 401 answer names the header, never the key.

Open without a key: ``/healthz`` (load balancers probe it) and the web page's files (``/`` and
``/static/...``: the page then asks for a key and sends it with each JSON call). Everything else,
including ``/v1/models``, ``/docs``, ``/openapi.json`` and ``/api``, answers 401 without a valid key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

DEFAULT_ENV = "RAYMANIFOLD_API_KEYS"
MIN_KEY_CHARS = 16
#: paths (below the app's route prefix) that never need a key
OPEN_PATHS = ("/healthz", "/")
_SPLIT = re.compile(r"[\s,]+")


#: SHA-256 digests of the keys this process accepts (set by the ingress replica's constructor through
#: :func:`configure`; Serve serves a frozen copy of the FastAPI app, so the middleware reads them here)
_ALLOWED: tuple = ()


def configure(key_digests) -> None:
    """Accept exactly these key digests from now on in this process (empty: every route open)."""
    global _ALLOWED
    _ALLOWED = tuple(key_digests)


class KeysError(ValueError):
    """The configured keys are unusable (message names the setting, never a key)."""


def read_keys(env_var: Optional[str], keys_file: Optional[str], *, repo_root: Path,
              environ: Optional[dict] = None) -> list[str]:
    """The keys of the environment variable ``env_var`` and the file ``keys_file`` (either may be absent)."""
    environ = os.environ if environ is None else environ
    keys = []
    if env_var and environ.get(env_var, "").strip():
        keys += [k for k in _SPLIT.split(environ[env_var].strip()) if k]
    if keys_file:
        p = Path(keys_file).expanduser()
        if not p.is_absolute():
            raise KeysError(f"args.auth.keys_file: give an absolute path outside the repository, got {keys_file!r}")
        try:
            p.resolve().relative_to(repo_root.resolve())
            inside = True
        except ValueError:
            inside = False
        if inside:
            raise KeysError("args.auth.keys_file: the key file lies inside the repository; keep keys out of it "
                            "(e.g. /etc/raymanifold/api_keys, mode 600)")
        if not p.is_file():
            raise KeysError(f"args.auth.keys_file: {str(p)!r} does not exist or is not a file")
        for line in p.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys += [k for k in _SPLIT.split(line) if k]
    short = sum(len(k) < MIN_KEY_CHARS for k in keys)
    if short:
        src = " and ".join(s for s in (f"${env_var}" if env_var and environ.get(env_var) else "",
                                       "args.auth.keys_file" if keys_file else "") if s)
        raise KeysError(f"{src}: {short} key(s) shorter than {MIN_KEY_CHARS} characters; use long random keys "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def digests(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(sorted({digest(k) for k in keys}))


def key_matches(given: str, allowed: tuple[bytes, ...]) -> bool:
    """Constant-time check of one presented key against every allowed digest."""
    d = digest(given)
    ok = False
    for a in allowed:
        ok |= hmac.compare_digest(d, a)
    return ok


_STATIC_FILE = re.compile(r"^/static/[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def is_open_path(path: str) -> bool:
    """``/healthz``, ``/`` and ``/static/<file>`` (one plain segment: no ``..``, no further ``/``)."""
    return path in OPEN_PATHS or (bool(_STATIC_FILE.match(path)) and ".." not in path)


def bearer(headers: list) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header among ASGI headers, else None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _unauthorized(message: str) -> tuple[bytes, list]:
    body = json.dumps({"detail": {"field": "authorization", "message": f"authorization: {message}"}}).encode()
    return body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                  (b"www-authenticate", b'Bearer realm="raymanifold"')]


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 unless the request carries an allowed key (or its path is open).

    The allowed digests are the process's (:func:`configure`, called by the ingress replica's
    constructor); none configured means every route is open.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            allowed = _ALLOWED
            if allowed:
                path = scope.get("path", "/")
                root = scope.get("root_path", "")
                if root and path.startswith(root):
                    path = path[len(root):] or "/"
                if not is_open_path(path):
                    token = bearer(scope.get("headers", []))
                    if token is None or not key_matches(token, allowed):
                        msg = ("missing; send 'Authorization: Bearer <API key>'" if token is None
                               else "the API key is not valid")
                        body, headers = _unauthorized(msg)
                        await send({"type": "http.response.start", "status": 401, "headers": headers})
                        await send({"type": "http.response.body", "body": body})
                        return
        await self.app(scope, receive, send)
