"""The documentation: every Python block in README.md and docs/*.md compiles, and runs unless marked.

Convention: a block runs (in a fresh namespace, from the repository root, offline) unless the line before its fence
is ``<!-- compile-only: reason -->`` (an HTML comment: invisible on GitHub and on the site), which fragments that need
a model, a launch or a cluster carry. The strict site build (broken links and references fail) is in ``.ci/run``:
``mkdocs build --strict``.
"""

import re
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def blocks():
    found = []
    for path in [ROOT / "README.md", *PAGES]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start("code")].count("\n") + 1
            runs = not match["before"].startswith("<!-- compile-only")
            found.append(pytest.param(match["code"], runs, id=f"{path.relative_to(ROOT)}:{line}"))
    return found


BLOCKS = blocks()


@pytest.mark.parametrize(("code", "runs"), BLOCKS)
def test_python_block_compiles_and_runs(code, runs, monkeypatch):
    compiled = compile(code, "<docs block>", "exec")
    if runs:
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        exec(compiled, {"__name__": "__docs__"})  # noqa: S102 - running the documentation's own code is the test


def test_some_blocks_run():
    assert sum(p.values[1] for p in BLOCKS) >= 2, "the convention needs runnable blocks to mean something"


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    words = len(readme.split())
    assert words < 1500, f"README.md has {words} words"
    assert "python -m pytest" in readme, "CI runs the README's test command"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)(?:#[\w-]+)?\)", readme))
    missing = {p.name for p in PAGES} - linked - {"index.md"}
    assert not missing, f"pages not reachable from README.md: {missing}"


def test_every_page_is_in_the_nav_and_moved_tables_survive():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    in_nav = set(re.findall(r"[\w-]+\.md", str(nav)))
    assert in_nav == {p.name for p in PAGES}
    tables = {
        "failure-modes.md": "| fault | what qsr_hf does |",
        "what-is-averaged.md": "| | qsr_hf | official code |",
        "planning.md": "| setting | paper | `qsr-hf plan` |",
    }
    for page, header in tables.items():
        assert header in (ROOT / "docs" / page).read_text(), f"{page} lost its table {header!r}"


def test_every_benchmark_table_comes_with_its_figure():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for section in re.split(r"(?m)^(?=#{2,3} )", text):
        title = section.splitlines()[0] if section else ""
        if title == "## The benchmarks" or not re.search(r"(?m)^\| --- ", section):
            continue  # the index of the scripts and their commands; sections without a table
        figures = re.findall(r"!\[[^\]]*\]\((results/\w+\.png)\)", section)
        assert figures, f"a table without its figure in {title!r}"
        assert all((ROOT / "docs" / f).is_file() for f in figures), figures
