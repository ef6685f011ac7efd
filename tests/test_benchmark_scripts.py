"""The benchmark scripts' own arithmetic, on hand-made inputs (their timings are not tested)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_breakdown_splits_a_runs_wall_time_into_its_parts(tmp_path):
    breakdown = _script("demo_breakdown")
    records = [
        {"epoch": 0, "seconds": 10.0, "loss": 1.0},
        {"epoch": 1, "seconds": 11.0, "refit_seconds": 0.5, "eval_seconds": 3.0, "top1": 50.0},
        {"epoch": 2, "seconds": 12.0, "eval_seconds": 3.5, "top1": 60.0},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "corruptions.json").write_text(json.dumps({"rows": [], "seconds": 7.0}))
    parts = breakdown.run_breakdown(tmp_path, wall=50.0)
    assert parts["train"] == 33.0 and parts["eval"] == 6.5 and parts["tests"] == 2
    assert parts["refit"] == 0.5 and parts["corruptions"] == 7.0
    assert parts["rest"] == pytest.approx(50.0 - 33.0 - 6.5 - 0.5 - 7.0)
    unknown = breakdown.run_breakdown(tmp_path, wall=None)
    assert unknown["rest"] != unknown["rest"]  # NaN: the wall time was not recorded
