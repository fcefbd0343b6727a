"""HTTP routes of the person service, each declared once: its models in the signature, its
answers in `responses=`, its scope beside it. Parse, call the store once, shape the answer."""

from __future__ import annotations

import html
import math
import uuid
from typing import Any, Literal

from flask import Flask, Response, current_app, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field
from servicekit.access import principal
from servicekit.auth import public, requires
from servicekit.correlation import correlation_id
from servicekit.errors import Problem, problem
from servicekit.web import BODY_ERRORS, WholeNumber, body, content

from .activation import Tokens
from .bulk import BulkItems, BulkRefused, read_items
from .catalogue import ITEM_KINDS
from .errors import BadToken, Conflict, ExpiredToken, NotFound, TooSoon, Unprocessable
from .imports import ImportStore, TooManyImports
from .schemas import (
    Accepted,
    BulkIn,
    DebtIn,
    HistoryOut,
    ImportAccepted,
    ImportOut,
    ItemCreated,
    ItemIn,
    OutboxOut,
    PersonCreated,
    PersonIn,
    PersonOut,
    PersonPatch,
    normalise_cpf,
)
from .service import Quota, Store

bp = APIBlueprint("person", __name__, abp_tags=[Tag(name="person")])
# A debt's type is optional, so debts have a route and a body of their own.
TYPED_KINDS = tuple(kind for kind in ITEM_KINDS if kind != "debt")
PAGE = content("text/html", "a page for the person who followed the link")


class CpfPath(BaseModel):
    cpf: str = Field(description="the person's CPF, digits (dots, dashes and spaces are ignored)")


class TypedItemPath(CpfPath):
    kind: Literal[TYPED_KINDS]  # type: ignore[valid-type]


class ItemPath(CpfPath):
    kind: Literal[ITEM_KINDS]  # type: ignore[valid-type]
    item_id: str = Field(description="the item's id (a UUID)")


class ImportPath(BaseModel):
    import_id: str = Field(description="the import's id (a UUID)")


class ImportQuery(BaseModel):
    limit: WholeNumber = Field(
        1000,
        ge=0,
        le=10_000,
        description="how many failed items to list (by index); an import keeps at most 10,000",
    )


class TokenQuery(BaseModel):
    token: str = Field("", description="the link's token (without one: 400)")


class OutboxQuery(BaseModel):
    parked: WholeNumber = Field(
        10, ge=0, le=1000, description="how many parked rows to list, oldest first (all count)"
    )


class HistoryQuery(BaseModel):
    cpf: str | None = Field(None, description="a person: their events and their items'")
    correlation_id: str | None = Field(
        None, min_length=1, max_length=128, description="a request's id (its X-Request-Id)"
    )
    limit: WholeNumber = Field(500, ge=1, le=500, description="how many events at most")


def store() -> Store:
    return current_app.extensions["person.store"]


def tokens() -> Tokens:
    return current_app.extensions["person.tokens"]


def imports() -> ImportStore:
    found = current_app.extensions.get("person.imports")
    if found is None:
        raise BulkRefused(503, "bulk registration needs the PostgreSQL store")
    return found


def path_cpf(cpf: str) -> str:
    try:
        return normalise_cpf(cpf)
    except ValueError:
        raise NotFound(f"no person with CPF {cpf}") from None


def person_json(person: dict[str, Any], model: type[PersonOut] = PersonOut, **extra: Any) -> dict:
    fields = {name: person[name] for name in PersonOut.model_fields}
    return body(model, **fields, **extra)


@bp.get("/asyncapi.json", responses={200: content("application/json", "AsyncAPI 3")})
@public
def asyncapi_document() -> Any:
    """The events this service publishes (AsyncAPI 3)"""
    return current_app.extensions["person.asyncapi"]


@bp.post("/person", responses={201: PersonCreated, 409: Problem, **BODY_ERRORS})
@requires("person:write")
def create_person(body: PersonIn) -> Any:
    """Register a person"""
    person = store().create_person(body.model_dump(), correlation_id())
    return person_json(person, PersonCreated, message="created"), 201


IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_MAX = "Idempotency-Key", 200
NDJSON = "application/x-ndjson"
# The bulk body is read by its own parser (a JSON array or NDJSON, counted as it is read, so an
# over-count body stops early) and the key's length is checked by the route (a 400): both are
# declared for the document here, not validated by flask-openapi3.
_BULK_REQUEST = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": BulkIn.model_json_schema()} for media in ("application/json", NDJSON)
        },
    },
    "parameters": [
        {
            "name": IDEMPOTENCY_KEY,
            "in": "header",
            "required": False,
            "description": "a resubmission with the same key returns the same import",
            "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
        }
    ],
}


