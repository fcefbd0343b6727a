"""HTTP routes of the score service."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from flask import current_app
from flask_openapi3 import APIBlueprint, Tag
from messaging.connection import Backoff
from messaging.healing import REBUILDING, STALE_WIPE_SECONDS, WIPING
from pydantic import BaseModel, Field
from servicekit.auth import requires
from servicekit.errors import Problem, problem
from servicekit.web import body

from .store import ScoreStore, StaleWipe

bp = APIBlueprint("score", __name__, abp_tags=[Tag(name="score")])
log = logging.getLogger("score.api")


class ScoreOut(BaseModel):
    cpf: str
    score: int
    incomes: str = Field(description="total of the person's incomes, decimal string")
    assets: str = Field(description="total of the person's assets, decimal string")
    debts: str = Field(description="total of the person's debts, decimal string")
    version: int = Field(description="revision of this read-model entry; grows with each change")
    person_version: int = Field(description="the person's entity_version this model holds")


class RebuildOut(BaseModel):
    state: str = Field(description="ready, rebuilding, wiping, or missing (the model lost it)")
    request_id: str | None
    wiped: int | None = Field(description="keys the last rebuild started here wiped")


class ScorePath(BaseModel):
    cpf: str = Field(description="the person's CPF, digits")


@bp.get("/<cpf>/score", responses={200: ScoreOut, 404: Problem})
@requires("score:read")
def get_score(path: ScorePath) -> Any:
    """A person's credit score"""
    store: ScoreStore = current_app.extensions["score.store"]
    found = store.read(path.cpf)
    if found is None:
        return problem(404, f"no score for CPF {path.cpf}: unknown person")
    return body(
        ScoreOut,
        cpf=found.cpf,
        score=found.score,
        incomes=str(found.incomes),
        assets=str(found.assets),
        debts=str(found.debts),
        version=found.version,
        person_version=found.person_version,
    )


_WIPES: dict[str, int] = {}


@bp.post("/rebuild", responses={202: RebuildOut, 409: Problem})
@requires("admin")
def rebuild() -> Any:
    """Rebuild the model: wipe it, then the consumer replays the person service's events

    The wipe runs in the background; the consumer then heals the model through a replay
    (score.rebuild's way, for operators without a shell). A wipe that stopped making progress
    (its process restarted, say) is taken over."""
    store: ScoreStore = current_app.extensions["score.store"]
    generation = store.generation()
    if generation is not None and generation.state in (WIPING, REBUILDING):
        stale = time.time() - generation.since > STALE_WIPE_SECONDS
        if generation.state == REBUILDING or not stale:
            return problem(409, f"a rebuild is under way ({generation.state})")
    threading.Thread(target=_wipe, args=(store,), name="score-wipe", daemon=True).start()
    return body(RebuildOut, state="wiping", request_id=None, wiped=None), 202


def _wipe(store: ScoreStore, attempts: int = 5) -> None:
    """Wipe, starting again after a Redis blip; a wipe that gives up leaves a marker that goes
    stale, and healing takes it over."""
    backoff = Backoff(first=1.0, cap=10.0)
    for attempt in range(1, attempts + 1):
        try:
            _WIPES["last"] = store.wipe()
            return
        except StaleWipe:
            return
        except redis.RedisError as exc:
            log.warning("the wipe failed (attempt %d of %d): %s", attempt, attempts, exc)
            time.sleep(backoff.next())


@bp.get("/rebuild", responses={200: RebuildOut})
@requires("admin")
def rebuild_state() -> Any:
    """Where a rebuild is"""
    generation = current_app.extensions["score.store"].generation()
    return body(
        RebuildOut,
        state=generation.state if generation else "missing",
        request_id=generation.request_id if generation else None,
        wiped=_WIPES.get("last"),
    )
