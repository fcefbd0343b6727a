"""What the console reads, and from where: the broker (AMQP) and each service's own HTTP API (the
producer's outbox through the person API's admin routes). No other service's store."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from messaging import deadletters
from messaging.connection import connect
from messaging.topology import Topology
from pika.exceptions import ChannelClosedByBroker
from prometheus_client.parser import text_string_to_metric_families

from .config import ConsoleConfig

TIMEOUT = 5.0
PARKED_SHOWN = 10  # parked outbox rows listed on the overview (messaging outbox status: all)
NOT_FOUND = 404  # AMQP: no such queue
# Fields of an event's data that say who a person is: masked until the operator reveals them.
PERSONAL = {"cpf", "name", "address", "email", "date_of_birth", "entity_id"}


class Unreachable(Exception):
    """A service did not answer as it should."""


@dataclass
class Sample:
    at: float
    values: dict[str, float] = field(default_factory=dict)


class Sources:
    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.topologies = [config.topology(service) for service in config.console_consumers]
        self.apis = {
            "person": config.person_api_url,
            "score": config.score_api_url,
            "notifier": config.notifier_api_url,
        }
        self._last: Sample | None = None
        self._lock = threading.Lock()

    # -- HTTP --------------------------------------------------------------------------------
    def call(self, service: str, method: str, path: str) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if self.config.console_api_key:
            headers["Authorization"] = f"Bearer {self.config.console_api_key}"
        request = urllib.request.Request(
            f"{self.apis[service].rstrip('/')}{path}",
            method=method,
            headers=headers,
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                return answer.status, _decoded(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decoded(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(f"{service} did not answer: {exc}") from exc

    def readiness(self) -> dict[str, Any]:
        found = {}
        for service in self.apis:
            try:
                status, answer = self.call(service, "GET", "/ready")
                found[service] = answer if isinstance(answer, dict) else {"status": str(status)}
            except Unreachable as exc:
                found[service] = {"status": "unreachable", "checks": {"api": str(exc)}}
        return found

    def metrics(self, service: str) -> dict[str, float]:
        """The service's Prometheus samples, by name and labels (name{k=v,...})."""
        status, text = self.call(service, "GET", "/metrics")
        if status != 200 or not isinstance(text, str):
            return {}
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    # -- the broker ----------------------------------------------------------------------------
    def queues(self) -> list[dict[str, Any]]:
        conn = connect(self.config.amqp_url, "console", timeout=3)
        rows = []
        try:
            for topology in self.topologies:
                for name, role in _queues_of(topology):
                    channel = conn.channel()
                    try:
                        method = channel.queue_declare(name, passive=True).method
                        rows.append(
                            {
                                "name": name,
                                "role": role,
                                "depth": method.message_count,
                                "consumers": method.consumer_count,
                            }
                        )
                    except Exception:
                        rows.append({"name": name, "role": role, "depth": None, "consumers": None})
                    finally:
                        if channel.is_open:
                            channel.close()
        finally:
            if conn.is_open:
                conn.close()
        return rows

    def dead_letters(
        self, queue: str, keep_body: Callable[[deadletters.Letter, bytes], bool] | None = None
    ) -> deadletters.Look:
        """One window of the dead queue's letters, given back at once; bodies where asked."""
        try:
            return self._dead(queue).look(keep_body)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            return deadletters.Look([], 0)  # its service has not declared its queues yet

    def replay(self, queue: str, ids: list[str]) -> deadletters.Outcome:
        return self._dead(queue).replay(ids)

    def discard(self, queue: str, ids: list[str]) -> deadletters.Outcome:
        return self._dead(queue).discard(ids)

    def _dead(self, queue: str) -> deadletters.DeadLetters:
        return deadletters.DeadLetters(
            self.config.amqp_url,
            queue,
            window=self.config.console_dlq_window,
            client_name="console",
        )

    @property
    def dead_queues(self) -> list[str]:
        return [t.dead_queue for t in self.topologies]

    # -- the producer's outbox, through the person API (admin) -----------------------------
    def outbox_state(self) -> dict[str, Any]:
        found = self._person("/outbox", parked=PARKED_SHOWN)
        for row in found["parked"]:
            row["parked_at"] = datetime.fromisoformat(row["parked_at"])
        return {
            "backlog": found["backlog"],
            "oldest_age": found["oldest_age_seconds"],
            "published": found["published"],
            "last": found["last_published_at"],
            "parked": found["parked"],
            "parked_count": found["parked_count"],
        }

    def history(self, cpf: str | None, correlation_id: str | None) -> list[dict[str, Any]]:
        """The events still in the outbox about a person and their items, or made by one
        request (its correlation id), oldest first."""
        asked = {"cpf": cpf} if cpf else {"correlation_id": correlation_id}
        # 422: no event can have it (a CPF of more than 14 digits, an id no request can have)
        return self._person("/outbox/history", none_if=422, **asked).get("events", [])

    def _person(self, path: str, none_if: int | None = None, **query: Any) -> dict[str, Any]:
        """A person API answer that must be 200 and JSON ({} for `none_if`); Unreachable
        otherwise."""
        status, answer = self.call("person", "GET", f"{path}?{urllib.parse.urlencode(query)}")
        if status == none_if:
            return {}
        if status != 200 or not isinstance(answer, dict):
            said = answer.get("message") if isinstance(answer, dict) else str(answer)[:200]
            raise Unreachable(f"person answered {status} to GET {path}: {said}")
        return answer

    # -- the overview --------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Everything the overview shows, with rates from the previous look."""
        now, problems = time.monotonic(), []
        view: dict[str, Any] = {"models": {}, "emails": {}}
        try:
            view["queues"] = self.queues()
        except Exception as exc:
            view["queues"], problems = [], [f"broker: {type(exc).__name__}: {exc}"]
        try:
            view["outbox"] = self.outbox_state()
        except Unreachable as exc:
            view["outbox"] = None
            problems.append(f"outbox: {exc}")
        counters = {"published": (view["outbox"] or {}).get("published", 0)}
        for service in ("score", "notifier"):
            try:
                samples = self.metrics(service)
            except Unreachable as exc:
                problems.append(str(exc))
                samples = {}
            applied = sum(
                v
                for k, v in samples.items()
                if k.startswith("consumer_messages_total") and "outcome=applied" in k
            )
            counters[f"{service}_applied"] = applied
            view["models"][service] = {
                "lag": max(
                    (v for k, v in samples.items() if k.startswith("read_model_lag")), default=None
                ),
                "applied": applied,
                "dead_lettered": sum(
                    v
                    for k, v in samples.items()
                    if k.startswith("consumer_messages_total") and "outcome=dead_lettered" in k
                ),
                "verification": _verification(samples),
            }
            if service == "notifier":
                view["emails"] = {
                    k.split("status=")[1].rstrip("}"): int(v)
                    for k, v in samples.items()
                    if k.startswith("emails{")
                }
        with self._lock:
            previous, self._last = self._last, Sample(now, counters)
        rates = {}
        if previous is not None and now > previous.at:
            span = now - previous.at
            rates = {
                k: max(0.0, (v - previous.values.get(k, v)) / span) for k, v in counters.items()
            }
        view["rates"] = rates
        view["ready"] = self.readiness()
        view["problems"] = problems
        return view


