"""The sweep report: last-K metrics, best p, mean ± std over seeds, tables, figures, partial sweeps.

The database is built by hand with the store's API; every expected number below is worked out
from the hand-chosen epoch values in the comments.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from dropcluster.experiments import paper_results, presets, report_figures
from dropcluster.experiments import statistics as stats
from dropcluster.experiments.report import write_report
from dropcluster.experiments.store import ResultsStore
from dropcluster.experiments.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRESET_NAME = "unit"
DEMO_PRESET = {
    "name": PRESET_NAME,
    "scale": "demo",
    "description": "hand-made database for the report tests",
    "dataset": "fashion-mnist",
    "paper_command": "dropcluster reproduce --preset paper-tiny-imagenet",
    "paper": None,
    "average_last": 2,
    "base": {"dataset": "fashion-mnist", "model": "resnet20", "epochs": 4},
    "grids": [{"regularizer": ["none"], "p": [0.0], "train_fraction": [1.0], "seed": [0]}],
}

# (regularizer, p, fraction) -> per seed, the test (top-1, top-5) of the last two of 4 epochs.
# Epochs 0 and 1 are (10, 30) and (20, 40) in every run, so averaging more than K = 2 epochs
# would show. The run's own summary top-1/top-5 are stored as 1.0 to show they are not used.
LAST_TWO = {
    ("none", 0.0, 1.0): [((60, 80), (62, 82)), ((64, 84), (66, 84))],  # 61, 65 -> 63 ± 2.83
    ("dropblock", 0.1, 1.0): [((64, 80), (64, 80)), ((66, 80), (66, 80))],  # 64, 66 -> 65
    ("dropblock", 0.2, 1.0): [((66, 85), (68, 87)), ((68, 88), (70, 90))],  # 67, 69 -> 68 ± 1.41
    ("dropcluster", 0.1, 1.0): [((70, 90), (70, 90)), ((72, 91), (72, 93))],  # 70, 72 -> 71
    ("dropcluster", 0.2, 1.0): [((69, 89), (69, 89)), ((69, 89), (69, 89))],  # 69 ± 0.00
    ("dropblock", 0.2, 0.5): [((50, 70), (50, 70)), ((54, 74), (54, 74))],  # 52 ± 2.83
    ("dropcluster", 0.1, 0.5): [((55, 75), (55, 75)), ((57, 77), (57, 77))],  # 56 ± 1.41
    ("dropcluster", 0.2, 0.5): [((40, 60), (40, 60))],  # seed 1 failed: see below
}

# Corruption results of the full-set runs at the best p (and decoys at a worse p).
CORRUPTION_ROWS = {
    ("dropblock", 0.2): [
        {
            "clean": 68,
            ("gaussian_noise", 1): 60,
            ("gaussian_noise", 2): 50,
            ("defocus_blur", 1): 58,
            ("defocus_blur", 2): 40,
        },
        {
            "clean": 70,
            ("gaussian_noise", 1): 62,
            ("gaussian_noise", 2): 52,
            ("defocus_blur", 1): 56,
            ("defocus_blur", 2): 44,
        },
    ],
    ("dropcluster", 0.1): [
        {
            "clean": 72,
            ("gaussian_noise", 1): 66,
            ("gaussian_noise", 2): 60,
            ("defocus_blur", 1): 64,
            ("defocus_blur", 2): 50,
        },
        {
            "clean": 74,
            ("gaussian_noise", 1): 68,
            ("gaussian_noise", 2): 62,
            ("defocus_blur", 1): 66,
            ("defocus_blur", 2): 52,
        },
    ],
    ("dropblock", 0.1): [
        {"clean": 11.11, ("gaussian_noise", 1): 11.11, ("defocus_blur", 1): 11.11},
        {"clean": 11.11, ("gaussian_noise", 1): 11.11, ("defocus_blur", 1): 11.11},
    ],
}


def _run_id(regularizer: str, p: float, fraction: float, seed: int) -> str:
    return f"{regularizer}-p{p:g}-f{fraction:g}-s{seed}"


def _history(last_two) -> list[dict]:
    epochs = [(10, 30), (20, 40), *last_two]
    return [
        {"epoch": epoch, "loss": 1.0, "top1": float(top1), "top5": float(top5)}
        for epoch, (top1, top5) in enumerate(epochs)
    ]


def _corruption_rows(values: dict) -> list[dict]:
    rows = []
    for key, top1 in values.items():
        corruption, severity = (key, 0) if key == "clean" else key
        rows.append(
            {"corruption": corruption, "severity": severity, "top1": top1, "top5": top1 + 10}
        )
    return rows


def _add(store, regularizer, p, fraction, seed, preset=PRESET_NAME) -> str:
    run_id = _run_id(regularizer, p, fraction, seed)
    store.add_run(
        run_id,
        {"epochs": 4},
        preset=preset,
        regularizer=regularizer,
        p=p,
        seed=seed,
        train_fraction=fraction,
    )
    return run_id


def _finished_at_70(store, regularizer, p, seed) -> str:
    """A finished run on the whole training set at 70 % top-1, 90 % top-5; its id."""
    run_id = _add(store, regularizer, p, 1.0, seed)
    store.mark_running(run_id)
    store.record_finished(
        run_id,
        history=_history([(70, 90), (70, 90)]),
        top1=70.0,
        top5=90.0,
        average_last=2,
        seconds=1.0,
    )
    return run_id


def _build_store(path, *, corruptions: bool = True) -> ResultsStore:
    store = ResultsStore(path / "results.sqlite")
    for (regularizer, p, fraction), seeds in LAST_TWO.items():
        for seed, last_two in enumerate(seeds):
            run_id = _add(store, regularizer, p, fraction, seed)
            store.mark_running(run_id)
            clusters = None
            if regularizer == "dropcluster" and p == 0.1 and fraction == 1.0:
                # 12 and 14 of 16 channels structured at the refit after epoch 2 -> 13 ± 1.41.
                clusters = [
                    {
                        "epoch": 2,
                        "layer": "stem",
                        "channels": 16,
                        "structured": 12 + 2 * seed,
                        "refit_seconds": 0.5,
                    }
                ]
            store.record_finished(
                run_id,
                history=_history(last_two),
                top1=1.0,
                top5=1.0,
                average_last=2,
                seconds=3.0,
                clusters=clusters,
            )
            rows = CORRUPTION_ROWS.get((regularizer, p)) if fraction == 1.0 else None
            if corruptions and rows:
                store.record_corruptions(run_id, _corruption_rows(rows[seed]))
    failed = _add(store, "dropcluster", 0.2, 0.5, 1)
    store.mark_running(failed)
    # As the sweep stores it: the exit status, then the tail of the worker's log.
    store.mark_failed(
        failed,
        'exit status 1\nTraceback (most recent call last):\n  File "loop.py", line 9\n'
        "RuntimeError: CUDA out of memory",
    )
    _add(store, "dropout", 0.1, 1.0, 0)  # pending
    other = _add(store, "spatial_dropout", 0.1, 1.0, 0, preset="another-preset")
    store.record_finished(
        other,
        history=_history([(99, 99), (99, 99)]),
        top1=99.0,
        top5=99.0,
        average_last=2,
        seconds=1.0,
    )
    return store


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = _cells(line)
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{text}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A hand-made database and the demo report written from it (drawn once: figures are slow)."""
    folder = tmp_path_factory.mktemp("sweep")
    store = _build_store(folder)
    report_path = write_report(store, folder, DEMO_PRESET)
    yield store, folder, report_path
    store.close()


