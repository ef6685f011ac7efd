"""benchmarks/check_cuda.py, the one prepared GPU run, works before a GPU session spends on it.

Its smoke mode (``--device cpu --smoke``) runs every section on tiny sizes with the same code as
the GPU run; it runs once here (about 15 s on 2 cores; under 60 s is required) and each test
reads one section of its output: the tables are there and hold numbers. Its ledger lines (each
section's compiles and timed calls) must equal what ``--plan`` counts, so that the plan's GPU
estimate cannot drift from the code.
"""

from __future__ import annotations

import ast
import importlib
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
def script():
    """The script loaded as a module (its plan and parser, no run)."""
    module = load_script()
    yield module
    sys.modules.pop("check_cuda", None)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[int, str, float]:
    """(exit status, stdout, seconds) of ``check_cuda.py --device cpu --smoke``, run in a
    process of its own as the GPU run is (a clean interpreter: no compiled graphs or random
    state of other tests)."""
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--smoke",
            "--cache-dir",
            str(tmp_path_factory.mktemp("inductor")),
            "--budget-s",
            "600",  # a busy machine must not cut: the tests read every table and count
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")},
    )
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def section(output: str, key: str) -> str:
    """The text of section ``key`` ("1", "2", ...), up to the next section."""
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
    parity = section(smoke[1], "7")
    assert "n_found equal" in parity and "same labels" in parity
    assert re.search(r"^  8x8 +True +100\.0% +True", parity, re.M), parity
    assert re.search(rf"median over channels {NUMBER}, {NUMBER} ms", section(smoke[1], "8"))
    masks = section(smoke[1], "5")
    assert re.search(r"the \d+ channels that drop a cluster", masks), masks
    for mode in ("eager", "compiled"):
        (cells,) = rows(masks, mode)
        assert all(0 <= float(cell) <= 1 for cell in cells), masks
    assert re.search(rf"zero fraction {NUMBER} -> {NUMBER}", masks)


def test_layer_costs_give_device_and_launch_bound_times_and_the_goal(smoke):
    text = section(smoke[1], "3")
    tables = re.findall(r"^-- \((\d+, \d+, \d+, \d+)\) (float32|bfloat16)", text, re.M)
    assert len(tables) == 4, text  # two shapes x two dtypes
    assert "device ms/call (N per sync)" in text and "launch-bound ms/call" in text
    for label in LAYER_LABELS:
        found = rows(text, label)
        assert len(found) == 4, (label, text)
        for cells in found:  # device ms, (N), ratio, launch-bound ms
            assert float(cells[0]) > 0 and int(cells[1].strip("()")) >= 1, (label, cells)
            assert float(cells[2].rstrip("x")) > 0 and float(cells[3]) > 0, (label, cells)
    for block in (5, 7):  # the paper's DropBlock sizes on CIFAR-100 and Tiny ImageNet
        for label in (f"DropBlock2d(0.1, {block})", f"DropBlock2d(0.1, {block}) reference"):
            assert len(rows(text, label)) == 2, (label, text)
    # --bf16-only (the default): only the first shape's bfloat16 table has a compiled row
    paper = rows(text, "DropCluster2d paper (shared, rena, split)")
    assert [cells[4] != "-" for cells in paper] == [False, True, False, False], paper
    compiled = paper[1]
    assert float(compiled[4]) > 0 and float(compiled[6].rstrip("x")) > 0  # compiled columns
    assert float(compiled[7]) > 0 and float(compiled[8]) > 0  # launch-bound, compile s
    assert "compiled <= 1.5x (device time):" in text


def test_kernel_counts_for_every_layer(smoke):
    text = section(smoke[1], "4")
    assert "aten ops" in text  # on the CPU it says what it counts instead of kernels
    for label in LAYER_LABELS:
        for cells in rows(text, label):
            assert int(cells[0]) > 0 and int(cells[2]) > 0, (label, cells)  # eager columns
    # the compiled bfloat16 column of the first shape (eager f32, compiled f32, eager bf16, ...)
    assert int(rows(text, "DropCluster2d paper (shared, rena, split)")[0][3]) > 0


def test_step_share_of_every_regularizer(smoke):
    text = section(smoke[1], "2")
    assert "step ms" in text and "extra %" in text
    for regularizer in REGULARIZERS:
        found = rows(text, regularizer)
        assert len(found) == 2, (regularizer, text)  # CIFAR-100 and Tiny ImageNet
        assert all(float(cells[1]) > 0 for cells in found)
    assert all("1%:" in cells for cells in rows(text, "dropcluster"))  # the goal, beside it


def test_protocol_measures_every_regularizer_and_projects_the_presets(smoke):
    text = section(smoke[1], "1")
    assert "images/s" in text and "train_epoch" in text
    for regularizer in REGULARIZERS:
        found = [cells for cells in rows(text, regularizer) if cells[0] == "eager"]
        assert len(found) == 2, (regularizer, text)
        assert all(float(cells[1]) > 0 and float(cells[2]) > 0 for cells in found)
    assert re.search(rf"one checkpoint .*: {NUMBER} s", text)
    # evaluated as training runs it: autocast as configured (none on the CPU), channels_last
    assert len(re.findall(r"test evaluation \(eager.*autocast none, channels_last True", text)) == 2
    assert re.search(rf"DropCluster refit .*: {NUMBER} ms, 4 per run", text)
    assert re.search(r"one cifar100 run .*goal < 15 min", text)
    for preset in ("paper-cifar100", "paper-tiny-imagenet"):
        match = re.search(rf"projected {preset}: (\d+) runs, {NUMBER} GPU-hours eager", text)
        assert match and int(match.group(1)) > 0 and float(match.group(2)) > 0, text