def _verification(samples: dict[str, float]) -> dict[str, Any] | None:
    """The model's last verification as its replicas report it (messaging.verification):
    when, how many buckets differed and still differ after a repair, repairs made."""

    def values(name: str) -> list[float]:
        return [v for k, v in samples.items() if k.split("{")[0] == name]

    last = values("read_model_last_verified_seconds")
    if not last and not values("read_model_verifications_total"):
        return None  # this model does not verify (VERIFY_SECONDS=0)
    return {
        "age": max(0.0, time.time() - max(last)) if last else None,
        "divergent": int(max(values("read_model_divergent_buckets"), default=0)),
        "unrepaired": int(max(values("read_model_unrepaired_buckets"), default=0)),
        "repairs": int(sum(values("read_model_repairs_total"))),
    }


def _queues_of(topology: Topology) -> list[tuple[str, str]]:
    return [
        (topology.queue, "work"),
        *((q, "retry") for q in topology.retry_queues),
        (topology.dead_queue, "dead"),
    ]


def _decoded(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def masked(value: Any) -> Any:
    """An event body with the personal fields hidden (the last two characters kept)."""
    if isinstance(value, dict):
        return {k: (_mask(v) if k in PERSONAL else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def _mask(value: Any) -> Any:
    if value is None:
        return None
    text = str(value)
    return "•" * max(0, len(text) - 2) + text[-2:] if len(text) > 2 else "••"


def body_view(body: bytes, reveal: bool) -> str:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        shown = body[:2000].decode(errors="replace")
        return shown if reveal else _mask(shown)
    return json.dumps(parsed if reveal else masked(parsed), indent=2, ensure_ascii=False)[:8000]


def quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")
