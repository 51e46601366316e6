"""The documentation cannot rot: the tutorial runs, and every public name is documented."""

import inspect
import pathlib
import re
import textwrap
import traceback

import pytest

import blockdistill as bd

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
TUTORIAL = DOCS / "tutorial.md"
API = DOCS / "api"

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
_API_LINE = re.compile(r"^[ \t]*:::[ \t]+blockdistill\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*$")
_SKIP_MARK = "# not run"


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """`(line number of the opening fence, dedented code)` of every ```python block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening.group("indent")
        start = index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: unclosed ```python block")
        code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in body)
        blocks.append((start + 1, textwrap.dedent(code) + "\n"))
        index += 1
    return blocks


def runnable(code: str) -> bool:
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return not first.startswith(_SKIP_MARK)


def test_python_blocks_parser():
    # guard the extractor itself, so that a silently empty tutorial cannot pass
    blocks = python_blocks(TUTORIAL)
    assert len([code for _, code in blocks if runnable(code)]) >= 8


def run_blocks(path: pathlib.Path) -> dict:
    """Execute the ```python blocks of `path` in order, in one shared namespace."""
    namespace: dict = {"__name__": "__tutorial__"}
    blocks = [(line, code) for line, code in python_blocks(path) if runnable(code)]
    for number, (line, code) in enumerate(blocks, start=1):
        filename = f"{path.name}, block {number} (line {line})"
        try:
            exec(compile(code, filename, "exec"), namespace)
        except Exception:
            pytest.fail(
                f"{path.name} block {number} (starting at line {line}) raised:\n"
                f"{traceback.format_exc()}\n--- the block ---\n{code}",
                pytrace=False,
            )
    return namespace


def test_tutorial_runs():
    run_blocks(TUTORIAL)


def test_readme_example_runs():
    namespace = run_blocks(DOCS.parent / "README.md")
    assert float(namespace["metrics"]["loss"]) > 0


def documented_names() -> dict[str, str]:
    """`name -> page` for every `::: blockdistill.NAME` line under docs/api/."""
    names = {}
    for page in sorted(API.rglob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            match = _API_LINE.match(line)
            if match:
                names.setdefault(match.group("name"), str(page.relative_to(DOCS)))
    return names


def test_every_public_name_is_in_the_api_reference():
    documented = documented_names()
    missing = [name for name in bd.__all__ if name not in documented]
    assert not missing, (
        f"public names without a `::: blockdistill.NAME` line in docs/api/*.md: {missing}; "
        "add each to the page of its group (see docs/api/index.md)"
    )
    unknown = [name for name in documented if name not in bd.__all__]
    assert not unknown, f"docs/api/ documents names that are not in blockdistill.__all__: {unknown}"


@pytest.mark.parametrize("name", bd.__all__)
def test_public_docstring_has_an_example(name):
    obj = getattr(bd, name)
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    doc = doc or ""
    assert "Example" in doc and "```python" in doc, (
        f"blockdistill.{name}: its docstring needs an **Example:** section with a "
        "```python code block"
    )
