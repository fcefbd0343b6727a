"""Who may call each route: the API key of `Authorization: Bearer <key>` against the scope the
route declared next to itself (auth.requires / auth.public). 401 without a known key, 403 with a
key that lacks the scope, both with a `WWW-Authenticate: Bearer` challenge."""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, g, request

from .auth import ANONYMOUS, PUBLIC, ApiKeys, Principal, declared_scope
from .errors import problem

log = logging.getLogger("servicekit.access")


def principal() -> Principal:
    """Who is calling (ANONYMOUS where API keys are off or the route is public)."""
    return g.get("principal") or ANONYMOUS


def init_app(app: Flask, service: str, api_keys: ApiKeys | None) -> None:
    """Check each request's key; None (development only) leaves every route open."""
    if api_keys is None:
        log.warning("%s: API_KEYS is not set: every route is open (development only)", service)
    app.extensions["servicekit.access"] = (service, api_keys)
    app.before_request(_authorize)


def is_static(endpoint: str) -> bool:
    """Static files (the documentation page's assets) are open: they are the same for all."""
    return endpoint == "static" or endpoint.endswith(".static")


def _authorize() -> Response | None:
    service, api_keys = current_app.extensions["servicekit.access"]
    endpoint = request.endpoint or ""
    view = current_app.view_functions.get(endpoint)
    if api_keys is None or view is None or is_static(endpoint):
        return None  # keys off, a 404 or 405 to come, or an asset
    scope = declared_scope(view)
    if scope == PUBLIC:
        return None
    found = api_keys.verify(request.headers.get("Authorization"))
    if found is None:
        response = problem(401, "a valid API key is required (Authorization: Bearer <key>)")
        response.headers["WWW-Authenticate"] = f'Bearer realm="{service}"'
        return response
    if scope not in found.scopes:
        response = problem(403, f"this API key lacks the {scope} scope")
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="{service}", error="insufficient_scope", scope="{scope}"'
        )
        return response
    g.principal = found
    return None
