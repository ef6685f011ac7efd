"""``dropcluster evaluate --model MODULE:FACTORY``: any classifier on a corrupted test set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dropcluster.validation import path_argument

__all__ = ["add_model_arguments", "check_model_arguments", "run_model_evaluation"]

#: Options that belong to --model only, and to --checkpoint only (dest names).
_MODEL_ONLY = (
    "weights",
    "model_option",
    "dataset",
    "data_dir",
    "source",
    "mean",
    "std",
    "json",
    "baseline",
)
_RUN_ONLY = ("jpeg_quality", "corrupted_from")


def add_model_arguments(group) -> None:
    """The options of ``evaluate --model`` (on an argparse group)."""
    group.add_argument(
        "--weights",
        type=path_argument,
        default=None,
        metavar="FILE",
        help="weights to load into the model (a state dict, or a checkpoint "
        "holding one under state_dict/model); default: the factory's own",
    )
    group.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the factory, e.g. num_classes=100 (repeatable; "
        "values are read as JSON, else as text)",
    )
    group.add_argument(
        "--dataset",
        choices=("cifar10-c", "cifar100-c", "tiny-imagenet-c"),
        default=None,
        help="the corrupted test set (required with --model)",
    )
    group.add_argument(
        "--data-dir",
        type=path_argument,
        default=None,
        metavar="DIR",
        help="folder holding the released set (CIFAR-10-C/ ...) and the clean "
        "data set; default: $DROPCLUSTER_DATA, else ~/.cache/dropcluster/data",
    )
    group.add_argument(
        "--source",
        choices=("released", "generated"),
        default="released",
        help="released: the published files (default); generated: corrupt the clean test set here",
    )
    group.add_argument(
        "--mean",
        default=None,
        metavar="M,M,M",
        help="per-channel mean the model's input is normalised with (pixels in "
        "[0, 1]), e.g. 0.4914,0.4822,0.4465",
    )
    group.add_argument("--std", default=None, metavar="S,S,S", help="per-channel std, with --mean")
    group.add_argument(
        "--json",
        type=path_argument,
        default=None,
        metavar="OUT",
        help="write the rows, errors and mCE to this JSON file",
    )
    group.add_argument(
        "--baseline",
        default=None,
        metavar="alexnet|FILE",
        help="also report CE and relative CE normalised by a baseline: 'alexnet' "
        "(its ImageNet-C errors, for ImageNet-sized models) or a --json file of "
        "another model",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse options of the other mode, and --model without --dataset, in one line."""
    if args.model is not None:
        given = [name for name in _RUN_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{_flags(given)} go with --checkpoint, not --model")
        if args.dataset is None:
            raise ValueError("--model needs --dataset (cifar10-c, cifar100-c or tiny-imagenet-c)")
        if (args.mean is None) != (args.std is None):
            raise ValueError("--mean and --std go together")
        return
    given = [name for name in _MODEL_ONLY if getattr(args, name) not in (None, [], "released")]
    if given:
        raise ValueError(f"{_flags(given)} go with --model, not --checkpoint")


def run_model_evaluation(args: argparse.Namespace) -> int:
    """Build, load and score the model; print the table; write --json. Returns 0."""
    from dropcluster.robustness import RobustnessResult, build_model, evaluate_model, load_weights
    from dropcluster.train.config import parse_assignments, resolve_device

    normalize = None
    if args.mean is not None:
        normalize = (_numbers("--mean", args.mean), _numbers("--std", args.std))
    baseline = _read_baseline(args.baseline, RobustnessResult)
    if args.json is not None and not args.json.parent.is_dir():
        raise FileNotFoundError(f"--json: the folder {args.json.parent} does not exist")
    from dropcluster.experiments.corruption_eval import parse_corruptions, parse_severities

    parse_corruptions(args.corruptions or "benchmark")  # bad names: one line, before any work
    parse_severities(args.severities)
    device = resolve_device(args.device)
    model = build_model(args.model, parse_assignments(args.model_option, "--model-option"))
    if args.weights is not None:
        load_weights(model, args.weights)
    print(
        f"evaluating {args.model} on {args.dataset} ({args.source}) on {device}",
        file=sys.stderr,
    )
    result = evaluate_model(
        model,
        args.dataset,
        data_dir=args.data_dir,
        source=args.source,
        corruptions=args.corruptions or "benchmark",
        severities=args.severities,
        normalize=normalize,
        batch_size=args.batch_size or 256,
        device=device,
        limit=args.limit,
        seed=args.seed,
        family=args.family,
        description=args.model,
    )
    document = result.to_json()
    print(result.table())
    if baseline is not None:
        against = _against(result, baseline, args.baseline)
        document["baseline"] = against
        for key, label in (("mce", "mCE"), ("relative_mce", "relative mCE")):
            if against.get(key) is not None:
                print(f"{label} normalised by {args.baseline}: {against[key]:.2f}")
    if args.json is not None:
        from dropcluster.files import atomic_write_json

        atomic_write_json(args.json, document)
        print(f"results written to {args.json}")
    return 0


def _against(result, baseline, name: str) -> dict:
    """CE, mCE, relative CE and relative mCE against the baseline (None where undefined)."""
    against: dict = {"name": name}
    try:
        against["ce"] = result.corruption_errors(baseline)
        against["mce"] = sum(against["ce"].values()) / len(against["ce"])
    except ValueError as error:
        against["mce"] = None
        print(f"CE against {name}: not computed ({error})", file=sys.stderr)
    try:
        against["relative_ce"] = result.relative_corruption_errors(baseline)
        values = against["relative_ce"].values()
        against["relative_mce"] = sum(values) / len(values)
    except ValueError as error:
        against["relative_mce"] = None
        print(f"relative CE against {name}: not computed ({error})", file=sys.stderr)
    return against


def _read_baseline(value: str | None, result_type):
    if value is None:
        return None
    if value.lower() == "alexnet":
        return "alexnet"
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"--baseline should be 'alexnet' or a --json file, but {path} is no file"
        )
    return result_type.from_json(path)


def _numbers(flag: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} should be comma-separated numbers, but got {text!r}") from None


def _flags(names: list[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)
