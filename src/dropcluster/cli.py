"""The ``dropcluster`` command."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import signal
import sys
import time
import traceback
import types
import typing
from pathlib import Path

from dropcluster import __version__
from dropcluster.errors import raised_while_interrupted, user_error_message
from dropcluster.files import atomic_write_json
from dropcluster.validation import MAX_SEED, int_argument, path_argument

__all__ = [
    "add_config_flags",
    "attribute_docs",
    "build_parser",
    "main",
]


# Printed cluster maps use one character per cluster id.
_MAP_SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropcluster",
        description="DropCluster: data-driven structured dropout for convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"dropcluster {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    analysis = commands.add_parser(
        "probe",
        aliases=["cluster-analysis"],
        help="ReNA clusters and Spatial Hopkins of a probe network's first conv layer on "
        "Fashion-MNIST images (alias: cluster-analysis)",
        description=(
            "Train a small probe network for a few steps on Fashion-MNIST, pass a minibatch of "
            "test images through its first conv layer, cluster every channel with ReNA under "
            "each rule for unstructured channels and print a per-channel summary."
        ),
    )
    analysis.add_argument(
        "--data-dir",
        type=path_argument,
        default=None,
        help="folder with the Fashion-MNIST IDX files (default: Debian's "
        "/usr/share/datasets/fashion-mnist, else fashion-mnist/ in the data folder, where "
        "`dropcluster download fashion-mnist` puts them)",
    )
    analysis.add_argument(
        "--n-images",
        type=int,
        default=128,
        help="images in the minibatch that is clustered (default 128)",
    )
    analysis.add_argument(
        "--n-clusters", type=int, default=15, help="clusters per channel (paper: 15)"
    )
    analysis.add_argument(
        "--channels",
        type=int,
        default=64,
        help="output channels of the first conv layer (default 64)",
    )
    analysis.add_argument(
        "--kernel-size", type=int, default=5, help="kernel size of the first conv layer (default 5)"
    )
    analysis.add_argument(
        "--train-steps",
        type=int,
        default=300,
        help="SGD steps of the probe before the analysis; 0 keeps the "
        "random initialisation (default 300)",
    )
    analysis.add_argument(
        "--seed", type=int_argument(0, MAX_SEED), default=0, help="random seed (default 0)"
    )
    analysis.add_argument(
        "--json",
        type=path_argument,
        default=None,
        dest="json_path",
        help="also write the per-channel results to this JSON file",
    )
    analysis.set_defaults(handler=_run_cluster_analysis)
    _add_train_parser(commands)
    from dropcluster.cli_download import add_download_parser

    add_download_parser(commands)
    from dropcluster.cli_experiments import add_experiment_parsers

    add_experiment_parsers(commands)
    return parser


def _add_train_parser(commands) -> None:
    from dropcluster.cli_experiments import add_plugin_argument
    from dropcluster.train.config import TrainConfig

    train = commands.add_parser(
        "train",
        help="train one model with one regularizer, resumable",
        description=(
            "Train one run. Settings come from --config (JSON or YAML), then --set KEY=VALUE, "
            "then the flags below (one per TrainConfig field)."
        ),
    )
    train.add_argument("--out", type=path_argument, required=True, help="output folder of the run")
    train.add_argument("--config", type=path_argument, help="a JSON or YAML config file")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        dest="assignments",
        metavar="KEY=VALUE",
        help="set any config field, JSON values (e.g. --set lr_milestones=[150,200]); repeatable",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the settings, the device in force, the processes and the batch norm choice; "
        "train and write nothing",
    )
    train.add_argument(
        "--nproc-per-node",
        type=int_argument(1),
        default=1,
        metavar="N",
        help="train on N processes of this machine (DistributedDataParallel, one GPU each on "
        "CUDA): torchrun's launcher, with one line when a process fails",
    )
    add_plugin_argument(train)
    # plugins: --plugin (repeatable), not the list flag of the field.
    add_config_flags(train.add_argument_group("config fields"), TrainConfig, skip=("plugins",))
    train.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="regularizer option, e.g. --option block_size=5 (repeatable)",
    )
    train.set_defaults(handler=_run_train)


def add_config_flags(parser, config_class, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass, typed and documented from the class itself.

    ``--name-with-dashes`` for each field (``--amp/--no-amp`` for booleans, several values for
    lists); dict fields are left to ``--set``. A flag that is not given keeps the config's
    value, so adding a field to the dataclass adds its flag.
    """
    hints = typing.get_type_hints(config_class)
    docs = attribute_docs(config_class)
    for spec in dataclasses.fields(config_class):
        if spec.name in skip:
            continue
        hint = hints[spec.name]
        kind = hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        flag = "--" + spec.name.replace("_", "-")
        text = docs.get(spec.name, "")
        if typing.get_origin(kind) is dict:
            continue
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, dest=spec.name, help=text
            )
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parser.add_argument(
                flag,
                type=item,
                nargs="*",
                default=None,
                dest=spec.name,
                metavar=item.__name__.upper(),
                help=text,
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=None,
                dest=spec.name,
                metavar=kind.__name__.upper(),
                help=text,
            )


