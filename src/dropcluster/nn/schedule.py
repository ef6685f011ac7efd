"""Drop-rate schedules usable with every regularizer.

A schedule maps a (possibly fractional) epoch to a drop rate and writes it into the models'
regularizers. For this package's layers it writes the 0-d ``p`` buffer in place, so the value
travels with the module's device and never makes ``torch.compile`` recompile. torch's own
``nn.Dropout``/``nn.Dropout2d`` keep p as a Python float; the schedule sets that attribute
(under ``torch.compile`` each new value of a float attribute recompiles those two).

The rate is a function of the epoch alone, so a run that resumes sets the same rate at the same
epoch as one that never stopped (the buffer is not saved in a ``state_dict``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate
from dropcluster.validation import check_choice, check_float

__all__ = [
    "SCHEDULE_KINDS",
    "DropRateSchedule",
    "schedulable",
]


#: ``constant``: p; ``linear``: a ramp (DropBlock's); ``early``: p, then 0 (Liu et al. 2023's
#: early dropout); ``late``: 0, then p.
SCHEDULE_KINDS = ("constant", "linear", "early", "late")
_TORCH_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: The fields each kind reads besides p; the others must keep their defaults.
_USES = {
    "constant": (),
    "linear": ("start_epoch", "end_epoch", "start_p"),
    "early": ("end_epoch",),
    "late": ("start_epoch",),
}


@dataclass(frozen=True)
class DropRateSchedule:
    """Drop rate as a function of the epoch (0-based; the rate of epoch e is ``value(e)``).

    - ``"constant"``: ``p`` at every epoch.
    - ``"linear"``: ``start_p`` up to ``start_epoch``, then a straight line to ``p`` at
      ``end_epoch``, then ``p`` (DropBlock's ramp: Ghiasi et al. 2018, section 3).
    - ``"early"``: ``p`` before ``end_epoch``, 0 from it on (early dropout: Liu et al. 2023,
      "Dropout Reduces Underfitting").
    - ``"late"``: 0 before ``start_epoch``, ``p`` from it on.

    Epochs may be fractional, so a training loop can step the ramp every minibatch.

    Args:
        p: the drop rate in [0, 1] (1 only for layers that take it: stochastic depth; every
            other layer refuses it when :meth:`apply` writes it).
        kind: one of :data:`SCHEDULE_KINDS`.
        start_epoch: where the ramp starts (``"linear"``) or dropout starts (``"late"``), >= 0.
        end_epoch: where the ramp ends (``"linear"``, ``start_epoch <= end_epoch``) or dropout
            ends (``"early"``, > 0).
        start_p: the rate before the ramp (``"linear"`` only; default 0), in [0, 1].

    Raises:
        ValueError: a rate outside [0, 1], an unknown kind, a negative epoch or span, an
            ``"early"`` schedule that never drops, or a field the kind does not read.
    """

    p: float
    kind: str = "constant"
    start_epoch: float = 0.0
    end_epoch: float = 0.0
    start_p: float = 0.0

    def __post_init__(self) -> None:
        check_drop_rate(self.p, allow_one=True)
        check_drop_rate(self.start_p, "start_p", allow_one=True)
        check_choice("kind", self.kind, SCHEDULE_KINDS)
        check_float("start_epoch", self.start_epoch, minimum=0.0)
        check_float("end_epoch", self.end_epoch, minimum=0.0)
        for spec in fields(self)[2:]:
            if spec.name not in _USES[self.kind] and getattr(self, spec.name) != spec.default:
                reads = ", ".join(("p", *_USES[self.kind]))
                raise ValueError(
                    f"a {self.kind!r} schedule reads {reads}, but got "
                    f"{spec.name}={getattr(self, spec.name)!r}"
                )
        if self.kind == "linear" and self.start_epoch > self.end_epoch:
            raise ValueError(
                "a linear schedule's span should not be negative (0 <= start_epoch <= "
                f"end_epoch), but got start_epoch={self.start_epoch}, end_epoch={self.end_epoch}"
            )
        if self.kind == "early" and self.end_epoch <= 0:
            raise ValueError(
                f"an 'early' schedule drops before end_epoch, which should be > 0 (0 never "
                f"drops), but got end_epoch={self.end_epoch}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DropRateSchedule:
        """A schedule from its JSON form: ``{"p": 0.1, "kind": "linear", "end_epoch": 50}``.

        Raises:
            ValueError: a key that is not a field (the message lists them), or a bad value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"a drop-rate schedule should be a mapping, but got {values!r}")
        names = [spec.name for spec in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown or "p" not in values:
            raise ValueError(
                f"a drop-rate schedule takes the keys {names} (p required), but got "
                f"{sorted(values)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what :meth:`from_dict` reads)."""
        return asdict(self)

    def value(self, epoch: float) -> float:
        """The drop rate at ``epoch`` (a float, e.g. ``epoch + step / steps_per_epoch``)."""
        if self.kind == "early":
            return self.p if epoch < self.end_epoch else 0.0
        if self.kind == "late":
            return self.p if epoch >= self.start_epoch else 0.0
        if self.kind == "constant" or epoch >= self.end_epoch:
            return self.p
        if epoch <= self.start_epoch:
            return self.start_p
        fraction = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.start_p + fraction * (self.p - self.start_p)

    def apply(self, model: nn.Module, epoch: float) -> float:
        """Set the drop rate of every regularizer inside ``model``; returns the rate set.

        One rate goes into every layer: per-layer rates (stochastic depth's linear depth rule)
        are not kept, and layers of other kinds (a plugin's own module) are left alone; with
        no layer to set it warns.

        Every layer is checked before any is written, so a rate one of them refuses (1 for
        any layer but stochastic depth) changes nothing.

        Raises:
            ValueError: a layer of this package refuses the rate; the message names it.
        """
        rate = self.value(epoch)
        layers = []
        for name, module in model.named_modules():
            if isinstance(module, DropRateModule):
                try:
                    check_drop_rate(rate, allow_one=module.ALLOWS_ONE)
                except ValueError as error:
                    raise ValueError(
                        f"{self!r} gives p={rate} at epoch {epoch}, which "
                        f"{type(module).__name__} {name or '(the model)'!r} refuses: {error}"
                    ) from None
                layers.append(module)
            elif isinstance(module, _TORCH_DROPOUTS):
                layers.append(module)
        if not layers:
            warnings.warn(
                f"{self!r} found no layer whose rate it sets in the model (this package's "
                f"layers and torch's dropouts): nothing was changed",
                stacklevel=2,
            )
        for module in layers:
            if isinstance(module, DropRateModule):
                module.set_p(rate)
            else:
                module.p = rate
        return rate


def schedulable(module: nn.Module) -> bool:
    """Whether :meth:`DropRateSchedule.apply` sets the rate of ``module`` (this package's
    layers and torch's dropouts; an ``nn.Identity`` has no rate)."""
    return isinstance(module, (DropRateModule, *_TORCH_DROPOUTS))
