"""Where the console sends a browser back to (`next` after signing in, `back` after a retry):
only to one of its own pages, judged as the browser will read the address."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from flask import current_app
from werkzeug.exceptions import HTTPException

# What a browser drops before parsing a URL (WHATWG URL standard): C0 controls and spaces at
# either end, and tabs and newlines anywhere: "/\t/evil.example/" is read as "//evil.example/".
_EDGES = "".join(chr(n) for n in range(0x21))
_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_PATH_SAFE = "/-._~!$&'()*+,;=:@"  # RFC 3986 pchar, "/" between segments


def same_console(value: str | None, default: str) -> str:
    """`value` as a path and query of a console page a GET routes to, or else `default`."""
    text = _TAB_OR_NEWLINE.sub("", (value or "").strip(_EDGES)).replace("\\", "/")
    parts = urlsplit(text)
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return default
    path = unquote(parts.path)
    if path.startswith("//") or _CONTROL.search(path) or not _routed(path):
        return default
    query = urlencode(parse_qsl(parts.query, keep_blank_values=True))
    # Built again from what was checked: the Location says nothing the check did not see.
    return quote(path, safe=_PATH_SAFE) + (f"?{query}" if query else "")


def _routed(path: str) -> bool:
    try:
        endpoint, _ = current_app.url_map.bind("").match(path, method="GET")
    except HTTPException:  # not found, another method, or a redirect to a canonical form
        return False
    return endpoint.startswith("console.") and endpoint not in ("console.static", "console.signin")
