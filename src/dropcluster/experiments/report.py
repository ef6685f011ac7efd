"""The sweep report: ``report/report.md`` and its figures, regenerated from the results database.

:func:`summarize` reads the database once and aggregates it into plain numbers (a
:class:`Summary`); :func:`write_report` turns a summary into markdown tables that mirror the
paper's Tables 1-5 and into the figures of :mod:`dropcluster.experiments.report_figures`.

The protocol follows the paper (section 6): a run's metric is the mean test accuracy over its
last K finished epochs; a regularizer's result is the mean and sample standard deviation of
that metric over seeds, at the drop rate p with the highest mean top-1 on the full training set.
Only finished runs count; failed runs are listed with their error and never aggregated. The
report never fails on a partial sweep: sections without data say so.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropcluster.experiments import report_figures
from dropcluster.experiments.paper_results import CORRUPTIONS, paper_tables
from dropcluster.experiments.presets import Preset, as_preset
from dropcluster.experiments.report_figures import display_name, ordered_regularizers
from dropcluster.experiments.store import CLEAN, FAILED, FINISHED, RUN_STATUSES, ResultsStore
from dropcluster.experiments.sweep import RUNS_FOLDER
from dropcluster.files import atomic_write_text
from dropcluster.validation import check_int

#: Figures this module writes; stale ones are removed so a rerun leaves no outdated image.
FIGURE_NAMES = (
    "corruption_top1.png",
    "corruption_top5.png",
    "training_fraction_top1.png",
    "learning_curves_top1.png",
)
_DASH = "—"


@dataclass(frozen=True)
class SeedStats:
    """One metric over the seeds of a group of runs, in percent.

    Attributes:
        values: one value per seed (run).
    """

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds (NaN with no seed)."""
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof=1); None with fewer than 2 seeds."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def mean_std(self) -> tuple[float, float | None]:
        """``(mean, std)``, the form the figure functions take."""
        return self.mean, self.std


@dataclass(frozen=True)
class RunMetric:
    """The metric of one finished run: its accuracy averaged over its last K finished epochs.

    Attributes:
        epochs_averaged: how many epochs went into the mean (fewer than K when the run has
            fewer epochs; 0 when the epochs table had none and the run's own summary is used).
    """

    run_id: str
    regularizer: str
    p: float
    seed: int
    train_fraction: float
    top1: float
    top5: float
    epochs_averaged: int


@dataclass(frozen=True)
class GroupResult:
    """The runs of one (regularizer, p, training fraction) cell, aggregated over seeds."""

    regularizer: str
    p: float
    train_fraction: float
    top1: SeedStats
    top5: SeedStats
    run_ids: tuple[str, ...]


@dataclass(frozen=True)
class FailedRun:
    """A failed run, listed in the report and never aggregated."""

    run_id: str
    regularizer: str
    p: float
    seed: int
    train_fraction: float
    attempts: int
    error: str


@dataclass(frozen=True)
class CorruptionResult:
    """One regularizer's accuracy on corrupted test sets, at one p, aggregated over seeds.

    Attributes:
        p: the drop rate of the runs aggregated.
        cells: ``cells[(corruption, severity)] = (top1, top5)``; ``("clean", 0)`` is the
            uncorrupted test set and ``("mean", s)`` the per-seed mean over the corruptions of
            severity ``s``, then aggregated over seeds.
        clean_from_runs: True when the clean row is the runs' own last-K metric because the
            database holds no ``"clean"`` evaluation for them.
    """

    p: float
    cells: dict[tuple[str, int], tuple[SeedStats, SeedStats]]
    clean_from_runs: bool = False


@dataclass(frozen=True)
class ClusterRow:
    """DropCluster's structured channels at one refit, averaged over the seeds of a group."""

    p: float
    train_fraction: float
    epoch: int
    layer: str
    structured: SeedStats
    channels: SeedStats
    refit_seconds: SeedStats


