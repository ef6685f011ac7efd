"""The shape of the public API: one functional form, __all__ everywhere, no private imports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from dropcluster import nn as regularizers

FUNCTIONAL_FORMS = [
    getattr(regularizers, name)
    for name in (
        *(f"drop_cluster{d}d" for d in (1, 2, 3)),
        *(f"drop_block{d}d" for d in (1, 2, 3)),
        *(f"drop_block{d}d_reference" for d in (1, 2, 3)),
        "stochastic_depth",
    )
]

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "src" / "dropcluster").rglob("*.py"))


@pytest.mark.parametrize("function", FUNCTIONAL_FORMS, ids=lambda f: f.__name__)
def test_every_functional_form_is_x_p_specifics_training_then_keywords(function):
    parameters = list(inspect.signature(function).parameters.values())
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[:2] == ["x", "p"] and positional[-1] == "training"
    assert len(positional) == 4  # one layer-specific argument between p and training
    keywords = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    assert "generator" in keywords and "return_mask" in keywords


def _public_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            names.append(node.name)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT / "src")))
def test_a_module_lists_its_public_names_and_imports_no_private_one(path):
    tree = ast.parse(path.read_text())
    public = _public_names(tree)
    declared = next(
        (
            node
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in node.targets)
        ),
        None,
    )
    if public and path.name != "__main__.py":
        assert declared is not None, f"{path.name} has public names {public} but no __all__"
        listed = set(ast.literal_eval(declared.value))
        assert set(public) <= listed | {"main"}, sorted(set(public) - listed)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dropcluster"):
            private = [
                a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
            ]
            assert not private, f"{path.name} imports private {private} from {node.module}"
            assert not any(
                part.startswith("_") and part != "__main__" for part in node.module.split(".")
            ), node.module