@bp.post(
    "/person/bulk",
    responses={202: ImportAccepted, **BODY_ERRORS, 429: Problem, 503: Problem},
    openapi_extensions=_BULK_REQUEST,
)
@requires("person:write")
def create_import() -> Any:
    """Register up to 100,000 people asynchronously

    A JSON array, or NDJSON with Content-Type: application/x-ndjson; each item is validated as
    POST /person validates its body."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        raise BulkRefused(
            400, f"the {IDEMPOTENCY_KEY} header must have 1 to {IDEMPOTENCY_KEY_MAX} characters"
        )
    owner = principal().key_digest
    with _bulk_items(owner, key) as items:
        row, _created = imports().create(items, key, owner)
    accepted = body(ImportAccepted, id=row["id"], status=row["status"], total=row["total"])
    return accepted, 202, {"Location": f"/imports/{row['id']}"}


@bp.get(
    "/imports/<import_id>", responses={200: ImportOut, 404: Problem, 422: Problem, 503: Problem}
)
@requires("person:read")
def get_import(path: ImportPath, query: ImportQuery) -> Any:
    """An import's progress and its failed items with their reasons"""
    canonical = _canonical_uuid(path.import_id)
    if canonical is None:
        raise NotFound(f"no import {path.import_id}")
    row = imports().get(canonical, query.limit, principal().key_digest)
    if row is None:
        raise NotFound(f"no import {path.import_id}")
    return body(ImportOut, **{key: row[key] for key in ImportOut.model_fields})


@bp.get("/person/<cpf>", responses={200: PersonOut, 404: Problem})
@requires("person:read")
def get_person(path: CpfPath) -> Any:
    """A person with incomes, assets and debts"""
    return person_json(store().get_person(path_cpf(path.cpf)))


@bp.patch("/person/<cpf>", responses={200: PersonOut, 404: Problem, **BODY_ERRORS})
@requires("person:write")
def update_person(path: CpfPath, body: PersonPatch) -> Any:
    """Change a person's fields (only those sent)"""
    key = path_cpf(path.cpf)
    changes = body.model_dump(exclude_unset=True)
    return person_json(store().update_person(key, changes, correlation_id()))


@bp.delete("/person/<cpf>", responses={204: None, 404: Problem})
@requires("person:write")
def delete_person(path: CpfPath) -> Any:
    """Delete a person and their items"""
    store().delete_person(path_cpf(path.cpf), correlation_id())
    return "", 204


ITEM_ANSWERS = {201: ItemCreated, 404: Problem, **BODY_ERRORS}


@bp.post(f"/person/<cpf>/<any({', '.join(TYPED_KINDS)}):kind>", responses=ITEM_ANSWERS)
@requires("person:write")
def add_item(path: TypedItemPath, body: ItemIn) -> Any:
    """Add an income or an asset"""
    return _added(path.cpf, path.kind, body)


@bp.post("/person/<cpf>/debt", responses=ITEM_ANSWERS)
@requires("person:write")
def add_debt(path: CpfPath, body: DebtIn) -> Any:
    """Add a debt (its type is optional)"""
    return _added(path.cpf, "debt", body)


def _added(cpf: str, kind: str, item: ItemIn | DebtIn) -> Any:
    key = path_cpf(cpf)
    created = store().add_item(key, kind, item.type, item.value, correlation_id())
    return body(
        ItemCreated,
        message="created",
        id=str(created["id"]),
        cpf=key,
        kind=kind,
        type=created["type"],
        value=str(created["value"]),
    ), 201


@bp.delete(
    f"/person/<cpf>/<any({', '.join(ITEM_KINDS)}):kind>/<item_id>",
    responses={204: None, 404: Problem},
)
@requires("person:write")
def delete_item(path: ItemPath) -> Any:
    """Delete an income, asset or debt"""
    canonical = _canonical_uuid(path.item_id)
    if canonical is None:
        raise NotFound(f"no {path.kind} {path.item_id}")
    store().delete_item(path_cpf(path.cpf), path.kind, canonical, correlation_id())
    return "", 204


