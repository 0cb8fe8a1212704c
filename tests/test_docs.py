"""The README a newcomer reads first: short, and every link in it leads somewhere.

The pages under docs/ are checked by `make docs` (a strict MkDocs build, part of `make check`);
the README is not part of that site, so its links are checked here, on GitHub's rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250  # what does not fit belongs on a page of the docs site

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and code spans, where links live."""
    return CODE_SPAN.sub("", FENCE.sub("", markdown))


def relative_links(markdown: str) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(markdown))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)  # http:, mailto:, ...
    ]


def github_anchor(heading: str) -> str:
    """The id GitHub (and MkDocs' default toc slug, for plain headings) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", markdown), re.MULTILINE):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_readme_stays_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, more than {MAX_README_LINES}: move the details to a page "
        "under docs/ and link it"
    )


def test_readme_links_resolve():
    readme = README.read_text(encoding="utf-8")
    links = relative_links(readme)
    assert links, "README.md should link into docs/"
    broken = []
    for link in links:
        path, _, anchor = unquote(link).partition("#")
        target = (README.parent / path).resolve() if path else README
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text("utf-8")):
            broken.append(f"{link}: no heading with anchor #{anchor} in {path or 'README.md'}")
    assert not broken, "README.md links that lead nowhere:\n" + "\n".join(broken)


def test_readme_links_into_the_docs_site():
    linked = {unquote(link).partition("#")[0] for link in relative_links(README.read_text())}
    for page in ("docs/index.md", "docs/reference.md", "docs/results.md"):
        assert page in linked, f"README.md does not link {page}"


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Two commands", "two-commands"),
        ("Contracts (firm)", "contracts-firm"),
        ("The `aet` command: flags, and [configs](x.md)", "the-aet-command-flags-and-configs"),
    ],
)
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_links_found_outside_code_only():
    text = "[a](docs/a.md) `[b](b.md)` ![img](c.png) [web](https://x.org)\n```\n[d](d.md)\n```\n"
    assert relative_links(text) == ["docs/a.md"]
