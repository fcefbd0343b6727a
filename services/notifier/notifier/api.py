"""HTTP routes of the notifier: the user view, the development mailbox, deliveries (admin)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydantic import BaseModel, Field
from servicekit.auth import requires
from servicekit.errors import Invalid, Problem, problem
from servicekit.web import IsoDateTime, OpenApi, body, path_parameter, query_int

from .store import NotifierStore

bp = Blueprint("notifier", __name__)
STATUSES = ("pending", "sending", "sent", "failed", "cancelled", "suppressed")
_LINK = re.compile(r"https?://\S+")


class WelcomeOut(BaseModel):
    status: str
    attempts: int
    last_error: str | None
    sent_at: IsoDateTime | None


class UserOut(BaseModel):
    cpf: str
    version: int = Field(description="the person's entity_version this view holds")
    name: str | None
    email: str | None
    status: str | None
    welcome_email: WelcomeOut | None = Field(description="null when no welcome e-mail is due")


class MailOut(BaseModel):
    id: int
    to: str
    subject: str
    received_at: IsoDateTime
    links: list[str]
    text: str
    html_url: str


class MailboxOut(BaseModel):
    messages: list[MailOut]


class DeliveryOut(BaseModel):
    id: int
    kind: str
    cpf: str
    to: str
    status: str
    attempts: int
    last_error: str | None
    provider: str | None
    provider_message_id: str | None
    created_at: IsoDateTime
    sent_at: IsoDateTime | None


class DeliveriesOut(BaseModel):
    deliveries: list[DeliveryOut]


class Accepted(BaseModel):
    message: str


def store() -> NotifierStore:
    return current_app.extensions["notifier.store"]


@bp.get("/users/<cpf>")
@requires("notifier:read")
def get_user(cpf: str) -> Any:
    user = store().user(cpf)
    if user is None:
        return problem(404, f"no user with CPF {cpf}")
    welcome = user["welcome"]
    return body(
        UserOut,
        **{name: user[name] for name in ("cpf", "version", "name", "email", "status")},
        welcome_email=None if welcome is None else {k: welcome[k] for k in WelcomeOut.model_fields},
    )


# The development mailbox holds every activation link: it exists only in development without a
# SendGrid key, and where API keys are on it takes the admin scope.
@bp.get("/mailbox")
@requires("admin")
def mailbox() -> Any:
    if not current_app.config["MAILBOX_OPEN"]:
        return problem(404, "the development mailbox is off (production, or SendGrid is on)")
    limit = _limit()
    to = request.args.get("to")
    if to is not None and not 1 <= len(to) <= 254:
        raise Invalid({"to": ["must be an e-mail address"]})
    base = current_app.config["NOTIFIER_URL"]
    return body(
        MailboxOut,
        messages=[
            {
                "id": m["id"],
                "to": m["to_email"],
                "subject": m["subject"],
                "received_at": m["received_at"],
                "links": _LINK.findall(m["text"]),
                "text": m["text"],
                "html_url": f"{base}/mailbox/{m['id']}",
            }
            for m in store().mailbox(limit, to)
        ],
    )


@bp.get("/mailbox/<int:mail_id>")
@requires("admin")
def mail(mail_id: int) -> Any:
    found = store().mail(mail_id) if current_app.config["MAILBOX_OPEN"] else None
    if found is None:
        return problem(404, f"no e-mail {mail_id} in the mailbox")
    return Response(found["html"], content_type="text/html; charset=utf-8")


@bp.get("/deliveries")
@requires("admin")
def deliveries() -> Any:
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise Invalid({"status": [f"must be one of {', '.join(STATUSES)}"]})
    return body(
        DeliveriesOut,
        deliveries=[
            {**d, "to": d["to_email"]} for d in store().deliveries(status, _limit(), _cpf())
        ],
    )


@bp.post("/deliveries/<int:delivery_id>/retry")
@requires("admin")
def retry(delivery_id: int) -> Any:
    previous = store().retry(delivery_id)
    if previous is None:
        return problem(404, f"no delivery {delivery_id}")
    if previous != "failed":
        return problem(409, f"delivery {delivery_id} is {previous}, not failed")
    return body(Accepted, message="queued again"), 202


def _cpf() -> str | None:
    cpf = request.args.get("cpf")
    if cpf is not None and len(cpf) > 20:
        raise Invalid({"cpf": ["must have at most 20 characters"]})
    return cpf


def _limit() -> int:
    return query_int("limit", 50, 1, 500)


def _integer(parameter: dict[str, Any]) -> dict[str, Any]:
    """A path parameter the route takes as <int:...>: digits only, anything else is a 404."""
    return {**parameter, "schema": {"type": "integer", "minimum": 0}}


def describe(api: OpenApi) -> None:
    to = {
        "name": "to",
        "in": "query",
        "required": False,
        "description": "only the e-mails to this address",
        "schema": {"type": "string", "minLength": 1, "maxLength": 254},
    }
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
    }
    api.route(
        "GET",
        "/users/{cpf}",
        "The user view with the welcome e-mail's state",
        parameters=[path_parameter("cpf", "the person's CPF, digits")],
        responses={200: UserOut, 404: Problem},
    )
    api.route(
        "GET",
        "/mailbox",
        "The development mailbox (development without SENDGRID_API_KEY), newest first",
        parameters=[limit, to],
        responses={200: MailboxOut, 404: Problem, 422: Problem},
    )
    api.route(
        "GET",
        "/mailbox/{mail_id}",
        "One e-mail of the mailbox, as HTML",
        parameters=[_integer(path_parameter("mail_id", "the e-mail's id"))],
        responses={200: "text/html", 404: Problem},
    )
    status = {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(STATUSES)},
    }
    by_person = {
        "name": "cpf",
        "in": "query",
        "required": False,
        "description": "only this person's e-mails",
        "schema": {"type": "string", "maxLength": 20},
    }
    api.route(
        "GET",
        "/deliveries",
        "E-mail deliveries by state",
        parameters=[status, limit, by_person],
        responses={200: DeliveriesOut, 401: Problem, 422: Problem},
    )
    api.route(
        "POST",
        "/deliveries/{delivery_id}/retry",
        "Queue a failed delivery again",
        parameters=[_integer(path_parameter("delivery_id", "the delivery's id"))],
        responses={202: Accepted, 401: Problem, 404: Problem, 409: Problem},
    )