def attribute_docs(config_class) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a class docstring.

    An entry may name several fields (``epochs, batch_size: ...``); indented lines continue it.
    """
    docs: dict[str, str] = {}
    names: list[str] = []
    entry_indent = None
    for line in inspect.cleandoc(config_class.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            entry_indent = -1
            continue
        if entry_indent is None or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if entry_indent == -1:
            entry_indent = indent
        if indent < entry_indent:
            break  # the section ended
        head, colon, text = stripped.partition(":")
        entry = [name.strip() for name in head.split(",")]
        if indent == entry_indent and colon and all(name.isidentifier() for name in entry):
            names = entry
            for name in names:
                docs[name] = text.strip()
        else:
            for name in names:
                docs[name] += " " + stripped
    # Help is plain text: Sphinx roles and literals lose their markup, % is argparse's escape.
    plain = {
        name: re.sub(r":\w+:`([^`]+)`", r"\1", text).replace("``", "")
        for name, text in docs.items()
    }
    return {name: text.replace("%", "%%") for name, text in plain.items()}


def _train_config(args: argparse.Namespace):
    from typing import Any

    from dropcluster.train.config import TrainConfig, parse_assignments
    from dropcluster.validation import check_type

    values = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    values.update(parse_assignments(args.assignments, "--set"))
    for spec in dataclasses.fields(TrainConfig):
        given = getattr(args, spec.name, None)
        if given is not None:
            values[spec.name] = given
    check_type("regularizer_options", values.get("regularizer_options", {}), dict[str, Any])
    options = dict(values.get("regularizer_options", {}))
    options.update(parse_assignments(args.option, "--option"))
    values["regularizer_options"] = options
    if args.plugin:  # recorded in the run's config, for --resume and evaluate --checkpoint
        check_type("plugins", values.get("plugins", []), list[str])
        values["plugins"] = list(dict.fromkeys([*values.get("plugins", []), *args.plugin]))
    return TrainConfig.from_dict(values)


def _run_train(args: argparse.Namespace) -> int:

    from dropcluster.train import distributed
    from dropcluster.train.config import describe_device
    from dropcluster.train.launch import launch, rank_failure
    from dropcluster.train.loop import train

    config = _train_config(args)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        return _train_dry_run(config, args, max(world, args.nproc_per_node))
    if args.nproc_per_node > 1 and world == 1:
        return launch(args.nproc_per_node, "dropcluster", _without_nproc(args.argv))
    if rank == 0:
        print(_train_headline(config, world, args.out))
        print(describe_device(config.device, world), flush=True)
        if config.tracker != "none":
            print(_tracker_line(config, args.out), flush=True)
    try:
        result = train(config, args.out, resume=args.resume)
    except Exception as error:
        if world > 1:
            # One line for the whole group (a lost peer told apart from an own error).
            status = rank_failure(error, rank, world)
            if status is not None:
                return status
        raise
    finally:
        distributed.close_group()
    if rank == 0:
        print(
            f"final (mean of the last {min(config.average_last, len(result.history))} epochs): "
            f"top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%; results in {args.out}"
        )
    if world > 1:
        # Every file of the run is written and the group is left: end without the
        # interpreter's teardown, where gloo's threads can abort a finished process
        # ("terminate called without an active exception"), which torchrun reports as a
        # failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _train_headline(config, world: int, out: Path) -> str:
    processes = f" on {world} processes (DistributedDataParallel)" if world > 1 else ""
    return (
        f"dropcluster {__version__}: training {config.model} on {config.dataset} with "
        f"{config.regularizer} (p={config.p}), {config.epochs} epochs{processes} -> {out}"
    )


def _tracker_line(config, out: Path) -> str:
    if config.tracker == "none":
        return "tracker: none (the curves are in log.jsonl)"
    return f"tracker: {config.tracker} (view with: tensorboard --logdir {out})"


def _train_dry_run(config, args: argparse.Namespace, world: int) -> int:
    """``train --dry-run``: the choices the run would make on this machine; nothing written."""
    import json

    from dropcluster.models import build_model
    from dropcluster.train.config import describe_device
    from dropcluster.train.loop import has_batch_norm

    print(_train_headline(config, world, args.out) + " (dry run: nothing is trained or written)")
    print(describe_device(config.device, world))
    if world > 1:
        share = config.batch_size // world
        print(f"processes: {world} (DistributedDataParallel), {share} images each per step")
        sync = "on: statistics over the whole batch" if config.sync_batchnorm else "off"
        # The data set's class count does not matter here: only whether the model normalises.
        model = build_model(config.model, n_classes=10, in_channels=3, stem=config.stem)
        if not has_batch_norm(model):
            sync += f" (no effect: {config.model} has no batch norm)"
        elif config.sync_batchnorm and config.resolved_device().type != "cuda":
            sync += " (needs CUDA devices: the run would be refused on the CPU)"
        print(f"sync-batchnorm: {sync}")
        warning = config.batch_norm_warning(world) if has_batch_norm(model) else None
        if warning is not None:
            print(f"warning: {warning}")
    else:
        print("processes: 1 (sync-batchnorm has no effect on one process)")
    print(_tracker_line(config, args.out))
    print(f"config: {json.dumps(config.to_dict(), sort_keys=True)}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc-per-node`` (what each launched process runs)."""
    kept, skip = [], False
    for item in argv:
        key = item.split("=", 1)[0]
        if skip:
            skip = False
        elif len(key) > 3 and "--nproc-per-node".startswith(key):  # argparse takes prefixes
            skip = "=" not in item
        else:
            kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> int:
    """Run the ``dropcluster`` command; returns its exit status.

    A problem the user can fix (a bad value, a missing or damaged file, a full or read-only
    disk, a busy run) is printed as one line and gives status 2; anything else is a bug in
    dropcluster: its traceback is printed, then one line, and the status is 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("DROPCLUSTER_LAUNCHED") == "1":
        # The launcher stops its processes with the signal it got; a process started from a
        # shell's background job would inherit SIGINT ignored, and be killed 30 s later.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "plugin", None):
            # Before anything reads a config or a preset that names what they register.
            from dropcluster.plugins import load_plugins

            load_plugins(args.plugin)
        return args.handler(args)
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as error:  # noqa: BLE001 - every error ends in one line and a status
        if raised_while_interrupted(error):
            return _interrupted()  # cleanup that failed on the way out of a Ctrl-C
        message = user_error_message(error)
        if message is None:
            traceback.print_exc()
            print(
                f"dropcluster: internal error: {type(error).__name__}: {error} (this is a bug "
                f"in dropcluster {__version__}; please report it with the traceback above)",
                file=sys.stderr,
            )
            return 1
        print(f"dropcluster: error: {message}", file=sys.stderr)
        return 2


def _interrupted() -> int:
    """Say that a Ctrl-C stopped the command; its exit status (130)."""
    # One line for a run of several processes: the launcher's, or else rank 0's.
    launched = os.environ.get("DROPCLUSTER_LAUNCHED") == "1"
    if not launched and os.environ.get("RANK", "0") == "0":
        print(
            "\ndropcluster: interrupted; a training run continues from its last finished "
            "epoch with --resume",
            file=sys.stderr,
        )
    if launched:
        # Every file of the run is written atomically and the group is left: end without
        # the interpreter's teardown, where an interrupted collective's threads can abort
        # ("terminate called without an active exception") and print to the launcher's
        # terminal.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return 130


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} should be at least 1, but got {value}")


def _run_cluster_analysis(args: argparse.Namespace) -> int:
    import torch

    from dropcluster.data.fashion_mnist import load_fashion_mnist
    from dropcluster.experiments.probe import FirstConvProbe, analyze_activations, train_probe

    _positive("n-images", args.n_images)
    _positive("n-clusters", args.n_clusters)
    _positive("channels", args.channels)
    _positive("kernel-size", args.kernel_size)
    if args.n_images < 2:
        raise ValueError(f"--n-images should be at least 2, but got {args.n_images}")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps should be 0 or more, but got {args.train_steps}")
    if args.json_path is not None and args.json_path.is_dir():
        raise ValueError(f"--json {args.json_path} is a folder: give the path of a file to write")

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train", root=args.data_dir)
    test_images, _ = load_fashion_mnist("test", root=args.data_dir)
    if args.n_images > test_images.shape[0]:
        raise ValueError(
            f"--n-images should be at most {test_images.shape[0]} (the test split), "
            f"but got {args.n_images}"
        )
    mean, std = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
    train_x = (train_images.float() / 255 - mean) / std
    probe = FirstConvProbe(1, args.channels, args.kernel_size, n_classes=10)
    print(f"dropcluster {__version__}: cluster analysis of a first conv layer on Fashion-MNIST")
    if args.train_steps:
        print(f"training the probe network for {args.train_steps} steps ...", flush=True)
        accuracy = train_probe(probe, train_x, train_labels, args.train_steps, generator=generator)
        print(f"  training accuracy over the last 20 steps: {accuracy:.1%}")
    pick = torch.randperm(test_images.shape[0], generator=generator)[: args.n_images]
    batch = (test_images[pick].float() / 255 - mean) / std
    activations = probe.first_conv_activations(batch)
    n, c, h, w = activations.shape
    print(
        f"clustering {c} channels of {h}x{w} maps, {n} test images, k={args.n_clusters} ...",
        flush=True,
    )
    analysis = analyze_activations(activations, args.n_clusters, generator=generator)
    _print_summary(analysis, args.n_clusters)
    if args.json_path is not None:
        _write_json(args.json_path, analysis)
        print(f"per-channel results written to {args.json_path}")
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0


def _print_summary(analysis, n_clusters: int) -> None:
    import torch

    results = analysis.results
    hopkins = analysis.hopkins
    n_channels = hopkins.numel()
    print()
    print("structured channels under each rule for unstructured channels:")
    print(f"  {'rule':<9} {'structured':>10}  {'ReNA time':>9}  meaning")
    meanings = {
        "rena": "the paper: ReNA ends with at most k clusters (reference semantics)",
        "dead": "default: every channel whose maps are not all constant",
        "hopkins": "Spatial Hopkins >= 0.55 and not dead",
        "none": "every channel",
    }
    for rule, result in results.items():
        seconds = analysis.seconds[f"rena[{rule}]"]
        print(
            f"  {rule:<9} {result.n_structured:>5} / {n_channels:<3} {seconds * 1000:>7.0f} ms"
            f"  {meanings[rule]}"
        )
    print(f"  Spatial Hopkins of all channels: {analysis.seconds['spatial_hopkins'] * 1000:.0f} ms")

    default = results["dead"]
    sizes = default.sizes[default.structured][:, :n_clusters].float()
    if sizes.numel():
        nonempty = sizes[sizes > 0]
        print(
            f"\ncluster sizes in structured channels (default rule), pixels: "
            f"min {int(nonempty.min())}, median {int(nonempty.median())}, "
            f"max {int(nonempty.max())}"
        )
    print(
        f"Spatial Hopkins over channels: min {float(hopkins.min()):.3f}, "
        f"median {float(hopkins.median()):.3f}, max {float(hopkins.max()):.3f}"
    )

    print("\nper channel (n_found under the paper's rule; * = structured):")
    header = (
        f"  {'ch':>3} {'hopkins':>7} {'paper n_found':>13} {'paper':>5} {'dead':>4} {'hopkins':>7}"
    )
    print(header)
    paper = results["rena"]
    for channel in range(n_channels):
        marks = [
            "*" if bool(results[rule].structured[channel]) else "-"
            for rule in ("rena", "dead", "hopkins")
        ]
        print(
            f"  {channel:>3} {float(hopkins[channel]):>7.3f} "
            f"{int(paper.n_found[channel]):>13} {marks[0]:>5} {marks[1]:>4} {marks[2]:>7}"
        )

    candidates = torch.where(default.structured, hopkins, torch.full_like(hopkins, -1.0))
    best = int(candidates.argmax())
    if bool(default.structured[best]):
        print(
            f"\ncluster map of channel {best} (Spatial Hopkins {float(hopkins[best]):.3f}), "
            "one symbol per cluster:"
        )
        for row in default.labels[best].tolist():
            print("  " + "".join(_MAP_SYMBOLS[label % len(_MAP_SYMBOLS)] for label in row))


def _write_json(path: Path, analysis) -> None:
    channels = []
    for channel in range(analysis.hopkins.numel()):
        entry = {"channel": channel, "spatial_hopkins": float(analysis.hopkins[channel])}
        for rule, result in analysis.results.items():
            entry[f"n_found[{rule}]"] = int(result.n_found[channel])
            entry[f"structured[{rule}]"] = bool(result.structured[channel])
        channels.append(entry)
    document = {"seconds": analysis.seconds, "channels": channels}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, document)


if __name__ == "__main__":
    raise SystemExit(main())