@bp.get(
    "/person/<cpf>/activate",
    responses={200: PAGE, 400: PAGE, 404: Problem, 410: PAGE},
)
@public  # the token is the credential
def activate(path: CpfPath, query: TokenQuery) -> Any:
    """Follow an activation link"""
    key = path_cpf(path.cpf)
    if not query.token:
        return _page(400, "Activation link incomplete", "The link has no token.")
    claim = tokens().read(query.token, key)
    person = store().get_person(key)
    if person["created_at"] != claim.registered_at:
        raise BadToken("the activation link was issued for an earlier registration")
    if person["status"] == "active" and (person["email"] or "").lower() == claim.email.lower():
        return _page(200, "Account already active", "Your account was already active.")
    Tokens.raise_if_expired(claim)
    store().activate(key, claim.email, claim.registered_at, correlation_id())
    return _page(200, "Account activated", f"Welcome, {person['name']}: your account is active.")


@bp.post(
    "/person/<cpf>/activation",
    responses={202: Accepted, 404: Problem, 409: Problem, 422: Problem, 429: Problem},
)
@requires("person:write")
def request_activation(path: CpfPath) -> Any:
    """Send a new activation e-mail"""
    resend = current_app.config["ACTIVATION_RESEND_SECONDS"]
    quota = Quota(principal().key_digest, current_app.config["ACTIVATION_REQUESTS_PER_KEY"])
    store().request_activation(path_cpf(path.cpf), correlation_id(), resend, quota)
    return body(Accepted, message="a new activation e-mail is on its way"), 202


@bp.get("/outbox", responses={200: OutboxOut, 422: Problem})
@requires("admin")
def outbox_status(query: OutboxQuery) -> Any:
    """The outbox: events waiting, published, and the rows the relay parked"""
    return body(OutboxOut, **store().outbox_status(query.parked))


@bp.get("/outbox/history", responses={200: HistoryOut, 422: Problem})
@requires("admin")
def outbox_history(query: HistoryQuery) -> Any:
    """The events still in the outbox about a person and their items, or made by one request

    Give `cpf`, `correlation_id` or both (either matches); oldest first."""
    if query.cpf is None and query.correlation_id is None:
        raise Unprocessable("cpf", "give a cpf or a correlation_id")
    cpf = None
    if query.cpf is not None:
        try:
            cpf = normalise_cpf(query.cpf)
        except ValueError as exc:
            raise Unprocessable("cpf", str(exc)) from None
    events = store().outbox_history(cpf, query.correlation_id, query.limit)
    return body(HistoryOut, events=events)


def _bulk_items(owner: str, key: str | None) -> BulkItems:
    """The items of a bulk body (a JSON array, or NDJSON), each an object; checked, not
    validated: the importer validates each one as POST /person does. The key's room for one
    more import is checked before the body is read; an over-size body is refused before it is
    read (413), an over-count one at the first item too many; the body is never held whole
    (person.bulk)."""
    mimetype = request.mimetype or ""
    if mimetype != NDJSON and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise BulkRefused(
            415, f"the body must be a JSON array (application/json) or NDJSON ({NDJSON})"
        )
    imports().check_room(owner, key)
    request.max_content_length = current_app.config["BULK_MAX_BYTES"]  # Flask >= 3.1
    return read_items(request.stream, mimetype == NDJSON, current_app.config["BULK_MAX_ITEMS"])


def _canonical_uuid(text: str) -> str | None:
    """The UUID in its canonical spelling (the one events carry), or None."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def _page(status: int, title: str, text: str) -> Response:
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        f"</body></html>"
    )
    return Response(body, status=status, content_type="text/html; charset=utf-8")


def init_app(app: Flask) -> None:
    """The one table from domain errors to HTTP answers."""

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return problem(404, str(exc))

    @app.errorhandler(Conflict)
    def _conflict(exc: Conflict) -> Response:
        return problem(409, str(exc))

    @app.errorhandler(Unprocessable)
    def _unprocessable(exc: Unprocessable) -> Response:
        return problem(422, "invalid fields", {exc.field: [exc.reason]})

    @app.errorhandler(TooSoon)
    def _too_soon(exc: TooSoon) -> Response:
        response = problem(429, str(exc))
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response

    @app.errorhandler(TooManyImports)
    def _too_many(exc: TooManyImports) -> Response:
        response = problem(429, str(exc))
        response.headers["Retry-After"] = "60"
        return response

    @app.errorhandler(BulkRefused)
    def _bulk_refused(exc: BulkRefused) -> Response:
        return problem(exc.status, exc.message, exc.errors)

    @app.errorhandler(BadToken)
    def _bad_token(exc: BadToken) -> Response:
        return _page(400, "Activation link not valid", str(exc))

    @app.errorhandler(ExpiredToken)
    def _expired(exc: ExpiredToken) -> Response:
        hint = f"{exc} (POST /person/<cpf>/activation sends one)."
        return _page(410, "Activation link expired", hint)