def test_run_metric_is_mean_of_last_k_epochs(sweep):
    store, _, _ = sweep
    metrics = {run.run_id: run for run in summarize(store, 2, preset_name=PRESET_NAME).runs}
    none_seed0 = metrics[_run_id("none", 0.0, 1.0, 0)]
    assert (none_seed0.top1, none_seed0.top5, none_seed0.epochs_averaged) == (61.0, 81.0, 2)
    last_one = {run.run_id: run for run in summarize(store, 1, preset_name=PRESET_NAME).runs}
    assert last_one[_run_id("none", 0.0, 1.0, 0)].top1 == 62.0
    # K = 3 reaches back into epoch 1 (top-1 20): (20 + 60 + 62) / 3.
    last_three = {run.run_id: run for run in summarize(store, 3, preset_name=PRESET_NAME).runs}
    assert last_three[_run_id("none", 0.0, 1.0, 0)].top1 == pytest.approx(142 / 3)
    with pytest.raises(ValueError, match="average_last \\(K\\) should be an integer >= 1"):
        summarize(store, 0)


def test_best_p_is_highest_mean_top1_on_full_set(sweep):
    store, _, _ = sweep
    summary = summarize(store, 2, preset_name=PRESET_NAME)
    assert summary.full_fraction == 1.0
    assert {name: group.p for name, group in summary.best.items()} == {
        "none": 0.0,
        "dropblock": 0.2,
        "dropcluster": 0.1,
    }
    best = summary.best["dropblock"]
    assert best.top1.values == (67.0, 69.0)
    assert best.top1.std == pytest.approx(math.sqrt(2))  # sample std, ddof = 1


def test_failed_runs_listed_and_never_counted(sweep):
    store, _, report_path = sweep
    summary = summarize(store, 2, preset_name=PRESET_NAME)
    failed_id = _run_id("dropcluster", 0.2, 0.5, 1)
    assert [run.run_id for run in summary.failed] == [failed_id]
    assert summary.failed[0].error == "RuntimeError: CUDA out of memory"
    assert failed_id not in {run.run_id for run in summary.runs}
    assert summary.groups[("dropcluster", 0.2, 0.5)].top1.n == 1
    assert summary.status_counts == {"pending": 1, "running": 0, "finished": 15, "failed": 1}
    markdown = report_path.read_text()
    assert "finished 15, failed 1" in markdown
    failed_row = _row(_section(markdown, "### Failed runs"), f"`{failed_id}`")
    assert failed_row[-1] == "RuntimeError: CUDA out of memory"
    assert "Traceback" not in markdown


