"""Unit: API keys with scopes in the shared web layer."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask
from flask_openapi3 import APIBlueprint
from prometheus_client import CollectorRegistry
from servicekit import access, docs, errors, health, metrics, web
from servicekit.auth import ApiKeys, digest, new_key, public, requires

pytestmark = pytest.mark.unit

READER, WRITER = "mk_reader-key", "mk_writer-key"
KEYS = ApiKeys.parse(json.dumps({digest(READER): ["thing:read"], digest(WRITER): ["thing:write"]}))


def app_with(keys: ApiKeys | None, undeclared: bool = False) -> Flask:
    app = web.new_app("t")
    bp = APIBlueprint("things", __name__)

    @bp.get("/things", responses={200: None})
    @requires("thing:read")
    def things():
        """list"""
        return {"things": [], "who": access.principal().key_digest}

    @bp.post("/things")
    @requires("thing:write")
    def add():
        return {}, 201

    @bp.get("/open")
    @public
    def open_():
        return {}

    if undeclared:

        @bp.get("/forgotten")
        def forgotten():
            return {}

    app.register_api(bp)
    registry = CollectorRegistry()
    metrics.init_app(app, registry)
    access.init_app(app, "t", keys)
    errors.init_app(app)
    health.init_app(app, "t", {}, registry)
    docs.init_app(app)
    return app


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer ",
        "Bearer nope",
        f"Basic {READER}",
        READER,
        f"Bearer {digest(READER)}",
        "Bearer " + "x" * 5000,
    ],
)
def test_a_missing_or_unknown_key_is_401_with_the_bearer_challenge(header):
    client = app_with(KEYS).test_client()
    answer = client.get("/things", headers={"Authorization": header} if header else {})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(answer.get_json()) == {"message", "errors"}


def test_a_key_without_the_routes_scope_is_403_and_the_right_one_passes():
    client = app_with(KEYS).test_client()
    answer = client.post("/things", headers={"Authorization": f"Bearer {READER}"})
    assert answer.status_code == 403
    assert 'error="insufficient_scope", scope="thing:write"' in answer.headers["WWW-Authenticate"]
    answer = client.get("/things", headers={"Authorization": f"bearer {READER}"})
    assert (answer.status_code, answer.get_json()["who"]) == (200, digest(READER))


def test_public_and_standard_routes_need_no_key_but_metrics_does():
    client = app_with(KEYS).test_client()
    for path in ("/open", "/health", "/ready", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/metrics").status_code == 401


def test_the_documentation_page_and_its_assets_need_no_key():
    client = app_with(KEYS).test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert "/swagger/js/swagger-ui-bundle.js" in assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_without_api_keys_every_route_is_open():
    client = app_with(None).test_client()
    assert client.post("/things").status_code == 201
    assert client.get("/metrics").status_code == 200


def test_an_app_with_a_route_that_declares_no_scope_refuses_to_start():
    with pytest.raises(RuntimeError, match="/forgotten"):
        app_with(KEYS, undeclared=True)


def test_the_openapi_document_shows_each_routes_requirement():
    document = app_with(KEYS).test_client().get("/openapi.json").get_json()
    assert document["paths"]["/things"]["get"]["security"] == [{"bearer": ["thing:read"]}]
    assert "401" in document["paths"]["/things"]["get"]["responses"]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_document_promises_a_422_only_where_a_route_declares_one():
    # flask-openapi3 would give every operation an array-of-errors 422 of its own.
    document = app_with(KEYS).test_client().get("/openapi.json").get_json()
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert not any("422" in op["responses"] for op in operations)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        "not json",
        '{"abc": ["a"]}',
        json.dumps({"0" * 64: []}),
        json.dumps({"0" * 64: ["Has Space"]}),
        json.dumps({"0" * 64: "admin"}),
    ],
)
def test_api_keys_that_do_not_parse_are_refused_naming_the_variable(text):
    with pytest.raises(ValueError, match="API_KEYS"):
        ApiKeys.parse(text)


def test_a_new_key_verifies_against_its_own_entry_only():
    key, entry = new_key(["b", "a"])
    [(key_digest, scopes)] = entry.items()
    assert key.startswith("mk_") and key_digest == digest(key) and scopes == ["a", "b"]
    found = ApiKeys.parse(json.dumps(entry)).verify(f"Bearer {key}")
    assert found.scopes == {"a", "b"}
    assert ApiKeys.parse(json.dumps(entry)).verify(f"Bearer {key}x") is None
