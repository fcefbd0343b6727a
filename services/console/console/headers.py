"""What every answer of the console tells the browser: run only the console's own files, never in
a frame, keep no copy (pages show personal data), and send no address on to another site."""

from __future__ import annotations

from flask import Flask, Response, request

# No inline script or style (console.js and console.css are files), nothing from elsewhere.
POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # journey addresses carry CPFs
}


def init_app(app: Flask) -> None:
    app.after_request(_protect)


def _protect(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not (request.endpoint or "").endswith("static"):  # the stylesheet and script may be kept
        response.headers["Cache-Control"] = "no-store"
    return response
