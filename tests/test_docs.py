"""The documentation holds together: every relative link and image resolves, anchors included, and the
README stays the front door (short, `make demo` and `make test`, one row per `hanlm` command)."""

from __future__ import annotations

import argparse
import difflib
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted(GUIDE.glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target "title") and ![alt](target); the text may hold one level of brackets and wrap lines
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^\s()]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def prose(text: str) -> str:
    """The text with fenced code blocks blanked out, line for line (so offsets keep their line numbers)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def without_code_spans(text: str) -> str:
    """Inline code replaced by as many x's as it is long (keeping offsets), so `[a](b)` in code is no link."""
    return CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, with everything but letters, marks,
    digits, connector punctuation (_), spaces and hyphens removed, and each space turned into a hyphen.
    CJK characters are letters, so they stay."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = CODE_SPAN.sub(lambda m: m.group(2), text)  # code spans: their content
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    kept = "".join(c for c in text.lower() if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: its headings' slugs (repeats get -1, -2, ... as on GitHub) and
    the names and ids of its HTML anchors."""
    seen: dict[str, int] = {}
    found = set()
    text = prose(path.read_text(encoding="utf-8"))
    for line in text.split("\n"):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line, text, target) of each inline link, image and reference definition outside code."""
    text = without_code_spans(prose(path.read_text(encoding="utf-8")))
    found = []
    for m in INLINE_LINK.finditer(text):
        found.append((text.count("\n", 0, m.start()) + 1, m.group(0).split("](")[0] + "]", m.group(2)))
    for m in REFERENCE_DEFINITION.finditer(text):
        found.append((text.count("\n", 0, m.start()) + 1, f"[{m.group(1)}]:", m.group(2)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for line, text, target in links(path):
        where = f"{rel(path)}:{line}: {text}({target})"
        target = target.strip("<>")
        if not target:
            problems.append(f"{where}: empty link")
            continue
        if SCHEME.match(target):  # http(s), mailto and other absolute URLs are not checked
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            dest = path
        elif file_part.startswith("/"):  # GitHub resolves /x against the repository's root
            dest = ROOT / file_part.lstrip("/")
        else:
            dest = (path.parent / file_part).resolve()
        if not dest.exists():
            problems.append(f"{where}: {rel(dest)} does not exist")
            continue
        if anchor and dest.suffix == ".md":
            offered = anchors(dest)
            anchor = unquote(anchor)
            if anchor not in offered:
                close = difflib.get_close_matches(anchor, sorted(offered), n=1)
                hint = f"; did you mean #{close[0]}?" if close else ""
                problems.append(f"{where}: {rel(dest)} has no heading with the anchor #{anchor}{hint}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_and_images_point_at_existing_files_and_headings(path):
    problems = broken_links(path)
    assert not problems, f"{rel(path)} has {len(problems)} broken link(s):\n" + "\n".join(problems)


def test_the_link_checker_finds_what_it_should(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Word segmentation (`hanlm segment`)\n## 生成 (`hanlm generate`) ...\n"
                                       "## Repeated\n## Repeated\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Top: the page\n\n[ok](other.md#word-segmentation-hanlm-segment) ![ok](img.png)\n"
                    "[ok](other.md#生成-hanlm-generate-) [ok](other.md#repeated-1) [ok](#top-the-page)\n"
                    "[web](https://example.org/none) [mail](mailto:a@b.c) `[code](missing.md)`\n"
                    "```\n[fenced](missing.md)\n# not a heading\n```\n"
                    "[no file](missing.md) ![no image](gone.png) [no heading](other.md#nowhere)\n"
                    "[wrapped\ntext](#not-a-heading)\n", encoding="utf-8")
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert "page.md:10: [no file](missing.md)" in problems[0] and "does not exist" in problems[0]
    assert "gone.png does not exist" in problems[1]
    assert "has no heading with the anchor #nowhere" in problems[2]
    assert "page.md:11: [wrapped\ntext](#not-a-heading)" in problems[3]


def test_readme_is_the_front_door():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail "
                                       "into a page of docs/guide/ and link to it")
    for command in ("make demo", "make test"):
        assert command in text, f"README.md no longer shows `{command}`"


def test_every_guide_page_is_linked_from_the_readme_and_the_guide_index():
    pages = {p.name for p in GUIDE.glob("*.md")} - {"README.md"}
    assert pages, "docs/guide/ has no pages"
    for index in (README, GUIDE / "README.md"):
        linked = {Path(unquote(t.partition("#")[0])).name for _, _, t in links(index) if not SCHEME.match(t)}
        missing = sorted(pages - linked)
        assert not missing, f"{rel(index)} does not link to docs/guide/{', docs/guide/'.join(missing)}"


def cli_verbs() -> set[str]:
    from hanlm.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "hanlm/cli.py: expected one set of subcommands"
    return set(actions[0].choices)


def readme_command_table() -> dict[str, str]:
    """The rows of the table under README.md's "## Commands" heading, keyed by the verb of their first cell."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Commands\s*$(.*?)(?=^#{1,2} |\Z)", prose(text), re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## Commands' section with the table of `hanlm` commands"
    rows = {}
    for line in m.group(1).split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        verb = re.match(r"`hanlm ([\w-]+)", cells[0]) if cells else None
        if verb:
            rows[verb.group(1)] = line
    return rows


def test_readme_command_table_has_a_row_with_a_guide_link_for_every_verb():
    verbs, rows = cli_verbs(), readme_command_table()
    missing = sorted(verbs - set(rows))
    assert not missing, ("README.md's command table (## Commands) has no row for "
                         + ", ".join(f"`hanlm {v}`" for v in missing) + ", which hanlm/cli.py defines")
    stale = sorted(set(rows) - verbs)
    assert not stale, ("README.md's command table (## Commands) lists "
                       + ", ".join(f"`hanlm {v}`" for v in stale) + ", which hanlm/cli.py does not define")
    unlinked = sorted(v for v, row in rows.items() if "](docs/guide/" not in row)
    assert not unlinked, ("README.md's command table: the rows of " + ", ".join(f"`hanlm {v}`" for v in unlinked)
                          + " link to no page of docs/guide/")
