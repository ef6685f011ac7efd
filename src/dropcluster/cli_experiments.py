"""The experiment subcommands of ``dropcluster``: evaluate, sweep, reproduce, collect, results,
report, analyze, rank-layers. Kept apart from :mod:`dropcluster.cli` so each file stays one
screenful of concerns."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dropcluster.validation import MAX_SEED, int_argument, path_argument

__all__ = [
    "add_experiment_parsers",
    "add_plugin_argument",
]


_DEVICE_HELP = "auto (CUDA when there is one), cpu, cuda, cuda:1, ..."


def add_experiment_parsers(commands) -> None:
    """Register the experiment subcommands on the ``dropcluster`` parser."""
    _add_evaluate_parser(commands)
    for name, text in (
        ("sweep", "train every run of a preset's grid that is not finished yet (resumable)"),
        ("reproduce", "sweep + report: reproduce the paper's comparisons (default: the demo)"),
    ):
        _add_sweep_parser(commands, name, text)
    _add_collect_parser(commands)
    _add_results_parser(commands)
    _add_report_parser(commands)
    _add_analyze_parser(commands)
    _add_rank_layers_parser(commands)


def add_plugin_argument(parser) -> None:
    """``--plugin MODULE`` (repeatable): imported before anything else, recorded in the runs."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        dest="plugin",
        metavar="MODULE",
        help="import this plugin module first (it registers a regularizer, model or data set: "
        "docs/plugins.md); recorded in the runs; repeatable",
    )


def _add_evaluate_parser(commands) -> None:
    from dropcluster.cli_robustness import add_model_arguments

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy on corrupted test sets: a trained run (--checkpoint) or any model "
        "(--model MODULE:FACTORY) on CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C, with mCE",
        description=(
            "Evaluate on the clean test set and on corrupted copies (Hendrycks & Dietterich "
            "2019). --checkpoint RUN: a run written by dropcluster train or a sweep, on copies "
            "made on the fly or on the released files (--corrupted-from); writes "
            "corruptions.json and a summary in the run's result.json. --model MODULE:FACTORY: "
            "any classifier (--weights FILE) on --dataset cifar10-c, cifar100-c or "
            "tiny-imagenet-c, released files by default; prints the errors and the mCE, "
            "--json writes them. Both print a table."
        ),
    )
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint",
        type=path_argument,
        help="the run's folder (written by dropcluster train or sweep)",
    )
    what.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="a function returning the nn.Module to score: mypackage.models:resnet18 or "
        "path/to/models.py:resnet18",
    )
    evaluate.add_argument(
        "--corruptions",
        default=None,
        help="a set (paper: the paper's 7; benchmark: the 15 of mCE; extra: 4; all: 19), "
        "names, or both, comma-separated (default: paper for --checkpoint, benchmark for "
        "--model)",
    )
    evaluate.add_argument("--severities", default="1-5", help="e.g. 1-5, 1,3,5 or 2")
    evaluate.add_argument(
        "--limit",
        type=int_argument(1),
        default=None,
        help="use a class-balanced subset of this many test images",
    )
    evaluate.add_argument(
        "--seed", type=int_argument(0, MAX_SEED), default=0, help="seed of the corruptions' noise"
    )
    evaluate.add_argument(
        "--family",
        choices=("cifar", "tiny-imagenet", "imagenet"),
        default=None,
        help="severity table of generated corruptions (default: by image size; 28x28 uses cifar)",
    )
    evaluate.add_argument("--device", default="auto", help=_DEVICE_HELP)
    evaluate.add_argument(
        "--batch-size", type=int_argument(1), default=None, help="evaluation batch size"
    )
    run_only = evaluate.add_argument_group("with --checkpoint")
    run_only.add_argument(
        "--jpeg-quality",
        type=int,
        default=None,
        help="JPEG round trip after corrupting (85: as Tiny-ImageNet-C)",
    )
    run_only.add_argument(
        "--corrupted-from",
        default=None,
        metavar="DIR",
        help="folder of the released CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C files",
    )
    add_model_arguments(evaluate.add_argument_group("with --model"))
    add_plugin_argument(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)


