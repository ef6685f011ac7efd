"""The guides say what the code does: counts read from the presets, flags from the parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dropcluster.cli import build_parser
from dropcluster.experiments.presets import arm_name, expand_grid, load_preset, preset_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def _preset_bullets() -> dict[str, str]:
    """The text of each ``- `preset`: ...`` bullet of docs/experiments.md, by preset."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    found = {
        match.group(1): match.group(0)
        for match in re.finditer(r"^- `([a-z0-9-]+)`[^\n]*(?:\n  [^\n]*)*", text, re.M)
    }
    assert found, "docs/experiments.md lists no preset"
    return found


def test_the_preset_counts_in_the_experiments_guide_are_the_presets():
    bullets = _preset_bullets()
    checked = 0
    for name, text in bullets.items():
        if name not in preset_names():
            continue
        specs = expand_grid(load_preset(name))
        arms = {arm_name(spec.regularizer, spec.config.variant) for spec in specs}
        for count, what in re.findall(r"\b(\d+) (runs|arms)\b", text):
            assert int(count) == {"runs": len(specs), "arms": len(arms)}[what], (name, text)
            checked += 1
    assert checked >= 3  # demo's runs, evidence's arms and runs


def test_the_cost_table_counts_the_presets_runs():
    text = (ROOT / "docs" / "scaling.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)`[^|]*\| (\d+) \|", text, re.M)
    assert len(rows) >= 4
    for name, runs in rows:
        assert int(runs) == len(expand_grid(load_preset(name))), name


def _commands() -> list[tuple[Path, list[str]]]:
    """Every ``dropcluster COMMAND ...`` line of the shell blocks of the docs, as tokens."""
    commands = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
            lines = block.replace("\\\n", " ").splitlines()
            if any(line.startswith("$ ") for line in lines):  # a session: commands and output
                lines = [line[2:] for line in lines if line.startswith("$ ")]
            for line in lines:
                line = line.split("   #")[0].split("  #")[0].strip()
                tokens = shlex.split(line, comments=True) if line else []
                for start, token in enumerate(tokens):
                    if token.endswith("dropcluster") and start + 1 < len(tokens):
                        commands.append((path, tokens[start + 1 :]))
                        break
    return commands


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(
    ("path", "tokens"), COMMANDS, ids=[f"{p.name}:{' '.join(t)[:40]}" for p, t in COMMANDS]
)
def test_every_flag_in_the_docs_is_one_of_the_commands_flags(path, tokens):
    subparsers = build_parser()._subparsers._group_actions[0].choices
    command = tokens[0]
    assert command in subparsers, f"{path.name}: no command {command!r}"
    flags = set(subparsers[command]._option_string_actions)
    for token in tokens[1:]:
        flag = token.split("=")[0]
        if flag.startswith("--"):
            assert flag in flags, f"{path.name}: `dropcluster {command}` has no flag {flag}"


def test_the_test_extra_holds_what_the_development_guide_says():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = {re.split(r"[<>=\[]", item)[0] for item in extras["test"]}
    for extra in ("data", "plot", "lightning", "ray", "slurm", "tensorboard"):
        assert {re.split(r"[<>=\[]", item)[0] for item in extras[extra]} <= named, extra
    assert "dropblock" in named
    assert "the PyPI `dropblock` package" in (ROOT / "docs" / "development.md").read_text()
