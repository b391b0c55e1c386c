"""Every ```python block in README.md and docs/*.md runs as written (a block whose info
string says `python fragment` is an excerpt and is skipped)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{page.name}[{i}]")
    for page in PAGES
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, capsys):
    namespace: dict = {}
    exec(compile(code, "<doc example>", "exec"), namespace)  # an example that raises fails here
    assert set(namespace) - {"__builtins__"}, "an example should at least import what it shows"
