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
import ipaddress
import json
import re
import urllib.parse
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
# Secrets the operators write: CloudNativePG's <cluster>-app (the owner) and <cluster>-superuser
# (the migrate steps'), the Cluster Operator's default user.
DATABASES = ("person", "notifier", "console")
OPERATOR_SECRETS = {f"{db}-db-{user}" for db in DATABASES for user in ("app", "superuser")}
OPERATOR_SECRETS |= {"events-default-user"}


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


# -- placeholders: the Secret as shipped starts nothing ------------------------------------------
PLACEHOLDER = "REPLACE-ME"
# What the operators write into their secrets, in the shape they write it.
OPERATOR_VALUES = {
    **{
        (f"{db}-db-app", "uri"): f"postgresql://{db}:operator-made-{db}@{db}-db-rw:5432/{db}"
        for db in DATABASES
    },
    **{
        (
            f"{db}-db-superuser",
            "uri",
        ): f"postgresql://postgres:operator-made-su@{db}-db-rw:5432/{db}"
        for db in DATABASES
    },
    ("events-default-user", "username"): "default_user_operator",
    ("events-default-user", "password"): "operator-made-administrator-password",
}


def filled_secret() -> dict[str, str]:
    """The Secret as an operator fills it in: every placeholder replaced by a value of its shape."""
    import secrets as random

    from servicekit.auth import new_key

    values = dict(of_kind("Secret")["event-replication-secrets"]["stringData"])
    assert set(values.values()) == {PLACEHOLDER}, "a credential the operator need not replace"
    filled = {name: random.token_urlsafe(32) for name in values}
    console_key, console_entry = new_key(["person:read", "score:read", "notifier:read", "admin"])
    filled["api-keys"] = json.dumps(console_entry)
    filled["console-api-key"] = console_key
    return filled


def environment(container: dict, secret: dict[str, str]) -> dict[str, str]:
    """The variables Kubernetes gives this container: its ConfigMaps, then its env in order
    ($(NAME) expanded), secrets from `secret` (ours) or as the operators write theirs."""
    configs = of_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configs[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), variable["value"]
            )
            continue
        ref = variable["valueFrom"]["secretKeyRef"]
        if ref["name"] == "event-replication-secrets":
            env[variable["name"]] = secret[ref["key"]]
        else:
            env[variable["name"]] = OPERATOR_VALUES[(ref["name"], ref["key"])]
    return env


def settings_of(container: dict):
    """The settings class of the service whose process the container runs."""
    from console.config import ConsoleConfig
    from notifier.config import NotifierConfig
    from person.config import PersonConfig
    from score.config import ScoreConfig

    command = " ".join(container["command"])
    found = {
        cls
        for service, cls in (
            ("person", PersonConfig),
            ("score", ScoreConfig),
            ("notifier", NotifierConfig),
            ("console", ConsoleConfig),
        )
        if re.search(rf"\b{service}\.\w+", command)
    }
    [cls] = found
    return cls


def app_containers() -> list[tuple[str, dict]]:
    return [(name, c) for name, c in containers() if c["image"].startswith("registry.example.com")]


@pytest.mark.parametrize(
    "name, container", app_containers(), ids=[name for name, _ in app_containers()]
)
def test_every_process_refuses_the_placeholder_secret_and_starts_once_it_is_filled_in(
    name, container
):
    from pydantic import ValidationError

    settings = settings_of(container)
    shipped = {key: PLACEHOLDER for key in filled_secret()}
    with pytest.raises(ValidationError, match=f"holds the placeholder {PLACEHOLDER}") as refused:
        settings(
            _env_file=None, **{k.lower(): v for k, v in environment(container, shipped).items()}
        )
    assert PLACEHOLDER not in str(refused.value).replace(f"placeholder {PLACEHOLDER}", "")
    filled = environment(container, filled_secret())
    config = settings(_env_file=None, **{k.lower(): v for k, v in filled.items()})
    assert config.production, name


def test_a_placeholder_is_refused_in_development_too_and_its_value_is_not_echoed():
    from pydantic import ValidationError
    from score.config import ScoreConfig

    url = f"redis://:{PLACEHOLDER}@redis:6379/0"
    with pytest.raises(ValidationError) as refused:
        ScoreConfig(_env_file=None, app_env="development", score_redis_url=url)
    assert "SCORE_REDIS_URL holds the placeholder REPLACE-ME" in str(refused.value)
    assert "redis://" not in str(refused.value)