@dataclass
class Summary:
    """Everything the report shows, aggregated from the database (see :func:`summarize`).

    Attributes:
        average_last: K, the number of last finished epochs averaged per run.
        status_counts: number of runs per status.
        failed: failed runs with the first line of their error.
        runs: the metric of every finished run.
        groups: ``groups[(regularizer, p, fraction)]`` over seeds.
        full_fraction: the largest training fraction with a finished run (1.0 for a full sweep),
            where p is chosen; None when nothing finished.
        best: ``best[regularizer]``: the group at the best p on ``full_fraction``.
        fraction_p: ``fraction_p[regularizer]``: the p of that regularizer's row in the
            training-fraction table (the best p unless the smaller fractions were run at
            another p only).
        fractions: ``fractions[regularizer][fraction]``: groups at ``fraction_p``.
        corruption: ``corruption[regularizer]`` on the full training fraction.
        curves: ``curves[regularizer] = [(epoch, top1 over seeds), ...]`` at the best p on the
            full fraction.
        clusters: DropCluster refit statistics of finished runs.
        short_runs: finished runs that averaged fewer than K epochs.
        runs_without_epochs: finished runs with no epoch rows, whose metric is the one the
            runner stored with the run.
    """

    average_last: int
    status_counts: dict[str, int] = field(default_factory=dict)
    failed: list[FailedRun] = field(default_factory=list)
    runs: list[RunMetric] = field(default_factory=list)
    groups: dict[tuple[str, float, float], GroupResult] = field(default_factory=dict)
    full_fraction: float | None = None
    best: dict[str, GroupResult] = field(default_factory=dict)
    fraction_p: dict[str, float] = field(default_factory=dict)
    fractions: dict[str, dict[float, GroupResult]] = field(default_factory=dict)
    corruption: dict[str, CorruptionResult] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, SeedStats]]] = field(default_factory=dict)
    clusters: list[ClusterRow] = field(default_factory=list)
    short_runs: list[str] = field(default_factory=list)
    runs_without_epochs: list[str] = field(default_factory=list)


def _key(value: float) -> float:
    # p and fractions come back from SQLite as floats; rounding makes 0.1 from two paths equal.
    return round(float(value), 6)


def _last_k_mean(epoch_rows: list[dict], average_last: int) -> tuple[float, float, int] | None:
    finished = sorted(
        (row for row in epoch_rows if row.get("top1") is not None), key=lambda row: row["epoch"]
    )
    tail = finished[-average_last:]
    if not tail:
        return None
    top5_values = [row["top5"] for row in tail if row.get("top5") is not None]
    top5 = statistics.fmean(top5_values) if top5_values else math.nan
    return statistics.fmean(row["top1"] for row in tail), top5, len(tail)


def _number(value: float | None) -> float:
    """A stored metric as a float; the store keeps a missing value (or NaN) as None."""
    return math.nan if value is None else float(value)


def _choose_p(candidates: Iterable[float], preferred: float) -> float:
    """``preferred`` when it is among ``candidates``, else the candidate nearest to it."""
    candidates = sorted(set(candidates))
    if preferred in candidates:
        return preferred
    return min(candidates, key=lambda p: (abs(p - preferred), p))


def summarize(store: ResultsStore, average_last: int, *, preset_name: str | None = None) -> Summary:
    """Aggregate the database into the numbers of the report (pure: reads, writes nothing).

    Args:
        store: the results database.
        average_last: K; each run's metric is the mean of top-1/top-5 over its last K
            finished epochs (fewer when it has fewer).
        preset_name: only runs of this preset (default: every run in the database).

    Returns:
        A :class:`Summary`; empty sections when nothing has finished.

    Raises:
        ValueError: ``average_last`` is not a positive integer.
    """
    check_int("average_last (K)", average_last, minimum=1)
    records = store.runs(preset=preset_name) if preset_name else store.runs()
    status_counts = dict.fromkeys(RUN_STATUSES, 0)
    for record in records:
        status_counts[record.status] = status_counts.get(record.status, 0) + 1
    failed = [
        FailedRun(
            record.run_id,
            record.regularizer,
            record.p,
            record.seed,
            record.train_fraction,
            record.attempts,
            _error_line(record.error),
        )
        for record in records
        if record.status == FAILED
    ]
    summary = Summary(average_last, status_counts, failed)
    finished = [record for record in records if record.status == FINISHED]
    epochs_by_run: dict[str, list[dict]] = defaultdict(list)
    for row in store.epochs():
        epochs_by_run[row["run_id"]].append(row)
    for record in finished:
        averaged = _last_k_mean(epochs_by_run.get(record.run_id, []), average_last)
        if averaged is None:
            if record.top1 is None:
                continue
            averaged = (record.top1, _number(record.top5), 0)
        top1, top5, n_epochs = averaged
        summary.runs.append(
            RunMetric(
                record.run_id,
                record.regularizer,
                _key(record.p),
                record.seed,
                _key(record.train_fraction),
                top1,
                top5,
                n_epochs,
            )
        )
        if n_epochs == 0:
            summary.runs_without_epochs.append(record.run_id)
        elif n_epochs < average_last:
            summary.short_runs.append(record.run_id)
    if not summary.runs:
        return summary
    _aggregate_groups(summary)
    _aggregate_corruptions(summary, store.corruption_results())
    _aggregate_curves(summary, epochs_by_run)
    _aggregate_clusters(summary, store.cluster_stats())
    return summary


