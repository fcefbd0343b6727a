"""The operators' console (console.localhost): overview, failures, one change's journey,
rebuilds and the audit log, server-rendered.

Signing in: the operator pastes an API key with the `admin` scope once; the session is kept
server-side (sessions.py: the HttpOnly, SameSite=Strict cookie holds a random token only), knows
the key's digest (never the key) and a CSRF token that every state-changing POST must carry, and
ends at sign-out. A bearer key with the scope works too. A failed sign-in, by either way, is
audited with the client's address, and a client that fails too often waits (429). Where API keys
are off (development), the pages are open, but POSTs still need the CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from messaging.connection import BrokerProbe
from prometheus_client import CollectorRegistry
from servicekit import access, correlation, docs, errors, health, metrics, tracing, web
from servicekit.auth import ApiKeys, Principal, digest, public
from servicekit.database import connection_pool
from werkzeug.middleware.proxy_fix import ProxyFix

from . import headers
from .audit import SIGN_IN_FAILED, AuditLog
from .config import ConsoleConfig
from .redirects import same_console
from .sessions import ServerSessions, SessionStore
from .sources import Sources, Unreachable, body_view

bp = Blueprint("console", __name__)
ADMIN = "admin"


def sources() -> Sources:
    return current_app.extensions["console.sources"]


def audit() -> AuditLog:
    return current_app.extensions["console.audit"]


def keys() -> ApiKeys | None:
    return current_app.extensions["console.keys"]


# -- who is there ------------------------------------------------------------------------------
@bp.before_app_request
def _who() -> Any:
    g.operator = None
    if request.endpoint in (None, "static") or request.blueprint != "console":
        return None
    if request.endpoint in ("console.signin", "console.signin_post"):
        return None
    found = keys()
    if found is None:
        g.operator = "anonymous (API keys off)"
        return None
    header = request.headers.get("Authorization")
    if header:  # a sign-in with each request: throttled and audited as the form's
        refused = _throttled()
        if refused is not None:
            return refused
        bearer = found.verify(header)
        if bearer is not None and ADMIN in bearer.scopes:
            g.operator = f"key {bearer.key_digest[:12]}"
            return None
        _failed(bearer, "bearer key")
    signed = session.get("key_digest")
    if isinstance(signed, str) and ADMIN in (found.scopes_of(signed) or ()):
        g.operator = f"key {signed[:12]}"
        return None
    if request.method == "GET":
        return redirect(url_for("console.signin", next=request.full_path))
    abort(401)


@bp.app_context_processor
def _forms() -> dict[str, Any]:
    return {"csrf_token": csrf_token}  # every page's sign-out form carries it


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def _check_csrf() -> None:
    sent = request.form.get("csrf", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        abort(400, "the form is stale or forged (CSRF token): reload the page")


@bp.get("/signin")
def signin() -> Any:
    return render_template("signin.html", next=_safe_next(), error=None, csrf=csrf_token())


@bp.post("/signin")
def signin_post() -> Any:
    _check_csrf()
    refused = _throttled()  # before the key is looked at: no answer says whether it was right
    if refused is not None:
        return refused
    key = request.form.get("key", "").strip()
    found = keys()
    principal = found.verify(f"Bearer {key}") if found else None
    if principal is None or ADMIN not in principal.scopes:
        _failed(principal, "sign-in form")
        page = render_template(
            "signin.html",
            next=_safe_next(),
            error="not a key with the admin scope",
            csrf=csrf_token(),
        )
        return page, 401
    audit().record(f"key {principal.key_digest[:12]}", "sign in", "console", 0)
    session.renew()  # a token seen before signing in is worth nothing after
    session.clear()
    session["key_digest"] = digest(key)
    session["csrf"] = secrets.token_urlsafe(24)
    return redirect(_safe_next())


@bp.post("/signout")
def signout() -> Any:
    _check_csrf()
    audit().record(g.operator, "sign out", "console", 0)
    session.end()  # its row goes: a copy of the cookie opens nothing any more
    return redirect(url_for("console.signin"))


def _client() -> str:
    return f"client {request.remote_addr}"  # the address Traefik saw (ProxyFix)


def _failed(principal: Principal | None, how: str) -> None:
    said = "an unknown key" if principal is None else f"key {principal.key_digest[:12]}, no admin"
    audit().record(_client(), SIGN_IN_FAILED, "console", 0, f"{how}: {said}")


def _throttled() -> Response | None:
    """429 with Retry-After (audited) for a client whose sign-ins failed too often lately."""
    most, window = current_app.extensions["console.throttle"]
    wait = audit().sign_in_wait(_client(), most, window)
    if not wait:
        return None
    audit().record(
        _client(), "sign in throttled", "console", 0, f"{request.path}: {wait} s to wait"
    )
    page = render_template(
        "signin.html",
        next=_safe_next(),
        error=f"too many failed sign-ins from this address: try again in {wait} s",
        csrf=session.get("csrf", ""),  # no new session for a client that is only refused
    )
    return Response(page, 429, {"Retry-After": str(wait)})


def _safe_next() -> str:
    return same_console(request.args.get("next") or request.form.get("next"), "/")


# -- pages -------------------------------------------------------------------------------------
@bp.get("/")
def overview() -> Any:
    return render_template("overview.html", csrf=csrf_token())


@bp.get("/overview/live")
def overview_live() -> Any:
    """The part of the overview the page fetches again every two seconds."""
    return render_template("overview_live.html", view=sources().overview(), now=_now())


@bp.get("/failures")
def failures() -> Any:
    groups: dict[tuple[str, str], list] = defaultdict(list)
    windows = []
    for queue in sources().dead_queues:
        look = sources().dead_letters(queue)  # headers only: groups need no body
        windows.append(_window(queue, look))
        for letter in look.letters:
            groups[(queue, letter.group)].append(letter)
    rows = [
        {
            "queue": queue,
            "group": group,
            "count": len(letters),
            "first": min((x.dead_at for x in letters if x.dead_at), default=""),
            "last": max((x.dead_at for x in letters if x.dead_at), default=""),
        }
        for (queue, group), letters in sorted(groups.items(), key=lambda item: -len(item[1]))
    ]
    return render_template("failures.html", rows=rows, windows=windows, csrf=csrf_token())


def _window(queue: str, look: Any) -> dict[str, Any]:
    """How much of a dead queue a page saw: the first `seen` of `depth`."""
    return {"queue": queue, "seen": len(look.letters), "depth": look.depth, "partial": look.partial}


@bp.get("/failures/group")
def failure_group() -> Any:
    queue, group = request.args.get("queue", ""), request.args.get("group", "")
    if queue not in sources().dead_queues:
        abort(404)
    reveal = request.args.get("reveal") == "1"
    look = sources().dead_letters(queue, keep_body=lambda letter, _body: letter.group == group)
    letters = [x for x in look.letters if x.group == group]
    if reveal:
        audit().record(g.operator, "reveal", f"{queue}: {group}", len(letters))
    shown = [
        {
            "letter": x,
            "body": body_view(x.body or b"", reveal),
            "headers": {k: v for k, v in sorted(x.headers.items()) if k != "x-death"},
        }
        for x in letters
    ]
    return render_template(
        "group.html",
        queue=queue,
        group=group,
        letters=shown,
        window=_window(queue, look),
        reveal=reveal,
        csrf=csrf_token(),
    )


@bp.post("/failures/<action>")
def failure_action(action: str) -> Any:
    _check_csrf()
    queue = request.form.get("queue", "")
    ids = request.form.getlist("id")
    if queue not in sources().dead_queues or action not in ("replay", "discard") or not ids:
        abort(400, "choose a dead queue, an action and at least one message")
    listed = f"{len(ids)} listed: {', '.join(ids)[:1500]}"
    with audit().acting(g.operator, action, queue, len(ids), listed) as done:
        outcome = (sources().replay if action == "replay" else sources().discard)(queue, ids)
        done.count, done.detail = outcome.done, _done(action, len(ids), outcome)
    return redirect(url_for("console.failures", done=done.detail))


def _done(action: str, listed: int, outcome: Any) -> str:
    """What an action did, in numbers, and why it did less than asked."""
    said = f"{action}: {outcome.done} of {listed}"
    if outcome.missing:
        said += f"; {len(outcome.missing)} not found among the {outcome.scanned} scanned"
    if outcome.other_readers:
        said += "; another reader held messages meanwhile"
    return said


@bp.get("/journey")
def journey() -> Any:
    query = request.args.get("q", "").strip()
    try:
        found = _journey(query) if query else None
    except Unreachable as exc:  # the outbox is read through the person API
        return render_template("journey.html", q=query, found=None, error=str(exc)), 503
    if found is not None:  # personal data: shown only once the log says who saw it
        seen = f"cpf {found['cpf']}; {len(found['emails'])} e-mail(s)" if found["cpf"] else ""
        audit().record(g.operator, "view journey", query[:200], len(found["events"]), seen)
    return render_template("journey.html", q=query, found=found, csrf=csrf_token())


def _journey(query: str) -> dict[str, Any]:
    s = sources()
    digits = "".join(ch for ch in query if ch.isdigit())
    is_cpf = query.replace(".", "").replace("-", "").isdigit()
    cpf = digits if is_cpf else None
    events = s.history(cpf, None if is_cpf else query)
    if cpf is None:
        cpf = next((e["entity_id"] for e in events if e["entity"] == "person"), None)
        if cpf is not None:
            events = s.history(cpf, None)
    latest_person = max(
        (e["entity_version"] for e in events if e["entity"] == "person"), default=None
    )
    models: dict[str, Any] = {}
    emails: list[dict] = []
    if cpf:
        for service, path in (("score", f"/{cpf}/score"), ("notifier", f"/users/{cpf}")):
            try:
                status, answer = s.call(service, "GET", path)
            except Unreachable as exc:
                models[service] = {"state": "unreachable", "detail": str(exc)}
                continue
            held = answer.get("person_version", answer.get("version")) if status == 200 else None
            models[service] = _model_state(held, latest_person, status)
        try:
            status, answer = s.call("notifier", "GET", f"/deliveries?cpf={cpf}&limit=50")
            emails = answer.get("deliveries", []) if status == 200 else []
        except Unreachable:
            emails = []
    dead, windows = [], []
    ids = {e["event_id"] for e in events}

    def about(letter: Any, body: bytes) -> bool:
        return letter.message_id in ids or bool(cpf and cpf.encode() in body)

    for queue in s.dead_queues:
        look = s.dead_letters(queue, keep_body=about)  # bodies of its own letters only
        windows.append(_window(queue, look))
        dead += [{"queue": queue, "letter": x} for x in look.letters if x.body is not None]
    for service, state in models.items():
        if any(d["queue"].startswith(f"{service}.") for d in dead):
            state["state"] = "dead-lettered"
    stuck = [e for e in events if e["published_at"] is None]
    return {
        "cpf": cpf,
        "events": events,
        "models": models,
        "emails": emails,
        "dead": dead,
        "dead_windows": windows,
        "unpublished": stuck,
        "latest": latest_person,
    }


def _model_state(held: int | None, latest: int | None, status: int) -> dict[str, Any]:
    if latest is None:
        return {"state": "no events", "held": held}
    if held is None:
        return {
            "state": "not in the model" if status == 404 else f"answered {status}",
            "held": None,
        }
    if held >= latest:
        return {"state": "applied", "held": held}
    return {"state": "behind (retrying, or still on its way)", "held": held}


@bp.post("/emails/<int:delivery_id>/retry")
def retry_email(delivery_id: int) -> Any:
    _check_csrf()
    with audit().acting(g.operator, "retry e-mail", f"delivery {delivery_id}", 1) as done:
        status, answer = sources().call("notifier", "POST", f"/deliveries/{delivery_id}/retry")
        done.count, done.failed = int(status == 202), status != 202
        done.detail = str(answer.get("message", "")) if isinstance(answer, dict) else str(status)
    return redirect(same_console(request.form.get("back"), url_for("console.journey")))


@bp.get("/rebuild")
def rebuild() -> Any:
    status, state = sources().call("score", "GET", "/rebuild")
    return render_template(
        "rebuild.html", state=state if status == 200 else None, csrf=csrf_token()
    )


@bp.get("/rebuild/state")
def rebuild_state() -> Any:
    status, state = sources().call("score", "GET", "/rebuild")
    return render_template("rebuild_state.html", state=state if status == 200 else None)


@bp.post("/rebuild")
def rebuild_start() -> Any:
    _check_csrf()
    with audit().acting(g.operator, "rebuild", "score", 1) as done:
        status, answer = sources().call("score", "POST", "/rebuild")
        done.count, done.failed = int(status == 202), status != 202
        done.detail = (
            str(answer.get("message", answer.get("state", "")))
            if isinstance(answer, dict)
            else str(status)
        )
    return redirect(url_for("console.rebuild"))


@bp.get("/audit")
def audit_log() -> Any:
    return render_template("audit.html", rows=audit().recent())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- composition -------------------------------------------------------------------------------
def create_app(config: ConsoleConfig | None = None) -> Flask:
    tracing.configure("console")  # before any pool connects: its connections are traced
    config = config or ConsoleConfig()
    api_keys = config.api_key_store()
    from .migrate import migrate_database

    migrate_database(config.console_database_url)  # its audit log, sessions: idempotent, locked
    app = web.new_app("console")
    if config.console_proxies:  # the client's address as the gateway saw it (the throttle's)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.console_proxies)  # type: ignore[method-assign]
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=config.production,
        SESSION_COOKIE_NAME="console",
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    pool = connection_pool(config.console_database_url, "console", 4, timeout=30)
    app.session_interface = ServerSessions(
        SessionStore(
            pool,
            config.console_secret,
            lifetime=config.console_session_seconds,
            idle=config.console_session_idle_seconds,
        )
    )
    app.extensions["console.sources"] = Sources(config)
    app.extensions["console.audit"] = AuditLog(pool)
    app.extensions["console.keys"] = api_keys
    app.extensions["console.throttle"] = (
        config.console_signin_failures,
        timedelta(seconds=config.console_signin_window_seconds),
    )
    app.register_blueprint(bp)
    for view in app.view_functions.values():  # the pages check the admin scope (_who)
        if getattr(view, "required_scope", None) is None:
            public(view)
    registry = CollectorRegistry()
    readiness = {
        "audit log": app.extensions["console.audit"].ping,
        "broker": BrokerProbe(config.amqp_url),
    }
    correlation.init_app(app)
    metrics.init_app(app, registry)
    access.init_app(app, "console", api_keys)  # /metrics; the pages check the admin scope
    errors.init_app(app)
    health.init_app(app, "console", readiness, registry)
    tracing.init_app(app, "console")
    docs.init_app(app, page=False)  # the console's own pages are at its root
    headers.init_app(app)

    @app.errorhandler(401)
    def _unauthorized(_exc: Exception) -> Response:
        return Response(
            "sign in with a key that has the admin scope",
            401,
            {"WWW-Authenticate": 'Bearer realm="console"'},
        )

    return app
