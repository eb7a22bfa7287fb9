"""Every relative link and image of the docs leads to a file of the checkout:
a handout that points at a missing picture or page is a broken handout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# [text](target) and ![alt](target), the target up to a space, ')' or '#'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")


def doc_files() -> list[Path]:
    return sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")])


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [target for target in LINK.findall(text)
            if "://" not in target and not target.startswith("mailto:")
            and not (path.parent / target).exists()]


def test_every_relative_link_of_the_docs_resolves():
    bad = {str(p.relative_to(ROOT)): links for p in doc_files() if (links := broken_links(p))}
    assert bad == {}
