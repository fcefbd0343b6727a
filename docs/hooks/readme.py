"""MkDocs hook: a page shows a part of the README without a second copy of it.

`<!-- README.md: NAME -->` in a page becomes the README's text between `<!-- start: NAME -->`
and `<!-- end: NAME -->` (the walkthrough, which the tests run from the README, is one), with its
links into docs/ made relative to the site. A name the README does not mark fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

README = Path(__file__).resolve().parents[2] / "README.md"
INCLUDE = re.compile(r"<!-- README\.md: ([a-z-]+) -->")


def part(name: str, readme: str) -> str:
    """The README's text marked NAME, its `docs/...` links made relative to docs/."""
    found = re.search(rf"<!-- start: {name} -->\n(.*?)<!-- end: {name} -->", readme, flags=re.S)
    if found is None:
        raise PluginError(f"README.md marks no part named {name!r}")
    return found.group(1).replace("](docs/", "](")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if not INCLUDE.search(markdown):
        return markdown
    readme = README.read_text()
    return INCLUDE.sub(lambda match: part(match.group(1), readme), markdown)
