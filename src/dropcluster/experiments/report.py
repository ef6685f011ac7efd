"""The sweep report: ``report/report.md`` and its figures, written from a :class:`Summary`.

:func:`write_report` summarizes the results (:mod:`dropcluster.experiments.summary`) and renders
them as Markdown tables that mirror the paper's Tables 1-5, the paired comparison with no
dropout, the cluster statistics, and the figures of
:mod:`dropcluster.experiments.report_figures`. The report never fails on a partial sweep:
sections without data say so. The paper's numbers, which are the paper's settings, stand
beside the plain arm only.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropcluster.data.corruptions import BENCHMARK, CORRUPTIONS, PAPER
from dropcluster.experiments import report_figures
from dropcluster.experiments.paper_results import paper_tables
from dropcluster.experiments.presets import Preset, as_preset
from dropcluster.experiments.report_figures import (
    arm_styles,
    display_name,
    ordered_regularizers,
    split_arm,
)
from dropcluster.experiments.statistics import SeedStats
from dropcluster.experiments.store import CLEAN
from dropcluster.experiments.summary import (
    BASELINE,
    CombinedResults,
    MceRow,
    PairedRow,
    ResultsSource,
    Summary,
    mce_rows,
    paired_corruption_rows,
    paired_rows,
    summarize,
)
from dropcluster.experiments.sweep import RUNS_FOLDER
from dropcluster.files import atomic_write_text

__all__ = ["ANALYSES_FOLDER", "FIGURE_NAMES", "write_report"]


#: Figures this module writes; stale ones are removed so a rerun leaves no outdated image.
FIGURE_NAMES = (
    "corruption_top1.png",
    "corruption_top5.png",
    "training_fraction_top1.png",
    "learning_curves_top1.png",
)


_DASH = "—"


#: Where a report written outside its sweep folder keeps copies of the runs' analyses.
ANALYSES_FOLDER = "analyses"


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
    if any(split_arm(arm)[1] for (arm, _, _) in summary.groups):
        lines.append(
            "- Arms: a name in brackets, such as DropCluster (ours), is a variant of the "
            "regularizer's settings, compared side by side with the plain one."
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
    if summary.unreadable:
        lines.append(
            f"- {len(summary.unreadable)} row(s) of the database could not be read and are left "
            f"out (`dropcluster collect` repairs them from the run folders): "
            + "; ".join(f"`{run_id}`: {reason}" for run_id, reason in summary.unreadable.items())
            + "."
        )
    lines += _assumptions(preset)
    if summary.failed:
        lines += ["", "### Failed runs", ""]
        lines.append(
            _table(
                ["run", "regularizer", "p", "fraction", "seed", "attempts", "error (last line)"],
                [
                    [
                        f"`{run.run_id}`",
                        display_name(run.arm),
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


def _assumptions(preset: Preset) -> list[str]:
    """The preset's assumptions as a list under a heading (nothing when it states none)."""
    if not preset.assumptions:
        return []
    lines = ["", "### Assumptions (settings the paper does not state; values chosen here)", ""]
    return lines + [f"- {assumption}" for assumption in preset.assumptions]


