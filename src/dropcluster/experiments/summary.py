"""A sweep's results aggregated into the numbers the report shows (:func:`summarize`).

The protocol follows the paper (section 6): a run's metric is the mean test accuracy over its
last K finished epochs; a regularizer's result is the mean and sample standard deviation of
that metric over seeds, at the drop rate p with the highest mean top-1 on the full training set.
Only finished runs count; failed runs are listed with their error and never aggregated.

What the report compares are *arms*: a regularizer, or a regularizer under a variant of the
settings (``"dropcluster:ours"``, see :attr:`~dropcluster.experiments.store.RunRecord.arm`).
Beyond the paper's tables every arm's runs are paired with the no-dropout runs of the same seed
(:func:`paired_rows`). The results come from a :class:`ResultsSource`: one sweep's database, or
several sweeps read as one (:class:`CombinedResults`).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dropcluster.compat import error_reason
from dropcluster.experiments.presets import Preset, arm_name
from dropcluster.experiments.report_figures import ordered_regularizers, split_arm
from dropcluster.experiments.statistics import PairedTest, SeedStats, paired_t_test
from dropcluster.experiments.store import (
    CLEAN,
    FAILED,
    FINISHED,
    RUN_STATUSES,
    ResultsStore,
    RunRecord,
)
from dropcluster.robustness.metrics import corruption_errors, mean_corruption_error
from dropcluster.validation import check_int

__all__ = [
    "BASELINE",
    "ClusterRow",
    "CombinedResults",
    "CorruptionResult",
    "FailedRun",
    "GroupResult",
    "MceRow",
    "PairedRow",
    "ResultsSource",
    "RunMetric",
    "Summary",
    "mce_rows",
    "paired_corruption_rows",
    "paired_rows",
    "summarize",
]


class ResultsSource(Protocol):
    """What :func:`summarize` reads: a sweep's :class:`~dropcluster.experiments.store.ResultsStore`,
    or :class:`CombinedResults`."""

    def runs(self, *, preset: str | None = None) -> list[RunRecord]:
        """The readable runs (of one preset)."""
        ...

    def unreadable_runs(self, *, preset: str | None = None) -> dict[str, str]:
        """The rows that could not be read, with the reason."""
        ...

    def epochs(self) -> list[dict]:
        """Every per-epoch row."""
        ...

    def corruption_results(self) -> list[dict]:
        """Every corruption row."""
        ...

    def cluster_stats(self) -> list[dict]:
        """Every cluster-statistics row."""
        ...


#: The arm every other arm is paired with (or its variant, see :func:`_baseline_arm`).
BASELINE = "none"


@dataclass(frozen=True)
class RunMetric:
    """The metric of one finished run: its accuracy averaged over its last K finished epochs.

    Attributes:
        arm: what the report compares the run under (``"dropcluster"``, ``"dropcluster:ours"``).
        epochs_averaged: how many epochs went into the mean (fewer than K when the run has
            fewer epochs; 0 when the epochs table had none and the run's own summary is used).
    """

    run_id: str
    regularizer: str
    arm: str
    p: float
    seed: int
    train_fraction: float
    top1: float
    top5: float
    epochs_averaged: int


@dataclass(frozen=True)
class GroupResult:
    """The runs of one (arm, p, training fraction) cell, aggregated over seeds."""

    arm: str
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
    arm: str
    p: float
    seed: int
    train_fraction: float
    attempts: int
    error: str


@dataclass(frozen=True)
class CorruptionResult:
    """One arm's accuracy on corrupted test sets, at one p, aggregated over seeds.

    Attributes:
        p: the drop rate of the runs aggregated.
        cells: ``cells[(corruption, severity)] = (top1, top5)``; ``("clean", 0)`` is the
            uncorrupted test set and ``("mean", s)`` the per-seed mean over the corruptions of
            severity ``s``, then aggregated over seeds.
        clean_from_runs: True when the clean row is the runs' own last-K metric because the
            database holds no ``"clean"`` evaluation for them.
        corrupted_top1: ``corrupted_top1[seed][(corruption, severity)]``: each run's top-1 on
            every corrupted test set (not the clean one), for the paired comparison.
    """

    p: float
    cells: dict[tuple[str, int], tuple[SeedStats, SeedStats]]
    clean_from_runs: bool = False
    corrupted_top1: dict[int, dict[tuple[str, int], float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterRow:
    """DropCluster's structured channels at one refit, averaged over the seeds of a group.

    Attributes:
        arm: the DropCluster arm of the runs (``"dropcluster"``, ``"dropcluster:ours"``, ...).
    """

    arm: str
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
        groups: ``groups[(arm, p, fraction)]`` over seeds; an arm is a regularizer or
            ``regularizer:variant`` (:attr:`~dropcluster.experiments.store.RunRecord.arm`), and
            every mapping below is keyed by arm too.
        full_fraction: the largest training fraction with a finished run (1.0 for a full sweep),
            where p is chosen; None when nothing finished.
        best: ``best[arm]``: the group at the best p on ``full_fraction``.
        fraction_p: ``fraction_p[arm]``: the p of that arm's row in the training-fraction
            table (the best p unless the smaller fractions were run at another p only).
        fractions: ``fractions[arm][fraction]``: groups at ``fraction_p``.
        corruption: ``corruption[arm]`` on the full training fraction.
        curves: ``curves[arm] = [(epoch, top1 over seeds), ...]`` at the best p on the full
            fraction.
        clusters: DropCluster refit statistics of finished runs, of every DropCluster arm.
        short_runs: finished runs that averaged fewer than K epochs.
        runs_without_epochs: finished runs with no epoch rows, whose metric is the one the
            runner stored with the run.
        unreadable: rows of the database that could not be read, by run id, with the reason
            (``dropcluster collect`` repairs them); never aggregated.
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
    unreadable: dict[str, str] = field(default_factory=dict)


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


def summarize(
    store: ResultsSource, average_last: int, *, preset_name: str | None = None
) -> Summary:
    """Aggregate the results into the numbers of the report (pure: reads, writes nothing).

    Args:
        store: a sweep's results database, or several read as one (:class:`CombinedResults`).
        average_last: K; each run's metric is the mean of top-1/top-5 over its last K
            finished epochs (fewer when it has fewer).
        preset_name: only runs of this preset (default: every run in the database).

    Returns:
        A :class:`Summary`; empty sections when nothing has finished.

    Raises:
        ValueError: ``average_last`` is not a positive integer.
    """
    check_int("average_last (K)", average_last, minimum=1)
    records = store.runs(preset=preset_name)
    status_counts = dict.fromkeys(RUN_STATUSES, 0)
    for record in records:
        status_counts[record.status] = status_counts.get(record.status, 0) + 1
    failed = [
        FailedRun(
            record.run_id,
            record.regularizer,
            record.arm,
            record.p,
            record.seed,
            record.train_fraction,
            record.attempts,
            error_reason(record.error),
        )
        for record in records
        if record.status == FAILED
    ]
    summary = Summary(average_last, status_counts, failed)
    summary.unreadable = store.unreadable_runs(preset=preset_name)
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
                record.arm,
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
        members[(run.arm, run.p, run.train_fraction)].append(run)
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
    for arm in ordered_regularizers({key[0] for key in summary.groups}):
        on_full = [g for (a, _, f), g in summary.groups.items() if a == arm and f == full]
        if on_full:
            # Highest mean top-1; a tie goes to the smaller p (the milder regularizer).
            summary.best[arm] = max(on_full, key=lambda g: (g.top1.mean, -g.p))
        smaller = {p for (a, p, f) in summary.groups if a == arm and f != full}
        best_p = summary.best[arm].p if arm in summary.best else None
        if smaller:
            row_p = _choose_p(smaller, best_p) if best_p is not None else min(smaller)
        elif best_p is not None:
            row_p = best_p
        else:
            continue
        summary.fraction_p[arm] = row_p
        summary.fractions[arm] = {
            f: group for (a, p, f), group in summary.groups.items() if a == arm and p == row_p
        }


def _aggregate_corruptions(summary: Summary, rows: list[dict]) -> None:
    runs = {run.run_id: run for run in summary.runs if run.train_fraction == summary.full_fraction}
    by_run: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["run_id"] in runs and row.get("top1") is not None:
            by_run[row["run_id"]].append(row)
    for arm in ordered_regularizers({runs[run_id].arm for run_id in by_run}):
        evaluated = [run_id for run_id in by_run if runs[run_id].arm == arm]
        p = _choose_p({runs[run_id].p for run_id in evaluated}, summary.best[arm].p)
        chosen = sorted(run_id for run_id in evaluated if runs[run_id].p == p)
        summary.corruption[arm] = _corruption_result(p, [(runs[r], by_run[r]) for r in chosen])


def _corruption_result(p: float, evaluated: list[tuple[RunMetric, list[dict]]]) -> CorruptionResult:
    """The corruption results of one arm's runs at ``p`` (each run with its evaluation rows)."""
    per_seed: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    corrupted_top1: dict[int, dict[tuple[str, int], float]] = {}
    clean_from_runs = False
    for run, rows in evaluated:
        cells = {(row["corruption"], int(row["severity"])): row for row in rows}
        for cell, row in cells.items():
            per_seed[cell].append((row["top1"], _number(row["top5"])))
        if (CLEAN, 0) not in cells:
            clean_from_runs = True
            per_seed[(CLEAN, 0)].append((run.top1, run.top5))
        corrupted = {cell: row for cell, row in cells.items() if cell[0] != CLEAN}
        corrupted_top1[run.seed] = {cell: row["top1"] for cell, row in corrupted.items()}
        for severity in {s for (_, s) in corrupted}:
            at_severity = [row for (_, s), row in corrupted.items() if s == severity]
            per_seed[("mean", severity)].append(
                (
                    statistics.fmean(row["top1"] for row in at_severity),
                    statistics.fmean(_number(row["top5"]) for row in at_severity),
                )
            )
    cells_over_seeds = {
        cell: (SeedStats(tuple(v[0] for v in values)), SeedStats(tuple(v[1] for v in values)))
        for cell, values in per_seed.items()
    }
    return CorruptionResult(p, cells_over_seeds, clean_from_runs, corrupted_top1)


def _aggregate_curves(summary: Summary, epochs_by_run: dict[str, list[dict]]) -> None:
    for arm, group in summary.best.items():
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for run_id in group.run_ids:
            for row in epochs_by_run.get(run_id, []):
                if row.get("top1") is not None:
                    by_epoch[int(row["epoch"])].append(row["top1"])
        if by_epoch:
            summary.curves[arm] = [
                (epoch, SeedStats(tuple(values))) for epoch, values in sorted(by_epoch.items())
            ]


def _aggregate_clusters(summary: Summary, rows: list[dict]) -> None:
    # Every DropCluster arm: variants refit clusters too, under their own settings.
    runs = {run.run_id: run for run in summary.runs if run.regularizer == "dropcluster"}
    cells: dict[tuple[str, float, float, int, str], list[dict]] = defaultdict(list)
    # The store returns layers in network order; sorting by name would put "layer10" first.
    layer_order: dict[str, int] = {}
    for row in rows:
        run = runs.get(row["run_id"])
        if run is not None:
            layer = str(row["layer"])
            layer_order.setdefault(layer, len(layer_order))
            cells[(run.arm, run.p, run.train_fraction, int(row["epoch"]), layer)].append(row)
    arm_order = {arm: i for i, arm in enumerate(ordered_regularizers({key[0] for key in cells}))}

    def table_order(item):
        arm, p, fraction, epoch, layer = item[0]
        return (arm_order[arm], -fraction, p, epoch, layer_order[layer])

    for (arm, p, fraction, epoch, layer), members in sorted(cells.items(), key=table_order):
        summary.clusters.append(
            ClusterRow(
                arm,
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


@dataclass(frozen=True)
class PairedRow:
    """One arm's runs paired by seed with no dropout's, on one training fraction (or on the
    corrupted test sets).

    Attributes:
        arm, baseline: the arm and the no-dropout arm its runs are paired with.
        values: the arm's metric over the paired seeds.
        test: the paired t test of the differences arm - baseline.
    """

    arm: str
    baseline: str
    p: float
    train_fraction: float
    values: SeedStats
    test: PairedTest


def _baseline_arm(arm: str, arms: Iterable[str]) -> str | None:
    """The no-dropout arm ``arm`` is paired with: no dropout under the same variant when
    ``arms`` has it, else plain no dropout (None: neither)."""
    arms = set(arms)
    same_variant = arm_name(BASELINE, split_arm(arm)[1])
    if same_variant in arms:
        return same_variant
    return BASELINE if BASELINE in arms else None


def _compared_arms(arms: Iterable[str]) -> list[tuple[str, str]]:
    """``(arm, baseline)`` of every arm that is not a no-dropout arm and has a baseline."""
    arms = set(arms)
    pairs = []
    for arm in ordered_regularizers(arms):
        baseline = _baseline_arm(arm, arms)
        if split_arm(arm)[0] != BASELINE and baseline is not None:
            pairs.append((arm, baseline))
    return pairs


def _shown_group(summary: Summary, arm: str, fraction: float) -> GroupResult | None:
    """The group the tables show for ``arm`` on ``fraction``: the best p on the full training
    fraction, the training-fraction table's p on the others."""
    if fraction == summary.full_fraction:
        return summary.best.get(arm)
    return summary.fractions.get(arm, {}).get(fraction)


def _paired(
    arm: str, baseline: str, p: float, fraction: float, values: dict[int, float], base: dict
) -> PairedRow | None:
    """The row of ``values`` and ``base`` (seed -> metric) paired by seed; None with fewer
    than 2 seeds where both have a number."""
    seeds = sorted(
        s
        for s in values.keys() & base.keys()
        if not math.isnan(values[s]) and not math.isnan(base[s])
    )
    if len(seeds) < 2:
        return None
    test = paired_t_test(values[s] - base[s] for s in seeds)
    return PairedRow(arm, baseline, p, fraction, SeedStats(tuple(values[s] for s in seeds)), test)


def paired_rows(summary: Summary, metric: str) -> list[PairedRow]:
    """Every arm against no dropout, per training fraction, paired by seed.

    Args:
        summary: from :func:`summarize`.
        metric: ``"top1"`` or ``"top5"``.

    Returns:
        One row per arm (in table order) and training fraction (largest first) with 2 or more
        paired seeds; each arm at the p the tables show (:func:`_shown_group`).
    """
    runs = {run.run_id: run for run in summary.runs}
    fractions = sorted({f for (_, _, f) in summary.groups}, reverse=True)
    rows = []
    for arm, baseline in _compared_arms(a for (a, _, _) in summary.groups):
        for fraction in fractions:
            group = _shown_group(summary, arm, fraction)
            base_group = _shown_group(summary, baseline, fraction)
            if group is None or base_group is None:
                continue
            values, base = (
                {runs[r].seed: getattr(runs[r], metric) for r in g.run_ids}
                for g in (group, base_group)
            )
            row = _paired(arm, baseline, group.p, fraction, values, base)
            if row is not None:
                rows.append(row)
    return rows


def paired_corruption_rows(summary: Summary) -> list[PairedRow]:
    """Every arm against no dropout on the corrupted test sets, paired by seed: the metric is a
    run's top-1 averaged over every corruption and severity that both runs of the pair were
    evaluated on.

    Returns:
        One row per arm with corruption results and 2 or more paired seeds.
    """
    rows = []
    arms = {a for (a, _, _) in summary.groups}
    for arm, baseline in _compared_arms(arms):
        result, base_result = summary.corruption.get(arm), summary.corruption.get(baseline)
        if result is None or base_result is None:
            continue
        values, base = {}, {}
        for seed in result.corrupted_top1.keys() & base_result.corrupted_top1.keys():
            mine, theirs = result.corrupted_top1[seed], base_result.corrupted_top1[seed]
            common = mine.keys() & theirs.keys()
            if common:
                values[seed] = statistics.fmean(mine[cell] for cell in common)
                base[seed] = statistics.fmean(theirs[cell] for cell in common)
        row = _paired(arm, baseline, result.p, summary.full_fraction, values, base)
        if row is not None:
            rows.append(row)
    return rows


@dataclass(frozen=True)
class MceRow:
    """One arm's mean corruption error over the benchmark set, over seeds.

    Attributes:
        mce: per seed, the unnormalised mCE (%): the mean top-1 error over the 15 benchmark
            corruptions x severities 1-5.
        normalised: per seed, the mCE normalised by the no-dropout run of the same seed (mean
            CE, %; 100 = as robust as no dropout); None for no dropout itself or without
            paired no-dropout runs.
        test: the paired t test of the mCE differences arm - no dropout (None: fewer than 2
            paired seeds, or no dropout itself).
        lower: in how many paired seeds the arm's mCE is below no dropout's.
    """

    arm: str
    baseline: str | None
    p: float
    mce: SeedStats
    normalised: SeedStats | None
    test: PairedTest | None
    lower: int


def _seed_errors(result: CorruptionResult) -> dict[int, dict[str, dict[int, float]]]:
    """Per seed, ``{corruption: {severity: top-1 error %}}`` of a corruption result."""
    errors: dict[int, dict[str, dict[int, float]]] = {}
    for seed, cells in result.corrupted_top1.items():
        by: dict[str, dict[int, float]] = defaultdict(dict)
        for (name, severity), top1 in cells.items():
            by[name][severity] = 100.0 - top1
        errors[seed] = dict(by)
    return errors


def _seed_mce(result: CorruptionResult) -> dict[int, float]:
    """Per seed with every benchmark corruption at severities 1-5: its unnormalised mCE."""
    values = {}
    for seed, errors in _seed_errors(result).items():
        try:
            values[seed] = mean_corruption_error(errors)
        except ValueError:
            continue
    return values


def mce_rows(summary: Summary) -> list[MceRow]:
    """The mCE of every arm with benchmark corruption results, with its paired comparison.

    Returns:
        One row per arm (in table order) with at least one seed evaluated on all 15 benchmark
        corruptions at severities 1-5; empty when no run was.
    """
    arms = list(summary.corruption)
    rows = []
    for arm in ordered_regularizers(arms):
        result = summary.corruption[arm]
        values = _seed_mce(result)
        if not values:
            continue
        baseline = _baseline_arm(arm, arms) if split_arm(arm)[0] != BASELINE else None
        base_result = summary.corruption.get(baseline) if baseline is not None else None
        normalised, test, lower = None, None, 0
        if base_result is not None:
            base_values = _seed_mce(base_result)
            base_errors = _seed_errors(base_result)
            mine_errors = _seed_errors(result)
            seeds = sorted(values.keys() & base_values.keys())
            if seeds:
                try:
                    normalised = SeedStats(
                        tuple(
                            statistics.fmean(
                                corruption_errors(mine_errors[s], base_errors[s]).values()
                            )
                            for s in seeds
                        )
                    )
                except ValueError:  # a no-dropout run without error on a corruption
                    normalised = None
                lower = sum(values[s] < base_values[s] for s in seeds)
            if len(seeds) >= 2:
                test = paired_t_test(values[s] - base_values[s] for s in seeds)
        else:
            baseline = None
        rows.append(
            MceRow(
                arm, baseline, result.p, SeedStats(tuple(values.values())), normalised, test, lower
            )
        )
    return rows


class CombinedResults:
    """The databases of several sweeps read as one, for one report (``report --with``): the
    runs of each sweep's own preset, side by side (e.g. ``paper-cifar100`` and its ``-ours``
    variant). Run ids must not repeat across the sweeps (variants give their own ids).

    Args:
        parts: ``(store, preset)`` per sweep, the report's own sweep first.

    Raises:
        ValueError: a run id in two of the sweeps.
    """

    def __init__(self, parts: list[tuple[ResultsStore, Preset]]) -> None:
        self.presets = [preset for _, preset in parts]
        self.parts = [(store, preset.name) for store, preset in parts]
        seen: dict[str, str] = {}
        for store, name in self.parts:
            for record in store.runs(preset=name):
                if record.run_id in seen:
                    raise ValueError(
                        f"run {record.run_id} is in the sweeps of both {seen[record.run_id]!r} "
                        f"and {name!r}: one report can only hold each run id once"
                    )
                seen[record.run_id] = name
        self.run_ids = set(seen)

    def runs(self, *, preset: str | None = None) -> list[RunRecord]:
        """Every sweep's runs of its own preset, or those of the sweep of ``preset``."""
        return [
            record for store, name in self._parts_of(preset) for record in store.runs(preset=name)
        ]

    def unreadable_runs(self, *, preset: str | None = None) -> dict[str, str]:
        """Every sweep's unreadable rows of its own preset, or those of the sweep of
        ``preset``."""
        return {
            run_id: reason
            for store, name in self._parts_of(preset)
            for run_id, reason in store.unreadable_runs(preset=name).items()
        }

    def _parts_of(self, preset: str | None) -> list[tuple[ResultsStore, str]]:
        return [(store, name) for store, name in self.parts if preset in (None, name)]

    def epochs(self) -> list[dict]:
        return self._rows("epochs")

    def corruption_results(self) -> list[dict]:
        return self._rows("corruption_results")

    def cluster_stats(self) -> list[dict]:
        return self._rows("cluster_stats")

    def _rows(self, table: str) -> list[dict]:
        """Every sweep's rows of ``table`` (a store method's name) of the runs read here."""
        return [
            row
            for store, _ in self.parts
            for row in getattr(store, table)()
            if row["run_id"] in self.run_ids
        ]