def _aggregate_groups(summary: Summary) -> None:
    members: dict[tuple[str, float, float], list[RunMetric]] = defaultdict(list)
    for run in summary.runs:
        members[(run.regularizer, run.p, run.train_fraction)].append(run)
    for key, runs in sorted(members.items()):
        runs.sort(key=lambda run: run.seed)
        summary.groups[key] = GroupResult(
            *key,
            top1=SeedStats(tuple(run.top1 for run in runs)),
            top5=SeedStats(tuple(run.top5 for run in runs)),
            run_ids=tuple(run.run_id for run in runs),
        )
    full = max(run.train_fraction for run in summary.runs)
    summary.full_fraction = full
    for regularizer in ordered_regularizers({key[0] for key in summary.groups}):
        on_full = [g for (r, _, f), g in summary.groups.items() if r == regularizer and f == full]
        if on_full:
            # Highest mean top-1; a tie goes to the smaller p (the milder regularizer).
            summary.best[regularizer] = max(on_full, key=lambda g: (g.top1.mean, -g.p))
        smaller = {p for (r, p, f) in summary.groups if r == regularizer and f != full}
        best_p = summary.best[regularizer].p if regularizer in summary.best else None
        if smaller:
            row_p = _choose_p(smaller, best_p) if best_p is not None else min(smaller)
        elif best_p is not None:
            row_p = best_p
        else:
            continue
        summary.fraction_p[regularizer] = row_p
        summary.fractions[regularizer] = {
            f: group
            for (r, p, f), group in summary.groups.items()
            if r == regularizer and p == row_p
        }


def _aggregate_corruptions(summary: Summary, rows: list[dict]) -> None:
    runs = {run.run_id: run for run in summary.runs if run.train_fraction == summary.full_fraction}
    by_run: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["run_id"] in runs and row.get("top1") is not None:
            by_run[row["run_id"]].append(row)
    for regularizer in ordered_regularizers({runs[run_id].regularizer for run_id in by_run}):
        evaluated = [run_id for run_id in by_run if runs[run_id].regularizer == regularizer]
        best_p = summary.best[regularizer].p
        p = _choose_p({runs[run_id].p for run_id in evaluated}, best_p)
        per_seed: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        clean_from_runs = False
        for run_id in sorted(run_id for run_id in evaluated if runs[run_id].p == p):
            cells = {(row["corruption"], int(row["severity"])): row for row in by_run[run_id]}
            for cell, row in cells.items():
                per_seed[cell].append((row["top1"], _number(row["top5"])))
            if (CLEAN, 0) not in cells:
                clean_from_runs = True
                per_seed[(CLEAN, 0)].append((runs[run_id].top1, runs[run_id].top5))
            for severity in {s for (name, s) in cells if name != CLEAN}:
                corrupted = [
                    row for (name, s), row in cells.items() if s == severity and name != CLEAN
                ]
                per_seed[("mean", severity)].append(
                    (
                        statistics.fmean(row["top1"] for row in corrupted),
                        statistics.fmean(_number(row["top5"]) for row in corrupted),
                    )
                )
        summary.corruption[regularizer] = CorruptionResult(
            p,
            {
                cell: (
                    SeedStats(tuple(v[0] for v in values)),
                    SeedStats(tuple(v[1] for v in values)),
                )
                for cell, values in per_seed.items()
            },
            clean_from_runs,
        )


def _aggregate_curves(summary: Summary, epochs_by_run: dict[str, list[dict]]) -> None:
    for regularizer, group in summary.best.items():
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for run_id in group.run_ids:
            for row in epochs_by_run.get(run_id, []):
                if row.get("top1") is not None:
                    by_epoch[int(row["epoch"])].append(row["top1"])
        if by_epoch:
            summary.curves[regularizer] = [
                (epoch, SeedStats(tuple(values))) for epoch, values in sorted(by_epoch.items())
            ]


