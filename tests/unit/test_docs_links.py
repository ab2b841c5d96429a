"""Every relative link and ``#anchor`` in README.md and docs/*.md resolves.

A link to a file must name a file or folder of the repository; an anchor (``page.md#heading`` or
``#heading`` in the same page) must be the slug of a heading of that page, by GitHub's rules:
lower case, punctuation dropped (letters, digits, ``-``, ``_`` and spaces kept), spaces as ``-``,
a repeated slug numbered ``-1``, ``-2``... Links with a scheme (``https:``, ``mailto:``) are not
followed. Fenced code blocks and inline code are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers (1-based)."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            found.append((number, line))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of ``path``, numbered as GitHub numbers repeats."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """The link targets of ``path`` (inline links, images, reference definitions), with line numbers."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
        definition = _REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        found.extend((number, target.strip("<>")) for target in targets)
    return found


def broken_links(paths: list[Path], root: Path = ROOT) -> list[str]:
    """One line per link of ``paths`` that does not resolve, naming the file, line and target."""
    problems = []
    for path in paths:
        where = path.relative_to(root)
        for number, target in links(path):
            if _SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if file_part and not linked.exists():
                problems.append(f"{where}:{number}: {target}: no such file")
                continue
            if file_part and root.resolve() not in (linked, *linked.parents):
                problems.append(f"{where}:{number}: {target}: outside the repository")
                continue
            if anchor:
                if linked.suffix != ".md" or linked.is_dir():
                    problems.append(f"{where}:{number}: {target}: an anchor into a file that is not Markdown")
                elif anchor not in anchors(linked):
                    problems.append(f"{where}:{number}: {target}: no heading with anchor #{anchor} in {linked.name}")
    return problems


def test_every_relative_link_and_anchor_resolves() -> None:
    paths = documents()
    assert len(paths) > 1, "no docs/*.md found"
    problems = broken_links(paths)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_check_finds_broken_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Keys, and `code`\n\n## Keys, and code\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "[ok](docs/page.md#keys-and-code) [ok, repeated](docs/page.md#keys-and-code-1) [ok](#title) [web](https://example.com/x#y)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#nope) [bad here](#nothing) [img](docs/none.png)\n"
        "```\n[in code](docs/not-read.md)\n```\n"
        "`[inline code](docs/not-read-either.md)`\n",
        encoding="utf-8",
    )
    problems = broken_links([readme, tmp_path / "docs" / "page.md"], root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["docs/missing.md", "docs/page.md#nope", "#nothing", "docs/none.png"], problems


def test_slugs_follow_githubs_rules() -> None:
    assert slug("Windows per run, and AVX2-only CPUs") == "windows-per-run-and-avx2-only-cpus"
    assert slug("Compute per 1,000 questions") == "compute-per-1000-questions"
    assert slug("The `model_id` of a [folder](x.md)") == "the-model_id-of-a-folder"
    assert slug("Store: publish and download") == "store-publish-and-download"
