"""benchmarks/check_cuda.py, the one prepared GPU run, works before a GPU session spends on it.

Its smoke mode (``--device cpu --smoke``) runs every section on tiny sizes with the same code as
the GPU run; it runs once here (about 20-30 s on 2 cores; under 60 s is required) and each test
reads one section of its output: the tables are there and hold numbers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dropcluster.nn import REGULARIZERS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_cuda.py"
#: The smoke run must stay cheap enough for every test run.
SMOKE_SECONDS = 60
#: Rows of every layer table (DropBlock's rows name the block size of each data set).
LAYER_LABELS = (
    "x * 2 (floor)",
    "nn.Dropout2d(0.1)",
    "DropCluster2d per_sample=True",
    "DropCluster2d per_sample=False",
    "DropCluster2d paper (shared, rena, split)",
    "StochasticDepth(0.1)",
)
NUMBER = r"(-?\d+(?:\.\d+)?)"


def load_script():
    """The script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("check_cuda", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_cuda"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke() -> tuple[int, str, float]:
    """(exit status, stdout, seconds) of ``check_cuda.py --device cpu --smoke``, run in a
    process of its own as the GPU run is (a clean interpreter: no compiled graphs or random
    state of other tests)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")},
    )
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def section(output: str, key: str) -> str:
    """The text of section ``key`` ("A", "1", ...), up to the next section."""
    match = re.search(rf"^== {re.escape(key)}\. .*?(?=^== |^done in )", output, re.M | re.S)
    assert match, f"section {key} missing from the output:\n{output}"
    return match.group(0)


def rows(text: str, label: str) -> list[list[str]]:
    """The cells after ``label`` of every table row that starts with it."""
    pattern = rf"^  {re.escape(label)}(?=  )(.*)$"
    return [line.split() for line in re.findall(pattern, text, re.M)]


def test_smoke_run_passes_in_under_a_minute(smoke):
    status, output, seconds = smoke
    assert status == 0, output
    assert "FAILED" not in output and "Traceback" not in output, output
    assert seconds < SMOKE_SECONDS, f"the smoke run took {seconds:.0f} s"


def test_header_names_versions_allocator_and_budget(smoke):
    header = smoke[1].split("\n== ")[0]
    assert f"torch {torch.__version__}" in header
    assert "torch threads" in header
    assert "MALLOC_MMAP_MAX_=" in header and "MALLOC_TRIM_THRESHOLD_=" in header
    assert re.search(r"budget \d+ s", header)
    assert re.search(r"^done in \d+ s \(budget \d+ s\)", smoke[1], re.M)


def test_checks_of_the_cuda_paths_print_their_results(smoke):
    parity = section(smoke[1], "A")
    assert "n_found equal" in parity and "same labels" in parity
    assert re.search(r"^  8x8 +True +100\.0% +True", parity, re.M), parity
    assert re.search(rf"median over channels {NUMBER}, {NUMBER} ms", section(smoke[1], "B"))
    masks = section(smoke[1], "C")
    for mode in ("eager", "compiled"):
        (cells,) = rows(masks, mode)
        assert all(0 <= float(cell) <= 1 for cell in cells), masks
    assert re.search(rf"zero fraction {NUMBER} -> {NUMBER}", masks)


def test_layer_costs_give_positive_ratios_and_the_goal(smoke):
    text = section(smoke[1], "1")
    tables = re.findall(r"^-- \((\d+, \d+, \d+, \d+)\) (float32|bfloat16)", text, re.M)
    assert len(tables) == 4, text  # two shapes x two dtypes
    assert "eager ms" in text and "compiled ms" in text and "compile s" in text
    for label in LAYER_LABELS:
        found = rows(text, label)
        assert len(found) == 4, (label, text)
        for cells in found:
            assert float(cells[0]) > 0 and float(cells[1].rstrip("x")) > 0, (label, cells)
    for block in (5, 7):  # the paper's DropBlock sizes on CIFAR-100 and Tiny ImageNet
        for label in (f"DropBlock2d(0.1, {block})", f"DropBlock2d(0.1, {block}) reference"):
            assert len(rows(text, label)) == 2, (label, text)
    paper = rows(text, "DropCluster2d paper (shared, rena, split)")[0]
    assert float(paper[2]) > 0 and float(paper[3].rstrip("x")) > 0  # its compiled row
    assert "compiled <= 1.5x:" in text


def test_kernel_counts_for_every_layer(smoke):
    text = section(smoke[1], "2")
    assert "aten ops" in text  # on the CPU it says what it counts instead of kernels
    for label in LAYER_LABELS:
        for cells in rows(text, label):
            assert int(cells[0]) > 0 and int(cells[2]) > 0, (label, cells)  # eager columns
    assert int(rows(text, "DropCluster2d paper (shared, rena, split)")[0][1]) > 0


def test_step_share_of_every_regularizer(smoke):
    text = section(smoke[1], "3")
    assert "step ms" in text and "extra %" in text
    for regularizer in REGULARIZERS:
        found = rows(text, regularizer)
        assert len(found) == 2, (regularizer, text)  # CIFAR-100 and Tiny ImageNet
        assert all(float(cells[1]) > 0 for cells in found)
    assert all("1%:" in cells for cells in rows(text, "dropcluster"))  # the goal, beside it


def test_protocol_measures_every_regularizer_and_projects_the_presets(smoke):
    text = section(smoke[1], "4")
    assert "images/s" in text and "train_epoch" in text
    for regularizer in REGULARIZERS:
        found = [cells for cells in rows(text, regularizer) if cells[0] == "eager"]
        assert len(found) == 2, (regularizer, text)
        assert all(float(cells[1]) > 0 and float(cells[2]) > 0 for cells in found)
    assert re.search(rf"one checkpoint .*: {NUMBER} s", text)
    assert re.search(rf"DropCluster refit .*: {NUMBER} ms, 4 per run", text)
    assert re.search(r"one cifar100 run .*goal < 15 min", text)
    for preset in ("paper-cifar100", "paper-tiny-imagenet"):
        match = re.search(rf"projected {preset}: (\d+) runs, {NUMBER} GPU-hours eager", text)
        assert match and int(match.group(1)) > 0 and float(match.group(2)) > 0, text


def test_rena_speed_beside_the_cpu(smoke):
    text = section(smoke[1], "5")
    for label in ("default (dead, merge)", "paper (rena, split)"):
        (cells,) = rows(text, label)
        assert float(cells[0]) > 0 and float(cells[1]) > 0
    assert "< 50 ms:" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full run starts when CUDA exists")
def test_full_run_without_cuda_exits_with_one_line():
    script = load_script()
    try:
        with pytest.raises(SystemExit) as exit_info:
            script.main([])
    finally:
        sys.modules.pop("check_cuda", None)
    message = str(exit_info.value.code)
    assert "CUDA is not available" in message and "\n" not in message