def _aggregate_clusters(summary: Summary, rows: list[dict]) -> None:
    runs = {run.run_id: run for run in summary.runs if run.regularizer == "dropcluster"}
    cells: dict[tuple[float, float, int, str], list[dict]] = defaultdict(list)
    # The store returns layers in network order; sorting by name would put "layer10" first.
    layer_order: dict[str, int] = {}
    for row in rows:
        run = runs.get(row["run_id"])
        if run is not None:
            layer = str(row["layer"])
            layer_order.setdefault(layer, len(layer_order))
            cells[(run.p, run.train_fraction, int(row["epoch"]), layer)].append(row)

    def table_order(item):
        p, fraction, epoch, layer = item[0]
        return (-fraction, p, epoch, layer_order[layer])

    for (p, fraction, epoch, layer), members in sorted(cells.items(), key=table_order):
        summary.clusters.append(
            ClusterRow(
                p,
                fraction,
                epoch,
                layer,
                SeedStats(tuple(float(row["structured"]) for row in members)),
                SeedStats(tuple(float(row["channels"]) for row in members)),
                SeedStats(
                    tuple(
                        float(row["refit_seconds"])
                        for row in members
                        if row.get("refit_seconds") is not None
                    )
                ),
            )
        )


def _error_line(error: str | None) -> str:
    """The line that says what went wrong: the last one (a traceback ends with the exception)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no error message)"


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt_stats(stats: SeedStats | None, *, with_n: bool = True) -> str:
    if stats is None or stats.n == 0:
        return ""
    std = _DASH if stats.std is None else f"{stats.std:.2f}"
    text = f"{stats.mean:.2f} ± {std}"
    return f"{text} (n={stats.n})" if with_n else text


def _fmt_p(p: float | None) -> str:
    return "" if p is None else f"{p:g}"


def _fmt_fraction(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _fmt_paper(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _header(summary: Summary, preset: Preset) -> list[str]:
    lines = [f"# DropCluster sweep report: preset `{preset.name}`", ""]
    command = preset.paper_command or "(none given in the preset)"
    if preset.scale == "paper":
        lines.append(
            f"**Paper scale** ({_dataset_name(preset.dataset)}): the paper's protocol; "
            "where the preset names one of the paper's data sets, its reported numbers stand "
            "beside the measured ones."
        )
    else:
        lines.append(
            f"**{preset.scale} scale: small model, short schedule, "
            f"{_dataset_name(preset.dataset)} — numbers are not comparable with the paper; "
            f"the paper-scale command is `{command}`.**"
        )
    lines += ["", preset.description, ""]
    counts = ", ".join(f"{status} {n}" for status, n in summary.status_counts.items())
    total = sum(summary.status_counts.values())
    lines.append(f"- Runs: {total} in the database ({counts or 'none'}).")
    lines.append(
        f"- Metric per run: mean test accuracy over its last K = {summary.average_last} finished "
        "epochs; per group: mean ± sample std (ddof=1) over seeds, n = number of seeds "
        f"({_DASH} with one seed). Accuracies in %. Failed runs are never counted."
    )
    if summary.short_runs:
        lines.append(
            f"- {len(summary.short_runs)} finished run(s) have fewer than K epochs and average all "
            f"they have: {', '.join(f'`{r}`' for r in summary.short_runs)}."
        )
    if summary.runs_without_epochs:
        lines.append(
            f"- {len(summary.runs_without_epochs)} finished run(s) have no epoch rows; their "
            "metric is the one stored with the run: "
            f"{', '.join(f'`{r}`' for r in summary.runs_without_epochs)}."
        )
    if summary.failed:
        lines += ["", "### Failed runs", ""]
        lines.append(
            _table(
                ["run", "regularizer", "p", "fraction", "seed", "attempts", "error (last line)"],
                [
                    [
                        f"`{run.run_id}`",
                        display_name(run.regularizer),
                        _fmt_p(run.p),
                        _fmt_fraction(run.train_fraction),
                        str(run.seed),
                        str(run.attempts),
                        run.error.replace("|", "\\|"),
                    ]
                    for run in summary.failed
                ],
            )
        )
    return lines


def _dataset_name(dataset: str | None) -> str:
    names = {
        "fashion-mnist": "Fashion-MNIST",
        "cifar100": "CIFAR-100",
        "tiny-imagenet": "Tiny ImageNet",
    }
    return names.get(dataset or "", dataset or "an unnamed data set")


def _full_set_section(summary: Summary, paper: dict | None, table_name: str) -> list[str]:
    full = summary.full_fraction
    lines = ["", f"## Full training set: each regularizer at its best p ({table_name})", ""]
    if full != 1.0:
        lines.append(
            f"The largest training fraction in this sweep, {_fmt_fraction(full)}, stands for the "
            "full training set here."
        )
        lines.append("")
    lines.append("Best p = highest mean top-1 over seeds (ties: the smaller p).")
    lines.append("")
    headers = ["regularizer", "p", "top-1 (%)", "top-5 (%)", "n"]
    if paper:
        headers = ["regularizer", "p measured", "p paper", "top-1 measured", "top-1 paper",
                   "top-5 measured", "top-5 paper", "n"]  # fmt: skip
    rows = []
    names = ordered_regularizers(set(summary.best) | set(paper["full"] if paper else ()))
    for regularizer in names:
        group = summary.best.get(regularizer)
        measured = [
            _fmt_p(group.p) if group else "",
            _fmt_stats(group.top1 if group else None, with_n=False),
            _fmt_stats(group.top5 if group else None, with_n=False),
        ]
        n = str(group.top1.n) if group else "0"
        if paper:
            reported = paper["full"].get(regularizer, {})
            rows.append([display_name(regularizer), measured[0], _fmt_p(reported.get("p")),
                         measured[1], _fmt_paper(reported.get("top1")),
                         measured[2], _fmt_paper(reported.get("top5")), n])  # fmt: skip
        else:
            rows.append([display_name(regularizer), *measured, n])
    lines.append(_table(headers, rows))
    lines += ["", "### Every p (top-1 %, full training set)", ""]
    ps = sorted({p for (_, p, f) in summary.groups if f == full})
    grid_rows, any_bold = [], False
    for regularizer in ordered_regularizers({r for (r, _, f) in summary.groups if f == full}):
        row = [display_name(regularizer)]
        n_ps = sum(1 for (r, _, f) in summary.groups if r == regularizer and f == full)
        for p in ps:
            group = summary.groups.get((regularizer, p, full))
            cell = _fmt_stats(group.top1 if group else None)
            if group and n_ps > 1 and summary.best[regularizer].p == p:
                cell, any_bold = f"**{cell}**", True
            row.append(cell)
        grid_rows.append(row)
    lines.append(_table(["regularizer"] + [f"p = {p:g}" for p in ps], grid_rows))
    if any_bold:
        lines += ["", "Bold: the best p of a regularizer with more than one p."]
    return lines


def _fraction_section(summary: Summary, paper: dict | None, table_name: str) -> list[str]:
    lines = ["", f"## Training-set size ({table_name})", ""]
    fractions_run = {f for (_, _, f) in summary.groups}
    if len(fractions_run) < 2 and not paper:
        lines.append("Only one training fraction has finished runs: nothing to compare yet.")
        return lines
    lines.append(
        "Top-1 (%) per training fraction, each regularizer at the p chosen on the full training "
        "set (the column says which p; where the smaller fractions were run at another p only, "
        "that p is used). Blank: not run or not finished."
    )
    lines.append("")
    regularizers = ordered_regularizers(
        set(summary.fractions) | set(paper["fraction"] if paper else ())
    )
    fractions = set(fractions_run)
    if paper:
        fractions |= {f for per_reg in paper["fraction"].values() for f in per_reg}
    headers = ["training set"]
    for regularizer in regularizers:
        label = display_name(regularizer)
        if regularizer in summary.fraction_p:
            label += f" (p={summary.fraction_p[regularizer]:g})"
        if paper:
            headers += [f"{label} measured", f"{display_name(regularizer)} paper"]
        else:
            headers.append(label)
    rows = []
    for fraction in sorted(fractions, reverse=True):
        row = [_fmt_fraction(fraction)]
        for regularizer in regularizers:
            group = summary.fractions.get(regularizer, {}).get(fraction)
            row.append(_fmt_stats(group.top1 if group else None))
            if paper:
                reported = paper["fraction"].get(regularizer, {}).get(fraction, {})
                row.append(_fmt_paper(reported.get("top1")))
        rows.append(row)
    lines.append(_table(headers, rows))
    return lines


@dataclass(frozen=True)
class _CorruptionComparison:
    """The numbers of the corruption table at one severity, before they are formatted.

    Attributes:
        severity: the severity of the corrupted rows (the lowest evaluated).
        columns: ``(regularizer, p)`` per column, p of the runs measured (None: none).
        rows: ``(test set, cells)``: the clean set, each corruption, then "mean"; one cell per
            column: the measured top-1 over seeds (None: not measured) and the paper's (None:
            the paper reports none here).
        with_paper: the paper's numbers stand beside the measured ones.
        other_corruptions: the paper's mean covers other corruptions than the measured mean.
    """

    severity: int
    columns: list[tuple[str, float | None]]
    rows: list[tuple[str, list[tuple[SeedStats | None, float | None]]]]
    with_paper: bool
    other_corruptions: bool


def _corruption_comparison(
    summary: Summary, paper: dict | None, severity: int
) -> _CorruptionComparison:
    """The measured (and, at severity 1, the paper's) top-1 per test set and regularizer."""
    paper_rows = paper["corruption"] if paper and severity == 1 else {}
    regularizers = ordered_regularizers(set(summary.corruption) | set(paper_rows))
    measured = {name for result in summary.corruption.values() for (name, _) in result.cells} - {
        CLEAN,
        "mean",
    }
    reported = {name for per_reg in paper_rows.values() for name in per_reg}
    corruptions = sorted(measured | reported, key=_paper_order)
    rows = []
    for name, level in [(CLEAN, 0), *((c, severity) for c in corruptions), ("mean", severity)]:
        cells = []
        for regularizer in regularizers:
            result = summary.corruption.get(regularizer)
            cell = result.cells.get((name, level)) if result else None
            reported_top1 = _paper_corruption(paper, regularizer, name) if paper_rows else None
            cells.append((cell[0] if cell else None, reported_top1))
        rows.append((name, cells))
    columns = [(r, summary.corruption[r].p if r in summary.corruption else None)
               for r in regularizers]  # fmt: skip
    return _CorruptionComparison(
        severity, columns, rows, bool(paper_rows), bool(paper_rows) and measured != reported
    )


def _paper_order(corruption: str) -> tuple[int, str]:
    """The paper's order of the corruptions; others after them, by name."""
    index = CORRUPTIONS.index(corruption) if corruption in CORRUPTIONS else len(CORRUPTIONS)
    return index, corruption


def _corruption_section(summary: Summary, paper: dict | None, table_name: str) -> list[str]:
    lines = ["", f"## Corrupted test sets ({table_name})", ""]
    if not summary.corruption:
        lines.append(
            "No corruption results in the database for finished runs on the full training "
            "fraction: this section fills in once corrupted test sets are evaluated."
        )
        return lines
    severities = sorted(
        {s for result in summary.corruption.values() for (name, s) in result.cells if name != CLEAN}
    )
    if not severities:
        lines.append("Only clean evaluations so far: no corrupted test set has been evaluated.")
        return lines
    comparison = _corruption_comparison(summary, paper, severities[0])
    lines += _corruption_notes(summary, paper, comparison)
    lines += ["", _corruption_table(comparison)]
    lines += ["", "### Mean over corruptions per severity (top-1 %)", ""]
    lines.append(_severity_means_table(summary, severities))
    return lines


def _corruption_notes(
    summary: Summary, paper: dict | None, comparison: _CorruptionComparison
) -> list[str]:
    notes = [
        f"Top-1 (%) at severity {comparison.severity} (the lowest evaluated), each regularizer at "
        f"its best p on the full training fraction ({_fmt_fraction(summary.full_fraction)}); "
        "clean = the uncorrupted test set; mean = per-seed mean over the corruptions, then over "
        "seeds."
    ]
    if comparison.with_paper:
        notes.append("The paper's clean row is its Table 3 (uncorrupted validation set).")
    if paper and not comparison.with_paper:
        notes.append("The paper reports no corruption numbers to compare with here.")
    if any(result.clean_from_runs for result in summary.corruption.values()):
        notes.append(
            "Where no clean evaluation is stored, the clean row is the runs' last-K test accuracy."
        )
    if comparison.other_corruptions:
        notes.append(
            "The measured mean covers only the corruptions measured here; the paper's covers its "
            "seven."
        )
    return notes


def _corruption_table(comparison: _CorruptionComparison) -> str:
    headers = ["corruption"]
    for regularizer, p in comparison.columns:
        label = display_name(regularizer) + ("" if p is None else f" (p={p:g})")
        if comparison.with_paper:
            headers += [f"{label} measured", f"{display_name(regularizer)} paper"]
        else:
            headers.append(label)
    rows = []
    for name, cells in comparison.rows:
        row = ["**mean over corruptions**" if name == "mean" else name.replace("_", " ")]
        for measured, reported in cells:
            row.append(_fmt_stats(measured))
            if comparison.with_paper:
                row.append(_fmt_paper(reported))
        rows.append(row)
    return _table(headers, rows)


def _severity_means_table(summary: Summary, severities: list[int]) -> str:
    """Top-1 of the clean set and the mean over corruptions at each severity."""
    regularizers = ordered_regularizers(summary.corruption)
    rows = []
    for severity in [0, *severities]:
        cell_name = CLEAN if severity == 0 else "mean"
        row = ["0 (clean)" if severity == 0 else str(severity)]
        for regularizer in regularizers:
            cell = summary.corruption[regularizer].cells.get((cell_name, severity))
            row.append(_fmt_stats(cell[0] if cell else None))
        rows.append(row)
    return _table(["severity"] + [display_name(r) for r in regularizers], rows)


def _paper_corruption(paper: dict, regularizer: str, name: str) -> float | None:
    if name == CLEAN:
        return (
            paper["full"].get(regularizer, {}).get("top1")
            if regularizer in paper["corruption"]
            else None
        )
    reported = paper["corruption"].get(regularizer)
    if not reported:
        return None
    if name == "mean":
        return statistics.fmean(row["top1"] for row in reported.values())
    return reported.get(name, {}).get("top1")


def _cluster_section(summary: Summary) -> list[str]:
    lines = ["", "## DropCluster: structured channels per refit", ""]
    if not summary.clusters:
        lines.append("No cluster statistics for finished DropCluster runs.")
        return lines
    lines.append(
        "Channels whose clustering met the requested number of clusters (structured) out of the "
        "layer's channels, at each refit epoch; mean ± std over seeds. Unstructured channels are "
        "dropped in training and inference."
    )
    lines.append("")
    rows = []
    for row in summary.clusters:
        share = 100 * row.structured.mean / row.channels.mean if row.channels.mean else math.nan
        rows.append([
            _fmt_p(row.p), _fmt_fraction(row.train_fraction), str(row.epoch), row.layer,
            _fmt_stats(row.structured, with_n=False), f"{row.channels.mean:g}",
            f"{share:.1f} %", _fmt_stats(row.refit_seconds, with_n=False), str(row.structured.n),
        ])  # fmt: skip
    headers = ["p", "training set", "epoch", "layer", "structured", "channels", "structured share",
               "refit (s)", "n"]  # fmt: skip
    lines.append(_table(headers, rows))
    return lines


def _draw_figures(summary: Summary, folder: Path, preset_name: str) -> tuple[list[str], str | None]:
    """Draw the figures; returns their markdown lines and, when matplotlib is missing, why not."""
    drawn: dict[str, Path] = {}
    try:
        if summary.corruption and any(
            name not in (CLEAN,)
            for result in summary.corruption.values()
            for (name, _) in result.cells
        ):
            for metric, index in (("top1", 0), ("top5", 1)):
                data = {}
                for regularizer, result in summary.corruption.items():
                    clean = result.cells.get((CLEAN, 0))
                    per_corruption: dict[str, dict[int, tuple[float, float | None]]] = defaultdict(
                        dict
                    )
                    for (name, severity), stats in result.cells.items():
                        if name == CLEAN:
                            continue
                        per_corruption[name][severity] = stats[index].mean_std()
                        if clean:
                            per_corruption[name][0] = clean[index].mean_std()
                    data[regularizer] = dict(per_corruption)
                drawn[f"corruption_{metric}"] = report_figures.plot_corruption_severity(
                    data, folder / f"corruption_{metric}.png", metric=metric,
                    title=f"{preset_name}: test {metric.replace('top', 'top-')} accuracy against "
                    "corruption severity (mean over seeds, bars: std)",
                )  # fmt: skip
        if len({f for per_reg in summary.fractions.values() for f in per_reg}) > 1:
            data = {
                regularizer: {f: group.top1.mean_std() for f, group in per_reg.items()}
                for regularizer, per_reg in summary.fractions.items()
            }
            drawn["training_fraction"] = report_figures.plot_training_fraction(
                data, folder / "training_fraction_top1.png",
                title=f"{preset_name}: top-1 against training-set size "
                "(mean over seeds, bars: std)",
            )  # fmt: skip
        if summary.curves:
            data = {
                regularizer: [(epoch, *stats.mean_std()) for epoch, stats in points]
                for regularizer, points in summary.curves.items()
            }
            drawn["learning_curves"] = report_figures.plot_learning_curves(
                data, folder / "learning_curves_top1.png", average_last=summary.average_last,
                title=f"{preset_name}: test top-1 per epoch, best p, "
                f"{_fmt_fraction(summary.full_fraction)} of the training set",
            )  # fmt: skip
    except ImportError as error:
        return [], str(error)
    captions = {
        "learning_curves": "Learning curves: test top-1 per epoch at each regularizer's best p "
        "(mean over seeds, band ±1 std)",
        "training_fraction": "Top-1 against training-set size",
        "corruption_top1": "Top-1 against corruption severity (paper, Figure 9)",
        "corruption_top5": "Top-5 against corruption severity (paper, Figure 10)",
    }
    lines = []
    for key, path in drawn.items():
        lines += [f"### {captions[key]}", "", f"![{captions[key]}]({path.name})", ""]
    return lines, None


def _analysis_section(out_dir: Path, summary: Summary, report_dir: Path) -> list[str]:
    """Links to the cluster analyses (``dropcluster analyze``) of this sweep's finished runs."""
    finished = {run.run_id for run in summary.runs}
    runs = Path(os.path.relpath(out_dir / RUNS_FOLDER, report_dir)).as_posix()
    analysed = sorted(
        path for path in (out_dir / RUNS_FOLDER).glob("*/analysis/analysis.md")
        if path.parent.parent.name in finished
    )  # fmt: skip
    if not analysed:
        return []
    lines = ["", "## Cluster analysis (paper, Figures 1-4 and 8)", ""]
    lines.append(
        "Cluster maps of every channel of the DropCluster slot, example masks and Spatial Hopkins "
        "per channel and per layer, made by `dropcluster analyze --checkpoint RUN`:"
    )
    lines.append("")
    for path in analysed:
        lines.append(f"- [{path.parent.parent.name}]({runs}/{path.parent.parent.name}/analysis/"
                     f"analysis.md)")  # fmt: skip
    first = analysed[0].parent
    if (first / "cluster_maps.png").is_file():
        run_id = first.parent.name
        lines += ["", f"![cluster maps of {run_id}]({runs}/{run_id}/analysis/cluster_maps.png)"]
    return lines


def write_report(
    store: ResultsStore,
    out_dir: str | Path,
    preset: Preset | dict[str, Any],
    *,
    average_last: int | None = None,
    report_dir: str | Path | None = None,
) -> Path:
    """Regenerate ``out_dir/report/report.md`` and its PNG figures from the database.

    Idempotent: every call rewrites the report and the figures from scratch and removes figures
    that no longer have data. Works on a partial sweep (sections without data say so).

    Args:
        store: the results database.
        out_dir: the sweep's output folder; the report goes to ``out_dir/report/``.
        preset: the sweep's :class:`~dropcluster.experiments.presets.Preset`, or its JSON form
            (the report shows its name, scale, description, data set, paper command and the
            paper's numbers for ``paper``).
        average_last: K, the number of last finished epochs averaged per run (default:
            ``preset.average_last``).
        report_dir: where the report goes instead of ``out_dir/report`` (a sweep folder on a
            read-only mount, say).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: a bad preset, no K given and none in the preset, or a bad K.
    """
    preset = as_preset(preset)
    if average_last is None:
        average_last = preset.average_last
        if average_last is None:
            raise ValueError("average_last (K) is neither given nor set in the preset")
    paper = paper_tables(preset.paper) if preset.paper else None
    summary = summarize(store, average_last, preset_name=preset.name)
    folder = Path(out_dir) / "report" if report_dir is None else Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_NAMES:
        (folder / name).unlink(missing_ok=True)
    lines = _header(summary, preset)
    if paper:
        lines += [
            "",
            f"Paper columns: the numbers the paper reports for {_dataset_name(preset.paper)} "
            "(4 seeds, last 50 epochs); blank where the paper reports nothing.",
        ]
    if not summary.runs:
        lines += ["", "**No run has finished yet**: tables and figures appear once runs finish."]
    else:
        tables = {
            "cifar100": ("Table 1", "Table 2"),
            "tiny-imagenet": ("Table 3", "Table 4"),
        }.get(preset.paper, ("as the paper's Tables 1 and 3", "as the paper's Tables 2 and 4"))
        lines += _full_set_section(summary, paper, tables[0])
        lines += _fraction_section(summary, paper, tables[1])
        table_5 = "Table 5" if preset.paper else "as the paper's Table 5"
        lines += _corruption_section(summary, paper, table_5)
        lines += _cluster_section(summary)
        figure_lines, missing = _draw_figures(summary, folder, preset.name)
        lines += ["", "## Figures", ""]
        if missing:
            lines.append(f"No figures: {missing}.")
        elif not figure_lines:
            lines.append("No figure has data yet.")
        lines += figure_lines
        lines += _analysis_section(Path(out_dir), summary, folder)
    return atomic_write_text(folder / "report.md", "\n".join(lines).rstrip() + "\n")
