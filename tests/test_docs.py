"""The documentation in docs/ and the README: the API page covers the public names, and links resolve.

``mkdocs build --strict`` (scripts/test.sh) checks links between the pages it builds; this also covers the
README, which mkdocs does not build, and runs without the docs extra installed.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

import rolevec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.M)


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed (links there are examples, not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (mkdocs) gives a heading."""
    text = re.sub(r"[`*_]", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Heading anchors, and the ids mkdocstrings gives each `::: rolevec.NAME` object."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)} | set(re.findall(r"^::: (\S+)\s*$", text, re.M))


def has_anchor(page: Path, anchor: str) -> bool:
    known = anchors(page)
    # mkdocstrings also gives every member an id below its object's: rolevec.StudyConfig.roles
    return anchor in known or any(anchor.startswith(f"{ref}.") for ref in known if ref.startswith("rolevec."))


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_every_public_name_is_on_the_api_page() -> None:
    text = API_PAGE.read_text(encoding="utf-8")
    documented = re.findall(r"^::: (\S+)\s*$", text, re.M)
    expected = {name for name in rolevec.__all__ if name not in {"__version__", "RolevecError"}}
    missing = sorted(name for name in expected if f"rolevec.{name}" not in documented)
    assert not missing, f"docs/api.md has no `::: rolevec.NAME` for {missing}"
    # Module paths inside the package may change; the page names everything through the package.
    other = [ref for ref in documented if ref.removeprefix("rolevec.") not in rolevec.__all__]
    assert not other, f"docs/api.md documents {other}: reference public names as `rolevec.NAME`"
    assert len(documented) == len(set(documented)), "docs/api.md documents a name twice"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and not has_anchor(path, anchor):
            broken.append(f"{target} (no heading with anchor #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_pages_included_by_snippets_exist() -> None:
    for page in sorted(DOCS.glob("*.md")):
        for included in SNIPPET.findall(page.read_text(encoding="utf-8")):
            assert (ROOT / included).is_file(), f"{page.relative_to(ROOT)} includes missing {included}"


def test_link_checker_sees_links() -> None:
    """The checks above can fail: the link pattern finds links and skips code, and slugs match mkdocs."""
    sample = "[a](x.md) ![b](img/y.png) [c](https://e.org) `[d](z.md)`\n```\n[e](w.md)\n```\n"
    assert LINK.findall(prose(sample)) == ["x.md", "img/y.png", "https://e.org"]
    assert slug("Export to llama.cpp and lm-evaluation") == "export-to-llamacpp-and-lm-evaluation"
    assert slug("Output folders and --force") == "output-folders-and-force"
    assert slug("The study: `rolevec run` and its report") == "the-study-rolevec-run-and-its-report"
    assert has_anchor(API_PAGE, "rolevec.StudyConfig") and not has_anchor(API_PAGE, "rolevec.Nothing")
    readme_links = relative_links(ROOT / "README.md")
    assert "docs/api.md" in readme_links and "CHANGELOG.md" in readme_links
