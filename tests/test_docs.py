"""The documentation's links resolve and the README stays a front door.

Every relative link in README.md, docs/**/*.md and examples/**/README.md must name a file or folder of the
repository, and a `#anchor` a heading of the target page, slugged as GitHub does (lowercase; punctuation other
than `-` and `_` dropped; spaces become `-`; repeats get `-1`, `-2`, ...). Links to the web are not followed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("README.md"))]
    return [f for f in files if f.is_file()]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"<[^>]+>", "", heading)                 # inline HTML
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)   # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                   # punctuation (backticks, dots, colons, ...) goes
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("``", line)):
            yield number, m.group(1)


def check_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto: ...
            continue
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: outside the repository")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix != ".md":
                problems.append(f"{where}: an anchor into something that is not a Markdown file")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_slug_follows_github():
    assert slug("Stage one: `eagle-pipe dump-teacher`") == "stage-one-eagle-pipe-dump-teacher"
    assert slug("Draft quality vs peers: `bench/quality.py`") == "draft-quality-vs-peers-benchqualitypy"
    assert slug("EAGLE-3.1 switches") == "eagle-31-switches"
    assert slug("Other trainers' drafts") == "other-trainers-drafts"
    assert slug("done.json") == "donejson"


def test_the_checker_catches_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## A `b` c\n\n[ok](#a-b-c) [ok](a.md#title) [web](https://x.y/z)\n"
                                   "[bad](#nope) [gone](missing.md)\n```\n[in code](nowhere.md)\n```\n")
    problems = check_links(tmp_path / "a.md")
    assert len(problems) == 2, problems
    assert "#nope" in problems[0] and "no such file" in problems[1]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = check_links(path)
    assert not problems, "\n".join(problems)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "move reference material into docs/")


def test_docs_name_no_path_outside_the_repository():
    """A user's clone has no ../shared/: the docs and the code must not send readers there."""
    offenders = []
    for path in [*doc_files(), *sorted((ROOT / "eagle").rglob("*.py")), *sorted((ROOT / "stages").rglob("*.py"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "shared/reference" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, "points outside the repository: " + ", ".join(offenders)


REPO_PATH = re.compile(r"(?<![\w/.-])((?:eagle|stages|bench|examples|tests|docs)/[\w./{},-]*[\w}])")
MODULE = re.compile(r"python -m ((?:bench|stages)(?:\.\w+)+)")
OTHER_REPOSITORIES = {"examples/speculative_decoding/main.py"}   # NVIDIA Model-Optimizer's trainer, named in quality.md


def named_paths(text: str):
    """Repository paths (`bench/perf/loader.py`, `stages/dump/`) and `python -m` modules a page names."""
    for m in REPO_PATH.finditer(text):
        path = m.group(1)
        if "{" in path or path in OTHER_REPOSITORIES:                                       # fc_norm.{0,1,2}-style patterns, not files
            continue
        yield path
    for m in MODULE.finditer(text):
        yield m.group(1).replace(".", "/") + ".py"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(path):
    """A page that names a script or module of this repository names one that exists (bench/ moves, stages split)."""
    missing = sorted({p for p in named_paths(path.read_text(encoding="utf-8"))
                      if not (ROOT / p).exists() and not (ROOT / p.rstrip(".")).exists()})
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist: {missing}"


# the docs page that describes each command's options (a flag may appear anywhere on the page: a table row or prose)
COMMAND_PAGES = {
    "regenerate": ["docs/regenerate.md"],
    "dump-teacher": ["docs/dump.md"],
    "verify": ["docs/dump.md"],
    "train": ["docs/train.md"],
    "export": ["docs/train.md", "docs/checkpoint-format.md"],
    "eval": ["docs/eval.md"],
    "run": ["docs/run.md"],
}


def test_every_command_option_is_documented():
    """A flag added to a command is described on that command's page (the docs stay true as stages grow)."""
    import importlib

    import click

    from stages.cli import COMMANDS

    assert set(COMMANDS) == set(COMMAND_PAGES), "a new command needs its docs page in COMMAND_PAGES"
    missing = []
    for name, (module, _) in COMMANDS.items():
        command = importlib.import_module(module).command
        text = "".join((ROOT / page).read_text(encoding="utf-8") for page in COMMAND_PAGES[name])
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flags = [f for f in param.opts + param.secondary_opts if f.startswith("--")]
                if flags and not any(re.search(re.escape(f) + r"(?![\w-])", text) for f in flags):
                    missing.append(f"{name} {flags[0]} (in {', '.join(COMMAND_PAGES[name])})")
    assert not missing, "options no docs page describes: " + "; ".join(missing)
