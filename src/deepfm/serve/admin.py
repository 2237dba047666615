"""The model-changing surface (``POST /v1/reload``): a bearer token and an allowed root folder.

Without a token the endpoint is off (403): a server never changes models for whoever can reach its port,
and no token is generated, because a generated one would have to be printed, and credentials never go to
logs. A request without ``Authorization: Bearer`` is a 401, a wrong token a 403 (compared in constant time).
A reload may only load a directory under the allowed root; the path is resolved first (symlinks, ``..``,
relative paths are taken from the root), and a path outside is a 403 whose message says nothing about
which paths exist.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deepfm.serve.errors import RequestError

bearer = HTTPBearer(auto_error=False, description="the server's admin token (--admin-token or "
                                                  "DEEPFM_SERVE_ADMIN_TOKEN)")


def require_admin(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Let the request through only with the server's admin token."""
    settings = request.app.state.serving.settings
    if settings.admin_token is None or not settings.reload_endpoint:
        raise RequestError(403, "reload over HTTP is off on this server: start it with an admin token "
                                "(DEEPFM_SERVE_ADMIN_TOKEN or --admin-token), or send it SIGHUP")
    if credentials is None:
        raise RequestError(401, "this endpoint needs the admin token: 'Authorization: Bearer TOKEN'",
                           headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise RequestError(403, "wrong admin token")


def under_root(requested: str, root: Path) -> Path:
    """The directory a reload asks for, resolved; a 403 (naming no path) unless it lies under ``root``."""
    try:
        path = (root / requested).resolve()  # an absolute ``requested`` replaces root; symlinks and .. resolved
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        path = None
    if path is None or not path.is_relative_to(root):
        raise RequestError(403, "this model directory is not under the folder this server may load models from "
                                "(--model-root)")
    return path