def test_the_broker_user_is_not_made_with_the_placeholder_password(monkeypatch, capsys):
    from messaging import cli

    [job] = [c for name, c in containers() if name == "migrate"]
    env = environment(job, {key: PLACEHOLDER for key in filled_secret()})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:9")  # never called
    command = job["command"][-1].split("&&")[0].split()
    assert command[:2] == ["messaging", "broker-user"]
    assert cli.main(command[1:]) == 2
    assert f"holds the placeholder {PLACEHOLDER}" in capsys.readouterr().err


def test_redis_refuses_the_placeholder_password(tmp_path):
    import subprocess

    [redis] = [c for name, c in containers() if name == "redis"]
    assert redis["command"][:2] == ["sh", "-c"]
    entrypoint = tmp_path / "docker-entrypoint.sh"  # the image's, standing in: prints its args
    entrypoint.write_text('#!/bin/sh\necho "$@"\n')
    entrypoint.chmod(0o755)

    def start(password: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            redis["command"],
            env={"PATH": f"{tmp_path}:/usr/bin:/bin", "REDIS_PASSWORD": password},
            capture_output=True,
            text=True,
            check=False,
        )

    refused = start(PLACEHOLDER)
    assert refused.returncode == 1 and "placeholder REPLACE-ME" in refused.stderr
    assert refused.stdout == ""
    started = start("an-operators-own-redis-password")
    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == [
        "redis-server",
        "--appendonly",
        "yes",
        "--requirepass",
        "an-operators-own-redis-password",
    ]


# -- resources, network and TLS --------------------------------------------------------------------
def quantity(text: str) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def test_every_container_and_operator_pod_has_requests_and_a_memory_limit():
    """Requests for the scheduler, a memory limit so one process cannot take a machine's memory.
    No CPU limit on our processes: throttling a latency-bound API helps nobody (a request is
    the share it is guaranteed)."""
    given = [(name, c.get("resources", {})) for name, c in containers()]
    given += [
        (doc["metadata"]["name"], doc["spec"].get("resources", {}))
        for doc in documents()
        if doc["kind"] in ("RabbitmqCluster", "Cluster")
    ]
    assert len(given) == len(containers()) + 4
    for name, resources in given:
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert {"cpu", "memory"} <= set(requests), name
        assert "memory" in limits, name
        assert quantity(limits["memory"]) >= quantity(requests["memory"]), name