def _dataset_name(dataset: str | None) -> str:
    names = {
        "fashion-mnist": "Fashion-MNIST",
        "cifar10": "CIFAR-10",
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
        headers = [
            "regularizer",
            "p measured",
            "p paper",
            "top-1 measured",
            "top-1 paper",
            "top-5 measured",
            "top-5 paper",
            "n",
        ]
    rows = []
    # The paper's tables are keyed by bare regularizer, which is the plain arm's name: a
    # variant finds nothing there, so the paper's numbers stand beside the plain arm only.
    names = ordered_regularizers(set(summary.best) | set(paper["full"] if paper else ()))
    for arm in names:
        group = summary.best.get(arm)
        measured = [
            _fmt_p(group.p) if group else "",
            _fmt_stats(group.top1 if group else None, with_n=False),
            _fmt_stats(group.top5 if group else None, with_n=False),
        ]
        n = str(group.top1.n) if group else "0"
        if paper:
            reported = paper["full"].get(arm, {})
            rows.append(
                [
                    display_name(arm),
                    measured[0],
                    _fmt_p(reported.get("p")),
                    measured[1],
                    _fmt_paper(reported.get("top1")),
                    measured[2],
                    _fmt_paper(reported.get("top5")),
                    n,
                ]
            )
        else:
            rows.append([display_name(arm), *measured, n])
    lines.append(_table(headers, rows))
    lines += ["", "### Every p (top-1 %, full training set)", ""]
    ps = sorted({p for (_, p, f) in summary.groups if f == full})
    grid_rows, any_bold = [], False
    for arm in ordered_regularizers({a for (a, _, f) in summary.groups if f == full}):
        row = [display_name(arm)]
        n_ps = sum(1 for (a, _, f) in summary.groups if a == arm and f == full)
        for p in ps:
            group = summary.groups.get((arm, p, full))
            cell = _fmt_stats(group.top1 if group else None)
            if group and n_ps > 1 and summary.best[arm].p == p:
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
    lines += ["", _fraction_table(summary, paper, "top1")]
    lines += ["", "### Top-5 (%) per training fraction", ""]
    lines.append(_fraction_table(summary, paper, "top5"))
    return lines


def _fraction_table(summary: Summary, paper: dict | None, metric: str) -> str:
    """The training-fraction table of ``metric`` ("top1" or "top5"), with the paper's column
    beside each plain arm when there is a paper."""
    arms = ordered_regularizers(set(summary.fractions) | set(paper["fraction"] if paper else ()))
    fractions = {f for (_, _, f) in summary.groups}
    if paper:
        fractions |= {f for per_reg in paper["fraction"].values() for f in per_reg}
    headers = ["training set"]
    for arm in arms:
        label = display_name(arm)
        if arm in summary.fraction_p:
            label += f" (p={summary.fraction_p[arm]:g})"
        # Beside a paper's columns every measured column says so, a variant's too.
        headers.append(f"{label} measured" if paper else label)
        if _with_paper_column(paper, arm):
            headers.append(f"{display_name(arm)} paper")
    rows = []
    for fraction in sorted(fractions, reverse=True):
        row = [_fmt_fraction(fraction)]
        for arm in arms:
            group = summary.fractions.get(arm, {}).get(fraction)
            row.append(_fmt_stats(getattr(group, metric) if group else None))
            if _with_paper_column(paper, arm):
                reported = paper["fraction"].get(arm, {}).get(fraction, {})
                row.append(_fmt_paper(reported.get(metric)))
        rows.append(row)
    return _table(headers, rows)


def _with_paper_column(paper: dict | None, arm: str) -> bool:
    """Whether ``arm`` gets a paper column beside its measured one: with a paper, a plain arm
    does; a variant never does (the paper's numbers are for the paper's settings)."""
    return bool(paper) and split_arm(arm)[1] is None


#: A metric's position in the (top-1, top-5) pairs of :attr:`CorruptionResult.cells`.
_METRIC_INDEX = {"top1": 0, "top5": 1}


_METRIC_NAMES = {"top1": "Top-1", "top5": "Top-5"}


@dataclass(frozen=True)
class _CorruptionComparison:
    """The numbers of the corruption table at one severity, before they are formatted.

    Attributes:
        severity: the severity of the corrupted rows (the lowest evaluated).
        columns: ``(arm, p)`` per column, p of the runs measured (None: none).
        rows: ``(test set, cells)``: the clean set, each corruption, then "mean"; one cell per
            column: the measured accuracy over seeds (None: not measured) and the paper's (None:
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
    summary: Summary, paper: dict | None, severity: int, metric: str = "top1"
) -> _CorruptionComparison:
    """The measured (and, at severity 1, the paper's) ``metric`` per test set and arm."""
    paper_rows = paper["corruption"] if paper and severity == 1 else {}
    arms = ordered_regularizers(set(summary.corruption) | set(paper_rows))
    measured = {name for result in summary.corruption.values() for (name, _) in result.cells} - {
        CLEAN,
        "mean",
    }
    reported = {name for per_reg in paper_rows.values() for name in per_reg}
    corruptions = sorted(measured | reported, key=_paper_order)
    rows = []
    for name, level in [(CLEAN, 0), *((c, severity) for c in corruptions), ("mean", severity)]:
        cells = []
        for arm in arms:
            result = summary.corruption.get(arm)
            cell = result.cells.get((name, level)) if result else None
            paper_value = _paper_corruption(paper, arm, name, metric) if paper_rows else None
            cells.append((cell[_METRIC_INDEX[metric]] if cell else None, paper_value))
        rows.append((name, cells))
    columns = [(a, summary.corruption[a].p if a in summary.corruption else None) for a in arms]
    return _CorruptionComparison(
        severity, columns, rows, bool(paper_rows), bool(paper_rows) and measured != reported
    )


def _paper_order(corruption: str) -> tuple[int, str]:
    """The paper's 7 in its order, then the benchmark's and the extra ones; unknown names last."""
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
    lines += ["", f"### Top-5 (%) at severity {comparison.severity}", ""]
    lines.append(_corruption_table(_corruption_comparison(summary, paper, severities[0], "top5")))
    for metric in ("top1", "top5"):
        lines += ["", f"### Mean over corruptions per severity ({metric[:3]}-{metric[3:]} %)", ""]
        lines.append(_severity_means_table(summary, severities, metric))
    return lines


def _corruption_notes(
    summary: Summary, paper: dict | None, comparison: _CorruptionComparison
) -> list[str]:
    notes = [
        f"Top-1 (%) at severity {comparison.severity} (the lowest evaluated), each regularizer at "
        f"its best p on the full training fraction ({_fmt_fraction(summary.full_fraction)}); "
        "clean = the uncorrupted test set; mean = per-seed mean over the corruptions, then over "
        "seeds. Top-5 follows in the same form."
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
    paper_columns = [
        comparison.with_paper and split_arm(arm)[1] is None for arm, _ in comparison.columns
    ]
    for (arm, p), with_paper in zip(comparison.columns, paper_columns, strict=True):
        label = display_name(arm) + ("" if p is None else f" (p={p:g})")
        headers.append(f"{label} measured" if comparison.with_paper else label)
        if with_paper:
            headers.append(f"{display_name(arm)} paper")
    rows = []
    for name, cells in comparison.rows:
        row = ["**mean over corruptions**" if name == "mean" else name.replace("_", " ")]
        for (measured, reported), with_paper in zip(cells, paper_columns, strict=True):
            row.append(_fmt_stats(measured))
            if with_paper:
                row.append(_fmt_paper(reported))
        rows.append(row)
    return _table(headers, rows)


def _severity_means_table(summary: Summary, severities: list[int], metric: str = "top1") -> str:
    """``metric`` of the clean set and the mean over corruptions at each severity."""
    arms = ordered_regularizers(summary.corruption)
    rows = []
    for severity in [0, *severities]:
        cell_name = CLEAN if severity == 0 else "mean"
        row = ["0 (clean)" if severity == 0 else str(severity)]
        for arm in arms:
            cell = summary.corruption[arm].cells.get((cell_name, severity))
            row.append(_fmt_stats(cell[_METRIC_INDEX[metric]] if cell else None))
        rows.append(row)
    return _table(["severity"] + [display_name(a) for a in arms], rows)


def _paper_corruption(paper: dict, arm: str, name: str, metric: str = "top1") -> float | None:
    """The paper's ``metric`` of ``arm`` on test set ``name`` at severity 1 (None: not
    reported; always None for a variant, as the paper's tables are keyed by regularizer)."""
    if name == CLEAN:
        return paper["full"].get(arm, {}).get(metric) if arm in paper["corruption"] else None
    reported = paper["corruption"].get(arm)
    if not reported:
        return None
    if name == "mean":
        return statistics.fmean(row[metric] for row in reported.values())
    return reported.get(name, {}).get(metric)


def _mce_section(summary: Summary) -> list[str]:
    """The mean corruption error over the 15 benchmark corruptions (nothing when the sweep
    evaluated no corrupted test set; a line saying what is missing when no run has all 75)."""
    cells = {cell for result in summary.corruption.values() for cell in result.cells}
    evaluated = {name for (name, _) in cells} - {CLEAN, "mean"}
    if not evaluated & (set(BENCHMARK) - set(PAPER)):
        return []  # the paper's seven only: no mCE was asked for
    lines = ["", "## Mean corruption error (mCE, the 15 benchmark corruptions)", ""]
    rows = mce_rows(summary)
    if not rows:
        missing = sorted(set(BENCHMARK) - evaluated, key=BENCHMARK.index)
        severities = sorted({s for (name, s) in cells if name in evaluated})
        lacking = ", ".join(missing) if missing else "none"
        lines.append(
            f"mCE needs each run evaluated on the 15 benchmark corruptions at severities 1-5; "
            f"this sweep's runs lack corruptions: {lacking}; severities evaluated: "
            f'{severities}. Set the preset\'s `evaluate.corruptions` to `"benchmark"` and '
            f"`evaluate.severities` to `[1, 2, 3, 4, 5]` for this table."
        )
        return lines
    lines.append(
        "mCE: per run, the mean top-1 error (%) over the 15 benchmark corruptions x severities "
        "1-5 (unnormalised, as CIFAR-10/100-C tables report it; lower is better), then mean ± sd "
        "over seeds. CE vs none: per seed, each corruption's error summed over severities "
        "divided by that of the no-dropout run of the same seed, averaged over the 15 "
        "corruptions (100 = as robust as no dropout). Δ mCE = arm − no dropout per seed, with "
        "the paired t test of the tables below; lower in: the seeds where the arm's mCE is "
        "lower. Full training fraction, the p of the corruption section."
    )
    lines += ["", _mce_table(rows)]
    return lines


def _mce_table(rows: list[MceRow]) -> str:
    headers = ["regularizer", "p", "mCE (%)", "CE vs none (%)", "Δ mCE vs none", "t", "p value"]
    headers.append("lower in")
    table = []
    for row in rows:
        paired = row.test is not None
        table.append(
            [
                display_name(row.arm),
                _fmt_p(row.p),
                _fmt_stats(row.mce),
                _fmt_stats(row.normalised, with_n=False) or _DASH,
                _fmt_delta(row.test.stats) if paired else _DASH,
                _fmt_t(row.test.t) if paired else _DASH,
                _fmt_p_value(row.test.p_value) if paired else _DASH,
                f"{row.lower} of {row.test.n}" if paired else _DASH,
            ]
        )
    return _table(headers, table)


def _paired_section(summary: Summary) -> list[str]:
    """The paired comparison of every arm with no dropout: nothing when the sweep has no
    finished no-dropout run; a line saying why when no cell has 2 paired seeds yet."""
    if not any(split_arm(arm)[0] == BASELINE for (arm, _, _) in summary.groups):
        return []
    lines = ["", "## Paired comparison with no dropout", ""]
    tables = {metric: paired_rows(summary, metric) for metric in ("top1", "top5")}
    corrupted = paired_corruption_rows(summary)
    if not tables["top1"] and not corrupted:
        lines.append(
            "No arm has 2 or more seeds paired with no-dropout runs yet: this section fills in "
            "once it has."
        )
        return lines
    lines += _paired_notes(tables["top1"] + corrupted)
    for metric, rows in tables.items():
        if rows:
            name = f"{metric[:3]}-{metric[3:]}"
            lines += ["", f"### {_METRIC_NAMES[metric]} (%), paired with no dropout", ""]
            lines.append(_paired_table(rows, name, with_fraction=True))
    if corrupted:
        lines += ["", "### Mean top-1 (%) over the corrupted test sets, paired with no dropout", ""]
        lines.append(
            "Per run, top-1 averaged over every corruption and severity that both runs of a "
            "pair were evaluated on (the clean test set left out); full training fraction, the "
            "p of the corruption section."
        )
        lines += ["", _paired_table(corrupted, "mean corrupted top-1", with_fraction=False)]
    lines += ["", _paired_caveat(tables["top1"] + tables["top5"] + corrupted)]
    return lines


def _paired_notes(rows: list[PairedRow]) -> list[str]:
    """What the paired tables show, and which no-dropout runs each variant is paired with."""
    notes = [
        "Each run is paired with the no-dropout run of the same seed and training fraction. "
        "Δ = arm − no dropout per seed, in percentage points, as mean ± sd (ddof=1) over the n "
        "pairs; t = mean Δ / (sd / √n) with n − 1 degrees of freedom; p value: two-sided, "
        "Student's t; better in k of n: the seeds where the arm is ahead. Each arm is at the p "
        "of the tables above; on the full training set that p is the best of the grid on these "
        "same runs, which favours the arm. Cells with fewer than 2 paired seeds are left out."
    ]
    # The rows come in table order; dict.fromkeys keeps it and drops repeats.
    variants = dict.fromkeys((row.arm, row.baseline) for row in rows if split_arm(row.arm)[1])
    if variants:
        pairs = "; ".join(f"{display_name(a)} with {display_name(b)}" for a, b in variants)
        notes += [
            "",
            "A variant is paired with the no-dropout runs of the same variant where the sweep has "
            f"them, else with the plain no-dropout runs: {pairs}.",
        ]
    return notes


def _paired_table(rows: list[PairedRow], metric_name: str, *, with_fraction: bool) -> str:
    """The table of paired rows: the arm's metric, the paired Δ, t, p value and the count of
    seeds where the arm is ahead."""
    headers = ["regularizer", "p"] + (["training set"] if with_fraction else [])
    headers += [f"{metric_name} (%)", f"Δ {metric_name} vs none", "t", "p value", "better in"]
    lines = []
    for row in rows:
        cells = [display_name(row.arm), _fmt_p(row.p)]
        if with_fraction:
            cells.append(_fmt_fraction(row.train_fraction))
        cells += [
            _fmt_stats(row.values, with_n=False),
            _fmt_delta(row.test.stats),
            _fmt_t(row.test.t),
            _fmt_p_value(row.test.p_value),
            f"{row.test.better} of {row.test.n}",
        ]
        lines.append(cells)
    return _table(headers, lines)


def _paired_caveat(rows: list[PairedRow]) -> str:
    """A plain-language reading of the p values, and why some small ones are expected."""
    arms = {row.arm for row in rows}
    seeds = max(row.test.n for row in rows)
    return (
        "How to read it: p < 0.05 means that a mean Δ at least this far from 0 would come up by "
        "chance in fewer than 5 % of sweeps if the arm made no difference on average; it is not "
        "the probability that the arm is better, and a large p does not show that the arms are "
        f"equal (few seeds give the test little power). With up to {seeds} seeds, "
        f"{len(arms)} arm(s) and {len(rows)} comparisons here, some small p values are expected "
        "by chance (no correction for multiple comparisons). — : every seed gave the same Δ, "
        "where the t test is undefined."
    )


def _fmt_delta(stats: SeedStats) -> str:
    std = _DASH if stats.std is None else f"{stats.std:.2f}"
    return f"{stats.mean:+.2f} ± {std}"


def _fmt_t(t: float | None) -> str:
    if t is None:
        return _DASH
    if math.isinf(t):
        return "∞" if t > 0 else "−∞"
    return f"{t:.2f}"


def _fmt_p_value(p_value: float | None) -> str:
    if p_value is None:
        return _DASH
    if p_value == 0:
        return "0"
    return "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"


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
        rows.append(
            [
                display_name(row.arm),
                _fmt_p(row.p),
                _fmt_fraction(row.train_fraction),
                str(row.epoch),
                row.layer,
                _fmt_stats(row.structured, with_n=False),
                f"{row.channels.mean:g}",
                f"{share:.1f} %",
                _fmt_stats(row.refit_seconds, with_n=False),
                str(row.structured.n),
            ]
        )
    headers = [
        "regularizer",
        "p",
        "training set",
        "epoch",
        "layer",
        "structured",
        "channels",
        "structured share",
        "refit (s)",
        "n",
    ]
    lines.append(_table(headers, rows))
    return lines


def _corruption_figure_data(summary: Summary, index: int) -> dict:
    """``data[arm][corruption][severity] = (mean, std)`` of the metric at ``index`` (0: top-1,
    1: top-5), severity 0 being the clean test set."""
    data = {}
    for arm, result in summary.corruption.items():
        clean = result.cells.get((CLEAN, 0))
        per_corruption: dict[str, dict[int, tuple[float, float | None]]] = defaultdict(dict)
        for (name, severity), stats in result.cells.items():
            if name == CLEAN:
                continue
            per_corruption[name][severity] = stats[index].mean_std()
            if clean:
                per_corruption[name][0] = clean[index].mean_std()
        data[arm] = dict(per_corruption)
    return data


def _draw_figures(summary: Summary, folder: Path, preset_name: str) -> tuple[list[str], str | None]:
    """Draw the figures; returns their markdown lines and, when matplotlib is missing, why not."""
    drawn: dict[str, Path] = {}
    # One style per arm for the whole report: an arm looks the same in every figure.
    styles = arm_styles({arm for (arm, _, _) in summary.groups} | set(summary.corruption))
    try:
        if summary.corruption and any(
            name not in (CLEAN,)
            for result in summary.corruption.values()
            for (name, _) in result.cells
        ):
            for metric, index in (("top1", 0), ("top5", 1)):
                drawn[f"corruption_{metric}"] = report_figures.plot_corruption_severity(
                    _corruption_figure_data(summary, index),
                    folder / f"corruption_{metric}.png",
                    metric=metric,
                    styles=styles,
                    title=f"{preset_name}: test {metric.replace('top', 'top-')} accuracy against "
                    "corruption severity (mean over seeds, bars: std)",
                )
        if len({f for per_arm in summary.fractions.values() for f in per_arm}) > 1:
            data = {
                arm: {f: group.top1.mean_std() for f, group in per_arm.items()}
                for arm, per_arm in summary.fractions.items()
            }
            drawn["training_fraction"] = report_figures.plot_training_fraction(
                data,
                folder / "training_fraction_top1.png",
                styles=styles,
                title=f"{preset_name}: top-1 against training-set size "
                "(mean over seeds, bars: std)",
            )
        if summary.curves:
            data = {
                arm: [(epoch, *stats.mean_std()) for epoch, stats in points]
                for arm, points in summary.curves.items()
            }
            drawn["learning_curves"] = report_figures.plot_learning_curves(
                data,
                folder / "learning_curves_top1.png",
                average_last=summary.average_last,
                styles=styles,
                title=f"{preset_name}: test top-1 per epoch, best p, "
                f"{_fmt_fraction(summary.full_fraction)} of the training set",
            )
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


def _parts_section(others: list[Preset]) -> list[str]:
    """What the other sweeps of a combined report (``report --with``) ran: their settings."""
    lines = ["", "## Other sweeps in this report", ""]
    for other in others:
        lines += [f"### Preset `{other.name}`", "", other.description, ""]
        if other.assumptions:
            lines.append("Its assumptions (settings the paper does not state):")
            lines += ["", *(f"- {assumption}" for assumption in other.assumptions), ""]
    return lines


def _analysis_section(out_dir: Path, summary: Summary, report_dir: Path) -> list[str]:
    """Links to the cluster analyses (``dropcluster analyze``) of this sweep's finished runs.

    A report written outside the sweep folder (``--to``) gets a copy of each analysis in its
    ``analyses/`` folder, so that it stands alone (a docs folder, an archive)."""
    finished = {run.run_id for run in summary.runs}
    analysed = sorted(
        path.parent
        for path in (out_dir / RUNS_FOLDER).glob("*/analysis/analysis.md")
        if path.parent.parent.name in finished
    )
    copies = report_dir / ANALYSES_FOLDER
    shutil.rmtree(copies, ignore_errors=True)  # none stale from an earlier report
    if not analysed:
        return []
    if not report_dir.resolve().is_relative_to(out_dir.resolve()):
        for folder in analysed:
            shutil.copytree(folder, copies / folder.parent.name)
        links = {
            folder.parent.name: f"{ANALYSES_FOLDER}/{folder.parent.name}" for folder in analysed
        }
    else:
        runs = Path(os.path.relpath(out_dir / RUNS_FOLDER, report_dir)).as_posix()
        links = {folder.parent.name: f"{runs}/{folder.parent.name}/analysis" for folder in analysed}
    lines = ["", "## Cluster analysis (paper, Figures 1-4 and 8)", ""]
    lines.append(
        "Cluster maps of every channel of the DropCluster slot, example masks and Spatial Hopkins "
        "per channel and per layer, made by `dropcluster analyze --checkpoint RUN`:"
    )
    lines.append("")
    for run_id, link in links.items():
        lines.append(f"- [{run_id}]({link}/analysis.md)")
    run_id, link = next(iter(links.items()))
    if (analysed[0] / "cluster_maps.png").is_file():
        lines += ["", f"![cluster maps of {run_id}]({link}/cluster_maps.png)"]
    return lines


def write_report(
    store: ResultsSource,
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
        store: the results database, or several sweeps' (:class:`CombinedResults`).
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
    if isinstance(store, CombinedResults):
        summary = summarize(store, average_last)  # each part keeps its own preset's runs
    else:
        summary = summarize(store, average_last, preset_name=preset.name)
    folder = Path(out_dir) / "report" if report_dir is None else Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_NAMES:
        (folder / name).unlink(missing_ok=True)
    lines = _header(summary, preset)
    if isinstance(store, CombinedResults):
        lines += _parts_section(store.presets[1:])
    if paper:
        lines += [
            "",
            f"Paper columns: the numbers the paper reports for {_dataset_name(preset.paper)} "
            "(4 seeds, last 50 epochs); blank where the paper reports nothing. They are the "
            "paper's settings, so they stand beside the plain regularizer only, never beside a "
            "variant (a name in brackets).",
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
        lines += _mce_section(summary)
        lines += _paired_section(summary)
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
