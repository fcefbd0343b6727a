"""The API's documentation: `GET /openapi.json` for machines and the root page for people, each
route's declared scope written into the document. Call it after every route is registered: an
app with a route that declares no scope refuses to start."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template_string

from .access import is_static
from .auth import PUBLIC, declared_scope, public
from .errors import Problem


def init_app(app: Flask, service: str, document: dict[str, Any], page: bool = True) -> None:
    """Serve the document at /openapi.json and, unless the service has pages of its own at its
    root (`page=False`), its rendering at /."""
    app.extensions["servicekit.docs"] = (service, document)
    app.register_blueprint(_routes(page))
    _document_security(app, document)


def _routes(page: bool) -> Blueprint:
    routes = Blueprint("docs", __name__)

    @routes.get("/openapi.json")
    @public
    def openapi_document() -> Response:
        return jsonify(current_app.extensions["servicekit.docs"][1])

    if page:

        @routes.get("/")
        @public
        def documentation() -> Response:
            """The API's documentation, for people: rendered from the OpenAPI document."""
            service, document = current_app.extensions["servicekit.docs"]
            text = render_template_string(_DOCUMENTATION, api=document, service=service)
            return Response(text, content_type="text/html; charset=utf-8")

    return routes


_DOCUMENTATION = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ service }} API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
code{background:#f3f3f3;padding:0 .2em}td,th{text-align:left;padding:.3em .6em;vertical-align:top}
tr:nth-child(even){background:#fafafa}.m{font-weight:bold;font-family:monospace}</style></head>
<body><h1>{{ api.info.title }} API</h1>
<p>JSON in and out; errors are <code>{"message", "errors"}</code>. Machine-readable:
{% for path in api.paths if path.endswith(".json") %}<a href="{{ path }}">{{ path }}</a>
({{ api.paths[path].get.summary }}){% if not loop.last %}, {% endif %}{% endfor %}.
Routes with a scope take <code>Authorization: Bearer &lt;key&gt;</code>.</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>scope</th><th>answers</th></tr>
{% for path, methods in api.paths.items() %}{% for method, op in methods.items() %}
<tr><td class="m">{{ method | upper }}</td><td><code>{{ path }}</code></td><td>{{ op.summary }}</td>
<td>{% for requirement in op.get("security", []) %}{{ requirement.bearer | join(", ") }}
{% else %}open{% endfor %}</td><td>{{ op.responses | join(" ") }}</td></tr>
{% endfor %}{% endfor %}</table></body></html>
"""


def _document_security(app: Flask, openapi: dict[str, Any]) -> None:
    """Write each route's declared scope into the OpenAPI document; refuse undeclared routes."""
    undeclared = []
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    problem_body = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    openapi["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (API_KEYS)"}
    }
    for rule in app.url_map.iter_rules():
        if is_static(rule.endpoint):
            continue
        scope = declared_scope(app.view_functions[rule.endpoint])
        if scope is None:
            undeclared.append(rule.rule)
            continue
        path = _PARAMETER.sub(r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = openapi.get("paths", {}).get(path, {}).get(method.lower())
            if operation is not None:
                operation["security"] = [] if scope == PUBLIC else [{"bearer": [scope]}]
                if scope != PUBLIC:
                    operation["responses"].setdefault(
                        "401", {"description": "no or unknown API key", "content": problem_body}
                    )
                    operation["responses"].setdefault(
                        "403",
                        {
                            "description": f"the API key lacks the {scope} scope",
                            "content": problem_body,
                        },
                    )
    if undeclared:
        raise RuntimeError(f"routes without a declared scope: {', '.join(sorted(undeclared))}")


_PARAMETER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
