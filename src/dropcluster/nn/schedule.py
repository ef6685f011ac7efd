"""Drop-rate schedules usable with every regularizer.

A schedule maps a (possibly fractional) epoch to a drop rate and writes it into the models'
regularizers. For this package's layers it writes the 0-d ``p`` buffer in place, so the value
travels with ``state_dict`` and never makes ``torch.compile`` recompile. torch's own
``nn.Dropout``/``nn.Dropout2d`` keep p as a Python float; the schedule sets that attribute (under
``torch.compile`` each new value of a float attribute recompiles those two).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate
from dropcluster.validation import check_choice, check_float

__all__ = [
    "SCHEDULE_KINDS",
    "DropRateSchedule",
]


SCHEDULE_KINDS = ("constant", "linear")
_TORCH_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class DropRateSchedule:
    """Drop rate as a function of the epoch.

    ``"constant"``: ``p`` at every epoch. ``"linear"``: ``start_p`` up to ``start_epoch``, then a
    straight line to ``p`` at ``end_epoch``, then ``p`` (DropBlock's ramp: Ghiasi et al. 2018,
    section 3). Epochs may be fractional, so a training loop can step it every minibatch.

    Args:
        p: final drop rate in [0, 1).
        kind: ``"constant"`` or ``"linear"``.
        start_epoch, end_epoch: the ramp's ends, ``0 <= start_epoch <= end_epoch``.
        start_p: rate before the ramp (default 0).
    """

    p: float
    kind: str = "constant"
    start_epoch: float = 0.0
    end_epoch: float = 0.0
    start_p: float = 0.0

    def __post_init__(self) -> None:
        check_drop_rate(self.p)
        check_drop_rate(self.start_p, "start_p")
        check_choice("kind", self.kind, SCHEDULE_KINDS)
        check_float("start_epoch", self.start_epoch, minimum=0.0)
        check_float("end_epoch", self.end_epoch)
        if self.start_epoch > self.end_epoch:
            raise ValueError(
                "epochs should satisfy 0 <= start_epoch <= end_epoch, but got "
                f"start_epoch={self.start_epoch}, end_epoch={self.end_epoch}"
            )

    def value(self, epoch: float) -> float:
        """The drop rate at ``epoch`` (a float, e.g. ``epoch + step / steps_per_epoch``)."""
        if self.kind == "constant" or epoch >= self.end_epoch:
            return self.p
        if epoch <= self.start_epoch:
            return self.start_p
        fraction = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.start_p + fraction * (self.p - self.start_p)

    def apply(self, model: nn.Module, epoch: float) -> float:
        """Set the drop rate of every regularizer inside ``model``; returns the rate set."""
        rate = self.value(epoch)
        for module in model.modules():
            if isinstance(module, DropRateModule):
                module.set_p(rate)
            elif isinstance(module, _TORCH_DROPOUTS):
                module.p = rate
        return rate
