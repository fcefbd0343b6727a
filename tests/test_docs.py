"""The documentation site builds with --strict (a broken link, a missing page or anchor fails it),
its pages ask no other host for anything, the README's parts it shows are the README's, and the
library's API reference lists exactly what `messaging` exports, each with a docstring."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import messaging
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    return out


def text_of(page: Path) -> str:
    """A built page's text, without its tags (code is split into spans by the highlighter)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_site_builds_strictly_and_its_pages_ask_no_other_host(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page.read_text())
        loaded = [
            url
            for tag in tags
            if 'rel="canonical"' not in tag  # names the page's own address, loads nothing
            for url in re.findall(r'\b(?:src|href)="([^"]+)"', tag)
        ]
        remote = [url for url in loaded if re.match(r"(https?:)?//", url)]
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def test_the_getting_started_page_shows_the_readme_walkthrough_the_tests_run(site):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks
    page = text_of(site / "getting-started" / "index.html")
    for block in blocks:
        for line in block.strip().splitlines():
            assert line.strip() in page, line


def test_the_api_reference_lists_exactly_what_messaging_exports(site):
    page = (site / "library" / "reference" / "index.html").read_text()
    documented = set(re.findall(r'<h2 id="messaging\.(\w+)"', page))
    assert documented == set(messaging.__all__)


def test_every_name_messaging_exports_has_a_docstring():
    import griffe

    package = griffe.load("messaging", search_paths=[str(ROOT / "shared" / "messaging")])
    missing = [
        name
        for name in messaging.__all__
        if not (package[name].docstring and package[name].docstring.value.strip())
    ]
    assert not missing, f"exported without a docstring: {missing}"


def test_every_alert_has_a_runbook_url_that_resolves_to_a_section_of_the_site(site):
    import yaml

    site_url = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_url"]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert alerts
    for alert in alerts:
        url = alert["annotations"].get("runbook_url", "")
        assert url.startswith(site_url), f"{alert['alert']}: runbook_url {url!r}"
        path, _, anchor = url.removeprefix(site_url).partition("#")
        page = site / path / "index.html"
        assert page.is_file(), f"{alert['alert']}: no page {path}"
        assert anchor and f'id="{anchor}"' in page.read_text(), f"{alert['alert']}: no #{anchor}"
