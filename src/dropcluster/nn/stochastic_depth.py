"""StochasticDepth (Huang et al., "Deep networks with stochastic depth", ECCV 2016).

A residual block computes ``shortcut(x) + branch(x)``; in training, stochastic depth drops the
whole branch with probability p (per sample, or for the whole batch) and rescales kept branches
by ``1 / (1 - p)`` so that the expectation is unchanged; evaluation uses every branch as is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dropcluster.nn._drop_rate import DropRateModule, check_drop_rate

MODES = ("row", "batch")


def stochastic_depth(
    x: Tensor,
    p: float | Tensor,
    mode: str = "row",
    *,
    training: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop the residual branch output ``x`` per sample (``"row"``) or per batch (``"batch"``).

    Args:
        x: (N, ...) output of a residual branch, any float dtype and device.
        p: drop rate in [0, 1), a float or a 0-d tensor (no host sync).
        mode: ``"row"``: each sample keeps its branch with probability 1 - p; ``"batch"``: one
            draw for the whole batch.
        training: identity when False.
        generator: random source on x's device.
        return_mask: also return the 0/1 keep mask, shape (N, 1, ..., 1) or (1, ..., 1).

    Returns:
        Tensor like x: ``x * keep / (1 - p)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode should be one of {MODES}, but got {mode!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("input should be a tensor with a batch dimension")
    if not isinstance(p, Tensor):
        p = check_drop_rate(p)
    if not training or (not isinstance(p, Tensor) and p == 0.0):
        if return_mask:
            return x, torch.ones((1,) * x.dim(), dtype=x.dtype, device=x.device)
        return x
    keep, scale = _keep_mask(x, p, mode, generator)
    out = x * (keep * scale)
    return (out, keep) if return_mask else out


def _keep_mask(x: Tensor, p, mode: str, generator) -> tuple[Tensor, Tensor]:
    shape = (x.shape[0] if mode == "row" else 1,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        p_tensor = p if isinstance(p, Tensor) else torch.tensor(p)
        p_tensor = p_tensor.to(device=x.device, dtype=torch.float32)
        uniform = torch.rand(shape, generator=generator, device=x.device)
        keep = (uniform >= p_tensor).to(x.dtype)
        scale = (1.0 / (1.0 - p_tensor)).to(x.dtype)
    return keep, scale


class StochasticDepth(DropRateModule):
    """Stochastic depth on a residual branch's output: ``shortcut + StochasticDepth(branch)``.

    Args:
        p: drop rate in [0, 1).
        mode: ``"row"`` (per sample, default) or ``"batch"``.
        generator: random source on the input's device.
    """

    def __init__(
        self, p: float = 0.1, mode: str = "row", *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(p)
        if mode not in MODES:
            raise ValueError(f"mode should be one of {MODES}, but got {mode!r}")
        self.mode = mode
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        result = stochastic_depth(
            x, self.p, self.mode, training=self.training, generator=self.generator,
            return_mask=self.record_mask,
        )  # fmt: skip
        return self._unpack(result)

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, mode={self.mode!r}"


class StochasticDepthResidual(DropRateModule):
    """A residual block with stochastic depth: ``shortcut(x) + drop(branch(x))``.

    With ``skip_dropped=True`` (training, row mode) the branch runs only on the kept samples
    and its output is index-added into the shortcut, which saves the branch's compute and memory
    for the dropped ones (about a fraction p). The price: the number of kept samples is read on
    the host (a synchronisation on accelerators), and normalisation layers inside the branch
    compute their batch statistics over the kept samples only. In batch mode a dropped batch
    skips the branch entirely. Outputs have the same distribution as with masking, and with the
    same generator state they are equal.

    Args:
        branch: the residual branch, mapping (N, ...) to the shortcut's output shape.
        p: drop rate in [0, 1).
        mode: ``"row"`` or ``"batch"``.
        skip_dropped: run the branch on kept samples only.
        shortcut: module applied to x for the identity path (default: identity).
        generator: random source on the input's device.
    """

    def __init__(
        self,
        branch: nn.Module,
        p: float = 0.1,
        mode: str = "row",
        *,
        skip_dropped: bool = False,
        shortcut: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p)
        if mode not in MODES:
            raise ValueError(f"mode should be one of {MODES}, but got {mode!r}")
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.mode = mode
        self.skip_dropped = skip_dropped
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        if not self.training:
            return identity + self.branch(x)
        keep, scale = _keep_mask(x, self.p, self.mode, self.generator)
        self._remember(keep)
        if not self.skip_dropped:
            return identity + self.branch(x) * (keep * scale)
        if self.mode == "batch":
            return identity + self.branch(x) * scale if bool(keep.any()) else identity
        kept = keep.view(-1).nonzero().squeeze(1)
        if kept.numel() == 0:
            return identity
        branch_out = self.branch(x.index_select(0, kept)) * scale
        return identity.index_add(0, kept, branch_out.to(identity.dtype))

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, mode={self.mode!r}, skip_dropped={self.skip_dropped}"
