"""README.md and docs/*.md: every relative link and image resolves to a file of the repository, every anchor to a
heading of its target under GitHub's slug rules; the README opens with a title, stays short, and links every page."""

import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; text may run over a line break.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
# GitHub keeps letters, marks, digits, connector punctuation (_), spaces and hyphens; \w covers all but marks.
SLUG_DROP = re.compile(r"[^\w\- ]", re.UNICODE)
LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")


def pages() -> List[Path]:
    """README.md, then every Markdown page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans reduced to a placeholder."""
    kept, inside = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            kept.append(line)
    return CODE_SPAN.sub("code", "\n".join(kept))


def link_targets(text: str) -> List[str]:
    """Targets of every inline link and image in Markdown text, code excluded."""
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: code and link markup dropped, lowercased, punctuation but - and _
    removed, spaces to hyphens."""
    text = INLINE_LINK.sub(r"\1", heading).replace("`", "")
    return SLUG_DROP.sub("", text.lower()).replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every heading anchor of a Markdown text; repeated headings get -1, -2, ... as on GitHub."""
    seen: Counter = Counter()
    found = set()
    inside = False
    for line in text.split("\n"):
        if FENCE.match(line):
            inside = not inside
            continue
        match = None if inside else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def is_web(target: str) -> bool:
    """Links the test leaves alone: web pages and mail addresses."""
    return re.match(r"(https?:|mailto:)", target, re.IGNORECASE) is not None


def resolve(page: Path, target: str) -> Tuple[Path, str]:
    """(file the link points at, its anchor or ''): a bare #anchor points into the page itself."""
    path, _, anchor = target.partition("#")
    return (page if not path else (page.parent / path).resolve()), anchor


def broken_links(page: Path, root: Path = REPO_ROOT, cache: Optional[Dict[Path, Set[str]]] = None) -> List[str]:
    """Each relative link of page whose file is missing or outside root, or whose anchor names no heading."""
    problems, cache = [], {} if cache is None else cache
    for target in link_targets(page.read_text(encoding="utf-8")):
        if is_web(target):
            continue
        path, anchor = resolve(page, target)
        if root != path and root not in path.parents:
            problems.append(f"{target}: outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file {path.relative_to(root)}")
        elif anchor and path.suffix == ".md":
            if path not in cache:
                cache[path] = anchors(path.read_text(encoding="utf-8"))
            if anchor not in cache[path]:
                problems.append(f"{target}: no heading #{anchor} in {path.relative_to(root)}")
        elif anchor and not LINE_ANCHOR.fullmatch(anchor):
            problems.append(f"{target}: an anchor into a file that is not Markdown")
    return problems


@pytest.mark.parametrize(("heading", "expected"), [
    ("The full RSICD run on a GPU box", "the-full-rsicd-run-on-a-gpu-box"),
    ("Evaluation: evaluate.py", "evaluation-evaluatepy"),
    ("Cache what is frozen: `--cache_latents`", "cache-what-is-frozen---cache_latents"),
    ("SD 2.x bases", "sd-2x-bases"),
    ("Data preparation: bench/bench_create.py", "data-preparation-benchbench_createpy"),
    ("See [LoRA](lora.md) too", "see-lora-too"),
])
def test_slug_follows_github_rules(heading, expected):
    assert slug(heading) == expected


def test_repeated_headings_get_numbered_anchors():
    text = "# Page\n\n## Resuming\n\n```\n## not a heading\n```\n\n## Resuming\n"
    assert anchors(text) == {"page", "resuming", "resuming-1"}


def test_links_in_code_are_not_links_and_images_are():
    text = ("See [data](docs/data.md#resuming) and\n[the\ntrainer](training.md).\n![demo](docs/demo.png)\n"
            "`[not](a.md)` and ``[nor](b.md)``\n```\n[nor this](c.md)\n```\n[web](https://example.org/x)\n")
    assert link_targets(text) == ["docs/data.md#resuming", "training.md", "docs/demo.png",
                                  "https://example.org/x"]


def test_a_missing_file_heading_or_escape_is_reported(tmp_path):
    root = tmp_path.resolve()
    (root / "docs").mkdir()
    (root / "docs" / "other.md").write_text("# Other\n\n## Part two\n", encoding="utf-8")
    page = root / "docs" / "page.md"
    page.write_text("# Page\n[ok](#page) [gone](#nowhere) [file](no_such_file.md) [up](../../x.md)\n"
                    "[there](other.md#part-two) [not there](other.md#part-three) ![pic](../pic.png)\n",
                    encoding="utf-8")
    reported = [problem.split(":")[0] for problem in broken_links(page, root)]
    assert reported == ["#nowhere", "no_such_file.md", "../../x.md", "other.md#part-three", "../pic.png"]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page):
    problems = broken_links(page)
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_readme_opens_with_a_title_and_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), f"README.md starts with {lines[0]!r}, not a '# ' title"
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, more than {README_MAX_LINES}"


def test_every_docs_page_opens_with_a_title():
    for page in sorted(DOCS.glob("*.md")):
        first = page.read_text(encoding="utf-8").split("\n", 1)[0]
        assert first.startswith("# "), f"{page.name} starts with {first!r}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolve(README, target)[0] for target in link_targets(README.read_text(encoding="utf-8"))
              if not is_web(target)}
    missing = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert missing == [], f"docs pages not linked from README.md: {missing}"
