"""Cluster-tendency statistics: the classic Hopkins statistic and the paper's Spatial Hopkins.

Both compare distances seen from real samples with distances seen from random probes, as a
ratio ``probe / (probe + real)``: about 0.5 when the data have no structure, near 1 when they
are clustered (paper, section 4.2).

* :func:`hopkins` is the classic statistic for plain vectors (paper eq. 2; Banerjee & Dave,
  "Validating clusters using the Hopkins statistic", FUZZ-IEEE 2004).
* :func:`spatial_hopkins` is the paper's adaptation to images (eqs. 3-5): it compares how much a
  pixel differs from its 8 neighbours with how much a random pixel of the same image differs
  from them. DropCluster uses it to tell structured channels from unstructured ones. The paper
  is 2-D; 1-D chains and 3-D volumes, with the 2 and 26 surrounding sites as the neighbourhood,
  are our extension (docs/design.md, "Spatial Hopkins").

Both are diagnostics: they read their input without tracking gradients.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from dropcluster.validation import check_choice, check_int, check_tensor

__all__ = [
    "DEFAULT_SAMPLE_FRACTION",
    "NO_TENDENCY",
    "REDUCTIONS",
    "default_n_points",
    "hopkins",
    "spatial_hopkins",
]


REDUCTIONS = ("none", "mean")

#: Both statistics sample this fraction of the candidates by default (the m << n of eq. 2).
DEFAULT_SAMPLE_FRACTION = 0.1

#: A structureless field, where no spatial or cluster tendency can be detected.
NO_TENDENCY = 0.5

# The names of the spatial axes of (N, C, L), (N, C, H, W) and (N, C, D, H, W), for messages.
_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def default_n_points(n_candidates: int) -> int:
    """Default sample size m: 10% of the candidates, rounded down, and at least 1.

    For Spatial Hopkins the candidates are the interior sites, ``prod(size - 2)`` over the
    spatial axes: 67 points for a 28x28 map, 90 for 32x32, 19 for 16x16; 25 for a chain of 256;
    100 for a 12x12x12 volume. For the classic statistic they are the n data points.
    """
    return max(1, int(n_candidates * DEFAULT_SAMPLE_FRACTION))


def spatial_hopkins(
    x: Tensor,
    n_points: int | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "none",
) -> Tensor:
    """Spatial Hopkins statistic S of every channel of every map (paper, eqs. 3-5).

    For each map (one channel of one sample), m interior sites ``s_i`` and m sites ``t_i`` of
    the whole map are drawn uniformly; ``w_i`` is how much ``s_i`` differs from its
    ``3**d - 1`` surrounding sites (eq. 3), ``z_i`` how much ``t_i`` differs from those same
    sites (eq. 4), and ``S = sum z / (sum z + sum w)`` (eq. 5). In 2-D these are the paper's 8
    neighbours of a pixel; the 2 neighbours of a 1-D site and the 26 of a 3-D site are our
    extension (the paper is 2-D only). S is about 0.5 for white noise and near 1 for smooth,
    structured maps; a constant map (0/0) gives exactly 0.5. docs/design.md, "Spatial
    Hopkins", gives the reasons for each reading of the paper and the spread of S on noise in
    each dimension.

    Args:
        x: (N, C, L), (N, C, H, W) or (N, C, D, H, W) real tensor on any device, N, C >= 1,
            every spatial axis at least 3 long, finite values. float64 input is processed in
            float64; every other dtype (half precision, integers such as uint8 images) is
            converted to float32 after the sampled sites are gathered.
        n_points: m, the number of ``s_i`` (and of ``t_i``) per map, in ``[1, n_interior]``
            with ``n_interior = prod(size - 2)`` over the spatial axes. ``None``:
            :func:`default_n_points` of the interior, 10% of it.
        generator: random source. Samples are drawn on the generator's device and moved to
            ``x``'s device. ``None`` uses torch's global RNG on ``x``'s device. For 2-D input
            the draws are those of the 2-D-only versions (0.6 and earlier): same results.
        reduction: ``"none"`` returns every map's S; ``"mean"`` the per-channel mean over
            the batch (the per-channel values of the paper's Figure 4).

    Returns:
        float32 tensor on ``x``'s device: (N, C) for ``reduction="none"``, (C,) for ``"mean"``.
        Values lie in [0, 1]. The work holds ``m * (3**d - 1)`` gathered values, and as many
        int64 indices, per map: with the default m about 0.2, 0.8 and 2.6 times the number of
        sites of a map in 1-D, 2-D and 3-D.

    Example::

        spatial_hopkins(activations, reduction="mean")  # (C,): one value per channel

    Raises:
        TypeError: ``x`` is not a tensor, or ``generator`` is not a ``torch.Generator``.
        ValueError: wrong rank, empty batch, a spatial axis shorter than 3, complex or bool
            dtype, non-finite values, ``n_points`` out of range, unknown ``reduction``.
    """
    check_tensor("x", x, (3, 4, 5), "(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
    n_images, n_channels, *sizes = x.shape
    if n_images < 1 or n_channels < 1:
        raise ValueError(f"x should have N >= 1 and C >= 1, but got shape {tuple(x.shape)}")
    short = [
        (name, size) for name, size in zip(_AXIS_NAMES[len(sizes)], sizes, strict=True) if size < 3
    ]
    if short:
        name, size = short[0]
        needed = "x".join("3" * len(sizes))
        raise ValueError(
            f"x should have maps of at least {needed} sites (an interior site needs a neighbour "
            f"on both sides of every axis), but axis {name} is {size} long in shape "
            f"{tuple(x.shape)}"
        )
    check_choice("reduction", reduction, REDUCTIONS)
    n_interior = math.prod(size - 2 for size in sizes)
    n_points = _check_sampling("x", x, n_points, n_interior, generator)
    centre_index, other_index = _sample_sites(
        n_images * n_channels, tuple(sizes), n_points, generator, x.device
    )
    flat = x.detach().reshape(n_images * n_channels, math.prod(sizes))
    statistic = _statistic_at_sites(flat, tuple(sizes), centre_index, other_index)
    statistic = statistic.view(n_images, n_channels)
    if reduction == "mean":
        statistic = statistic.mean(dim=0)
    return statistic.to(torch.float32)


def hopkins(
    points: Tensor,
    n_points: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Classic Hopkins statistic H of a set of points (paper eq. 2; Banerjee & Dave 2004).

    m artificial points ``a_i`` are drawn uniformly in the bounding box of the data (each
    feature between its minimum and maximum), and m data points ``p_i`` are sampled without
    replacement. With ``u_i`` the distance from ``a_i`` to its nearest data point and ``w_i``
    the distance from ``p_i`` to its nearest *other* data point (a duplicate of ``p_i`` counts,
    at distance 0), ``H = sum u / (sum u + sum w)``: near 1 for clustered data, about 0.5 for
    uniform data, below 0.5 towards 0 for regularly spaced data (a grid). When all distances
    are 0 (every point identical) H is 0/0 and is defined as exactly 0.5: there is no tendency
    to detect.

    Args:
        points: (n, d) or batched (B, n, d) real tensor, n >= 2, d >= 1, B >= 1, finite values.
            float64 input is processed in float64, anything else in float32.
        n_points: m, in ``[1, n]``. ``None``: :func:`default_n_points` of n, 10% of it.
        generator: random source. Samples are drawn on the generator's device and moved to
            ``points``' device. ``None`` uses torch's global RNG on ``points``' device.

    Returns:
        float32 tensor on ``points``' device: a scalar for (n, d) input, (B,) for (B, n, d);
        each set of the batch gets its own random draws.

    Raises:
        TypeError: ``points`` is not a tensor, or ``generator`` is not a ``torch.Generator``.
        ValueError: wrong rank, fewer than 2 points, empty batch or no features, complex or
            bool dtype, non-finite values, ``n_points`` out of range.
    """
    check_tensor("points", points, (2, 3), "(n, d) or (B, n, d)")
    n_data, n_features = points.shape[-2:]
    if points.dim() == 3 and points.shape[0] < 1:
        raise ValueError(f"points should have B >= 1 sets, but got shape {tuple(points.shape)}")
    if n_data < 2:
        raise ValueError(
            f"points should have n >= 2 points (w_i needs another point), but got n={n_data}"
        )
    if n_features < 1:
        raise ValueError(f"points should have d >= 1 features, but got d={n_features}")
    n_points = _check_sampling("points", points, n_points, n_data, generator)
    batched = points.dim() == 3
    data = points.detach() if batched else points.detach().unsqueeze(0)
    data = data.to(_compute_dtype(data.dtype))
    n_sets, n_data, n_features = data.shape
    sample_device = generator.device if generator is not None else data.device
    unit = torch.rand(
        n_sets, n_points, n_features, generator=generator, device=sample_device, dtype=data.dtype
    ).to(data.device)
    # Sampling without replacement: the m smallest of n uniform keys form a uniform m-subset.
    keys = torch.rand(n_sets, n_data, generator=generator, device=sample_device)
    sample_index = keys.topk(n_points, dim=1, largest=False).indices.to(data.device)
    low = data.amin(dim=1, keepdim=True)
    high = data.amax(dim=1, keepdim=True)
    artificial = low + unit * (high - low)
    statistic = _hopkins_from_samples(data, artificial, sample_index)
    return (statistic if batched else statistic.squeeze(0)).to(torch.float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ratio_or_no_tendency(probe_sum: Tensor, real_sum: Tensor) -> Tensor:
    """``probe / (probe + real)``, with 0/0 defined as :data:`NO_TENDENCY`."""
    total = probe_sum + real_sum
    defined = total > 0
    ratio = probe_sum / torch.where(defined, total, torch.ones_like(total))
    return torch.where(defined, ratio, torch.full_like(ratio, NO_TENDENCY))


def _sample_sites(
    n_maps: int,
    sizes: tuple[int, ...],
    n_points: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Draw the row-major flat site indices of eqs. 3-4 for every map of any rank 1-3.

    Args:
        sizes: the spatial sizes, ``(L,)``, ``(H, W)`` or ``(D, H, W)``, each at least 3.

    Returns:
        ``centre_index`` (n_maps, m) int64, interior sites ``s_i`` (every coordinate in
        ``1..size-2``), and ``other_index`` (n_maps, m) int64, sites ``t_i`` anywhere in the
        map, both on ``device``. Interior sites first, then the others, each one ``randint``
        over a flat range: in 2-D these are exactly the draws of the 2-D-only versions.
    """
    sample_device = generator.device if generator is not None else device
    n_interior = math.prod(size - 2 for size in sizes)
    interior = torch.randint(
        n_interior, (n_maps, n_points), generator=generator, device=sample_device
    )
    other = torch.randint(
        math.prod(sizes), (n_maps, n_points), generator=generator, device=sample_device
    )
    # Unravel the index into the interior's grid, shift every coordinate by one, and ravel it
    # into the full grid; a loop over at most 3 axes, each step batched over every draw. The
    # outermost coordinate is what is left of the index (no modulo), and the last axis has
    # stride 1: 2-D maps take the 6 tensor operations of the 2-D-only versions, not more.
    centre = None
    stride = 1
    for axis, size in enumerate(reversed(sizes)):
        outermost = axis == len(sizes) - 1
        coordinate = interior if outermost else interior % (size - 2)
        term = coordinate + 1 if stride == 1 else (coordinate + 1) * stride
        centre = term if centre is None else centre.add_(term)
        if not outermost:
            interior = interior // (size - 2)
        stride *= size
    return centre.to(device), other.to(device)


def _neighbour_offsets(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """(3**d - 1,) int64 flat offsets of the sites around an interior site, row-major order.

    In 2-D: ``-W-1, -W, -W+1, -1, 1, W-1, W, W+1``, the order of the 2-D-only versions (the
    mean of eqs. 3-4 adds them in this order, so 2-D results stay bit-identical).
    """
    strides = [math.prod(sizes[axis + 1 :]) for axis in range(len(sizes))]
    offsets = [
        sum(step * stride for step, stride in zip(steps, strides, strict=True))
        for steps in itertools.product((-1, 0, 1), repeat=len(sizes))
        if any(steps)
    ]
    return torch.tensor(offsets, device=device)


def _statistic_at_sites(
    flat: Tensor, sizes: tuple[int, ...], centre_index: Tensor, other_index: Tensor
) -> Tensor:
    """Eqs. 3-5 at given sites of maps of any rank 1-3.

    Args:
        flat: (M, prod(sizes)) maps, row-major sites, any real dtype.
        sizes: the spatial sizes, ``(L,)``, ``(H, W)`` or ``(D, H, W)``.
        centre_index: (M, m) int64 flat indices of interior sites ``s_i``.
        other_index: (M, m) int64 flat indices of any sites ``t_i``.

    Returns:
        (M,) S per map, float64 for float64 maps, float32 otherwise.
    """
    n_maps, n_points = centre_index.shape
    offsets = _neighbour_offsets(sizes, flat.device)
    n_neighbours = offsets.numel()
    neighbour_index = (centre_index.unsqueeze(-1) + offsets).view(n_maps, n_points * n_neighbours)
    # Gather first, convert after: only the sampled sites are copied to the compute dtype,
    # and integer maps are differenced in floating point (uint8 differences would wrap).
    dtype = _compute_dtype(flat.dtype)
    centre = flat.gather(1, centre_index).to(dtype).unsqueeze(-1)
    other = flat.gather(1, other_index).to(dtype).unsqueeze(-1)
    neighbours = flat.gather(1, neighbour_index).to(dtype).view(n_maps, n_points, n_neighbours)
    w = (neighbours - centre).abs_().mean(dim=-1)  # eq. 3, (M, m)
    z = neighbours.sub_(other).abs_().mean(dim=-1)  # eq. 4, (M, m); reuses the gathered copy
    return _ratio_or_no_tendency(z.sum(dim=-1), w.sum(dim=-1))  # eq. 5


def _sample_spatial_locations(
    n_maps: int,
    height: int,
    width: int,
    n_points: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """:func:`_sample_sites` for (H, W) maps: flat pixel indices ``h * W + w``."""
    return _sample_sites(n_maps, (height, width), n_points, generator, device)


def _spatial_hopkins_at(
    flat: Tensor, width: int, centre_index: Tensor, other_index: Tensor
) -> Tensor:
    """:func:`_statistic_at_sites` for (M, H * W) maps; only W is needed to find neighbours."""
    height = flat.shape[1] // width
    return _statistic_at_sites(flat, (height, width), centre_index, other_index)


def _hopkins_from_samples(data: Tensor, artificial: Tensor, sample_index: Tensor) -> Tensor:
    """Eq. 2 for given artificial points and sampled data points.

    Args:
        data: (B, n, d) floating data points.
        artificial: (B, m, d) artificial points, same dtype.
        sample_index: (B, m) int64 indices of distinct sampled data points.

    Returns:
        (B,) H per set, in ``data``'s dtype.
    """
    n_features = data.shape[-1]
    sampled = data.gather(1, sample_index.unsqueeze(-1).expand(-1, -1, n_features))
    # The matrix-product form of cdist loses the small nearest-neighbour distances to
    # cancellation (and makes identical points a little apart); the direct form is exact.
    exact = "donot_use_mm_for_euclid_dist"
    u = torch.cdist(artificial, data, compute_mode=exact).amin(dim=-1)
    to_data = torch.cdist(sampled, data, compute_mode=exact)
    to_data.scatter_(-1, sample_index.unsqueeze(-1), float("inf"))  # exclude the point itself
    w = to_data.amin(dim=-1)
    return _ratio_or_no_tendency(u.sum(dim=-1), w.sum(dim=-1))


def _check_sampling(
    name: str,
    value: Tensor,
    n_points: int | None,
    n_candidates: int,
    generator: torch.Generator | None,
) -> int:
    """The checks both statistics share; returns m, ``n_points`` or its default.

    ``value`` must hold finite real numbers, ``generator`` be a ``torch.Generator`` or None, and
    ``n_points`` lie in ``[1, n_candidates]``.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator should be a torch.Generator or None, but got {type(generator).__name__}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} should hold real numbers, but got dtype {value.dtype}")
    if n_points is None:
        n_points = default_n_points(n_candidates)
    else:
        n_points = check_int("n_points", n_points, minimum=1, maximum=n_candidates)
    # NaN and infinities reach the extremes; this reads the tensor once and allocates no mask.
    if value.is_floating_point() and not bool(torch.isfinite(torch.stack(value.aminmax())).all()):
        raise ValueError(f"{name} should hold finite values, but it contains NaN or infinity")
    return n_points
