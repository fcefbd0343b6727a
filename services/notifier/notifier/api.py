"""HTTP routes of the notifier: the user view, the development mailbox, deliveries (admin),
each declared once (models in the signature, answers in `responses=`, scope beside it)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from flask import Response, current_app
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field
from servicekit.auth import requires
from servicekit.errors import Problem, problem
from servicekit.web import IsoDateTime, WholeNumber, body, content

from .store import NotifierStore

bp = APIBlueprint("notifier", __name__, abp_tags=[Tag(name="notifier")])
STATUSES = ("pending", "sending", "sent", "failed", "cancelled", "suppressed")
Limit = Annotated[WholeNumber, Field(ge=1, le=500, description="how many, newest first")]
_LINK = re.compile(r"https?://\S+")


class EmailOut(BaseModel):
    """One e-mail's state; `last_error` says why one was suppressed, cancelled or failed."""

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
    welcome_email: EmailOut | None = Field(description="null when no welcome e-mail is due")
    activation_email: EmailOut | None = Field(
        None, description="the latest activation e-mail asked for; null when none was"
    )


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


class UserPath(BaseModel):
    cpf: str = Field(description="the person's CPF, digits")


class MailPath(BaseModel):
    mail_id: int = Field(ge=0, description="the e-mail's id")


class DeliveryPath(BaseModel):
    delivery_id: int = Field(ge=0, description="the delivery's id")


class MailboxQuery(BaseModel):
    limit: Limit = 50
    to: Annotated[str, Field(min_length=1, max_length=254)] | None = Field(
        None, description="only the e-mails to this address"
    )


class DeliveriesQuery(BaseModel):
    status: Literal[STATUSES] | None = None  # type: ignore[valid-type]
    limit: Limit = 50
    cpf: Annotated[str, Field(max_length=20)] | None = Field(
        None, description="only this person's e-mails"
    )


def store() -> NotifierStore:
    return current_app.extensions["notifier.store"]


@bp.get("/users/<cpf>", responses={200: UserOut, 404: Problem})
@requires("notifier:read")
def get_user(path: UserPath) -> Any:
    """The user view with the welcome e-mail's state"""
    user = store().user(path.cpf)
    if user is None:
        return problem(404, f"no user with CPF {path.cpf}")
    return body(
        UserOut,
        **{name: user[name] for name in ("cpf", "version", "name", "email", "status")},
        welcome_email=_email_state(user["welcome"]),
        activation_email=_email_state(user["activation"]),
    )


def _email_state(delivery: dict | None) -> dict | None:
    return None if delivery is None else {k: delivery[k] for k in EmailOut.model_fields}


# The development mailbox holds every activation link: it exists only in development without a
# SendGrid key, and where API keys are on it takes the admin scope.
@bp.get("/mailbox", responses={200: MailboxOut, 404: Problem, 422: Problem})
@requires("admin")
def mailbox(query: MailboxQuery) -> Any:
    """The development mailbox (development without SENDGRID_API_KEY), newest first"""
    if not current_app.config["MAILBOX_OPEN"]:
        return problem(404, "the development mailbox is off (production, or SendGrid is on)")
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
            for m in store().mailbox(query.limit, query.to)
        ],
    )


@bp.get(
    "/mailbox/<int:mail_id>",
    responses={200: content("text/html", "the e-mail as HTML"), 404: Problem},
)
@requires("admin")
def mail(path: MailPath) -> Any:
    """One e-mail of the mailbox, as HTML"""
    found = store().mail(path.mail_id) if current_app.config["MAILBOX_OPEN"] else None
    if found is None:
        return problem(404, f"no e-mail {path.mail_id} in the mailbox")
    return Response(found["html"], content_type="text/html; charset=utf-8")


@bp.get("/deliveries", responses={200: DeliveriesOut, 422: Problem})
@requires("admin")
def deliveries(query: DeliveriesQuery) -> Any:
    """E-mail deliveries by state"""
    found = store().deliveries(query.status, query.limit, query.cpf)
    return body(DeliveriesOut, deliveries=[{**d, "to": d["to_email"]} for d in found])


@bp.post(
    "/deliveries/<int:delivery_id>/retry",
    responses={202: Accepted, 404: Problem, 409: Problem},
)
@requires("admin")
def retry(path: DeliveryPath) -> Any:
    """Queue a failed delivery again"""
    delivery_id = path.delivery_id
    previous = store().retry(delivery_id)
    if previous is None:
        return problem(404, f"no delivery {delivery_id}")
    if previous != "failed":
        return problem(409, f"delivery {delivery_id} is {previous}, not failed")
    return body(Accepted, message="queued again"), 202