def test_other_presets_runs_are_left_out(sweep):
    _, _, report_path = sweep
    markdown = report_path.read_text()
    assert "SpatialDropout" not in markdown and "99.00" not in markdown


def test_demo_header_says_scale_k_and_paper_command(sweep):
    _, _, report_path = sweep
    header = report_path.read_text().split("\n## ")[0]
    assert "demo scale: small model, short schedule, Fashion-MNIST" in header
    assert "not comparable with the paper" in header
    assert "`dropcluster reproduce --preset paper-tiny-imagenet`" in header
    assert "K = 2" in header


def test_full_set_table_has_mean_std_at_best_p(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## Full training set")
    # none: seeds 61 and 65 -> mean 63, std sqrt(8) = 2.83; top-5 81 and 84 -> 82.5 ± 2.12.
    assert _row(section, "No dropout") == ["No dropout", "0", "63.00 ± 2.83", "82.50 ± 2.12", "2"]
    # DropBlock p=0.2: 67, 69 -> 68 ± 1.41; top-5 86, 89 -> 87.5 ± 2.12.
    assert _row(section, "DropBlock") == ["DropBlock", "0.2", "68.00 ± 1.41", "87.50 ± 2.12", "2"]
    assert _row(section, "DropCluster")[:3] == ["DropCluster", "0.1", "71.00 ± 1.41"]
    grid = _section(report_path.read_text(), "### Every p")
    assert _row(grid, "regularizer") == ["regularizer", "p = 0", "p = 0.1", "p = 0.2"]
    assert _row(grid, "DropBlock") == [
        "DropBlock",
        "",
        "65.00 ± 1.41 (n=2)",
        "**68.00 ± 1.41 (n=2)**",
    ]
    assert _row(grid, "DropCluster")[3] == "69.00 ± 0.00 (n=2)"


def test_fraction_table_uses_best_p_and_blanks(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## Training-set size")
    assert _row(section, "training set") == [
        "training set",
        "No dropout (p=0)",
        "DropBlock (p=0.2)",
        "DropCluster (p=0.1)",
    ]
    assert _row(section, "100 %") == [
        "100 %",
        "63.00 ± 2.83 (n=2)",
        "68.00 ± 1.41 (n=2)",
        "71.00 ± 1.41 (n=2)",
    ]
    # No dropout was not run on half the data: blank. DropCluster's p = 0.2 run (40) is not shown.
    assert _row(section, "50 %") == ["50 %", "", "52.00 ± 2.83 (n=2)", "56.00 ± 1.41 (n=2)"]
    assert "40.00" not in section


def test_corruption_tables_at_lowest_severity_and_per_severity(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## Corrupted test sets")
    assert "severity 1" in section
    assert _row(section, "clean") == ["clean", "69.00 ± 1.41 (n=2)", "73.00 ± 1.41 (n=2)"]
    assert _row(section, "gaussian noise") == [
        "gaussian noise",
        "61.00 ± 1.41 (n=2)",
        "67.00 ± 1.41 (n=2)",
    ]
    # Per seed mean over corruptions at severity 1: DropBlock 59, 59; DropCluster 65, 67.
    assert _row(section, "**mean over corruptions**")[1:] == [
        "59.00 ± 0.00 (n=2)",
        "66.00 ± 1.41 (n=2)",
    ]
    per_severity = _section(report_path.read_text(), "### Mean over corruptions per severity")
    # Severity 2: DropBlock seeds (50+40)/2 = 45 and (52+44)/2 = 48 -> 46.5 ± 2.12.
    assert _row(per_severity, "2")[1] == "46.50 ± 2.12 (n=2)"
    assert _row(per_severity, "0 (clean)")[1] == "69.00 ± 1.41 (n=2)"
    assert "11.11" not in section  # the worse p's corruption results


def test_cluster_statistics(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## DropCluster: structured channels")
    assert _row(section, "DropCluster") == [
        "DropCluster",
        "0.1",
        "100 %",
        "2",
        "stem",
        "13.00 ± 1.41",
        "16",
        "81.2 %",
        "0.50 ± 0.00",
        "2",
    ]


def test_figures_written_as_png_and_linked(sweep):
    _, folder, report_path = sweep
    markdown = report_path.read_text()
    names = [
        "corruption_top1.png",
        "corruption_top5.png",
        "training_fraction_top1.png",
        "learning_curves_top1.png",
    ]
    for name in names:
        path = folder / "report" / name
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in markdown


def test_report_is_idempotent(sweep):
    store, folder, report_path = sweep
    before = report_path.read_text()
    assert write_report(store, folder, DEMO_PRESET) == report_path
    assert report_path.read_text() == before


def test_paper_preset_shows_paper_columns(tmp_path):
    store = _build_store(tmp_path)
    preset = {**DEMO_PRESET, "scale": "paper", "paper": "tiny-imagenet", "dataset": "tiny-imagenet"}
    markdown = write_report(store, tmp_path, preset).read_text()
    store.close()
    full = _section(markdown, "## Full training set")
    assert "top-1 paper" in full and "top-1 measured" in full
    paper_dropblock = paper_results.FULL_TRAINING_SET["tiny-imagenet"]["dropblock"]
    assert _row(full, "DropBlock") == [
        "DropBlock",
        "0.2",
        "0.1",
        "68.00 ± 1.41",
        "65.59",
        "87.50 ± 2.12",
        "84.14",
        "2",
    ]
    assert paper_dropblock["top1"] == 65.59
    # Regularizers the paper has and the sweep lacks still show the paper's numbers.
    assert _row(full, "StochasticDepth")[4] == "64.86"
    fractions = _section(markdown, "## Training-set size")
    tenth = dict(zip(_row(fractions, "training set"), _row(fractions, "10 %"), strict=True))
    assert tenth["DropBlock paper"] == "28.89" and tenth["DropCluster paper"] == "29.04"
    assert tenth["StochasticDepth paper"] == "26.29" and tenth["DropBlock (p=0.2) measured"] == ""
    corruption = _section(markdown, "## Corrupted test sets")
    gaussian = _row(corruption, "gaussian noise")
    assert "61.25" in gaussian and "62.57" in gaussian  # Table 5, DropBlock and DropCluster
    assert "Paper scale" in markdown and "not comparable" not in markdown


def test_demo_preset_has_no_paper_columns(sweep):
    _, _, report_path = sweep
    tables = [line for line in report_path.read_text().splitlines() if line.startswith("|")]
    assert not any("paper" in line or "measured" in line for line in tables)


def test_empty_database_reports_nothing_finished(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    _add(store, "none", 0.0, 1.0, 0)
    markdown = write_report(store, tmp_path, DEMO_PRESET).read_text()
    store.close()
    assert "No run has finished yet" in markdown
    assert "pending 1" in markdown
    assert not list((tmp_path / "report").glob("*.png"))


def test_short_and_epochless_runs_are_flagged(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    short = _add(store, "none", 0.0, 1.0, 0)
    store.record_finished(
        short,
        history=[{"epoch": 0, "top1": 40.0, "top5": 70.0}],
        top1=1.0,
        top5=1.0,
        average_last=1,
        seconds=1.0,
    )
    epochless = _add(store, "none", 0.0, 1.0, 1)
    store.record_finished(epochless, history=[], top1=50.0, top5=80.0, average_last=0, seconds=1.0)
    summary = summarize(store, 2)
    assert summary.short_runs == [short] and summary.runs_without_epochs == [epochless]
    # Seed 0 averages its single epoch (40), seed 1 uses its stored metric (50).
    assert summary.best["none"].top1.values == (40.0, 50.0)
    markdown = write_report(store, tmp_path, DEMO_PRESET).read_text()
    store.close()
    assert "1 finished run(s) have fewer than K epochs" in markdown
    assert f"no epoch rows; their metric is the one stored with the run: `{epochless}`" in markdown


def test_no_corruptions_section_says_so(tmp_path):
    store = _build_store(tmp_path, corruptions=False)
    markdown = write_report(store, tmp_path, DEMO_PRESET, average_last=1).read_text()
    store.close()
    assert "No corruption results" in _section(markdown, "## Corrupted test sets")
    assert "K = 1" in markdown
    assert not (tmp_path / "report" / "corruption_top1.png").exists()
    assert (tmp_path / "report" / "learning_curves_top1.png").exists()


def test_missing_matplotlib_still_writes_tables(tmp_path, monkeypatch):
    def no_matplotlib():
        raise ImportError("figures need matplotlib, an optional extra")

    monkeypatch.setattr(report_figures, "pyplot", no_matplotlib)
    store = _build_store(tmp_path, corruptions=False)
    markdown = write_report(store, tmp_path, DEMO_PRESET).read_text()
    store.close()
    assert "No figures: figures need matplotlib" in markdown
    assert "68.00 ± 1.41" in markdown


def test_figure_functions_check_their_input(tmp_path):
    with pytest.raises(ValueError, match="metric should be one of 'top1', 'top5'"):
        report_figures.plot_training_fraction(
            {"none": {1.0: (1.0, None)}}, tmp_path / "x.png", metric="top-1"
        )
    with pytest.raises(ValueError, match="nothing to plot"):
        report_figures.plot_learning_curves({"none": []}, tmp_path / "x.png")


def test_paper_tables_lookup():
    tables = paper_results.paper_tables("cifar100")
    assert tables["full"]["dropcluster"] == {"p": 0.1, "top1": 63.01, "top5": 85.45}
    assert tables["fraction"]["stochastic_depth"][0.2]["top1"] == 29.57
    assert tables["corruption"] == {}
    assert set(paper_results.CORRUPTION_SEVERITY_1["tiny-imagenet"]["dropblock"]) == set(
        paper_results.CORRUPTIONS
    )
    with pytest.raises(ValueError, match="cifar100, tiny-imagenet"):
        paper_results.paper_tables("imagenet")


# -- arms (regularizer + variant), the paired comparison, top-5 tables, assumptions ----------

# (arm, p, fraction) -> per seed 0, 1, 2: the (top-1, top-5) of both of the last two epochs, so
# a run's metric is that pair. Paired with no dropout of the same seed (Δ = arm − none):
ARM_RUNS = {
    ("none", 0.0, 1.0): [(60, 80), (61, 80), (62, 80)],
    ("none", 0.0, 0.5): [(50, 70), (50, 70), (50, 70)],
    ("none:ours", 0.0, 1.0): [(62, 82), (62, 82), (62, 82)],
    # Top-1 Δ 1, 2, 3: mean 2, sd 1, t = 2 / (1 / √3) = 2√3, df 2 -> p = 1 − √(6/7) = 0.074.
    # Top-5 Δ 1, 2, 3 too.
    ("dropcluster", 0.1, 1.0): [(61, 81), (63, 82), (65, 83)],
    # Top-1 Δ 1, −1, 3: mean 1, sd 2, t = √3 / 2, p = 1 − √(3/11) = 0.478; top-5 Δ all 0.
    ("dropcluster", 0.1, 0.5): [(51, 70), (49, 70), (53, 70)],
    # Paired with none:ours: top-1 Δ 0, 1, 2: mean 1, sd 1, t = √3, p = 1 − √(3/5) = 0.225;
    # top-5 Δ 3, 3, 3: sd 0, so no t and no p value (the test is undefined).
    ("dropcluster:ours", 0.1, 1.0): [(62, 85), (63, 85), (64, 85)],
    # No dead-variant none runs: paired with plain none; top-1 Δ 2, 2, 2 -> no t, no p.
    ("dropcluster:dead", 0.1, 1.0): [(62, 82), (63, 82), (64, 82)],
}

# Top-1 on corrupted test sets at severity 1 (top-5 = top-1 + 10), per seed.
ARM_CORRUPTIONS = {
    # Mean over the two corruptions: 45 for every seed.
    "none": [{"clean": 60, ("gaussian_noise", 1): 50, ("defocus_blur", 1): 40}] * 3,
    "none:ours": [{"clean": 62, ("gaussian_noise", 1): 53, ("defocus_blur", 1): 43}] * 3,
    # Means 47, 48, 49: Δ 2, 3, 4 vs none -> mean 3, sd 1, t = 3√3, p = 1 − √(27/29) = 0.035.
    "dropcluster": [
        {"clean": 61 + 2 * s, ("gaussian_noise", 1): 52 + s, ("defocus_blur", 1): 42 + s}
        for s in range(3)
    ],
    # Means 49, 50, 51: Δ 1, 2, 3 vs none:ours (48).
    "dropcluster:ours": [
        {"clean": 63, ("gaussian_noise", 1): 54 + s, ("defocus_blur", 1): 44 + s} for s in range(3)
    ],
}

ASSUMPTIONS = ["DropCluster refits its clusters every 5 epochs", "ReNA k = 15"]
ARMS_PRESET = {
    **DEMO_PRESET,
    "scale": "paper",
    "paper": "tiny-imagenet",
    "dataset": "tiny-imagenet",
    "assumptions": ASSUMPTIONS,
}


def _build_arms_store(path) -> ResultsStore:
    """Runs stored as the sweep stores them: the config without ``variant``, the id with it."""
    store = ResultsStore(path / "results.sqlite")
    for (arm, p, fraction), seeds in ARM_RUNS.items():
        regularizer, _, variant = arm.partition(":")
        for seed, (top1, top5) in enumerate(seeds):
            run_id = presets.run_id(regularizer, p, fraction, seed, variant or None)
            store.add_run(
                run_id,
                {"epochs": 4},
                preset=PRESET_NAME,
                regularizer=regularizer,
                p=p,
                seed=seed,
                train_fraction=fraction,
            )
            store.mark_running(run_id)
            clusters = None
            if regularizer == "dropcluster" and fraction == 1.0:
                structured = 9 if variant == "ours" else 8
                clusters = [
                    {
                        "epoch": 2,
                        "layer": "stem",
                        "channels": 16,
                        "structured": structured,
                        "refit_seconds": 0.5,
                    }
                ]
            store.record_finished(
                run_id,
                history=_history([(top1, top5)] * 2),
                top1=1.0,
                top5=1.0,
                average_last=2,
                seconds=1.0,
                clusters=clusters,
            )
            if fraction == 1.0 and arm in ARM_CORRUPTIONS:
                store.record_corruptions(run_id, _corruption_rows(ARM_CORRUPTIONS[arm][seed]))
    return store


@pytest.fixture(scope="module")
def arms_sweep(tmp_path_factory):
    """The arms database and its paper-preset report; the figure functions are wrapped to
    record the arms and styles they get (and still draw)."""
    folder = tmp_path_factory.mktemp("arms")
    store = _build_arms_store(folder)
    calls = {}

    def spy(name):
        draw = getattr(report_figures, name)

        def recording(data, out_path, **options):
            calls[name] = (data, options["styles"])
            return draw(data, out_path, **options)

        return recording

    with pytest.MonkeyPatch.context() as patch:
        for name in ("plot_corruption_severity", "plot_training_fraction", "plot_learning_curves"):
            patch.setattr(report_figures, name, spy(name))
        markdown = write_report(store, folder, ARMS_PRESET).read_text()
    yield store, markdown, calls
    store.close()


def test_student_t_two_sided_tail():
    p_value = stats.student_t_two_sided_p
    # Two-sided 5 % critical values of the t tables.
    assert p_value(2.776, 4) == pytest.approx(0.0500, abs=1e-4)
    assert p_value(4.303, 2) == pytest.approx(0.0500, abs=1e-4)
    assert p_value(2.262, 9) == pytest.approx(0.0500, abs=1e-4)
    # df 1 is the Cauchy distribution: P(|T| >= 1) = 1/2 exactly.
    assert p_value(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert p_value(-1.0, 1) == p_value(1.0, 1)
    # df 2 has the closed form 1 − t / √(2 + t²).
    assert p_value(2 * math.sqrt(3), 2) == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-12)
    assert p_value(0.0, 1) == 1.0 and p_value(0.0, 6) == 1.0
    assert p_value(math.inf, 3) == 0.0
    with pytest.raises(ValueError, match="df"):
        p_value(1.0, 0)


def test_paired_t_test_by_hand():
    test = stats.paired_t_test([1.0, 2.0, 3.0])
    assert (test.n, test.stats.mean, test.stats.std, test.better) == (3, 2.0, 1.0, 3)
    assert test.t == pytest.approx(2 * math.sqrt(3))
    assert test.p_value == pytest.approx(1 - math.sqrt(6 / 7))
    same = stats.paired_t_test([-2.0, -2.0])
    assert (same.t, same.p_value, same.better) == (None, None, 0)
    zero = stats.paired_t_test([0.0, 0.0, 0.0])
    assert (zero.t, zero.p_value) == (None, None)
    with pytest.raises(ValueError, match="2 or more"):
        stats.paired_t_test([1.0])


def test_arm_of_a_run_record(arms_sweep):
    store, _, _ = arms_sweep
    arms = {record.run_id: record.arm for record in store.runs()}
    assert arms["dropcluster-ours-p0.1-f1-s0"] == "dropcluster:ours"
    assert arms["dropcluster-p0.1-f1-s0"] == "dropcluster"
    assert arms["none-ours-p0-f1-s2"] == "none:ours"
    record = store.runs()[0]
    assert replace(record, config={"variant": "dead"}).arm == f"{record.regularizer}:dead"
    assert replace(record, run_id="custom-name").arm == record.regularizer


def test_arm_names_and_order():
    assert report_figures.display_name("dropcluster:ours") == "DropCluster (ours)"
    assert report_figures.display_name("dropcluster") == "DropCluster"
    arms = ["dropcluster:ours", "none", "zeta", "dropcluster", "dropblock", "dropcluster:dead"]
    assert report_figures.ordered_regularizers(arms) == [
        "none",
        "dropblock",
        "dropcluster",
        "dropcluster:dead",
        "dropcluster:ours",
        "zeta",
    ]
    styles = report_figures.arm_styles(arms)
    assert styles == report_figures.arm_styles(reversed(arms))  # deterministic
    dropcluster = [styles[a] for a in ("dropcluster", "dropcluster:dead", "dropcluster:ours")]
    assert dropcluster[0]["color"] == report_figures.REGULARIZER_COLOURS["dropcluster"]
    assert len({s["color"] for s in dropcluster}) == 3
    assert len({s["marker"] for s in dropcluster}) == 3
    assert [s["linestyle"] for s in dropcluster] == ["-", "--", "--"]


def test_arms_are_rows_with_paper_numbers_beside_the_plain_arm_only(arms_sweep):
    _, markdown, _ = arms_sweep
    full = _section(markdown, "## Full training set")
    table = full[: full.index("### Every p")]
    assert [row[0] for row in _rows(table)] == [
        "No dropout",
        "No dropout (ours)",
        "Dropout",
        "SpatialDropout",
        "DropBlock",
        "StochasticDepth",
        "DropCluster",
        "DropCluster (dead)",
        "DropCluster (ours)",
    ]
    # Plain: 61, 63, 65 -> 63 ± 2; the paper's Table 3 beside it. The variant: no paper numbers.
    assert _row(full, "DropCluster") == [
        "DropCluster",
        "0.1",
        "0.1",
        "63.00 ± 2.00",
        "66.26",
        "82.00 ± 1.00",
        "84.35",
        "3",
    ]
    assert _row(full, "DropCluster (ours)") == [
        "DropCluster (ours)",
        "0.1",
        "",
        "63.00 ± 1.00",
        "",
        "85.00 ± 0.00",
        "",
        "3",
    ]
    fractions = _section(markdown, "## Training-set size")
    header = _row(fractions, "training set")
    assert "DropCluster paper" in header and "DropCluster (ours) (p=0.1) measured" in header
    assert not any("(ours) paper" in cell or "(dead) paper" in cell for cell in header)


def test_fraction_top5_table_has_paper_columns(arms_sweep):
    _, markdown, _ = arms_sweep
    top5 = _section(markdown, "### Top-5 (%) per training fraction")
    header = _row(top5, "training set")
    half = dict(zip(header, _row(top5, "50 %"), strict=True))
    # Table 4's top-5 at 50 % of the data; none's top-5 at half the data is 70 for every seed.
    assert half["DropCluster paper"] == "79.83" and half["DropBlock paper"] == "78.99"
    assert half["DropCluster (p=0.1) measured"] == "70.00 ± 0.00 (n=3)"
    assert half["No dropout (p=0) measured"] == "70.00 ± 0.00 (n=3)"
    full = dict(zip(header, _row(top5, "100 %"), strict=True))
    assert full["DropCluster (ours) (p=0.1) measured"] == "85.00 ± 0.00 (n=3)"


def test_corruption_top5_tables_with_paper_columns(arms_sweep):
    _, markdown, _ = arms_sweep
    top1 = _section(markdown, "## Corrupted test sets")
    top1_gaussian = dict(zip(_row(top1, "corruption"), _row(top1, "gaussian noise"), strict=True))
    assert top1_gaussian["DropCluster paper"] == "62.57"  # Table 5, top-1
    top5 = _section(markdown, "### Top-5 (%) at severity 1")
    header = _row(top5, "corruption")
    gaussian = dict(zip(header, _row(top5, "gaussian noise"), strict=True))
    # Measured top-5 = top-1 + 10: seeds 62, 63, 64 -> 63 ± 1; the paper's top-5 is 83.31.
    assert gaussian["DropCluster (p=0.1) measured"] == "63.00 ± 1.00 (n=3)"
    assert gaussian["DropCluster paper"] == "83.31" and gaussian["DropBlock paper"] == "82.53"
    assert gaussian["DropCluster (ours) (p=0.1) measured"] == "65.00 ± 1.00 (n=3)"
    assert "DropCluster (ours) paper" not in header
    clean = dict(zip(header, _row(top5, "clean"), strict=True))
    assert clean["DropCluster paper"] == "84.35"  # Table 3's top-5
    means = _section(markdown, "### Mean over corruptions per severity (top-5 %)")
    # none: (60 + 50) / 2 = 55 per seed.
    assert _row(means, "1")[1] == "55.00 ± 0.00 (n=3)"


def test_paired_comparison_by_hand(arms_sweep):
    _, markdown, _ = arms_sweep
    section = _section(markdown, "## Paired comparison with no dropout")
    top1 = section[: section.index("### Top-5")]
    rows = {(row[0], row[2]): row for row in _rows(top1)}
    assert rows[("DropCluster", "100 %")] == [
        "DropCluster",
        "0.1",
        "100 %",
        "63.00 ± 2.00",
        "+2.00 ± 1.00",
        "3.46",
        "0.074",
        "3 of 3",
    ]
    assert rows[("DropCluster", "50 %")][4:] == ["+1.00 ± 2.00", "0.87", "0.478", "2 of 3"]
    assert rows[("DropCluster (ours)", "100 %")][4:] == ["+1.00 ± 1.00", "1.73", "0.225", "2 of 3"]
    assert rows[("DropCluster (dead)", "100 %")][4:] == ["+2.00 ± 0.00", "—", "—", "3 of 3"]
    assert not any(name.startswith("No dropout") for name, _ in rows)
    top5 = section[section.index("### Top-5") : section.index("### Mean top-1")]
    rows5 = {(row[0], row[2]): row for row in _rows(top5)}
    assert rows5[("DropCluster", "50 %")][4:] == ["+0.00 ± 0.00", "—", "—", "0 of 3"]
    assert rows5[("DropCluster (ours)", "100 %")][4:] == ["+3.00 ± 0.00", "—", "—", "3 of 3"]
    corrupted = {row[0]: row for row in _rows(section[section.index("### Mean top-1") :])}
    assert corrupted["DropCluster"] == [
        "DropCluster",
        "0.1",
        "48.00 ± 1.00",
        "+3.00 ± 1.00",
        "5.20",
        "0.035",
        "3 of 3",
    ]
    assert corrupted["DropCluster (ours)"][3:6] == ["+2.00 ± 1.00", "3.46", "0.074"]
    # Which no-dropout runs each variant is paired with, and how to read the p values.
    assert "DropCluster (dead) with No dropout; DropCluster (ours) with No dropout (ours)." in (
        section.replace("\n", " ")
    )
    assert "p < 0.05 means" in section and "no correction for multiple comparisons" in section


def test_paired_section_needs_two_seeds_and_no_dropout(tmp_path):
    store = _build_store(tmp_path, corruptions=False)  # two seeds, none on the full set only
    markdown = write_report(store, tmp_path, DEMO_PRESET).read_text()
    # DropCluster at p 0.1: 70, 72 against none's 61, 65 -> Δ 9, 7: mean 8, sd √2, t = 8.
    row = _row(_section(markdown, "## Paired comparison"), "DropCluster")
    assert row[2:] == ["100 %", "71.00 ± 1.41", "+8.00 ± 1.41", "8.00", "0.079", "2 of 2"]
    one_seed = ResultsStore(tmp_path / "one" / "results.sqlite")
    for regularizer, p, top1 in (("none", 0.0, 60), ("dropout", 0.1, 61)):
        run_id = _add(one_seed, regularizer, p, 1.0, 0)
        one_seed.record_finished(
            run_id,
            history=_history([(top1, 80)] * 2),
            top1=1.0,
            top5=1.0,
            average_last=2,
            seconds=1.0,
        )
    markdown = write_report(one_seed, tmp_path / "one", DEMO_PRESET).read_text()
    assert "No arm has 2 or more seeds paired" in _section(markdown, "## Paired comparison")
    store.close()
    one_seed.close()


def test_no_assumptions_heading_without_assumptions(sweep):
    _, _, report_path = sweep
    markdown = report_path.read_text()
    assert "Assumptions" not in markdown


def test_assumptions_listed_in_the_header(arms_sweep):
    _, markdown, _ = arms_sweep
    header = markdown.split("\n## ")[0]
    heading = "### Assumptions (settings the paper does not state; values chosen here)"
    assert heading in header
    bullets = header.split(heading)[1].split("\n\n")[1].splitlines()
    assert bullets == [f"- {assumption}" for assumption in ASSUMPTIONS]


def test_cluster_rows_per_dropcluster_arm(arms_sweep):
    _, markdown, _ = arms_sweep
    section = _section(markdown, "## DropCluster: structured channels")
    rows = [row[:6] for row in _rows(section)]
    assert rows == [
        ["DropCluster", "0.1", "100 %", "2", "stem", "8.00 ± 0.00"],
        ["DropCluster (dead)", "0.1", "100 %", "2", "stem", "8.00 ± 0.00"],
        ["DropCluster (ours)", "0.1", "100 %", "2", "stem", "9.00 ± 0.00"],
    ]


def test_figures_get_every_arm_with_its_own_style(arms_sweep):
    _, markdown, calls = arms_sweep
    assert set(calls) == {
        "plot_corruption_severity",
        "plot_training_fraction",
        "plot_learning_curves",
    }
    curves, styles = calls["plot_learning_curves"]
    assert set(curves) == {
        "none",
        "none:ours",
        "dropcluster",
        "dropcluster:ours",
        "dropcluster:dead",
    }
    # One style table for the whole report: the same arm looks the same in every figure.
    assert all(options is styles for _, options in calls.values())
    colours = {styles[arm]["color"] for arm in curves}
    assert len(colours) == len(curves)
    assert styles["dropcluster:ours"]["label"] == "DropCluster (ours)"
    assert "](learning_curves_top1.png)" in markdown


def _rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text``: neither a rule nor a header (the line
    before a rule)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    rule = [line.startswith("|---") for line in lines] + [False]
    return [_cells(line) for i, line in enumerate(lines) if not rule[i] and not rule[i + 1]]


def test_mce_section_by_hand(tmp_path):
    """mCE per seed over 15 x 5 cells, CE normalised by the same seed's no-dropout run, and the
    paired Δ: no dropout errs 40, 41, 42 % everywhere (seeds 0-2), DropCluster 38, 40, 40 %."""
    from dropcluster.data.corruptions import BENCHMARK

    store = ResultsStore(tmp_path / "results.sqlite")
    for regularizer, errors in (("none", (40, 41, 42)), ("dropcluster", (38, 40, 40))):
        p = 0.0 if regularizer == "none" else 0.1
        for seed, error in enumerate(errors):
            run_id = _finished_at_70(store, regularizer, p, seed)
            cells = {"clean": 70.0}
            cells.update({(name, s): 100.0 - error for name in BENCHMARK for s in range(1, 6)})
            store.record_corruptions(run_id, _corruption_rows(cells))
    markdown = write_report(store, tmp_path, DEMO_PRESET).read_text()
    section = _section(markdown, "## Mean corruption error")
    assert _row(section, "No dropout")[2:4] == ["41.00 ± 1.00 (n=3)", "—"]
    # CE per seed: 38/40, 40/41, 40/42 -> 95.00, 97.56, 95.24: mean 95.93, sd 1.41
    assert _row(section, "DropCluster") == [
        "DropCluster",
        "0.1",
        "39.33 ± 1.15 (n=3)",
        "95.93 ± 1.41",
        "-1.67 ± 0.58",
        "-5.00",
        "0.038",
        "3 of 3",
    ]
    # A sweep that evaluated only the paper's seven asked for no mCE: no section.
    (tmp_path / "paper").mkdir()
    other = _build_store(tmp_path / "paper")
    assert (
        "## Mean corruption error"
        not in write_report(other, tmp_path / "paper", DEMO_PRESET).read_text()
    )
    # The 15 at severities 1 and 3 only: the section says what is missing.
    (tmp_path / "partial").mkdir()
    partial = ResultsStore(tmp_path / "partial" / "results.sqlite")
    for seed in (0, 1):
        run_id = _finished_at_70(partial, "none", 0.0, seed)
        cells = {(name, s): 60.0 for name in BENCHMARK for s in (1, 3)}
        partial.record_corruptions(run_id, _corruption_rows(cells))
    text = write_report(partial, tmp_path / "partial", DEMO_PRESET).read_text()
    assert "lack corruptions: none; severities evaluated: [1, 3]" in _section(
        text, "## Mean corruption error"
    )