def _add_sweep_parser(commands, name: str, text: str) -> None:
    sub = commands.add_parser(name, help=text, description=text)
    sub.add_argument(
        "--preset",
        default="demo",
        help="demo (default), evidence, paper-cifar100, paper-tiny-imagenet, their -ours "
        "variants, paper-figures, or a .json",
    )
    sub.add_argument(
        "--out", type=path_argument, default=None, help="output folder (default: runs/<preset>)"
    )
    sub.add_argument(
        "--jobs",
        type=int_argument(1),
        default=None,
        help="runs at once (default on this machine: one per visible GPU, each on its own, or 1 "
        "without CUDA; with several on the CPU they share the cores; on Ray or Slurm every "
        "pending run is submitted)",
    )
    sub.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="FILTER",
        help="keep matching runs: regularizer=dropcluster,dropblock, p=0.1, "
        "fraction=1, seed=0 or a run-id pattern (repeatable)",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a base config value, e.g. --set stem=cifar (repeatable)",
    )
    sub.add_argument(
        "--stem",
        choices=("imagenet", "cifar"),
        default=None,
        help="ResNet stem: imagenet (the paper's) or cifar (the stronger model on 32x32)",
    )
    sub.add_argument(
        "--device", default=None, help=f"shorthand for --set device=...: {_DEVICE_HELP}"
    )
    sub.add_argument(
        "--corrupted-from",
        default=None,
        metavar="DIR",
        help="evaluate corruptions on the released files in DIR",
    )
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="list the grid with its status and estimated cost; run nothing",
    )
    add_plugin_argument(sub)
    _add_backend_arguments(sub)
    sub.set_defaults(handler=_run_sweep, report=name == "reproduce")


def _add_backend_arguments(sub) -> None:
    """The flags of :class:`~dropcluster.experiments.backends.BackendSettings`."""
    engines = sub.add_argument_group("where the runs train (docs/scaling.md)")
    engines.add_argument(
        "--backend",
        choices=("local", "ray", "slurm"),
        default="local",
        help="local: worker processes on this machine (default); ray: one Ray task per run; "
        "slurm: a Slurm job array, one task per run (through submitit). The sweep folder has "
        "to be on a filesystem every node sees",
    )
    engines.add_argument(
        "--address",
        default=None,
        help="Ray: the cluster to join ('auto': the one this machine belongs to; default: "
        "start Ray here)",
    )
    engines.add_argument(
        "--runtime-env",
        type=_runtime_env_argument,
        default=None,
        metavar="JSON_OR_FILE",
        help="Ray: the tasks' runtime environment (working_dir, pip, env_vars, ...), a JSON "
        "object or a .json/.yaml file holding one",
    )
    engines.add_argument(
        "--gpus-per-run",
        type=int_argument(0),
        default=None,
        metavar="N",
        help="GPUs per run; above 1 the run trains under torchrun, one process per GPU "
        "(default: one when the device is CUDA; on this machine only values above 1 matter)",
    )
    engines.add_argument(
        "--cpus-per-run",
        type=int_argument(1),
        default=None,
        metavar="N",
        help="Ray, Slurm: CPU cores per run, also its torch threads (default 1)",
    )
    engines.add_argument("--partition", default=None, help="Slurm: the partition")
    engines.add_argument(
        "--time",
        type=int_argument(1),
        default=None,
        dest="time_minutes",
        metavar="MINUTES",
        help="Slurm: time limit of each job; a run that reaches it is requeued and resumes "
        "(default 240)",
    )
    engines.add_argument(
        "--mem",
        type=int_argument(1),
        default=None,
        dest="mem_gb",
        metavar="GB",
        help="Slurm: memory per job in GB",
    )
    engines.add_argument("--account", default=None, help="Slurm: the account charged for the jobs")
    engines.add_argument("--qos", default=None, help="Slurm: the quality of service of the jobs")
    engines.add_argument(
        "--constraint",
        default=None,
        help="Slurm: node features the jobs need, e.g. a100 or 'a100|h100'",
    )
    engines.add_argument(
        "--sbatch",
        action="append",
        default=[],
        type=_sbatch_argument,
        metavar="NAME=VALUE",
        help="Slurm: any other sbatch option, written as '#SBATCH --NAME=VALUE', e.g. "
        "gres=gpu:a100:1 or mail-type=END (repeatable)",
    )
    engines.add_argument(
        "--job-setup",
        action="append",
        default=[],
        dest="setup",
        metavar="LINE",
        help="Slurm: a shell line each job runs before its run, e.g. 'module load cuda/12.1' "
        "or 'source /nfs/venv/bin/activate' (repeatable, in order)",
    )
    engines.add_argument(
        "--array-parallelism",
        type=int_argument(1),
        default=None,
        metavar="N",
        help="Slurm: at most N runs of the job array at once (--array=0-K%%N; default: no limit)",
    )
    engines.add_argument(
        "--no-array",
        action="store_false",
        dest="array",
        help="Slurm: one job per run (named after the run) instead of one job array",
    )
    engines.add_argument(
        "--no-wait",
        action="store_false",
        dest="wait",
        help="Slurm: submit and return; `dropcluster collect OUT` (or this command again) "
        "records the runs that finished",
    )


