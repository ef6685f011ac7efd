"""The sweep report: last-K metrics, best p, mean ± std over seeds, tables, figures, partial sweeps.

The database is built by hand with the store's API; every expected number below is worked out
from the hand-chosen epoch values in the comments.
"""

from __future__ import annotations

import math

import pytest

from dropcluster.experiments import paper_results, report_figures
from dropcluster.experiments.report import summarize, write_report
from dropcluster.experiments.store import ResultsStore

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
        {"clean": 68, ("gaussian_noise", 1): 60, ("gaussian_noise", 2): 50,
         ("defocus_blur", 1): 58, ("defocus_blur", 2): 40},
        {"clean": 70, ("gaussian_noise", 1): 62, ("gaussian_noise", 2): 52,
         ("defocus_blur", 1): 56, ("defocus_blur", 2): 44},
    ],
    ("dropcluster", 0.1): [
        {"clean": 72, ("gaussian_noise", 1): 66, ("gaussian_noise", 2): 60,
         ("defocus_blur", 1): 64, ("defocus_blur", 2): 50},
        {"clean": 74, ("gaussian_noise", 1): 68, ("gaussian_noise", 2): 62,
         ("defocus_blur", 1): 66, ("defocus_blur", 2): 52},
    ],
    ("dropblock", 0.1): [
        {"clean": 11.11, ("gaussian_noise", 1): 11.11, ("defocus_blur", 1): 11.11},
        {"clean": 11.11, ("gaussian_noise", 1): 11.11, ("defocus_blur", 1): 11.11},
    ],
}  # fmt: skip


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
    store.add_run(run_id, {"epochs": 4}, preset=preset, regularizer=regularizer, p=p, seed=seed,
                  train_fraction=fraction)  # fmt: skip
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
                clusters = [{"epoch": 2, "layer": "stem", "channels": 16,
                             "structured": 12 + 2 * seed, "refit_seconds": 0.5}]  # fmt: skip
            store.record_finished(run_id, history=_history(last_two), top1=1.0, top5=1.0,
                                  average_last=2, seconds=3.0, clusters=clusters)  # fmt: skip
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
    store.record_finished(other, history=_history([(99, 99), (99, 99)]), top1=99.0, top5=99.0,
                          average_last=2, seconds=1.0)  # fmt: skip
    return store


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
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
        "none": 0.0, "dropblock": 0.2, "dropcluster": 0.1
    }  # fmt: skip
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
        "DropBlock", "", "65.00 ± 1.41 (n=2)", "**68.00 ± 1.41 (n=2)**"
    ]  # fmt: skip
    assert _row(grid, "DropCluster")[3] == "69.00 ± 0.00 (n=2)"


def test_fraction_table_uses_best_p_and_blanks(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## Training-set size")
    assert _row(section, "training set") == [
        "training set", "No dropout (p=0)", "DropBlock (p=0.2)", "DropCluster (p=0.1)"
    ]  # fmt: skip
    assert _row(section, "100 %") == [
        "100 %", "63.00 ± 2.83 (n=2)", "68.00 ± 1.41 (n=2)", "71.00 ± 1.41 (n=2)"
    ]  # fmt: skip
    # No dropout was not run on half the data: blank. DropCluster's p = 0.2 run (40) is not shown.
    assert _row(section, "50 %") == ["50 %", "", "52.00 ± 2.83 (n=2)", "56.00 ± 1.41 (n=2)"]
    assert "40.00" not in section


def test_corruption_tables_at_lowest_severity_and_per_severity(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## Corrupted test sets")
    assert "severity 1" in section
    assert _row(section, "clean") == ["clean", "69.00 ± 1.41 (n=2)", "73.00 ± 1.41 (n=2)"]
    assert _row(section, "gaussian noise") == [
        "gaussian noise", "61.00 ± 1.41 (n=2)", "67.00 ± 1.41 (n=2)"
    ]  # fmt: skip
    # Per seed mean over corruptions at severity 1: DropBlock 59, 59; DropCluster 65, 67.
    assert _row(section, "**mean over corruptions**")[1:] == [
        "59.00 ± 0.00 (n=2)", "66.00 ± 1.41 (n=2)"
    ]  # fmt: skip
    per_severity = _section(report_path.read_text(), "### Mean over corruptions per severity")
    # Severity 2: DropBlock seeds (50+40)/2 = 45 and (52+44)/2 = 48 -> 46.5 ± 2.12.
    assert _row(per_severity, "2")[1] == "46.50 ± 2.12 (n=2)"
    assert _row(per_severity, "0 (clean)")[1] == "69.00 ± 1.41 (n=2)"
    assert "11.11" not in section  # the worse p's corruption results


def test_cluster_statistics(sweep):
    _, _, report_path = sweep
    section = _section(report_path.read_text(), "## DropCluster: structured channels")
    assert _row(section, "0.1") == [
        "0.1", "100 %", "2", "stem", "13.00 ± 1.41", "16", "81.2 %", "0.50 ± 0.00", "2"
    ]  # fmt: skip


def test_figures_written_as_png_and_linked(sweep):
    _, folder, report_path = sweep
    markdown = report_path.read_text()
    names = [
        "corruption_top1.png", "corruption_top5.png", "training_fraction_top1.png",
        "learning_curves_top1.png",
    ]  # fmt: skip
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
        "DropBlock", "0.2", "0.1", "68.00 ± 1.41", "65.59", "87.50 ± 2.12", "84.14", "2"
    ]  # fmt: skip
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
    store.record_finished(short, history=[{"epoch": 0, "top1": 40.0, "top5": 70.0}], top1=1.0,
                          top5=1.0, average_last=1, seconds=1.0)  # fmt: skip
    epochless = _add(store, "none", 0.0, 1.0, 1)
    store.record_finished(epochless, history=[], top1=50.0, top5=80.0, average_last=0,
                          seconds=1.0)  # fmt: skip
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
        report_figures.plot_training_fraction({"none": {1.0: (1.0, None)}}, tmp_path / "x.png",
                                              metric="top-1")  # fmt: skip
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
