"""HTTP routes of the notifier: the user view, the development mailbox, deliveries (admin)."""

from __future__ import annotations

import hmac
import re
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, request
from messaging.web import Invalid, OpenApi, path_parameter, problem
from pydantic import BaseModel, Field

from .store import NotifierStore

bp = Blueprint("notifier", __name__)
STATUSES = ("pending", "sending", "sent", "failed", "cancelled")
_LINK = re.compile(r"https?://\S+")


class WelcomeOut(BaseModel):
    status: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class UserOut(BaseModel):
    cpf: str
    name: str | None
    email: str | None
    status: str | None
    welcome_email: WelcomeOut | None = Field(description="null when no welcome e-mail is due")


class MailOut(BaseModel):
    id: int
    to: str
    subject: str
    received_at: datetime
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
    created_at: datetime
    sent_at: datetime | None


class DeliveriesOut(BaseModel):
    deliveries: list[DeliveryOut]


class Problem(BaseModel):
    message: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


class Accepted(BaseModel):
    message: str


def store() -> NotifierStore:
    return current_app.extensions["notifier.store"]


@bp.get("/users/<cpf>")
def get_user(cpf: str) -> Any:
    user = store().user(cpf)
    if user is None:
        return problem(404, f"no user with CPF {cpf}")
    welcome = user["welcome"]
    return {
        "cpf": user["cpf"],
        "name": user["name"],
        "email": user["email"],
        "status": user["status"],
        "welcome_email": None
        if welcome is None
        else {
            "status": welcome["status"],
            "attempts": welcome["attempts"],
            "last_error": welcome["last_error"],
            "sent_at": welcome["sent_at"].isoformat() if welcome["sent_at"] else None,
        },
    }


@bp.get("/mailbox")
def mailbox() -> Any:
    if current_app.config["SENDGRID_ENABLED"]:
        return problem(404, "the development mailbox is off: e-mails go through SendGrid")
    limit = _limit()
    return {
        "messages": [
            {
                "id": m["id"],
                "to": m["to_email"],
                "subject": m["subject"],
                "received_at": m["received_at"].isoformat(),
                "links": _LINK.findall(m["text"]),
                "text": m["text"],
                "html_url": f"{request.host_url}mailbox/{m['id']}",
            }
            for m in store().mailbox(limit)
        ]
    }


@bp.get("/mailbox/<int:mail_id>")
def mail(mail_id: int) -> Any:
    found = None if current_app.config["SENDGRID_ENABLED"] else store().mail(mail_id)
    if found is None:
        return problem(404, f"no e-mail {mail_id} in the mailbox")
    return Response(found["html"], content_type="text/html; charset=utf-8")


@bp.get("/deliveries")
def deliveries() -> Any:
    _require_admin()
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise Invalid({"status": [f"must be one of {', '.join(STATUSES)}"]})
    return {
        "deliveries": [
            {
                "id": d["id"],
                "kind": d["kind"],
                "cpf": d["cpf"],
                "to": d["to_email"],
                "status": d["status"],
                "attempts": d["attempts"],
                "last_error": d["last_error"],
                "provider": d["provider"],
                "provider_message_id": d["provider_message_id"],
                "created_at": d["created_at"].isoformat(),
                "sent_at": d["sent_at"].isoformat() if d["sent_at"] else None,
            }
            for d in store().deliveries(status, _limit())
        ]
    }


@bp.post("/deliveries/<int:delivery_id>/retry")
def retry(delivery_id: int) -> Any:
    _require_admin()
    previous = store().retry(delivery_id)
    if previous is None:
        return problem(404, f"no delivery {delivery_id}")
    if previous != "failed":
        return problem(409, f"delivery {delivery_id} is {previous}, not failed")
    return {"message": "queued again"}, 202


class Unauthorized(Exception):
    pass


def _require_admin() -> None:
    expected = current_app.config["ADMIN_TOKEN"]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized()


def unauthorized(_exc: Unauthorized) -> Response:
    response = problem(401, "a bearer token (ADMIN_TOKEN) is required")
    response.headers["WWW-Authenticate"] = 'Bearer realm="notifier"'
    return response


def _limit() -> int:
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise Invalid({"limit": ["must be a whole number from 1 to 500"]})
    return int(raw)


def _integer(parameter: dict[str, Any]) -> dict[str, Any]:
    """A path parameter the route takes as <int:...>: digits only, anything else is a 404."""
    return {**parameter, "schema": {"type": "integer", "minimum": 0}}


def describe(api: OpenApi) -> None:
    admin = [{"bearer": []}]
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
        "The development mailbox (no SENDGRID_API_KEY)",
        parameters=[limit],
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
    api.route(
        "GET",
        "/deliveries",
        "E-mail deliveries by state (bearer ADMIN_TOKEN)",
        parameters=[status, limit],
        responses={200: DeliveriesOut, 401: Problem, 422: Problem},
    )
    api.route(
        "POST",
        "/deliveries/{delivery_id}/retry",
        "Queue a failed delivery again",
        parameters=[_integer(path_parameter("delivery_id", "the delivery's id"))],
        responses={202: Accepted, 401: Problem, 404: Problem, 409: Problem},
    )
    for path in ("/deliveries", "/deliveries/{delivery_id}/retry"):
        for operation in api.paths[path].values():
            operation["security"] = admin