def test_rena_speed_beside_the_cpu(smoke):
    text = section(smoke[1], "6")
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


LEDGER = re.compile(
    rf"^  \[ledger (\w+): (\d+) compiles {NUMBER} s \((\d+) skipped; .*?\), (\d+) timed calls, "
    rf"{NUMBER} s; \d+ s elapsed\]$",
    re.M,
)


def test_sections_run_in_the_plans_order_each_with_its_ledger(smoke, script):
    output = smoke[1]
    assert re.findall(r"^== (\w+)\. ", output, re.M) == list(script.SECTIONS)
    ledgers = LEDGER.findall(output)
    assert [found[0] for found in ledgers] == list(script.SECTIONS), output
    for key in script.SECTIONS:  # each ledger closes its own section
        assert LEDGER.search(section(output, key)), key


def test_the_plan_counts_what_the_smoke_run_made(smoke, script):
    """``--plan``'s compiles and timed calls are those the run makes (nothing was cut)."""
    assert "nothing cut" in smoke[1]
    made = {key: (int(c), int(t)) for key, c, _, skipped, t, _ in LEDGER.findall(smoke[1])}
    planned = script.plan_counts(script.SMOKE, script.parse_args(["--smoke"]))
    assert made == planned
    assert sum(compiles for compiles, _ in made.values()) == 2  # one layer, the mask check


def test_plan_counts_follow_the_flags(script):
    default = script.plan_counts(script.FULL, script.parse_args([]))
    every = script.plan_counts(script.FULL, script.parse_args(["--all-dtypes"]))
    methods = len(script.COMPILED_METHODS)
    assert default["3"][0] == 2 * methods  # two shapes, bfloat16 only
    assert every["3"][0] == 4 * methods
    assert default["1"][0] == 3  # CIFAR-100: none's and DropCluster's step, the evaluation
    assert script.plan_counts(script.FULL, script.parse_args(["--only", "4"])).keys() == {"3", "4"}


def test_the_default_plan_fits_eight_minutes(script, capsys):
    assert script.main(["--plan"]) == 0
    out = capsys.readouterr().out
    total = re.search(r"^  total .* (\d+)  \(goal <= 480 s: met\)$", out, re.M)
    assert total and int(total.group(1)) <= 480, out
    assert "LAYER_COMPILE_S" in out and "MODEL_COMPILE_S" in out


def test_the_performance_guide_shows_the_current_plan(script, capsys):
    """docs/performance.md pastes ``--plan``'s output: its rows and total are the script's."""
    script.main(["--plan"])
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    guide = (SCRIPT.parents[1] / "docs" / "performance.md").read_text()
    table = [line for line in plan if re.match(r"  (\d|total) ", line)]
    assert len(table) == len(script.SECTIONS) + 1
    for line in table:
        assert line in guide, f"docs/performance.md is missing the plan line:\n{line}"


def test_every_flag_the_guide_gives_check_cuda_exists(script):
    guide = (SCRIPT.parents[1] / "docs" / "performance.md").read_text()
    lines = [line for line in guide.splitlines() if "check_cuda.py" in line]
    flags = {flag for line in lines for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)}
    assert flags, "the guide gives no check_cuda.py command line"
    known = set(script.build_parser()._option_string_actions)
    assert flags <= known, flags - known


def test_the_script_imports_only_public_names():
    """Every ``from dropcluster... import X`` of the script names X in that module's ``__all__``."""
    tree = ast.parse(SCRIPT.read_text())
    imports = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dropcluster")
        for alias in node.names
    ]
    assert imports
    for module, name in imports:
        assert name in importlib.import_module(module).__all__, f"{module}.{name} is not public"


def test_the_clock_skips_a_compile_that_would_overrun_the_budget(script, capsys):
    clock = script.Clock(budget_s=100.0, compile_priors={"layer": 10.0, "model": 60.0})
    clock.section = "3"
    assert clock.compile("layer", "a", lambda: None, lambda: None) is not None
    clock.start -= 95.0  # 95 s spent: a layer compile (median measured ~0 s) still fits
    assert clock.may_compile("layer", "b")
    assert not clock.may_compile("model", "c")  # the prior, 60 s, does not
    assert clock.ledgers["3"].compiles == 1 and clock.ledgers["3"].skipped == 1
    assert "cut compile of c (expected 60 s)" in capsys.readouterr().out


def test_the_mask_check_compares_only_channels_that_drop_a_cluster(script):
    layer = script.DropCluster2d(0.1, 15).fit(script.conv_like(8, 16, 128))
    channels = script.dropping_channels(layer)
    counts = layer.cluster_counts
    expected = (layer.structured & (counts >= 10)).nonzero().squeeze(1)  # floor(0.1 n) >= 1
    assert torch.equal(channels, expected)
    assert 2 <= channels.numel() < layer.structured.sum(), counts  # some are left out
    torch.manual_seed(0)
    out = layer.train()(torch.ones(64, 16, 8, 8))
    worst, mean, consecutive, compared = script.mask_agreement(layer, out)
    assert compared == channels.numel() and mean < 0.5 and consecutive < 0.5
