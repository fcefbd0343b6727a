"""Read models that lost part of their stores find it and repair it (messaging.verification),
on the running stack, as a user would try it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from messaging.testing import wait_until
from messaging.topology import Topology
from stack_reads import metric, score_store, scores_match

pytestmark = pytest.mark.e2e

# Two scheduled checks cannot both pass while `messaging verify` looks (it shows the difference
# before the repair) yet the repair comes within 2 x 10 s and a replay.
VERIFY_SECONDS = "10"


@pytest.fixture(scope="module")
def stack(start_stack):
    return start_stack(VERIFY_SECONDS=VERIFY_SECONDS)


def messaging(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "DATABASE_URL": stack.env["PERSON_DATABASE_URL"]}
    return subprocess.run(
        [str(Path(sys.executable).parent / "messaging"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def welcomes(stack) -> dict[str, int]:
    """Welcome e-mails recorded and sent per CPF."""
    with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT cpf, count(*) FROM deliveries WHERE kind = 'welcome' AND status = 'sent' "
            "GROUP BY cpf"
        ).fetchall()
    return dict(rows)


def test_read_models_that_lost_part_of_their_stores_find_it_and_repair_it(stack):
    """Keys of the score's Redis and rows of the notifier's view deleted by hand come back by
    themselves within two verifications (VERIFY_SECONDS=10 here) and a replay, with no second
    e-mail; `messaging verify` shows the difference before and none after."""
    cpfs = [str(n) for n in range(76_000, 76_012)]
    for cpf in cpfs:
        person = {"cpf": cpf, "name": "V", "address": "a", "date_of_birth": "1990-01-01"}
        person["email"] = f"v{cpf}@example.com"
        assert stack.call("POST", "person", "/person", person)[0] == 201
        asset = {"type": "car", "value": 500}
        assert stack.call("POST", "person", f"/person/{cpf}/asset", asset)[0] == 201
    store = score_store(stack)
    wait_until(lambda: scores_match(stack, store), what="the scores")
    wait_until(lambda: all(welcomes(stack).get(c) == 1 for c in cpfs), what="every welcome")
    exchange = stack.env["EVENTS_EXCHANGE"]
    score_queue, view_queue = (
        Topology("score", exchange).queue,
        Topology("notifier", exchange).queue,
    )
    assert messaging(stack, "verify", score_queue).returncode == 0

    lost = cpfs[:3]
    store.unlink([store.person_key(cpf) for cpf in lost])
    with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
        conn.execute("DELETE FROM users WHERE cpf = ANY(%s)", (cpfs[3:6],))
    before = messaging(stack, "verify", score_queue)
    assert before.returncode == 1, before.stdout + before.stderr
    assert all(f"{cpf}: published v1, held -" in before.stdout for cpf in lost), before.stdout
    assert all(stack.call("GET", "score", f"/{cpf}/score")[0] == 404 for cpf in lost)

    wait_until(lambda: scores_match(stack, store), timeout=60, what="the lost scores back")
    for cpf in cpfs[3:6]:
        wait_until(
            lambda c=cpf: stack.call("GET", "notifier", f"/users/{c}")[0] == 200,
            timeout=60,
            what=f"the view of {cpf} back",
        )
    for queue in (score_queue, view_queue):
        after = messaging(stack, "verify", queue)
        assert after.returncode == 0 and "matches the producer" in after.stdout, after.stdout
    for host in ("score", "notifier"):  # as the replicas' next reports say
        wait_until(
            lambda h=host: metric(stack, h, "read_model_repairs_total") >= 1,
            what=f"the {host}'s repairs counted",
        )
    assert all(welcomes(stack).get(c) == 1 for c in cpfs)  # a repair sends no second welcome
