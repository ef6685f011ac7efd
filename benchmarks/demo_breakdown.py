"""Where a finished sweep's time went: training, test evaluations, refits, corruptions, the rest.

Reads a sweep folder (``make demo`` writes ``runs/demo``): each run's wall time from the results
database (the worker process, start to end), and from the run's own files the seconds of its
training epochs (``seconds``), test evaluations (``eval_seconds``), DropCluster refits
(``refit_seconds``) and corrupted-test evaluation (``corruptions.json``'s ``seconds``, model
and data loading included). What remains of the wall time is process start-up, data loading
and checkpoint writing; ``--startup`` measures the first two on their own.

    python benchmarks/demo_breakdown.py runs/demo [--startup]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dropcluster.experiments.store import ResultsStore
from dropcluster.train.loop import read_log

COMPONENTS = (
    ("training epochs", "train"),
    ("test-set evaluations", "eval"),
    ("DropCluster refits", "refit"),
    ("corrupted-test evaluation", "corruptions"),
    ("the rest: start-up, data loading, checkpoints", "rest"),
)


def run_breakdown(run_dir: Path, wall: float | None) -> dict[str, float]:
    """Seconds per component of one run (the rest only when its wall time is known)."""
    history = read_log(run_dir / "log.jsonl")
    parts = {
        "train": sum(record.get("seconds", 0.0) for record in history),
        "eval": sum(record.get("eval_seconds", 0.0) for record in history),
        "refit": sum(record.get("refit_seconds", 0.0) for record in history),
        "corruptions": 0.0,
    }
    corruptions = run_dir / "corruptions.json"
    if corruptions.is_file():
        parts["corruptions"] = float(json.loads(corruptions.read_text()).get("seconds", 0.0))
    parts["tests"] = sum("eval_seconds" in record for record in history)
    measured = sum(parts[key] for key in ("train", "eval", "refit", "corruptions"))
    parts["rest"] = wall - measured if wall is not None else float("nan")
    parts["wall"] = wall if wall is not None else float("nan")
    return parts


def measure_startup(repeats: int = 3) -> tuple[float, float]:
    """Median seconds of a fresh Python importing the worker, and of loading Fashion-MNIST."""
    imports, loads = [], []
    code = (
        "import time; t = time.perf_counter(); import dropcluster.experiments.worker; "
        "from dropcluster.data.datasets import load_dataset; a = time.perf_counter(); "
        "load_dataset('fashion-mnist'); load_dataset('fashion-mnist', 'test'); "
        "print(a - t, time.perf_counter() - a)"
    )
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        total = time.perf_counter() - start
        imported, loaded = map(float, result.stdout.split())
        imports.append(total - loaded)  # interpreter start + imports
        loads.append(loaded)
    return statistics.median(imports), statistics.median(loads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder (with results.sqlite)")
    parser.add_argument(
        "--startup", action="store_true", help="also time a process start and a data load (x3)"
    )
    args = parser.parse_args(argv)
    with ResultsStore.in_folder(args.sweep, readonly=True) as store:
        records = store.runs()
    if not records:
        raise SystemExit(f"no runs in {args.sweep}")
    print(
        f"{args.sweep}: {len(records)} runs | MALLOC_MMAP_MAX_="
        f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    rows = {r.run_id: run_breakdown(args.sweep / "runs" / r.run_id, r.seconds) for r in records}
    print(
        f"\n{'run':<32} {'wall':>7} {'train':>7} {'tests':>9} {'refit':>6} {'corrupt':>8} "
        f"{'rest':>6}"
    )
    for run_id, parts in rows.items():
        print(
            f"{run_id:<32} {parts['wall']:>7.1f} {parts['train']:>7.1f} "
            f"{parts['eval']:>5.1f} ({parts['tests']:.0f}) {parts['refit']:>6.1f} "
            f"{parts['corruptions']:>8.1f} {parts['rest']:>6.1f}"
        )
    total = sum(parts["wall"] for parts in rows.values())
    print(f"\nsum over the runs: {total:.0f} s of worker wall time")
    for name, key in COMPONENTS:
        seconds = sum(parts[key] for parts in rows.values())
        print(f"  {name:<46} {seconds:>7.1f} s  {seconds / total:>6.1%}")
    if args.startup:
        started, loaded = measure_startup()
        print(
            f"\none process start with the imports: {started:.2f} s; one Fashion-MNIST load: "
            f"{loaded:.2f} s (x {len(rows)} runs = {(started + loaded) * len(rows):.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
