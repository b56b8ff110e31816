"""README.md stays runnable: every ```python block is executed, and the docs cite only real files.

Each python block runs on its own, in a fresh namespace (as a reader would paste it), in the
order of the README, on the CPU at the README's small sizes; a block that raises fails its test.
Blocks that are not meant to run (shell commands, output) are ```bash or ```text, never ```python.
The blocks run single-threaded: at these sizes that is faster, and steadier on shared machines.
"""
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(path: pathlib.Path, language: str):
    text = path.read_text()
    return [body for lang, body in FENCE.findall(text) if lang == language]


PYTHON_BLOCKS = code_blocks(README, "python")


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands in a temporary folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec")
        exec(code, {"__name__": f"readme_block_{index + 1}"})
    finally:
        torch.set_num_threads(threads)


def _commands(block: str):
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_starts_with_the_two_commands_ci_runs():
    """The README's first block is exactly the two commands that set up and run everything;
    CI runs the second (the test command) the way a user does, and the plain pytest line that
    `make test` runs stays in the README for those who install by hand."""
    first = code_blocks(README, "bash")[0]
    assert _commands(first) == ["make bench", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "run make test " in ci and "run make test-fast " in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "-m pytest -q -n $(JOBS) $(PYTEST_ARGS)" in makefile
    assert any(line.strip() == "python -m pytest -q"
               for block in code_blocks(README, "bash") for line in block.splitlines())


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_cite_only_what_users_have(path):
    text = path.read_text()
    for word in ("SPEC.md", "../shared", "$OUT"):
        assert word not in text, f"{path.name} mentions {word!r}, which users of the repository do not have"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    missing = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an external URL
        resolved = (path.parent / target).resolve()
        if not resolved.exists():
            rel = resolved.relative_to(ROOT).as_posix() if ROOT in resolved.parents else target
            missing.append(rel)
    name = path.relative_to(ROOT).as_posix()
    assert not missing, f"{name} links to missing files: {sorted(set(missing))}"


def test_group_count_examples_match_the_code():
    from kphi3_kernels import group_count
    rows = re.findall(r"^\| (-?\d+) \| (-?\d+) \| (-?\d+) \| (-?\d+) \| (-?\d+) \|",
                      (ROOT / "docs" / "group-count.md").read_text(), re.M)
    assert len(rows) >= 10
    for cin, cout, minimum, cap, groups in (map(int, row) for row in rows):
        assert max(1, min(cin, cout, cin // minimum)) == cap, (cin, cout, minimum)
        assert group_count(cin, cout, minimum) == groups, (cin, cout, minimum)
    with pytest.raises(ValueError):
        group_count(1280, 1280, 0)
