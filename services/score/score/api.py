"""HTTP routes of the score service."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app
from messaging.auth import requires
from messaging.web import OpenApi, Problem, body, path_parameter, problem
from pydantic import BaseModel, Field

from .store import ScoreStore

bp = Blueprint("score", __name__)


class ScoreOut(BaseModel):
    cpf: str
    score: int
    incomes: str = Field(description="total of the person's incomes, decimal string")
    assets: str = Field(description="total of the person's assets, decimal string")
    debts: str = Field(description="total of the person's debts, decimal string")
    version: int = Field(description="revision of this read-model entry; grows with each change")


@bp.get("/<cpf>/score")
@requires("score:read")
def get_score(cpf: str) -> Any:
    store: ScoreStore = current_app.extensions["score.store"]
    found = store.read(cpf)
    if found is None:
        return problem(404, f"no score for CPF {cpf}: unknown person")
    return body(
        ScoreOut,
        cpf=found.cpf,
        score=found.score,
        incomes=str(found.incomes),
        assets=str(found.assets),
        debts=str(found.debts),
        version=found.version,
    )


def describe(api: OpenApi) -> None:
    api.route(
        "GET",
        "/{cpf}/score",
        "A person's credit score",
        parameters=[path_parameter("cpf", "the person's CPF, digits")],
        responses={200: ScoreOut, 404: Problem},
    )
