"""What the images install is what requirements.txt pins, hash-checked; no pin has a known
vulnerability.

requirements.txt (and requirements-build.txt, the build backend) are the pins people edit;
requirements.lock is the same pins with every file's hash (`make lock`, pip-tools), which the
Dockerfile installs with --require-hashes. pip-audit checks every pinned requirement file against
PyPI's advisories (`make audit` runs the same command).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("requirements.txt", "requirements-build.txt")  # what the images install
AUDITED = (*PINNED, "requirements-dev.txt")
PIP_AUDIT = Path(sys.executable).parent / "pip-audit"


def pins(name: str) -> dict[str, str]:
    """Canonical name -> version of each `name==version` line of a requirements file."""
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[\w,-]+\])?==([\w.!+-]+)", line)
        assert match, f"{name}: not pinned exactly: {line}"
        found[canonicalize_name(match[1])] = match[3]
    return found


def locked() -> dict[str, tuple[str, list[str]]]:
    """Canonical name -> (version, hashes) of requirements.lock."""
    text = (ROOT / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)((?: \\\n\s+--hash=\S+)+)", text, re.MULTILINE)
    assert entries, "requirements.lock has no pinned entries"
    return {
        canonicalize_name(name): (version, re.findall(r"--hash=(\S+)", hashes))
        for name, version, hashes in entries
    }


@pytest.mark.unit
def test_every_requirement_file_pins_each_distribution_exactly():
    for name in AUDITED:
        assert pins(name), name
    assert "pip-audit" in pins("requirements-dev.txt") and "pip-tools" in pins(
        "requirements-dev.txt"
    )


@pytest.mark.unit
def test_the_lock_pins_exactly_what_the_requirement_files_pin_each_with_its_hashes():
    """Edited requirements.txt without `make lock`, or a dependency pip-compile had to add that
    requirements.txt does not pin: either way the images would not get what it says."""
    lock = locked()
    wanted = {name: version for file in PINNED for name, version in pins(file).items()}
    assert {name: version for name, (version, _) in lock.items()} == wanted, "run make lock"
    for name, (_, hashes) in lock.items():
        assert hashes, name
        for value in hashes:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", value), (name, value)
    every_line = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line]
    assert not [line for line in every_line if line.startswith(("-i ", "--index", "--extra-index"))]


@pytest.mark.unit
def test_the_images_install_only_hash_checked_files_from_the_index():
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    installs = re.findall(r"\bpip install ([^&\n]+)", dockerfile)
    assert installs
    for arguments in installs:
        words = arguments.split()
        if "--require-hashes" in words:
            assert words[words.index("-r") + 1] == "requirements.lock", arguments
        else:  # our own packages, from the build context, built with the hashed setuptools
            assert {"--no-deps", "--no-build-isolation"} <= set(words), arguments
            assert all(w.startswith(("--", "./")) for w in words), arguments
    assert "COPY requirements.lock ./" in dockerfile
    assert "setuptools" in pins("requirements-build.txt")


# -- pip-audit ----------------------------------------------------------------------------------
def _json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=20) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _pypi() -> str:
    """PyPI's JSON API base, as pip knows it."""
    from pip._internal.models.index import PyPI

    return PyPI.pypi_url


def _advisories(release: dict) -> list[str]:
    return [
        f"{v['id']} (fixed in {', '.join(v.get('fixed_in') or ['no release'])})"
        for v in release.get("vulnerabilities", [])
        if not v.get("withdrawn")
    ]


@pytest.mark.integration  # PyPI answers it
def test_no_pinned_distribution_has_a_known_vulnerability(tmp_path):
    """pip-audit over every requirement file, with PyPI's advisory data (what `make audit` runs,
    --strict: a pin it cannot look up fails too)."""
    report = tmp_path / "audit.json"
    files = [arg for name in AUDITED for arg in ("-r", str(ROOT / name))]
    audit = subprocess.run(
        [
            *(str(PIP_AUDIT), "--no-deps", "--disable-pip", "--progress-spinner", "off"),
            *("--format", "json", "--output", str(report), *files),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert report.exists(), audit.stderr[-3000:]
    dependencies = json.loads(report.read_text())["dependencies"]
    vulnerable = {
        f"{d['name']}=={d['version']}": [
            f"{v['id']} (fix: {v['fix_versions']})" for v in d["vulns"]
        ]
        for d in dependencies
        if d.get("vulns")
    }
    assert not vulnerable, f"upgrade these pins (then make lock): {vulnerable}"
    skipped = {d["name"] for d in dependencies if "skip_reason" in d}
    if not skipped:
        assert audit.returncode == 0, audit.stderr[-3000:]
        return
    # pip-audit reads PyPI's advisories per release (/pypi/<name>/<version>/json). Where only the
    # project documents (/pypi/<name>/json) are served, as on the development machines' network,
    # those give the advisories of each project's newest release: a pin at its newest release is
    # audited from them; one behind it cannot be here.
    if _json(f"{_pypi()}/pip-audit/{pins('requirements-dev.txt')['pip-audit']}/json") is not None:
        pytest.fail(f"pip-audit could not look up {sorted(skipped)}: {audit.stderr[-2000:]}")
    wanted = {name: version for file in AUDITED for name, version in pins(file).items()}
    found, behind = {}, []
    for name in sorted(canonicalize_name(s) for s in skipped):
        project = _json(f"{_pypi()}/{name}/json")
        assert project is not None, f"{name} is not on PyPI"
        if project["info"]["version"] != wanted[name]:
            behind.append(f"{name}=={wanted[name]}")
        elif advisories := _advisories(project):
            found[f"{name}=={wanted[name]}"] = advisories
    assert not found, f"upgrade these pins (then make lock): {found}"
    if behind:
        pytest.skip(
            f"PyPI's per-release advisories are not served on this network: "
            f"{len(wanted) - len(behind)} pins (each its project's newest release) audited "
            f"from the project documents, none vulnerable; {len(behind)} behind their newest "
            f"release could not be: {', '.join(behind)} (make audit where PyPI answers fully)"
        )
