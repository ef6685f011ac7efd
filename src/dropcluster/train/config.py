"""Everything one training run needs, in one typed, serialisable config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

#: Fields that do not change a run's results: a run may resume with other values.
NOT_IDENTITY = frozenset({"device", "eval_batch_size"})

#: Weight decay of the paper's protocol per data set.
PAPER_WEIGHT_DECAY = {"cifar100": 5e-4, "tiny-imagenet": 1e-4}


@dataclass
class TrainConfig:
    """One training run.

    Saved as ``config.json`` next to the run's results; load it back with
    :meth:`from_file` (JSON, or YAML when PyYAML is installed).

    Attributes:
        dataset: "cifar100", "tiny-imagenet", "fashion-mnist" or "synthetic".
        data_dir: where the data set's files are (None: the loader's default place).
        model: "resnet50", "resnet18", "resnet20" or "lenet5".
        stem: "imagenet" (the paper's) or "cifar"; None: the model's default.
        regularizer: "none", "dropout", "spatial_dropout", "dropblock", "dropcluster" or
            "stochastic_depth", placed as the paper did (``dropcluster.models.placement``).
        p: drop rate.
        regularizer_options: extra options of the regularizer (e.g. {"block_size": 5}).
        epochs, batch_size, lr, momentum: SGD with momentum (paper: 250 epochs, lr 0.1,
            momentum 0.9).
        weight_decay: None: the paper's value for the data set (5e-4 on CIFAR-100, 1e-4 on
            Tiny ImageNet; 5e-4 for the others), see :meth:`resolved_weight_decay`.
        lr_milestones, lr_gamma: step decay (paper: x0.1 at epochs 150 and 200).
        cluster_every: refit DropCluster's clusters at epochs s, 2s, ... (paper: 50).
        cluster_images: training images whose activations are clustered (more than one
            minibatch: the paper's unstructured rule depends on the batch size).
        train_fraction: stratified fraction of the training set (the small-sample runs).
        average_last: the final metric is the mean over the last K epochs (paper: 50).
        seed: seeds the model, the data order, augmentation and dropout masks.
        device: "cpu", "cuda", "cuda:1", ..., or "auto" (CUDA when available, else the CPU).
            Not part of a run's identity: a run may resume on another device.
        amp: mixed precision on CUDA; ignored on the CPU.
        amp_dtype: "bfloat16" (default) or "float16" (with gradient scaling).
        channels_last: NHWC memory format (faster convolutions on CPU and recent GPUs).
        compile: wrap the model in torch.compile.
        eval_batch_size: batch size for evaluation.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "resnet20"
    stem: str | None = None
    regularizer: str = "dropcluster"
    p: float = 0.1
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    cluster_every: int = 5
    cluster_images: int = 512
    train_fraction: float = 1.0
    average_last: int = 5
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, what was expected and what was given."""
        positive = ("epochs", "batch_size", "cluster_every", "cluster_images", "average_last",
                    "eval_batch_size")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive int, but got {value!r}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction should be in (0, 1], but got {self.train_fraction}")
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p should be in [0, 1), but got {self.p}")
        if self.lr <= 0 or self.resolved_weight_decay() < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                "expected lr > 0, weight_decay >= 0 and momentum in [0, 1), but got "
                f"lr={self.lr}, weight_decay={self.weight_decay}, momentum={self.momentum}"
            )
        try:
            if self.device != "auto":
                torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device should be 'auto', 'cpu', 'cuda', 'cuda:N', ..., but got {self.device!r}"
            ) from error
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype should be bfloat16 or float16, but got {self.amp_dtype!r}")
        if sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ValueError(f"lr_milestones should be increasing, but got {self.lr_milestones}")

    def resolved_weight_decay(self) -> float:
        """The weight decay in force: the given one, or the paper's for the data set."""
        if self.weight_decay is not None:
            return self.weight_decay
        return PAPER_WEIGHT_DECAY.get(self.dataset, 5e-4)

    def resolved_device(self) -> torch.device:
        """The device in force ("auto": the first CUDA device when there is one, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def same_run_as(self, other: TrainConfig) -> bool:
        """Equal in every field that changes results (the device and eval batch size do not)."""
        return self.run_differences(other) == {}

    def run_differences(self, other: TrainConfig) -> dict[str, Any]:
        """``{field: (mine, theirs)}`` for the fields that differ and change results."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {key: (mine[key], theirs[key]) for key in mine
                if mine[key] != theirs[key] and key not in NOT_IDENTITY}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a JSON file, or a YAML file (``.yaml``/``.yml``, needs PyYAML)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise ValueError(
                    f"{path} is YAML, which needs PyYAML: pip install pyyaml (or use JSON)"
                ) from error
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path} should hold a mapping of config keys, but got {values!r}")
        return cls.from_dict(values)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})