def _backend_settings(args: argparse.Namespace):
    from dropcluster.experiments.backends import BackendSettings

    values = {
        "name": args.backend,
        "gpus_per_run": args.gpus_per_run,
        "cpus_per_run": args.cpus_per_run,
        "address": args.address,
        "partition": args.partition,
        "time_minutes": args.time_minutes,
        "mem_gb": args.mem_gb,
        "wait": args.wait,
        "account": args.account,
        "qos": args.qos,
        "constraint": args.constraint,
        "sbatch": dict(args.sbatch),
        "setup": args.setup,
        "array": args.array,
        "array_parallelism": args.array_parallelism,
        "runtime_env": args.runtime_env,
    }
    # Flags left out keep the settings' defaults.
    return BackendSettings(**{k: v for k, v in values.items() if v is not None})


def _sbatch_argument(text: str) -> tuple[str, str]:
    """An ``argparse`` type: ``--sbatch NAME=VALUE`` as ``(NAME, VALUE)``."""
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE (an sbatch option and its value, e.g. gres=gpu:1), but got "
            f"{text!r}"
        )
    return name.strip().lstrip("-"), value


_sbatch_argument.__name__ = "sbatch option"


def _runtime_env_argument(text: str) -> dict:
    """An ``argparse`` type: Ray's runtime environment, a JSON object given inline or in a
    .json/.yaml/.yml file."""
    from dropcluster.experiments.backends.runtime_env import read_runtime_env

    try:
        return read_runtime_env(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_runtime_env_argument.__name__ = "runtime environment"


def _add_collect_parser(commands) -> None:
    text = (
        "record the finished runs of a sweep folder in its database without training: after "
        "--no-wait, after losing the database, or to merge sweeps of one preset (--from)"
    )
    collect = commands.add_parser("collect", help=text, description=text)
    collect.add_argument("out", type=path_argument, metavar="DIR", help="the sweep's output folder")
    collect.add_argument(
        "--from",
        action="append",
        default=[],
        type=path_argument,
        dest="sources",
        metavar="OTHER_DIR",
        help="first copy in the finished runs of this sweep folder of the same preset and "
        "settings (repeatable); runs finished in DIR are never replaced",
    )
    collect.add_argument(
        "--drop-mismatched",
        action="store_true",
        help="remove the rows of the preset's runs recorded with another config than "
        "preset.json's (without it, such rows stop the collect: preset.json may have been "
        "edited)",
    )
    collect.set_defaults(handler=_run_collect)


def _add_results_parser(commands) -> None:
    from dropcluster.experiments.store import RUN_STATUSES

    results = commands.add_parser(
        "results",
        help="list the runs of a sweep and their status",
        description="List a sweep's runs; --csv exports the database.",
    )
    results.add_argument(
        "--out", type=path_argument, required=True, help="the sweep's output folder"
    )
    results.add_argument(
        "--status", choices=RUN_STATUSES, default=None, help="only runs with this status"
    )
    results.add_argument(
        "--csv",
        type=path_argument,
        default=None,
        metavar="DIR",
        help="export runs, epochs, corruptions and clusters as CSV files",
    )
    results.set_defaults(handler=_run_results)


def _add_report_parser(commands) -> None:
    report = commands.add_parser(
        "report",
        help="regenerate the Markdown + PNG report of a sweep",
        description="Regenerate OUT/report/report.md from the database.",
    )
    report.add_argument(
        "--out", type=path_argument, required=True, help="the sweep's output folder"
    )
    report.add_argument(
        "--average-last",
        type=int_argument(1),
        default=None,
        help="average metrics over the last K epochs (default: the preset's)",
    )
    report.add_argument(
        "--to",
        type=path_argument,
        default=None,
        dest="report_dir",
        metavar="DIR",
        help="write the report here instead of OUT/report (e.g. for a read-only sweep folder)",
    )
    report.add_argument(
        "--with",
        type=path_argument,
        action="append",
        default=[],
        dest="with_sweeps",
        metavar="SWEEP",
        help="add the runs of another sweep folder (repeatable), e.g. the -ours variant of a "
        "paper preset, to compare side by side; the report takes OUT's preset for its header",
    )
    report.set_defaults(handler=_run_report)


def _add_analyze_parser(commands) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="cluster maps and Spatial Hopkins statistics of a trained run (PNG + Markdown)",
        description="Figures of a run's DropCluster slot: cluster maps of every channel, "
        "per-channel Spatial Hopkins, Spatial Hopkins histograms per layer.",
    )
    analyze.add_argument("--checkpoint", type=path_argument, required=True, help="the run's folder")
    analyze.add_argument(
        "--out",
        type=path_argument,
        default=None,
        help="output folder (default: <run>/analysis, or <run>/analysis-epochE with --epoch)",
    )
    analyze.add_argument("--images", type=int_argument(1), default=4, help="example images to show")
    analyze.add_argument(
        "--sample-images",
        type=int_argument(2),
        default=256,
        help="test images whose activations are analysed",
    )
    analyze.add_argument("--device", default="auto", help=_DEVICE_HELP)
    analyze.add_argument("--seed", type=int_argument(0, MAX_SEED), default=0, help="random seed")
    analyze.add_argument(
        "--epoch",
        type=int_argument(1),
        default=None,
        help="analyse the checkpoint kept after this many epochs (train with "
        "keep_checkpoints=[E]); default: the last checkpoint",
    )
    analyze.add_argument(
        "--unstructured",
        choices=("rena", "dead"),
        default=None,
        help="rule for runs without a fitted DropCluster layer: rena (the paper's: ReNA "
        "does not reach the number of clusters) or dead (constant channels); default: the "
        "run's layer's rule, else dead",
    )
    analyze.set_defaults(handler=_run_analyze)