NAMESPACE = "event-replication"
# Pods from elsewhere: (namespace, its labels, the pod's labels), or an address outside.
TRAEFIK = (
    "traefik",
    {"kubernetes.io/metadata.name": "traefik"},
    {"app.kubernetes.io/name": "traefik"},
)
DNS = ("kube-system", {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
CNPG_OPERATOR = ("cnpg-system", {"kubernetes.io/metadata.name": "cnpg-system"}, {"app": "cnpg"})
RABBIT_OPERATOR = ("rabbitmq-system", {"kubernetes.io/metadata.name": "rabbitmq-system"}, {})
ELSEWHERE = ("default", {"kubernetes.io/metadata.name": "default"}, {"app": "anything"})
SENDGRID = "198.51.100.7"  # an address on the internet
METADATA = "169.254.169.254"  # a cloud's metadata service
PORTS = (53, 443, 4369, 5432, 5672, 6379, 6443, 8000, 15672, 25672)
KUBERNETES_API = (443, 6443)  # the operators' pods reach it wherever it is
# What each process connects to, and why (the test checks each against its environment).
NEEDS = {
    "person": {("person-db", 5432), ("events", 5672)},
    "person-relay": {("person-db", 5432), ("events", 5672)},
    "person-importer": {("person-db", 5432)},
    "migrate-person": {("person-db", 5432)},
    "score": {("redis", 6379), ("events", 5672)},
    "score-consumer": {("redis", 6379), ("events", 5672)},
    "notifier": {("notifier-db", 5432), ("events", 5672)},
    "notifier-consumer": {("notifier-db", 5432), ("events", 5672)},
    "notifier-sender": {("notifier-db", 5432), (SENDGRID, 443)},
    "migrate": {("notifier-db", 5432), ("events", 5672), ("events", 15672)},
    "console": {("console-db", 5432), ("events", 5672)}
    | {(api, 8000) for api in ("person", "score", "notifier")},
}


def pods() -> dict[str, tuple[str, dict, dict]]:
    """Every pod of the namespace by name: ours, the broker's nodes, the databases' instances."""
    found = {
        name: (NAMESPACE, {}, w["spec"]["template"]["metadata"]["labels"])
        for name, w in {**workloads(), **of_kind("Job")}.items()
    }
    for name in of_kind("RabbitmqCluster"):  # the Cluster Operator's pod labels
        found[name] = (
            NAMESPACE,
            {},
            {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "rabbitmq"},
        )
    for name in of_kind("Cluster"):  # CloudNativePG's
        found[name] = (NAMESPACE, {}, {"cnpg.io/cluster": name, "cnpg.io/podRole": "instance"})
    return found


def matches(selector: dict, labels: dict) -> bool:
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions)
    return selects(selector.get("matchLabels", {}), labels) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def peer_admits(peer: dict, other) -> bool:
    if isinstance(other, str):  # an address outside the cluster
        block = peer.get("ipBlock")
        if block is None:
            return False
        inside = ipaddress.ip_address(other) in ipaddress.ip_network(block["cidr"])
        return inside and not any(
            ipaddress.ip_address(other) in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    namespace, namespace_labels, labels = other
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_namespace = matches(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = namespace == NAMESPACE
    return in_namespace and matches(peer.get("podSelector", {}), labels)


def rule_admits(rule: dict, peers_key: str, other, port: int) -> bool:
    ports = rule.get("ports")
    if ports is not None and not any(p["port"] == port for p in ports):
        return False
    peers = rule.get(peers_key)
    return peers is None or any(peer_admits(peer, other) for peer in peers)


def allowed(source, destination, port: int, policies: list[dict]) -> bool:
    """Whether these policies let `source` open a connection to `destination` on `port`."""
    for pod, direction, key, other in (
        (source, "Egress", "to", destination),
        (destination, "Ingress", "from", source),
    ):
        if isinstance(pod, str) or pod[0] != NAMESPACE:
            continue  # not ours: no policy of these files governs it
        selecting = [
            p["spec"]
            for p in policies
            if direction in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod[2])
        ]
        if selecting and not any(
            rule_admits(rule, key, other, port)
            for spec in selecting
            for rule in spec.get(direction.lower(), [])
        ):
            return False
    return True


def test_network_policies_deny_by_default_and_allow_each_process_only_what_it_needs():
    ours = pods()
    everyone = {**ours, "traefik": TRAEFIK, "dns": DNS, "elsewhere": ELSEWHERE}
    everyone |= {"cnpg": CNPG_OPERATOR, "rabbit-operator": RABBIT_OPERATOR}
    databases = set(of_kind("Cluster"))
    [rabbit] = of_kind("RabbitmqCluster")
    expected = {(name, target, port) for name, needs in NEEDS.items() for target, port in needs}
    expected |= {(name, "dns", 53) for name in ours}  # names resolve everywhere
    expected |= {("traefik", api, 8000) for api in APIS}
    expected |= {(rabbit, rabbit, p) for p in (4369, 25672)} | {("rabbit-operator", rabbit, 15672)}
    expected |= {(db, db, p) for db in databases for p in (5432, 8000)}
    expected |= {("cnpg", db, 8000) for db in databases}
    expected |= {
        (operated, name, port)
        for operated in databases | {rabbit}
        for name, pod in everyone.items()
        if pod[0] != NAMESPACE
        for port in KUBERNETES_API
    }
    policies = list(of_kind("NetworkPolicy").values())
    # A pod these files do not know yet (a new workload) talks to nobody either.
    assert {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]} in [
        p["spec"] for p in policies
    ]
    assert set(NEEDS) | databases | {rabbit, "redis"} == set(ours)
    for source, src in everyone.items():
        for destination, dst in everyone.items():
            if src[0] != NAMESPACE and dst[0] != NAMESPACE:
                continue
            for port in PORTS:
                verdict = allowed(src, dst, port, policies)
                assert verdict == ((source, destination, port) in expected), (
                    source,
                    destination,
                    port,
                )
    # Outside the cluster: the senders reach SendGrid; nobody reaches the metadata service; the
    # operators' pods reach the Kubernetes API (on its ports, wherever it is).
    for name, pod in ours.items():
        assert allowed(pod, SENDGRID, 443, policies) == (
            name == "notifier-sender" or name in databases or name == rabbit
        ), name
        assert allowed(pod, METADATA, 443, policies) == (name in databases or name == rabbit), name
        assert not allowed(pod, SENDGRID, 80, policies), name


def test_what_each_process_needs_is_what_its_environment_names():
    secret = filled_secret()
    hosts = {"events": "events", "redis": "redis"} | {f"{db}-rw": db for db in of_kind("Cluster")}
    hosts |= {api: api for api in ("person", "score", "notifier")}
    for name, container in app_containers():
        env = environment(container, secret)
        named = set()
        for key, value in env.items():
            if key.endswith(("_URL",)) and "://" in value:
                for url in value.split(","):
                    host = urllib.parse.urlsplit(url).hostname or ""
                    if host.split(".")[0] in hosts:
                        named.add(hosts[host.split(".")[0]])
        needed = {target for target, _ in NEEDS[name] if target != SENDGRID}
        assert needed <= named, (name, needed - named)


def test_the_ingress_serves_every_host_over_tls_only():
    [ingress] = of_kind("Ingress").values()
    annotations = ingress["metadata"]["annotations"]
    assert annotations["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
    assert annotations["traefik.ingress.kubernetes.io/router.tls"] == "true"
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    [tls] = ingress["spec"]["tls"]
    assert set(tls["hosts"]) == hosts
    assert tls["secretName"] in (MANIFESTS / "README.md").read_text()


def test_the_console_is_given_no_store_but_its_own():
    """It reads the others through their APIs (the producer's outbox too)."""
    [console] = [c for name, c in containers() if name == "console"]
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in console.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert not secrets & OPERATOR_SECRETS  # its own password only: the init container migrates
    names = {e["name"] for e in console.get("env", [])}
    assert not {"PERSON_DATABASE_URL", "NOTIFIER_DATABASE_URL", "SCORE_REDIS_URL"} & names


# Least privilege (docs/security.md): each process its own broker user and database role; the
# owners' and administrators' credentials are the migrate steps' (Jobs, the console's init
# container) alone.
K8S_ROLES = {
    "person": ("probe", {"person_service"}),
    "person-relay": ("relay", {"person_service"}),
    "person-importer": ("probe", {"person_service"}),
    "score": ("probe", set()),
    "score-consumer": ("score", set()),
    "notifier": ("probe", {"notifier_service"}),
    "notifier-consumer": ("notifier", {"notifier_service"}),
    "notifier-sender": ("probe", {"notifier_service"}),
    "console": ("operator", {"console_service"}),
}


def test_each_process_runs_as_its_own_roles_and_never_as_an_administrator():
    secret = filled_secret()
    jobs = set(of_kind("Job"))
    for name, container in app_containers():
        refs = {
            v["valueFrom"]["secretKeyRef"]["name"]
            for v in container.get("env", [])
            if "valueFrom" in v and "secretKeyRef" in v["valueFrom"]
        }
        env = environment(container, secret)
        if name in jobs:
            continue
        assert refs <= {"event-replication-secrets"}, (name, refs)  # no owner, no superuser
        broker_user, database_roles = K8S_ROLES[name]
        users = {urllib.parse.urlsplit(url).username for url in node_urls(env["AMQP_URL"])}
        assert users == {broker_user}, name
        roles = {
            urllib.parse.urlsplit(value).username
            for key, value in env.items()
            if key.endswith("_DATABASE_URL")
        }
        assert roles == database_roles, name
    [migrate] = [c for name, c in containers() if name == "migrate"]
    command = migrate["command"][-1]
    for role in {user for user, _ in K8S_ROLES.values()}:
        assert f" {role}" in command.split("&&")[0], role
    assert "servicekit.roles" in command
    [person_job] = [c for name, c in containers() if name == "migrate-person"]
    assert "servicekit.roles" in person_job["command"][-1]
    [console] = of_kind("Deployment")["console"]["spec"]["template"]["spec"]["initContainers"]
    assert "servicekit.roles" in console["command"][-1]
    assert all(of_kind("Cluster")[db]["spec"]["enableSuperuserAccess"] for db in of_kind("Cluster"))


FAILING_OVER = {"person-db": "PERSON_DATABASE_URL", "notifier-db": "NOTIFIER_DATABASE_URL"}


def test_the_services_follow_their_database_to_a_promoted_standby():
    """Each of the two databases keeps a synchronous standby (no acknowledged write on one copy
    only), and every long-running process's URL names the primary's Service, then every
    instance's, asking for the one that takes writes: what servicekit.database checks."""
    from psycopg.conninfo import conninfo_to_dict
    from servicekit.database import check_url

    clusters = of_kind("Cluster")
    for name in FAILING_OVER:
        spec = clusters[name]["spec"]
        assert spec["instances"] >= 2, name
        assert spec["postgresql"]["synchronous"]["number"] >= 1, name
        assert spec["postgresql"]["synchronous"]["dataDurability"] == "required", name
    secret = filled_secret()
    jobs = set(of_kind("Job"))
    seen = set()
    for name, container in app_containers():
        env = environment(container, secret)
        for cluster, variable in FAILING_OVER.items():
            if name in jobs or variable not in env:
                continue
            params = conninfo_to_dict(check_url(variable, env[variable]))
            assert params["host"] == f"{cluster}-rw,{cluster}-r", name
            assert params["target_session_attrs"] == "read-write", name
            seen.add((name, cluster))
    assert {name for name, _ in seen} == {
        "person",
        "person-relay",
        "person-importer",
        "notifier",
        "notifier-consumer",
        "notifier-sender",
    }
