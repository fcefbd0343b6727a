"""The alert rules and scrape configurations of deploy/prometheus, checked with Prometheus's own
promtool: the rules parse, each fires when it should and not before (rules_test.yml), and the
scrape configurations are valid. Also: the metrics the rules use are the ones the APIs export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is needed: apt-get install --no-install-recommends prometheus")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_alert_fires_when_it_should_and_not_before():
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = set(re.findall(r"- alert: (\w+)", (DEPLOY / "rules.yml").read_text()))
    covered = set(re.findall(r"alertname: (\w+)", (DEPLOY / "rules_test.yml").read_text()))
    assert rules == covered, f"untested alerts: {rules - covered}"


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_the_scrape_configurations_are_valid(config, tmp_path):
    for name in (config, "rules.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    (tmp_path / "metrics.key").write_text("a-key-with-the-metrics-scope")
    checked = promtool("check", "config", config, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_use_metrics_the_services_export():
    from messaging.replicas import consumer_metrics
    from prometheus_client import CollectorRegistry, generate_latest
    from servicekit import health

    exported = set()
    snapshot = {
        "consumed": 1,
        "retried": 0,
        "dead_lettered": 0,
        "connections": 1,
        "last_occurred_at": "2026-01-01T00:00:00+00:00",
        "handler_buckets": [1.0],
        "handler_counts": [1, 0],
        "handler_seconds": 0.1,
        "verifications": 1,
        "divergent_buckets": 0,
        "unrepaired_buckets": 0,
        "repairs": 0,
    }
    exported |= {family.name for family in consumer_metrics({"host:1": snapshot})}
    registry = CollectorRegistry()
    registry.register(health._ReadinessCollector({"consumer": lambda: None}))
    exported |= set(re.findall(r"^(\w+)\{", generate_latest(registry).decode(), re.MULTILINE))
    exported |= {
        "outbox_backlog",
        "outbox_oldest_age_seconds",
        "outbox_parked",
        "emails",
        "up",
        "consumer_messages_total",
    }
    used = set(
        re.findall(
            r"\b([a-z_]+)(?:\{|\[| >| -|\))",
            " ".join(re.findall(r"expr: (.*)", (DEPLOY / "rules.yml").read_text())),
        )
    )
    functions = {"sum", "by", "max", "min", "deriv", "increase", "min_over_time", "and"}
    assert used - functions <= exported | {"job", "check"}, used - functions - exported