def _add_rank_layers_parser(commands) -> None:
    from dropcluster.rena import UNSTRUCTURED_MODES

    rank = commands.add_parser(
        "rank-layers",
        help="which layer? rank a model's places by the Spatial Hopkins structure of their "
        "activations (a trained run, or an untrained model)",
        description="Run test images through a trained run's model (--run) or an untrained "
        "one (--model with --dataset), measure at every slot (or conv output) the per-channel "
        "Spatial Hopkins and the channels ReNA calls structured, and print the places, most "
        "structured first.",
    )
    what = rank.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--run", type=path_argument, help="a run folder (written by dropcluster train or sweep)"
    )
    what.add_argument("--model", help="an untrained model of dropcluster.models (with --dataset)")
    rank.add_argument("--dataset", help="the data set whose test images --model runs on")
    rank.add_argument(
        "--data-dir",
        type=path_argument,
        default=None,
        help="folder of the data set (--model; default: its loader's default place)",
    )
    rank.add_argument(
        "--modules",
        default=None,
        help="slots or convs (default: the model's slots), or module names, comma-separated",
    )
    rank.add_argument(
        "--n-batches", type=int_argument(1), default=2, help="batches run (default 2)"
    )
    rank.add_argument(
        "--batch-size", type=int_argument(1), default=64, help="test images per batch (default 64)"
    )
    rank.add_argument(
        "--n-clusters", type=int_argument(1), default=15, help="clusters per channel (paper: 15)"
    )
    rank.add_argument(
        "--unstructured",
        choices=UNSTRUCTURED_MODES,
        default="dead",
        help="ReNA's rule for unstructured channels (default dead, DropCluster2d's default; "
        "rena: the paper's)",
    )
    rank.add_argument("--device", default="cpu", help=_DEVICE_HELP + " (default cpu)")
    rank.add_argument(
        "--seed",
        type=int_argument(0, MAX_SEED),
        default=0,
        help="seeds the test images drawn, Spatial Hopkins' sites and the untrained weights",
    )
    rank.add_argument(
        "--json", type=path_argument, default=None, dest="json_path", help="write the table here"
    )
    rank.add_argument(
        "--plot", type=path_argument, default=None, help="draw the figure here (PNG, matplotlib)"
    )
    add_plugin_argument(rank)
    rank.set_defaults(handler=_run_rank_layers)


