"""What every regularizer module shares: the drop rate held in a buffer, and mask recording.

The current drop rate ``p`` lives in a 0-d float32 buffer, not a Python float: a schedule that
changes it (see :mod:`dropcluster.nn.schedule`) writes into the buffer in place, so the module's
device moves and DataParallel replicas carry it, and ``torch.compile`` never sees a new
constant (no recompilation when the rate changes). The buffer is not persistent: a state_dict
holds no ``p``, so adding a regularizer to a model keeps its checkpoints loadable strictly (a
schedule sets the rate again from the epoch when a run resumes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dropcluster.compat import loaded_drop_rate
from dropcluster.validation import check_float

__all__ = [
    "DropRateModule",
    "check_drop_rate",
    "uniform",
]


def check_drop_rate(p: float | Tensor, name: str = "p", *, allow_one: bool = False) -> float:
    """Return ``p`` as a float after checking that it lies in [0, 1) ([0, 1] with ``allow_one``).

    The one check of a drop rate: every layer, functional form and schedule calls it. Only
    stochastic depth allows 1 (every branch dropped, scale 0); the other regularizers' rescaling
    would divide by 0 there.

    Raises:
        ValueError: p is not a finite number (or a 1-element tensor holding one) in the range.
    """
    if isinstance(p, Tensor):
        if p.numel() != 1:
            raise ValueError(
                f"{name} should be a number or a 1-element tensor, but got shape {tuple(p.shape)}"
            )
        p = float(p)
    value = check_float(name, p)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"drop probability {name} has to be in {interval}, but got {value}")
    return value


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``torch.rand`` that names ``generator`` only when there is one.

    Under ``torch.compile`` with a dynamic batch size, ``torch.rand(..., generator=None)``
    takes the generator overload, which rejects symbolic sizes (torch 2.11, CUDA).
    """
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


class DropRateModule(nn.Module):
    """Base of the regularizer modules: a drop rate buffer ``p`` and optional mask recording.

    Args:
        p: drop rate in [0, 1).

    Attributes:
        p: 0-d float32 buffer with the current drop rate. Change it with :meth:`set_p`.
        record_mask: when True, ``forward`` keeps the mask it applied in ``last_mask`` (a
            tensor broadcastable to the input, after rescaling is *not* applied: 1 = kept).
        last_mask: the last recorded mask, or None.
    """

    p: Tensor
    #: Whether p = 1 is a valid rate (stochastic depth: every branch dropped).
    ALLOWS_ONE = False

    def __init__(self, p: float) -> None:
        super().__init__()
        # Not persistent: a model saved without regularizers loads strictly into one with them.
        rate = torch.tensor(check_drop_rate(p, allow_one=self.ALLOWS_ONE), dtype=torch.float32)
        self.register_buffer("p", rate, persistent=False)
        self.record_mask = False
        self.last_mask: Tensor | None = None

    def set_p(self, p: float) -> None:
        """Set the drop rate in place (no new tensor, so compiled graphs stay valid)."""
        value = check_drop_rate(p, allow_one=self.ALLOWS_ONE)
        with torch.no_grad():
            self.p.fill_(value)

    def _check_loaded_p(self, state_dict, prefix: str) -> float | None:
        """The drop rate a state_dict of 0.1 holds for this layer (None: none), checked."""
        return loaded_drop_rate(state_dict, prefix + "p", self.ALLOWS_ONE)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        rate = self._check_loaded_p(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "p"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if rate is not None:
            with torch.no_grad():
                self.p.fill_(rate)

    def _apply(self, fn, recurse=True):
        # `.half()`/`.to(bfloat16)` would round p (0.2 becomes 0.19995 in float16, and
        # floor(p * 15) then drops 2 clusters instead of 3): the rate stays float32.
        rate = self.p
        super()._apply(fn, recurse)
        if self.p.dtype != torch.float32:
            self.p = rate.to(device=self.p.device)
        return self

    def _remember(self, mask: Tensor | None) -> None:
        if self.record_mask:
            self.last_mask = mask

    def _unpack(self, result: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """The output of a functional form called with ``return_mask=self.record_mask``."""
        if self.record_mask:
            out, mask = result
            self.last_mask = mask
            return out
        return result
