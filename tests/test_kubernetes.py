"""docs/deploy/kubernetes/ holds valid manifests that describe the same stack, offline.

Kubernetes' own kinds are validated against the API's JSON schemas for Kubernetes 1.30 in strict
mode (no unknown field), as the pinned kubernetes-validate package ships them. The two operators'
kinds, RabbitmqCluster and CloudNativePG's Cluster, are validated against small schemas written
for this project (docs/deploy/kubernetes/schemas/): kind, name, required fields and the type of
every field the manifests set, not the operators' whole CRDs. The checks after that compare the
manifests with the Procfile and with each other (selectors, probes, budgets, secrets).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from messaging.connection import node_urls

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "docs" / "deploy" / "kubernetes"
KUBERNETES = "1.30"
CUSTOM = {  # (apiVersion, kind) -> the schema file written for it
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster-rabbitmq.com-v1beta1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql.cnpg.io-v1.json",
}
APIS = ("person", "score", "notifier", "console")
COPIES = {"person-relay": 2, "score-consumer": 3, "notifier-consumer": 2, "notifier-sender": 2}
# Secrets the operators write: CloudNativePG's <cluster>-app, the Cluster Operator's default user.
OPERATOR_SECRETS = {"person-db-app", "notifier-db-app", "console-db-app", "events-default-user"}


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def validate(doc: dict) -> None:
    """Raise unless the document is valid for its kind (see the module docstring)."""
    custom = CUSTOM.get((doc["apiVersion"], doc["kind"]))
    if custom is None:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    schema = json.loads((MANIFESTS / "schemas" / custom).read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def workloads() -> dict[str, dict]:
    return {**of_kind("Deployment"), **of_kind("StatefulSet")}


def containers() -> list[tuple[str, dict]]:
    found = []
    for doc in documents():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            found += [
                (doc["metadata"]["name"], c) for c in doc["spec"]["template"]["spec"]["containers"]
            ]
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_for_its_kind(doc):
    validate(doc)


def test_the_validation_refuses_what_kubernetes_would(tmp_path):
    deployment = copy.deepcopy(of_kind("Deployment")["score-consumer"])
    deployment["spec"]["replica"] = 3  # a typo: strict mode knows no such field
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment)
    rabbit = copy.deepcopy(next(iter(of_kind("RabbitmqCluster").values())))
    rabbit["spec"]["replicas"] = "3"
    with pytest.raises(jsonschema.ValidationError):
        validate(rabbit)
    database = copy.deepcopy(of_kind("Cluster")["person-db"])
    del database["spec"]["instances"]
    with pytest.raises(jsonschema.ValidationError):
        validate(database)


def test_every_process_of_the_procfile_runs_with_its_command():
    commands = {name: " ".join(c["command"]) for name, c in containers() if "command" in c}
    for name, command in procfile().items():
        if name == "traefik":  # the cluster's ingress controller routes instead
            continue
        native = command.split()
        assert commands[name].split()[0] == native[0], name
        assert commands[name].split()[-1].strip('"') == native[-1].strip('"'), name


def test_replicas_a_relay_standby_and_a_three_node_broker():
    deployments = of_kind("Deployment")
    for name, replicas in COPIES.items():
        assert deployments[name]["spec"]["replicas"] == replicas, name
    for api in APIS:
        if api != "console":  # operators' pages: one copy is enough
            assert deployments[api]["spec"]["replicas"] >= 2, api
    [rabbit] = of_kind("RabbitmqCluster").values()
    assert rabbit["spec"]["replicas"] == 3
    config = of_kind("ConfigMap")["event-replication"]["data"]
    assert config["QUEUE_GROUP_SIZE"] == "3"
    for database in of_kind("Cluster").values():
        spec = database["spec"]
        assert spec["instances"] >= 2
        assert spec["postgresql"]["synchronous"]["number"] >= 1  # no acknowledged write lost


def test_apis_are_probed_on_health_and_ready_at_their_port():
    deployments = of_kind("Deployment")
    config = of_kind("ConfigMap")["event-replication"]["data"]
    port = int(config["BIND"].rpartition(":")[2])
    for api in APIS:
        [container] = deployments[api]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == port, api
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}, api
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, api


def test_every_replicated_workload_has_a_disruption_budget_that_keeps_one():
    budgets = of_kind("PodDisruptionBudget")
    pods = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads().items()}
    [rabbit] = of_kind("RabbitmqCluster")
    pods[rabbit] = {"app.kubernetes.io/name": rabbit}  # the operator's pod labels
    covered = {}
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [w for w, labels in pods.items() if selects(selector, labels)]
        assert matched, f"budget {name} selects no pods"
        covered.update(dict.fromkeys(matched, budget["spec"]))
    for name, workload in workloads().items():
        if workload["spec"]["replicas"] > 1:
            spec = covered[name]
            assert spec.get("minAvailable", 0) >= 1 or spec.get("maxUnavailable") == 1, name
    assert covered[rabbit] == {"maxUnavailable": 1, "selector": {"matchLabels": pods[rabbit]}}


def test_selectors_services_and_ingress_fit_together():
    for name, workload in workloads().items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(workload["spec"]["selector"]["matchLabels"], labels), name
    services = of_kind("Service")
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads().values()]
    for name, service in services.items():
        assert any(selects(service["spec"]["selector"], labels) for labels in pods), name
    [ingress] = of_kind("Ingress").values()
    routed = set()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in ports
            routed.add((rule["host"].split(".")[0], backend["name"]))
    assert routed == {(api, api) for api in APIS}


def test_every_container_is_given_the_broker_nodes_and_existing_secrets():
    secrets = of_kind("Secret")
    keys = {name: set(s["stringData"]) for name, s in secrets.items()}
    [rabbit] = of_kind("RabbitmqCluster")
    nodes = [rabbit] + [f"{rabbit}-server-{n}.{rabbit}-nodes" for n in range(3)]
    for name, container in containers():
        env = container.get("env", [])
        defined: set[str] = set()
        for variable in env:
            # $(NAME) expands only variables defined before it in the list.
            for used in re.findall(r"\$\((\w+)\)", variable.get("value", "")):
                assert used in defined, (name, variable["name"], used)
            defined.add(variable["name"])
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] not in OPERATOR_SECRETS:
                assert ref["key"] in keys[ref["name"]], (name, ref)
        if name == "redis":
            continue
        amqp = next(v["value"] for v in env if v["name"] == "AMQP_URL")
        hosts = [url.split("@", 1)[1].split(":")[0] for url in node_urls(amqp)]
        assert hosts == nodes, name


def test_the_console_is_given_no_store_but_its_own():
    """It reads the others through their APIs (the producer's outbox too)."""
    [console] = [c for name, c in containers() if name == "console"]
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in console.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets & OPERATOR_SECRETS == {"console-db-app"}
    names = {e["name"] for e in console.get("env", [])}
    assert not {"PERSON_DATABASE_URL", "NOTIFIER_DATABASE_URL", "SCORE_REDIS_URL"} & names