def _run_evaluate(args: argparse.Namespace) -> int:
    from dropcluster.cli_robustness import check_model_arguments, run_model_evaluation

    check_model_arguments(args)
    if args.model is not None:
        return run_model_evaluation(args)
    return _evaluate_checkpoint(args)


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    from dropcluster.experiments.corruption_eval import (
        CorruptionSettings,
        evaluate_run,
        format_table,
    )

    settings = CorruptionSettings(
        corruptions=args.corruptions or "paper",
        severities=args.severities,
        limit=args.limit,
        seed=args.seed,
        jpeg_quality=args.jpeg_quality,
        family=args.family,
        corrupted_from=args.corrupted_from,
    )
    source = args.corrupted_from or "generated on the fly"
    print(
        f"evaluating {args.checkpoint} on {len(settings.corruptions)} corruptions x "
        f"severities {settings.severities} ({source})",
        file=sys.stderr,
    )
    rows = evaluate_run(args.checkpoint, settings, device=args.device, batch_size=args.batch_size)
    print(format_table(rows, "top1"))
    print()
    print(format_table(rows, "top5"))
    print(f"\nresults written to {args.checkpoint / 'corruptions.json'} and result.json")
    _update_sweep_database(
        args.checkpoint, rows, "released" if args.corrupted_from else "generated"
    )
    return 0


def _update_sweep_database(run_dir: Path, rows, source: str) -> None:
    """A run inside a sweep folder (OUT/runs/<id>) also gets its rows in OUT's database."""
    from dropcluster.experiments.store import DATABASE_NAME, ResultsStore
    from dropcluster.experiments.sweep import RUNS_FOLDER

    runs_folder = run_dir.resolve().parent
    sweep_dir = runs_folder.parent
    if runs_folder.name != RUNS_FOLDER or not (sweep_dir / DATABASE_NAME).is_file():
        return
    with ResultsStore.in_folder(sweep_dir) as store:
        try:
            store.run(run_dir.name)
        except KeyError:
            return
        store.record_corruptions(run_dir.name, rows, source=source, replace=True)
    print(f"and to the sweep's database {sweep_dir / DATABASE_NAME}")


def _load_sweep_preset(args: argparse.Namespace):
    from dropcluster.experiments.presets import (
        apply_overrides,
        load_preset,
        parse_overrides,
        with_corrupted_from,
        with_plugins,
    )

    preset = load_preset(args.preset)
    if args.plugin:
        preset = with_plugins(preset, args.plugin)
    overrides = parse_overrides(args.overrides)
    if args.device is not None:
        overrides["device"] = args.device
    if args.stem is not None:
        overrides["stem"] = args.stem
    if overrides:
        preset = apply_overrides(preset, overrides)
    if args.corrupted_from is not None:
        preset = with_corrupted_from(preset, args.corrupted_from)
    return preset


