"""StochasticDepth (Huang et al., "Deep networks with stochastic depth", ECCV 2016).

A residual block computes ``shortcut(x) + branch(x)``. In training, stochastic depth drops the
whole branch with probability p, per sample (``mode="row"``, as timm and torchvision do by
default) or for the whole batch (``mode="batch"``, the paper's section 3 draws one Bernoulli
variable per block and minibatch), and rescales the kept branches by ``1 / (1 - p)`` so that
the expected output is unchanged; evaluation uses every branch as is. p = 1 drops every branch
in training (the output is zeros), as torchvision allows. (The paper rescales at
test time instead, by the survival probability; the two are equivalent in expectation.) The
paper's rates grow linearly with depth, ``p_l = l / L * p_L`` for block l of L: give each
block its own p.

Two ways to apply it:

- :func:`stochastic_depth` / :class:`StochasticDepth` multiply a branch's output by the keep
  mask: ``out = shortcut + StochasticDepth(p)(branch(x))``. No host synchronisation, works
  under ``torch.compile``; the branch is computed for every sample.
- :class:`StochasticDepthResidual` wraps the whole block, and with ``skip_dropped=True`` runs
  the branch only on the kept samples: about a fraction p less compute and activation memory,
  for one host read of the kept count per forward (see the class docstring for the
  differences).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate, uniform
from dropcluster.validation import check_choice

__all__ = [
    "MODES",
    "StochasticDepth",
    "StochasticDepthResidual",
    "stochastic_depth",
]


MODES = ("row", "batch")


def stochastic_depth(
    x: Tensor,
    p: float | Tensor,
    mode: str = "row",
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop the residual branch output ``x`` per sample (``"row"``) or per batch (``"batch"``).

    Args:
        x: (N, ...) output of a residual branch: any floating dtype, device and memory format.
        p: drop rate in [0, 1]: a float (checked) or a 1-element float tensor (its shape is
            checked, its value trusted as the modules' buffers are: reading it would be a host
            synchronisation on accelerators and a graph break under ``torch.compile``).
        mode: ``"row"``: each sample keeps its branch with probability 1 - p, independently;
            ``"batch"``: one draw for the whole batch.
        training: identity (``x`` itself is returned) when False, and when p is the float 0.
        generator: random source on x's device (default: the global one).
        return_mask: also return the 0/1 keep mask, before rescaling.

    Returns:
        Tensor like x (same shape, dtype and memory format): ``x * keep / (1 - p)``; with
        ``return_mask``, also ``keep``, shape (N, 1, ..., 1) in row mode or (1, ..., 1) in batch
        mode (all ones when nothing is dropped), in x's dtype.

    The factor ``1 / (1 - p)`` is applied in x's dtype, as timm and torchvision do: in
    bfloat16 it is rounded by at most 2**-9 relative. With p = 1 every branch is dropped and the
    output is zeros (torchvision's rule). The first four arguments are torchvision's
    (``stochastic_depth(input, p, mode, training)``), in its order.

    Raises:
        ValueError: x is not a floating tensor with a batch dimension, p is outside [0, 1] or
            not a 1-element float tensor, or mode is unknown.
    """
    _check_input(x)
    check_choice("mode", mode, MODES)
    if not isinstance(p, Tensor):
        p = check_drop_rate(p, allow_one=True)
    elif p.numel() != 1 or not p.is_floating_point():
        raise ValueError(
            f"p should be a float or a 1-element float tensor, but got a {p.dtype} tensor of "
            f"shape {tuple(p.shape)}"
        )
    return _stochastic_depth(x, p, mode, training, generator, return_mask)


def _check_input(x: Tensor) -> None:
    """The input rule of the functional form and of both modules' ``forward``."""
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"input should be a floating tensor with a batch dimension (N, ...), but got {got}"
        )


