"""Every Python example in the README and in docs/ runs as written, and every link resolves."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))


def _examples(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


EXAMPLES = _examples(README)
DOC_EXAMPLES = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}-{index}")
    for path in DOCS
    for index, code in enumerate(_examples(path))
]


def test_readme_has_examples():
    # The front door shows three uses: the layer on a tensor, in a model, an experiment.
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {"__name__": "readme"})


def _torchvision_layout(monkeypatch) -> None:
    """``torchvision.models.resnet18``: the real one when installed, else the hand-written copy
    of its layout (torchvision's wheels do not import beside this project's CPU torch)."""
    try:
        import torchvision.models  # noqa: F401
    except ImportError:
        import types

        from reference_models import ResNet18

        models = types.ModuleType("torchvision.models")
        models.resnet18 = lambda num_classes=1000: ResNet18(n_classes=num_classes)
        package = types.ModuleType("torchvision")
        package.models = models
        monkeypatch.setitem(sys.modules, "torchvision", package)
        monkeypatch.setitem(sys.modules, "torchvision.models", models)


@pytest.mark.parametrize("code", DOC_EXAMPLES)
def test_docs_example_runs(code, tmp_path, monkeypatch):
    import dropcluster.plugins

    monkeypatch.chdir(tmp_path)
    # What an example registers (docs/plugins.md) stays in it: other tests see built-ins only.
    monkeypatch.setattr(dropcluster.plugins, "REGISTRY", dropcluster.plugins.Registry())
    if "from torchvision" in code:
        _torchvision_layout(monkeypatch)
    exec(compile(code, "docs example", "exec"), {"__name__": "docs"})


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name} links to a missing heading: {target}"
