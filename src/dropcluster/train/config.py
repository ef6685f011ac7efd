"""Everything one training run needs, in one typed, serialisable config."""

from __future__ import annotations

import json
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dropcluster.files import atomic_write_text
from dropcluster.train.tracking import TRACKERS
from dropcluster.validation import MAX_SEED, check_choice, check_fields, check_float, check_int

if TYPE_CHECKING:
    from dropcluster.nn import DropRateSchedule

__all__ = [
    "ADDED_FIELDS",
    "DEFAULT_DEVICE",
    "NOT_IDENTITY",
    "PAPER_WEIGHT_DECAY",
    "PLACEMENT_OPTIONS",
    "SMALL_BATCH_PER_PROCESS",
    "SUPPORTED_DEVICE_TYPES",
    "WEIGHT_DECAY_ON",
    "TrainConfig",
    "describe_device",
    "parse_assignments",
    "parse_device",
    "resolve_device",
]


#: Fields that do not change a run's results: a run may resume with other values.
NOT_IDENTITY = frozenset(
    {
        "device",
        "eval_batch_size",
        "keep_checkpoints",
        "test_every",
        "checkpoint_every",
        "plugins",
        "tracker",
    }
)

#: Fields added after 0.4: :meth:`TrainConfig.to_dict` leaves them out while they hold their
#: default (a stored config without them is the same run).
ADDED_FIELDS = ("drop_schedule", "plugins", "tracker")

#: Keys of ``regularizer_options`` that say where the regularizer goes, not how it works.
PLACEMENT_OPTIONS = ("slot", "depth_rule")

#: Which parameters weight decay applies to: conv/linear weights only, or every parameter.
WEIGHT_DECAY_ON = ("weights", "all")

#: The device of a config that names none: CUDA when this machine has it, else the CPU.
DEFAULT_DEVICE = "auto"

#: Images per process below which a distributed run's batch norm statistics, computed by each
#: process over its own share of the batch, get noisy (the usual advice: use SyncBatchNorm
#: below about 32 per GPU; Wu & He, "Group Normalization", 2018, show the error of batch norm
#: growing as the per-device batch shrinks below 32).
SMALL_BATCH_PER_PROCESS = 32

#: Weight decay of the paper's protocol per data set.
PAPER_WEIGHT_DECAY = {"cifar100": 5e-4, "tiny-imagenet": 1e-4}


