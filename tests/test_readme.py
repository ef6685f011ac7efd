"""Every Python example in the README and in docs/ runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _examples(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


EXAMPLES = _examples(README)
DOC_EXAMPLES = [
    pytest.param(code, id=f"{path.name}-{index}")
    for path in DOCS
    for index, code in enumerate(_examples(path))
]


def test_readme_has_examples():
    assert len(EXAMPLES) >= 7


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = EXAMPLES[index].replace("/tmp/dropcluster.pt", str(tmp_path / "dropcluster.pt"))
    exec(compile(code, f"README example {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("code", DOC_EXAMPLES)
def test_docs_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs example", "exec"), {"__name__": "docs"})