def _stochastic_depth(
    x: Tensor,
    p: float | Tensor,
    mode: str,
    training: bool,
    generator: torch.Generator | None,
    return_mask: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`stochastic_depth` on checked arguments (the modules' entry point)."""
    if not training or (not isinstance(p, Tensor) and p == 0.0):
        if return_mask:
            return x, x.new_ones((1,) * x.dim())
        return x
    keep = _draw_keep(x.shape[0], p, mode, x.device, generator)
    keep = _broadcastable(keep, x.dim(), x.dtype)
    out = x * (keep * _keep_scale(p, x.dtype))
    return (out, keep) if return_mask else out


def _draw_keep(
    n_samples: int,
    p: float | Tensor,
    mode: str,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """(N,) in row mode or (1,) in batch mode bool tensor: True where the branch is kept."""
    with torch.no_grad():
        # Uniform in [0, 1) in float32 whatever x's dtype: P(u >= p) = 1 - p to within 2**-24,
        # where a bfloat16 draw (multiples of 2**-8) would quantise small rates.
        draws = uniform((n_samples if mode == "row" else 1,), generator, device, torch.float32)
        if isinstance(p, Tensor):
            p = p.to(device=device).reshape(())
        return draws >= p


def _keep_scale(p: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """``1 / (1 - p)``, and 0 for p = 1 (nothing is kept, and 0 * inf would be NaN): a Python
    float for a float p, a 0-d tensor in ``dtype`` for a tensor."""
    if isinstance(p, Tensor):
        with torch.no_grad():
            rate = p.reshape(())
            return torch.where(rate < 1.0, 1.0 / (1.0 - rate), 0.0).to(dtype)
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _broadcastable(keep: Tensor, n_dims: int, dtype: torch.dtype) -> Tensor:
    """The (N,) or (1,) keep vector as a (N or 1, 1, ..., 1) tensor of rank n_dims in dtype."""
    return keep.reshape((-1,) + (1,) * (n_dims - 1)).to(dtype)


def _channels_last_order(x: Tensor) -> tuple[int, ...] | None:
    """The dims of a channels_last(_3d) tensor in memory order (its contiguous view), else None.

    index_select and index_add_ along dim 0 are fast on contiguous tensors only: on a
    channels_last one they are slower than on its contiguous (N, H, W, C) view, and
    index_select returns a contiguous (N, C, H, W) tensor that the convolutions would convert.
    """
    if x.is_contiguous():
        return None
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return (0, 2, 3, 4, 1)
    return None


def _gather_samples(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` in x's memory format, through index_select (whose backward is index_add_;
    advanced indexing's is a slower accumulating index_put_)."""
    order = _channels_last_order(x)
    if order is None:
        return x.index_select(0, index)
    inverse = tuple(order.index(dim) for dim in range(x.dim()))
    return x.permute(order).index_select(0, index).permute(inverse)


def _add_samples_(out: Tensor, index: Tensor, source: Tensor) -> None:
    """``out[index] += source`` in place, on out's contiguous view when it is channels_last."""
    order = _channels_last_order(out)
    if order is None:
        out.index_add_(0, index, source)
    else:
        out.permute(order).index_add_(0, index, source.permute(order))


class StochasticDepth(DropRateModule):
    """Stochastic depth on a residual branch's output: ``shortcut + StochasticDepth(p)(branch)``.

    A thin shell around :func:`stochastic_depth` that keeps the rate in the ``p`` buffer
    (``set_p`` changes it without recompiling a compiled model).

    Args:
        p: drop rate in [0, 1] (1 drops every branch in training: the output is zeros).
        mode: ``"row"`` (per sample, default) or ``"batch"`` (whole batch).
        generator: random source on the input's device (default: the global one).

    Shape:
        input (N, ...) floating tensor; output the same shape, dtype and memory format.
    """

    ALLOWS_ONE = True  # p = 1 drops every branch (scale 0), as torchvision allows

    def __init__(
        self, p: float = 0.1, mode: str = "row", *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(p)
        check_choice("mode", mode, MODES)
        self.mode = mode
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        result = _stochastic_depth(
            x, self.p, self.mode, self.training, self.generator, self.record_mask
        )
        return self._unpack(result)

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, mode={self.mode!r}"


class StochasticDepthResidual(DropRateModule):
    """A residual block with stochastic depth: ``shortcut(x) + drop(branch(x))``.

    In training each sample (row mode) or the whole batch (batch mode) keeps the branch with
    probability 1 - p, and kept branches are scaled by ``1 / (1 - p)``; in evaluation the block
    is ``shortcut(x) + branch(x)``.

    ``skip_dropped=False`` (default) computes the branch for every sample and multiplies it by
    the mask, like ``shortcut(x) + StochasticDepth(p)(branch(x))``: no synchronisation, fully
    traceable by ``torch.compile``.

    ``skip_dropped=True`` runs the branch on the kept samples only (``x[kept]``) and index-adds
    its scaled output into the shortcut's; a dropped batch (batch mode) skips the branch
    altogether. It saves about a fraction p of the branch's compute and saved activations, and
    costs a gather of the kept inputs and a scatter of their outputs. With the same generator
    state it draws the same mask and gives the same outputs and parameter gradients as
    masking (up to float rounding), except that:

    - the kept count is read on the host every training forward: a synchronisation on
      accelerators (the device queue drains), and a graph break with a data-dependent shape
      under ``torch.compile``;
    - normalisation layers inside the branch compute their batch statistics (and update their
      running averages) over the kept samples only, where masking lets every sample, dropped
      or not, contribute; and batch norm raises if a single sample with 1x1 maps is kept;
    - when no sample is kept the branch does not run: its parameters get no gradient (None
      rather than zeros), so optimizers skip them for that step (no weight decay or momentum
      update) and DistributedDataParallel needs ``find_unused_parameters=True``.

    Args:
        branch: the residual branch, mapping (N, ...) to the shortcut's output shape.
        p: drop rate in [0, 1] (1: the block is the shortcut in training).
        mode: ``"row"`` (per sample, default) or ``"batch"`` (whole batch).
        skip_dropped: run the branch on the kept samples only (see above).
        shortcut: the identity path (default :class:`torch.nn.Identity`), e.g. a strided 1x1
            conv where the branch changes the shape.
        generator: random source on the input's device (default: the global one).

    Shape:
        input (N, ...) floating tensor; output the shape of ``shortcut(x)``. A recorded mask
        (``record_mask``) is (N or 1, 1, ..., 1) with the rank of x, before rescaling.
    """

    ALLOWS_ONE = True  # p = 1 drops every branch (scale 0), as torchvision allows

    def __init__(
        self,
        branch: nn.Module,
        p: float = 0.1,
        mode: str = "row",
        skip_dropped: bool = False,
        shortcut: nn.Module | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p)
        check_choice("mode", mode, MODES)
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.mode = mode
        self.skip_dropped = bool(skip_dropped)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        identity = self.shortcut(x)
        if not self.training:
            return identity + self.branch(x)
        # Drawn before the branch runs, in both variants, so that they consume the generator
        # identically (and a branch drawing from the same generator sees the same state).
        keep = _draw_keep(x.shape[0], self.p, self.mode, x.device, self.generator)
        if self.record_mask:
            self._remember(_broadcastable(keep, x.dim(), x.dtype))
        if self.skip_dropped:
            return self._forward_kept_only(x, identity, keep)
        branch_out = self.branch(x)
        mask = _broadcastable(keep, branch_out.dim(), branch_out.dtype)
        return identity + branch_out * (mask * _keep_scale(self.p, branch_out.dtype))

    def _forward_kept_only(self, x: Tensor, identity: Tensor, keep: Tensor) -> Tensor:
        if self.mode == "batch":
            if not bool(keep):  # host read
                return identity
            branch_out = self.branch(x)
            return identity + branch_out * _keep_scale(self.p, branch_out.dtype)
        kept = keep.nonzero().squeeze(1)
        n_kept = kept.numel()  # the host read: nonzero has a data-dependent size
        if n_kept == 0:
            return identity
        if n_kept == x.shape[0]:  # nothing to gather or scatter
            branch_out = self.branch(x)
            return identity + branch_out * _keep_scale(self.p, branch_out.dtype)
        branch_out = self.branch(_gather_samples(x, kept))
        branch_out = branch_out * _keep_scale(self.p, branch_out.dtype)
        out_dtype = torch.promote_types(identity.dtype, branch_out.dtype)
        out = identity.to(dtype=out_dtype, copy=True)  # keeps the memory format
        _add_samples_(out, kept, branch_out.to(out_dtype))
        return out

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, mode={self.mode!r}, skip_dropped={self.skip_dropped}"