@dataclass
class TrainConfig:
    """One training run.

    Saved as ``config.json`` next to the run's results; load it back with
    :meth:`from_file` (JSON, or YAML when PyYAML is installed).

    Attributes:
        dataset: "cifar10", "cifar100", "tiny-imagenet", "fashion-mnist" or "synthetic".
        data_dir: where the data set's files are (None: the loader's default place).
        model: "resnet50", "resnet18", "resnet20" or "lenet5".
        stem: "imagenet" (the paper's, inferred from the 64 x 16 x 16 first-layer output it
            reports on CIFAR-100) or "cifar"; None: the model's default.
        regularizer: "none", "dropout", "spatial_dropout", "dropblock", "dropcluster" or
            "stochastic_depth", placed as the paper did (``dropcluster.models.placement``);
            or a name registered by a plugin (``plugins``; so can ``dataset`` and ``model``).
        p: drop rate (with ``drop_schedule``: the rate the schedule reaches).
        regularizer_options: extra options of the regularizer (e.g. {"block_size": 5}), and
            ``slot`` / ``depth_rule`` of :func:`dropcluster.models.place_regularizer`; checked
            by building the regularizer once.
        drop_schedule: how p changes over the epochs: None (default) or ``{"kind":
            "constant"}``: p throughout; ``{"kind": "linear", "start_epoch": 0, "end_epoch": 50,
            "start_p": 0}``: a ramp from start_p to p (DropBlock's); ``{"kind": "early",
            "end_epoch": 20}``: p before epoch 20, then 0 (early dropout); ``{"kind": "late",
            "start_epoch": 20}``: 0 before epoch 20, then p. The keys are
            :class:`~dropcluster.nn.DropRateSchedule`'s but p. The rate is set at the start of
            every epoch (the value at that whole epoch) and logged as ``p``; a resumed run sets
            the same rates. Set with ``--set drop_schedule='{"kind": "early", "end_epoch": 20}'``.
        variant: a name for these settings in reports (a sweep compares
            ``regularizer:variant`` arms, e.g. ``dropcluster:ours``). It changes nothing in
            training but is part of the run's identity (a run resumes under its own name).
        epochs: number of training epochs (not stated by the paper: an assumption; the paper
            presets use 250, past its lr milestones 150 and 200 and its last-50-epoch average).
        batch_size: training minibatch size, over all processes under distributed training
            (the paper does not state it).
        lr: initial learning rate of SGD (paper: 0.1).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: None: the paper's value for the data set (5e-4 on CIFAR-100, 1e-4 on
            Tiny ImageNet; 5e-4 for the others), see :meth:`resolved_weight_decay`.
        weight_decay_on: ``"weights"`` (default, this project's choice): conv and linear weights
            only, batch-norm scales and shifts and biases are not decayed; ``"all"``: plain
            weight decay on every parameter (the paper's presets: the paper gives a weight decay
            and no exclusion).
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_gamma``
            (paper: 150 and 200).
        lr_gamma: factor of the step decay (paper: 0.1).
        cluster_every: refit DropCluster's clusters at epochs s, 2s, ... (paper: 50).
        cluster_images: training images whose activations are clustered. The paper clusters
            "a minibatch" without giving its size (an assumption: the paper presets use one
            minibatch of 128); the default, 512, makes the paper's unstructured rule less
            dependent on the batch size.
        train_fraction: stratified fraction of the training set (the small-sample runs).
        average_last: the final metric is the mean over the last K epochs (paper: 50).
        seed: seeds the model, the data order, augmentation and dropout masks (0 to
            2**32 - 1).
        device: "auto" (default: CUDA when available, else the CPU), "cpu", "cuda",
            "cuda:1", ...; other device types ("mps", "xla", ...) are refused. Not part of a
            run's identity: a run may resume on another device.
        amp: mixed precision on CUDA; ignored on the CPU.
        amp_dtype: "bfloat16" (default) or "float16" (with gradient scaling).
        channels_last: NHWC memory format for the model and its inputs.
        compile: wrap the model in torch.compile.
        sync_batchnorm: under distributed training (torchrun), batch norm statistics over the
            whole batch of all processes (SyncBatchNorm, CUDA) instead of each process's share.
        eval_batch_size: batch size for evaluation.
        test_every: evaluate on the test set after every k-th epoch (default 1: every epoch, a
            full learning curve) and always after each of the last ``average_last`` epochs,
            the ones the final metric averages; the other epochs' records have no test
            accuracy. A larger k saves evaluation time and leaves the result unchanged (the
            evaluation draws no random numbers, unless a regularizer keeps sampling in
            evaluation: ``sample_in_eval``). Not part of a run's identity.
        checkpoint_every: write the run's checkpoint after every k-th epoch and after the last
            (default 1: every epoch). A crash then repeats at most k - 1 epochs on resume, with
            the same result (the checkpoint holds every random state); a larger k saves the
            time of writing a large model (ResNet-50 with its SGD state is about 190 MB). Not
            part of a run's identity.
        keep_checkpoints: epochs after which a copy of the checkpoint is kept as
            ``checkpoint-epoch{E}.pt`` beside the run's last one (e.g. ``[50]``: the model the
            paper's Figures 1-4 analyse); epochs past ``epochs`` keep nothing. Not part of a
            run's identity.
        plugins: modules imported before the names are checked (``"my_pkg.methods"`` or
            ``"my_pkg.methods:register"``): the plugins that register this run's regularizer,
            model or data set (:mod:`dropcluster.plugins`); recorded so that sweep workers,
            ``--resume`` and ``evaluate --checkpoint`` import them too. Not part of a run's
            identity.
        tracker: where the training curves also go: "none" (default: ``log.jsonl`` only) or
            "tensorboard" (event files in the run folder, beside ``log.jsonl``: loss, accuracy,
            learning rate, drop rate, refits, corrupted-test results; needs the ``tensorboard``
            extra). Not part of a run's identity.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "resnet20"
    stem: str | None = None
    regularizer: str = "dropcluster"
    p: float = 0.1
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    drop_schedule: dict[str, Any] | None = None
    variant: str | None = None
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    weight_decay_on: str = "weights"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    cluster_every: int = 5
    cluster_images: int = 512
    train_fraction: float = 1.0
    average_last: int = 5
    seed: int = 0
    device: str = DEFAULT_DEVICE
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    compile: bool = False
    sync_batchnorm: bool = False
    eval_batch_size: int = 500
    test_every: int = 1
    checkpoint_every: int = 1
    keep_checkpoints: list[int] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    tracker: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, what was expected and what was given.

        Types are checked against the annotations (``"p": "0.1"`` or ``"seed": 1.5`` are
        refused), numbers must be finite, names must be known. Whether a CUDA device exists is
        checked later, by :meth:`resolved_device`, so a config written on a GPU machine still
        loads on a CPU-only one.
        """
        from dropcluster.data.datasets import dataset_names
        from dropcluster.models import model_names
        from dropcluster.nn.registry import regularizer_names
        from dropcluster.plugins import load_plugins

        check_fields(self)
        load_plugins(self.plugins)  # before the names: they may register them
        check_choice("dataset", self.dataset, dataset_names(self.dataset))
        check_choice("model", self.model, model_names(self.model))
        check_choice("stem", self.stem, (None, "imagenet", "cifar"))
        check_choice("regularizer", self.regularizer, regularizer_names(self.regularizer))
        if self.variant is not None and not self.variant:
            raise ValueError("variant should be a non-empty name or None, but got ''")
        for name in (
            "epochs",
            "batch_size",
            "cluster_every",
            "cluster_images",
            "average_last",
            "eval_batch_size",
            "test_every",
            "checkpoint_every",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_float("train_fraction", self.train_fraction, above=0.0, maximum=1.0)
        check_float("p", self.p, minimum=0.0, below=1.0)
        check_float("lr", self.lr, above=0.0)
        check_float("momentum", self.momentum, minimum=0.0, below=1.0)
        if self.weight_decay is not None:
            check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_choice("weight_decay_on", self.weight_decay_on, WEIGHT_DECAY_ON)
        check_float("lr_gamma", self.lr_gamma, above=0.0)
        for kept in self.keep_checkpoints:  # entries past `epochs` keep nothing (--set epochs=)
            check_int("keep_checkpoints entries", kept, minimum=1)
        for milestone in self.lr_milestones:
            check_int("lr_milestones entries", milestone, minimum=1)
        if sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ValueError(f"lr_milestones should be increasing, but got {self.lr_milestones}")
        check_choice("amp_dtype", self.amp_dtype, ("bfloat16", "float16"))
        parse_device(self.device)
        check_choice("tracker", self.tracker, TRACKERS)
        self._check_regularizer_options()
        self.drop_rate_schedule()  # checks drop_schedule

    def _check_regularizer_options(self) -> None:
        from dropcluster.models.placement import check_placement
        from dropcluster.nn import build_regularizer

        # The placement keys go to place_regularizer, the rest to the module: build it once
        # (cheap: no fitting) so that a bad option fails now, not when the run starts. The slot
        # names depend on the model: they are checked when it is built.
        options = self.regularizer_options
        try:
            check_placement(options.get("slot"), options.get("depth_rule", "constant"))
            build_regularizer(self.regularizer, self.p, **self._module_options())
        except (TypeError, ValueError) as error:
            raise ValueError(f"regularizer_options {self.regularizer_options}: {error}") from error

    def drop_rate_schedule(self) -> DropRateSchedule | None:
        """The :class:`~dropcluster.nn.DropRateSchedule` of ``drop_schedule`` with the config's
        p as its target; None without one.

        Raises:
            ValueError: a bad schedule (one line naming ``drop_schedule``), a schedule on a run
                without a regularizer, or a ``start_p`` the regularizer refuses.
        """
        from dropcluster.nn import DropRateSchedule, build_regularizer
        from dropcluster.nn.schedule import schedulable

        if self.drop_schedule is None:
            return None
        where = f"drop_schedule {json.dumps(self.drop_schedule, sort_keys=True)}"
        if "p" in self.drop_schedule:
            raise ValueError(f"{where}: a schedule takes no p here, it reaches the config's p")
        if self.regularizer == "none":
            raise ValueError(f"{where}: regularizer 'none' has no drop rate to schedule")
        if self.regularizer_options.get("depth_rule", "constant") != "constant":
            # A schedule writes one rate into every layer: it would flatten the per-block
            # rates of the linear depth rule.
            raise ValueError(
                f"{where}: a schedule sets one rate in every layer, which would undo "
                f"depth_rule={self.regularizer_options['depth_rule']!r}; use one or the other"
            )
        try:
            schedule = DropRateSchedule.from_dict({**self.drop_schedule, "p": self.p})
            if schedule.start_p != self.p:  # e.g. start_p=1, which only StochasticDepth takes
                build_regularizer(self.regularizer, schedule.start_p, **self._module_options())
            module = build_regularizer(self.regularizer, self.p, **self._module_options())
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        if not schedulable(module):
            raise ValueError(
                f"{where}: a schedule sets p of this package's layers and torch's dropouts, but "
                f"regularizer {self.regularizer!r} builds {type(module).__name__}, whose rate "
                f"it cannot set (a plugin's layer can subclass dropcluster.nn.DropRateModule)"
            )
        return schedule

    def refit_warning(self, has_dropcluster: bool | None = None) -> str | None:
        """Why DropCluster would never be fitted in this run (``cluster_every`` at or past
        ``epochs``: the first refit is at the start of epoch ``cluster_every``), with what to
        change; None when it is fitted or the model holds no DropCluster2d (``has_dropcluster``;
        None: whether the regularizer is ``"dropcluster"``)."""
        from dropcluster.nn import RefitSchedule

        if has_dropcluster is None:
            has_dropcluster = self.regularizer == "dropcluster"
        refits = RefitSchedule(every=self.cluster_every)
        if not has_dropcluster or not refits.never_fits(self.epochs):
            return None
        owner = f"cluster_every={self.cluster_every}"
        return refits.too_late_message(self.epochs, owner, "cluster_every")

    def batch_norm_warning(self, world: int) -> str | None:
        """Why batch norm would be noisy in this run on ``world`` processes (each normalising
        over its own share of the batch, fewer than :data:`SMALL_BATCH_PER_PROCESS` images,
        without ``sync_batchnorm``), with what to change; None otherwise. For a model with
        batch norm (the caller knows)."""
        share = self.batch_size // max(1, world)
        if world <= 1 or self.sync_batchnorm or share >= SMALL_BATCH_PER_PROCESS:
            return None
        return (
            f"each of the {world} processes computes batch norm statistics over its own "
            f"{share} images (batch_size {self.batch_size} / {world}), fewer than "
            f"{SMALL_BATCH_PER_PROCESS}: noisy statistics can cost accuracy; --sync-batchnorm "
            f"(CUDA) computes them over the whole batch, or raise --batch-size"
        )

    def _module_options(self) -> dict[str, Any]:
        """``regularizer_options`` without the placement keys: the module's own options."""
        return {
            key: value
            for key, value in self.regularizer_options.items()
            if key not in PLACEMENT_OPTIONS
        }

    def resolved_weight_decay(self) -> float:
        """The weight decay in force: the given one, or the paper's for the data set."""
        if self.weight_decay is not None:
            return self.weight_decay
        return PAPER_WEIGHT_DECAY.get(self.dataset, 5e-4)

    def decay_of_norms_and_biases(self) -> float:
        """The weight decay of batch-norm parameters and biases (0 unless ``"all"``)."""
        return self.resolved_weight_decay() if self.weight_decay_on == "all" else 0.0

    def tests_after(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a test-set evaluation (``test_every``)."""
        return (epoch + 1) % self.test_every == 0 or epoch >= self.epochs - self.average_last

    def checkpoints_after(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a checkpoint (``checkpoint_every``, the
        last epoch, ``keep_checkpoints``)."""
        done = epoch + 1
        return (
            done % self.checkpoint_every == 0
            or done == self.epochs
            or (done in self.keep_checkpoints)
        )

    def resolved_device(self) -> torch.device:
        """The device in force (see :func:`resolve_device`)."""
        return resolve_device(self.device)

    def same_run_as(self, other: TrainConfig) -> bool:
        """Equal in every field that changes results (:data:`NOT_IDENTITY`: the device, the eval
        batch size and the kept checkpoints do not)."""
        return self.run_differences(other) == {}

    def run_differences(self, other: TrainConfig) -> dict[str, Any]:
        """``{field: (mine, theirs)}`` for the fields that differ and change results."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            key: (mine.get(key), theirs.get(key))
            for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key) and key not in NOT_IDENTITY
        }

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready mapping. Fields added since 0.4 (:data:`ADDED_FIELDS`)
        appear only when they differ from their default, so the configs of runs made before
        them (in checkpoints and sweep databases) stay equal to today's configs of the same
        runs."""
        values = asdict(self)
        for spec in fields(self):
            if spec.name in ADDED_FIELDS and values[spec.name] == _default(spec):
                del values[spec.name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a mapping of field names to values (unknown keys are refused)."""
        if not isinstance(values, dict):
            raise ValueError(f"a config should be a mapping of keys, but got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a JSON file, or a YAML file (``.yaml``/``.yml``, needs PyYAML).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: unparsable, not a mapping, or a bad value; the message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise ValueError(
                    f"{path} is YAML, which needs PyYAML: pip install pyyaml (or use JSON)"
                ) from error
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                detail = " ".join(str(error).split())
                raise ValueError(f"{path} is not valid YAML: {detail}") from error
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} should hold a mapping of config keys, but got {values!r}")
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _default(spec: Field) -> Any:
    """A dataclass field's default value."""
    return spec.default if spec.default is not MISSING else spec.default_factory()


#: The device types dropcluster trains and evaluates on (its tests run on both).
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def parse_device(device: str) -> str:
    """Check that ``device`` names a device dropcluster supports: "auto", "cpu", "cuda",
    "cuda:N". Devices torch knows but dropcluster was never tested on ("mps", "xla", "meta",
    ...) are refused by name, before anything is loaded onto them."""
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device should be 'auto', 'cpu', 'cuda', 'cuda:N', ..., but got {device!r}"
        ) from error
    _check_device_type(parsed)
    return device


def _check_device_type(device: torch.device) -> None:
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"device {str(device)!r} is not supported: dropcluster runs on 'cpu' and 'cuda' "
            f"devices ('auto' takes CUDA when there is one)"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """The device to use: "auto" is the first CUDA device when there is one, else the CPU.

    Raises:
        ValueError: a CUDA (or other accelerator) device that this machine does not have.
    """
    if isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(parse_device(device))
    _check_device_type(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(
                f"device {str(device)!r} was asked for, but this torch ({torch.__version__}) "
                f"has {build}: use --device cpu or --device auto"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {str(device)!r} was asked for, but only {count} CUDA device(s) exist"
            )
    return device


def describe_device(device: str, world: int = 1) -> str:
    """One line saying where a run computes, e.g. ``device: cpu (auto: no CUDA device is
    visible)`` or ``device: cuda:0, NVIDIA H100 80GB HBM3 (auto: 2 CUDA devices visible)``;
    under distributed training (``world`` processes) a CUDA run takes one GPU per process.

    Raises:
        ValueError: as :func:`resolve_device` (a CUDA device this machine lacks).
    """
    resolved = resolve_device(device)
    if resolved.type == "cuda" and world > 1:
        text = f"cuda, one GPU per process ({world} processes, by local rank)"
    elif resolved.type == "cuda":
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        text = f"cuda:{index}, {torch.cuda.get_device_name(index)}"
    else:
        text = "cpu"
    if device == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        seen = "no CUDA device is visible" if count == 0 else f"{count} CUDA device(s) visible"
        text += f" (auto: {seen})"
    return f"device: {text}"


def parse_assignments(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["epochs=10", "stem=cifar"]`` -> ``{"epochs": 10, "stem": "cifar"}``.

    Values are read as JSON (numbers, lists, true/false/null), else kept as text; the keys are
    checked where the values are used (``TrainConfig.from_dict``).
    """
    values: dict[str, Any] = {}
    for item in items:
        key, separator, raw = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"{flag} should look like KEY=VALUE, but got {item!r}")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values