def _run_sweep(args: argparse.Namespace) -> int:
    from dropcluster.experiments.sweep import (
        DEFAULT_OUT_PARENT,
        dry_run,
        format_duration,
        run_sweep,
    )

    preset = _load_sweep_preset(args)
    out = args.out if args.out is not None else DEFAULT_OUT_PARENT / preset.name
    if args.dry_run:
        dry_run(preset, out, args.only, sys.stdout, jobs=args.jobs, backend=_backend_settings(args))
        return 0
    backend = _backend_settings(args)
    # A refused option in one line, before anything is written.
    if backend.name == "slurm":
        from dropcluster.experiments.backends.slurm import check_slurm_settings

        check_slurm_settings(backend)
    if backend.runtime_env is not None:
        from dropcluster.experiments.backends.ray import check_runtime_env

        check_runtime_env(backend.runtime_env)
    print(
        f"dropcluster {args.command}: preset {preset.name} ({preset.scale} scale) -> {out}",
        file=sys.stderr,
    )
    try:
        summary = run_sweep(preset, out, jobs=args.jobs, only=args.only, backend=backend)
    except KeyboardInterrupt:
        print(
            "\ndropcluster: interrupted; finished runs are kept and the interrupted ones "
            "continue from their last epoch: rerun the same command",
            file=sys.stderr,
        )
        return 130
    print(
        f"{summary.finished}/{summary.total} runs finished ({len(summary.ran)} in this "
        f"invocation, {format_duration(summary.seconds)})",
        file=sys.stderr,
    )
    if summary.submitted:
        print(
            f"{len(summary.submitted)} run(s) submitted (job ids in {out / 'slurm' / 'jobs.json'}"
            f"); when they are done, `dropcluster collect {out}` or this command again records "
            f"them",
            file=sys.stderr,
        )
        return 0
    status = 0
    if summary.failed:
        print(
            f"{len(summary.failed)} run(s) failed: {', '.join(summary.failed)}; their errors "
            f"are in `dropcluster results --out {out} --status failed`; rerun to retry",
            file=sys.stderr,
        )
        status = 1
    if args.report:
        _analyze_runs(out, preset)
        path = _write_report(out, preset, None)
        print(f"report: {path}")
    return status


def _run_collect(args: argparse.Namespace) -> int:
    from dropcluster.experiments.collect import collect

    collect(args.out, args.sources, drop_mismatched=args.drop_mismatched)
    return 0


def _analyze_runs(out: Path, preset) -> None:
    """The cluster analyses the report links: the preset's ``analyze`` settings, by default the
    best DropCluster run (see ``analyze_sweep_runs``)."""
    from dropcluster.experiments.presets import AnalyzeSettings
    from dropcluster.experiments.run_analysis import analyze_sweep_runs

    settings = preset.analyze if preset.analyze is not None else AnalyzeSettings()
    try:
        analyze_sweep_runs(out, settings, progress=lambda message: print(message, file=sys.stderr))
    except ImportError as error:
        print(f"no cluster analysis: {error}", file=sys.stderr)


def _write_report(out: Path, preset, average_last, report_dir: Path | None = None):
    from dropcluster.experiments.report import write_report
    from dropcluster.experiments.store import ResultsStore

    with ResultsStore.in_folder(out, readonly=True) as store:
        return write_report(store, out, preset, average_last=average_last, report_dir=report_dir)


def _run_report(args: argparse.Namespace) -> int:
    from dropcluster.experiments.presets import load_preset
    from dropcluster.experiments.sweep import PRESET_NAME

    preset_path = args.out / PRESET_NAME
    if not preset_path.is_file():
        raise FileNotFoundError(f"{args.out} has no {PRESET_NAME}: is it a sweep's output folder?")
    preset = load_preset(preset_path)
    if args.with_sweeps:
        path = _write_combined_report(args, preset)
    else:
        path = _write_report(args.out, preset, args.average_last, args.report_dir)
    print(f"report: {path}")
    return 0


def _write_combined_report(args: argparse.Namespace, preset) -> Path:
    """The report of OUT with the runs of the ``--with`` sweeps beside its own."""
    from contextlib import ExitStack

    from dropcluster.experiments.presets import load_preset
    from dropcluster.experiments.report import write_report
    from dropcluster.experiments.store import ResultsStore
    from dropcluster.experiments.summary import CombinedResults
    from dropcluster.experiments.sweep import PRESET_NAME

    with ExitStack() as stack:
        parts = [(stack.enter_context(ResultsStore.in_folder(args.out, readonly=True)), preset)]
        for folder in args.with_sweeps:
            if not (folder / PRESET_NAME).is_file():
                raise FileNotFoundError(f"--with {folder}: no {PRESET_NAME}; is it a sweep folder?")
            other = load_preset(folder / PRESET_NAME)
            store = stack.enter_context(ResultsStore.in_folder(folder, readonly=True))
            parts.append((store, other))
        return write_report(
            CombinedResults(parts),
            args.out,
            preset,
            average_last=args.average_last,
            report_dir=args.report_dir,
        )


def _run_results(args: argparse.Namespace) -> int:
    from dropcluster.compat import error_reason
    from dropcluster.experiments.store import FAILED, ResultsStore

    with ResultsStore.in_folder(args.out, readonly=True) as store:
        runs = store.runs(status=args.status)
        counts = store.counts()
        print(f"{'run':<40} {'status':>9} {'epochs':>6} {'top-1':>7} {'top-5':>7} {'tries':>5}")
        for record in runs:
            top1 = f"{record.top1:.2f}" if record.top1 is not None else "-"
            top5 = f"{record.top5:.2f}" if record.top5 is not None else "-"
            print(
                f"{record.run_id:<40} {record.status:>9} {record.epochs_done:>6} {top1:>7} "
                f"{top5:>7} {record.attempts:>5}"
            )
            if record.status == FAILED and record.error:
                print(f"    error: {error_reason(record.error)}")
        print(", ".join(f"{count} {status}" for status, count in counts.items()))
        for run_id, reason in store.unreadable_runs().items():
            print(f"not read: {run_id} ({reason}; `dropcluster collect {args.out}` repairs it)")
        if args.csv is not None:
            for path in store.export_csv(args.csv):
                print(f"wrote {path}")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from dropcluster.experiments.run_analysis import analyze_run

    path = analyze_run(
        args.checkpoint,
        args.out,
        n_images=args.images,
        sample_images=args.sample_images,
        device=args.device,
        seed=args.seed,
        progress=lambda message: print(message, file=sys.stderr),
        epoch=args.epoch,
        unstructured=args.unstructured,
    )
    print(f"analysis: {path}")
    return 0


def _run_rank_layers(args: argparse.Namespace) -> int:
    from dropcluster.experiments.layer_ranking import plot_ranking, rank_model, rank_run
    from dropcluster.files import atomic_write_json

    if args.model is not None and args.dataset is None:
        raise ValueError("rank-layers --model needs --dataset (the data set of its test images)")
    if args.run is not None and (args.dataset is not None or args.data_dir is not None):
        raise ValueError(
            "rank-layers --run reads its data set from the run: drop --dataset/--data-dir"
        )
    if args.plot is not None:
        from dropcluster.experiments.plotting import pyplot

        pyplot()  # fail before the forward passes when matplotlib is missing
    modules = args.modules
    if modules is not None and modules not in ("slots", "convs"):
        modules = [name.strip() for name in modules.split(",") if name.strip()]
    options = dict(
        n_batches=args.n_batches,
        batch_size=args.batch_size,
        n_clusters=args.n_clusters,
        unstructured=args.unstructured,
        modules=modules,
        device=args.device,
        seed=args.seed,
    )
    if args.run is not None:
        ranked = rank_run(args.run, **options)
    else:
        ranked = rank_model(args.model, args.dataset, data_dir=args.data_dir, **options)
    ranking = ranked.ranking
    print(f"{ranked.model} on {ranked.dataset} test images, {ranked.source}")
    print(ranking.format())
    print(f"best: {ranking.best}")
    if args.json_path is not None:
        atomic_write_json(
            args.json_path,
            {
                "model": ranked.model,
                "dataset": ranked.dataset,
                "source": ranked.source,
                "n_images": ranking.n_images,
                "n_clusters": ranking.n_clusters,
                "unstructured": ranking.unstructured,
                "best": ranking.best,
                "skipped": list(ranking.skipped),
                "layers": ranking.to_rows(),
            },
        )
        print(f"wrote {args.json_path}")
    if args.plot is not None:
        title = f"{ranked.model} on {ranked.dataset}, {ranked.source}: structure by depth"
        print(f"wrote {plot_ranking(ranking, args.plot, title=title)}")
    return 0
