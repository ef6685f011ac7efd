"""DropBlock2d: the exact drop rate, block placement, edge cases, autograd, compile, state."""

import functools
import io
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dropcluster.nn import (
    DropBlock1d,
    DropBlock2d,
    DropBlock3d,
    drop_block1d,
    drop_block1d_reference,
    drop_block2d,
    drop_block2d_reference,
    drop_block3d,
    drop_block3d_reference,
)
from dropcluster.nn import dropblock as db
from dropcluster.nn import dropblock_sampler as sampler


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _torchvision_gamma(p, height, width, block_size):
    """torchvision.ops.drop_block2d's (and the DropBlock paper's) first-order centre rate."""
    block_h, block_w = db.effective_block(block_size, height, width)
    valid = (height - block_h + 1) * (width - block_w + 1)
    return p * height * width / (block_h * block_w * valid)


# The acceptance protocol: 200 draws of a (64, 16, H, W) input, masks independent per channel.
PROTOCOL_MAPS = 200 * 64 * 16
# Tolerance 0.005 against a standard error of at most 0.001 (5 standard errors). Why the bound
# holds: the dropped fraction of one H x W map is a mean of pixels with drop probabilities q_j
# (mean p). Two pixels more than a block apart share no centre, so they are independent; for the
# others Cov <= (Var_j + Var_k) / 2, so Var(map fraction) <= mean_j q_j (1 - q_j) * min(1,
# (2 bh - 1)(2 bw - 1) / (H W)) <= p (1 - p) * min(1, (2 bh - 1)(2 bw - 1) / (H W)). Maps are
# independent, so M maps give a standard error <= sqrt(that / M). _maps_needed picks M for 0.001,
# capped at the protocol's 204,800 maps (where the cap binds, on 4 x 4 and 8 x 8 maps with large
# blocks, the bound is 0.00101).
STANDARD_ERROR = 0.001


def _maps_needed(height, width, block_size, p):
    """Whole (64, 16) draws' worth of maps for a standard error <= 0.001, at most 200 draws."""
    block_h, block_w = db.effective_block(block_size, height, width)
    neighbours = min(1.0, (2 * block_h - 1) * (2 * block_w - 1) / (height * width))
    maps = p * (1 - p) * neighbours / STANDARD_ERROR**2
    return min(PROTOCOL_MAPS, 1024 * math.ceil(maps / 1024))


def _realized_drop_fraction(height, width, block_size, p, n_maps, generator, gamma=None):
    """Mean dropped fraction over ``n_maps`` masks drawn as (64, 16, H, W) inputs.

    Uses the CPU sampler's own helpers, many draws per call (at most 4M pixels at a time), and
    counts dropped pixels without building the float mask or output.
    """
    if gamma is None:
        gamma = db.solve_gamma(p, height, width, block_size)
    block = db.effective_block(block_size, height, width)
    draws_per_batch = max(1, (1 << 22) // (1024 * height * width))
    dropped, draws_left = 0, n_maps // 1024
    while draws_left:
        draws = min(draws_per_batch, draws_left)
        shape = (64 * draws, 16, height, width)
        corners = sampler.sample_block_corners(shape, gamma, *block, generator)
        dropped += int(sampler.dropped_pixels(corners, shape, block)[2].sum())
        draws_left -= draws
    return dropped / (n_maps * height * width)


@pytest.mark.parametrize("height", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_realized_drop_fraction_is_within_0_005_of_p_for_block_sizes_1_to_7(height, p):
    deviations = {}
    for block_size in range(1, 8):
        n_maps = _maps_needed(height, height, block_size, p)
        fraction = _realized_drop_fraction(
            height, height, block_size, p, n_maps, _generator(block_size)
        )
        deviations[block_size] = round(fraction - p, 5)
    assert max(abs(d) for d in deviations.values()) < 0.005, deviations


@pytest.mark.parametrize(("height", "width"), [(4, 16), (16, 5), (1, 9), (9, 1), (1, 1)])
def test_realized_drop_fraction_matches_p_on_non_square_and_one_pixel_maps(height, width):
    for block_size in (2, 3, 7):
        n_maps = _maps_needed(height, width, block_size, 0.3)
        fraction = _realized_drop_fraction(height, width, block_size, 0.3, n_maps, _generator())
        assert abs(fraction - 0.3) < 0.005, (height, width, block_size, fraction)


def test_first_order_gamma_misses_p_where_the_solved_gamma_does_not():
    # The example: p = 0.3, 7 x 7 blocks on 16 x 16 maps, same sampler and protocol.
    height, block_size, p = 16, 7, 0.3
    n_maps = _maps_needed(height, height, block_size, p)
    first_order = _torchvision_gamma(p, height, height, block_size)
    expected_first_order = db.expected_drop_fraction(first_order, height, height, block_size)
    realized_first_order = _realized_drop_fraction(
        height, height, block_size, p, n_maps, _generator(1), gamma=first_order
    )
    realized_solved = _realized_drop_fraction(height, height, block_size, p, n_maps, _generator(2))
    assert expected_first_order == pytest.approx(0.244, abs=5e-4)  # overlapping blocks
    assert realized_first_order == pytest.approx(expected_first_order, abs=0.005)
    assert abs(realized_solved - p) < 0.005 < 0.05 < abs(realized_first_order - p)


def test_solved_gamma_tends_to_the_first_order_formula_as_p_goes_to_0():
    for height, width, block_size in [(16, 16, 7), (32, 32, 3), (64, 40, 5)]:
        excess = []
        for p in (1e-3, 1e-4):
            solved = db.solve_gamma(p, height, width, block_size)
            excess.append(solved / _torchvision_gamma(p, height, width, block_size) - 1)
        # Ours is above theirs (overlaps waste centres) by a relative amount linear in p.
        assert 0 < excess[1] < excess[0] < 0.02
        assert excess[1] == pytest.approx(excess[0] / 10, rel=0.02)


@pytest.mark.parametrize("height,width", [(1, 1), (3, 3), (4, 7), (16, 16), (33, 20), (224, 224)])
def test_newton_solves_f_gamma_equals_p_exactly_in_float_and_tensor_form(height, width):
    for block_size in (1, 2, 3, 5, 7, 11):
        for p in (1e-4, 0.05, 0.3, 0.7, 0.99):
            gamma = db.solve_gamma(p, height, width, block_size)
            achieved = db.expected_drop_fraction(gamma, height, width, block_size)
            assert achieved == pytest.approx(p, rel=1e-12, abs=1e-15), (block_size, p)
            rate = torch.tensor(p, dtype=torch.float32)  # a module's buffer
            from_tensor = db._solve_gamma_tensor(rate, height, width, block_size)
            expected = db.solve_gamma(float(rate), height, width, block_size)
            assert float(from_tensor) == pytest.approx(expected, rel=1e-12)


def test_coverage_histogram_of_a_3x3_map_with_2x2_blocks_by_hand():
    # Centres form a 2 x 2 grid: corners are covered once, edge midpoints twice, the middle 4x.
    assert db.coverage_histogram(3, 3, 2) == ((1, 4), (2, 4), (4, 1))
    expected = 1 - (4 * 0.8 + 4 * 0.8**2 + 0.8**4) / 9
    assert db.expected_drop_fraction(0.2, 3, 3, 2) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("height", "width", "block_size"), [(5, 5, 3), (6, 4, 2), (3, 8, 7), (1, 1, 3), (7, 9, 4)]
)
def test_coverage_histogram_matches_counting_every_block(height, width, block_size):
    block_h, block_w = db.effective_block(block_size, height, width)
    coverage = torch.zeros(height, width, dtype=torch.int64)
    for row in range(height - block_h + 1):
        for col in range(width - block_w + 1):
            coverage[row : row + block_h, col : col + block_w] += 1
    brute = tuple(sorted(Counter(coverage.flatten().tolist()).items()))
    assert db.coverage_histogram(height, width, block_size) == brute


@pytest.mark.parametrize(("height", "width", "block_size"), [(7, 6, 3), (6, 9, 4)])
def test_expected_fraction_matches_a_brute_force_monte_carlo_of_the_centre_process(
    height, width, block_size
):
    # Independent of the samplers: centres by torch.rand on the valid region, blocks by a
    # transposed convolution with a ones kernel (coverage counts), dropped = covered at all.
    gamma, n_maps = 0.06, 20000
    valid = (n_maps, 1, height - block_size + 1, width - block_size + 1)
    centres = (torch.rand(valid, generator=_generator()) < gamma).float()
    coverage = F.conv_transpose2d(centres, torch.ones(1, 1, block_size, block_size))
    assert coverage.shape[-2:] == (height, width)
    realized = float((coverage > 0).float().mean())
    expected = db.expected_drop_fraction(gamma, height, width, block_size)
    standard_error = math.sqrt(expected * (1 - expected) / n_maps)  # map fractions in [0, 1]
    assert abs(realized - expected) < 5 * standard_error


def test_blocks_from_centres_on_hand_made_5x5_maps():
    centres = torch.zeros(3, 1, 5, 5)
    centres[0, 0, 2, 2] = 1  # block 3: rows and columns 1..3
    centres[1, 0, 1, 3] = 1  # block 2: the centre is the top-left of the middle 2 x 2
    centres[2, 0, 1, 1] = 1  # block 4: the first valid centre, (4 - 1) // 2 = 1 from the edge
    expected = torch.zeros(3, 5, 5)
    expected[0, 1:4, 1:4] = 1
    expected[1, 1:3, 3:5] = 1
    expected[2, 0:4, 0:4] = 1
    for sample, block_size in enumerate((3, 2, 4)):
        covered = db._blocks_from_centres(centres[sample : sample + 1], block_size, block_size)
        assert covered.shape == (1, 1, 5, 5)
        assert torch.equal(covered[0, 0], expected[sample]), block_size


def _corners(*blocks):
    """(sample, channel, row, col) tensors for hand-placed blocks given by their top-left."""
    return tuple(torch.tensor(values, dtype=torch.float64) for values in zip(*blocks, strict=True))


def test_hand_placed_blocks_are_zeroed_and_the_rest_scaled_by_count_over_count_ones():
    x = torch.arange(1.0, 51.0).view(2, 1, 5, 5).requires_grad_()
    # Sample 0: one 3 x 3 block at (1, 1): 16 of 25 pixels kept, scale 25 / 16. Sample 1: blocks
    # at (0, 0) and (1, 1) overlap on 4 pixels: 14 dropped, 11 kept, scale 25 / 11.
    corners = _corners((0, 0, 1, 1), (1, 0, 0, 0), (1, 0, 1, 1))
    out, keep = sampler.drop_blocks_at(x, corners, (3, 3), per_channel=True, return_mask=True)
    expected_keep = torch.ones(2, 1, 5, 5)
    expected_keep[0, 0, 1:4, 1:4] = 0
    expected_keep[1, 0, 0:3, 0:3] = 0
    expected_keep[1, 0, 1:4, 1:4] = 0
    assert torch.equal(keep, expected_keep)
    scale = torch.tensor([25 / 16, 25 / 11]).view(2, 1, 1, 1)
    assert torch.allclose(out, x * expected_keep * scale)
    out.sum().backward()
    assert torch.allclose(x.grad, expected_keep * scale)


@pytest.mark.parametrize("block_size", [2, 4, 6])
def test_even_blocks_cover_exactly_block_size_rows_and_columns(block_size):
    # One block with top-left (1, 0) on a 7 x 8 map, through the CPU path and the dense one.
    x = torch.ones(1, 1, 7, 8)
    _, keep = sampler.drop_blocks_at(x, _corners((0, 0, 1, 0)), (block_size,) * 2, True, True)
    expected = torch.ones(1, 1, 7, 8)
    expected[0, 0, 1 : 1 + block_size, 0:block_size] = 0
    assert torch.equal(keep, expected)
    centres = torch.zeros(1, 1, 7, 8)
    centres[0, 0, 1 + (block_size - 1) // 2, (block_size - 1) // 2] = 1
    assert torch.equal(1 - db._blocks_from_centres(centres, block_size, block_size), expected)


def _runs_are_at_least(dropped, length, dim):
    """Whether every dropped pixel lies in a run of >= ``length`` dropped pixels along ``dim``."""
    kernel = (1, length) if dim == 3 else (length, 1)
    padding = (length - 1, length - 1, 0, 0) if dim == 3 else (0, 0, length - 1, length - 1)
    full_windows = (F.max_pool2d(1 - dropped, kernel, stride=1) == 0).float()
    covered = F.max_pool2d(F.pad(full_windows, padding), kernel, stride=1)
    return torch.equal(covered, dropped)


@pytest.mark.parametrize("block_size", [2, 3, 4, 6])
@pytest.mark.parametrize(("height", "width"), [(8, 8), (7, 10), (5, 5)])
def test_sampled_masks_have_the_input_shape_and_only_whole_blocks(block_size, height, width):
    x = torch.ones(32, 4, height, width)
    out, keep = drop_block2d(x, 0.2, block_size, generator=_generator(), return_mask=True)
    assert out.shape == keep.shape == x.shape
    dropped = 1 - keep
    assert dropped.sum() > 0
    # Unions of whole blocks: every run of dropped pixels, across and down, is at least a block
    # long (a block shifted off the map or cut short would leave a shorter one).
    block_h, block_w = db.effective_block(block_size, height, width)
    assert _runs_are_at_least(dropped, block_w, dim=3)
    assert _runs_are_at_least(dropped, block_h, dim=2)


def test_cpu_and_dense_samplers_place_the_same_blocks_for_the_same_centres():
    shape, block = (8, 4, 9, 7), (4, 4)
    corners = sampler.sample_block_corners(shape, 0.1, *block, _generator())
    _, dropped, n_dropped = sampler.dropped_pixels(corners, shape, block)
    centres = torch.zeros(shape)
    sample, channel, row, col = (c.long() for c in corners)
    centres[sample, channel, row + (block[0] - 1) // 2, col + (block[1] - 1) // 2] = 1
    covered = db._blocks_from_centres(centres, *block)
    assert torch.equal(covered.to(torch.uint8).view(8, -1), dropped)
    assert torch.equal(n_dropped, covered.view(8, -1).sum(1).long())


def test_dense_sampler_realizes_p_and_rescales_per_sample():
    # The path used on accelerators and under torch.compile, run here on the CPU.
    height, width, block_size, p = 12, 10, 4, 0.2
    x = torch.ones(2048, 16, height, width)
    gamma = db._solve_gamma_tensor(torch.tensor(p), height, width, block_size)
    out, keep = db._drop_block_dense(x, gamma, block_size, True, _generator(), True)
    # 32768 maps: standard error <= sqrt(0.16 * 49 / 120 / 32768) = 0.0014.
    assert abs(1 - float(keep.mean()) - p) < 0.007
    scale = keep[0].numel() / keep.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, keep * scale)
    assert _runs_are_at_least(1 - keep[:64], block_size, dim=3)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_working_in_groups_of_samples_changes_neither_output_nor_gradient(
    monkeypatch, memory_format
):
    x = torch.randn(7, 3, 9, 8).to(memory_format=memory_format).requires_grad_()
    weights = torch.randn(7, 3, 9, 8)
    results = []
    for group_elements in (1 << 20, 2 * 3 * 9 * 8):  # one group; groups of 2, 2, 2, 1 samples
        monkeypatch.setattr(sampler, "_GROUP_ELEMENTS", group_elements)
        x.grad = None
        out = drop_block2d(x, 0.3, 3, generator=_generator(8))
        (out * weights).sum().backward()
        results.append((out, x.grad))
    (out, grad), (grouped_out, grouped_grad) = results
    assert torch.equal(grouped_out, out) and torch.equal(grouped_grad, grad)
    keep = (out != 0).float()
    assert torch.allclose(grad, weights * keep * 216 / keep.sum(dim=(1, 2, 3), keepdim=True))


def test_block_larger_than_the_map_drops_whole_maps_with_probability_p():
    _, keep = drop_block2d(
        torch.ones(20000, 1, 3, 3), 0.2, 7, generator=_generator(), return_mask=True
    )
    per_map = keep.view(20000, -1).sum(1)
    assert ((per_map == 0) | (per_map == 9)).all()
    # Standard error sqrt(0.16 / 20000) = 0.0028.
    assert float((per_map == 0).float().mean()) == pytest.approx(0.2, abs=0.014)


def test_block_larger_than_one_side_is_clamped_to_that_side_only():
    # 7 x 7 blocks on 3 x 12 maps are 3 x 7: whole columns, at least 7 of them side by side.
    _, keep = drop_block2d(
        torch.ones(256, 2, 3, 12), 0.3, 7, generator=_generator(), return_mask=True
    )
    assert (keep == keep[:, :, :1]).all()
    assert _runs_are_at_least(1 - keep, 7, dim=3)
    assert 0 < float(1 - keep.mean()) < 1


def test_one_pixel_maps_are_dropped_independently_with_probability_p():
    out, keep = drop_block2d(
        torch.ones(4096, 16, 1, 1), 0.3, 3, generator=_generator(), return_mask=True
    )
    # Standard error sqrt(0.21 / 65536) = 0.0018.
    assert abs(1 - float(keep.mean()) - 0.3) < 0.009
    assert torch.allclose(out, keep * 16 / keep.sum(dim=(1, 2, 3), keepdim=True))


def test_a_sample_with_everything_dropped_gives_zeros_not_nan():
    out = drop_block2d(torch.ones(64, 1, 3, 3), 0.9, 3, generator=_generator())
    assert torch.isfinite(out).all()
    assert (out.view(64, -1).sum(1) == 0).any()


def test_shared_mask_is_identical_across_channels_and_per_channel_masks_are_not():
    x = torch.ones(4, 8, 16, 16)
    out, shared = drop_block2d(
        x, 0.3, 3, per_channel=False, generator=_generator(), return_mask=True
    )
    assert shared.shape == (4, 1, 16, 16)
    assert (out == out[:, :1]).all()
    assert torch.allclose(out, shared * 256 / shared.sum(dim=(1, 2, 3), keepdim=True))
    _, own = drop_block2d(x, 0.3, 3, generator=_generator(), return_mask=True)
    assert not torch.equal(own[:, 0], own[:, 1])
    assert not torch.equal(own[0], own[1])  # and per sample


def test_output_is_input_times_mask_times_per_sample_count_over_count_ones():
    x = torch.randn(8, 6, 11, 13)
    out, keep = drop_block2d(x, 0.25, 3, generator=_generator(), return_mask=True)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    scale = keep[0].numel() / keep.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, x * keep * scale)


def test_gradient_flows_only_through_kept_pixels_scaled():
    layer = DropBlock2d(0.2, 3, generator=_generator(3))
    layer.record_mask = True
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    weights = torch.randn(4, 3, 10, 10)
    (layer(x) * weights).sum().backward()
    keep = layer.last_mask
    scale = 300 / keep.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, weights * keep * scale)


@pytest.mark.parametrize("per_channel", [True, False])
def test_gradcheck_and_double_backward_with_a_fixed_mask(per_channel):
    def dropped(x):
        return drop_block2d(x, 0.3, 2, per_channel=per_channel, generator=_generator(4))

    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dropped, (x,))
    assert torch.autograd.gradgradcheck(dropped, (x,))


def test_evaluation_and_zero_rate_are_the_identity():
    x = torch.randn(2, 3, 8, 8)
    assert DropBlock2d(0.3).eval()(x) is x
    assert drop_block2d(x, 0.3, 3, training=False) is x
    assert drop_block2d(x, 0.0, 3) is x
    assert torch.equal(DropBlock2d(0.0)(x), x)
    assert torch.equal(drop_block2d(x, torch.tensor(0.0), 3), x)
    zero_gamma = db._solve_gamma_tensor(torch.tensor(0.0), 8, 8, 3)
    assert torch.equal(db._drop_block_dense(x, zero_gamma, 3, True, None, False), x)


def test_the_0_3_call_forms_fail_naming_the_new_ones():
    # 0.3 took torchvision's order, (input, p, block_size, inplace, eps, training), and mode=.
    x = torch.randn(4, 3, 8, 8)
    for call in (
        lambda: drop_block2d(x, 0.3, 3, False, 1e-6, True),
        lambda: drop_block2d(x, 0.3, 3, mode="reference"),
        lambda: drop_block2d(x, 0.3, 3, gamma=0.1),
    ):
        with pytest.raises(
            TypeError,
            match=r"new form since dropcluster 0.4: drop_block2d\(x, p, "
            r"block_size, training=True.*drop_block2d_reference",
        ):
            call()
    # The fourth argument is training, as in every functional form of the package.
    assert drop_block2d(x, 0.3, 3, False) is x


@pytest.mark.parametrize("per_channel", [True, False])
def test_inplace_writes_the_same_result_into_the_input_and_keeps_gradients(per_channel):
    source = torch.randn(4, 3, 8, 8, requires_grad=True)
    expected = drop_block2d(source, 0.3, 3, per_channel=per_channel, generator=_generator(5))
    (expected_grad,) = torch.autograd.grad(expected.sum(), source)
    x = source * 1.0  # not a leaf: autograd allows writing into it
    out, keep = drop_block2d(
        x, 0.3, 3, inplace=True, per_channel=per_channel, generator=_generator(5), return_mask=True
    )
    assert out is x and torch.equal(out, expected)
    assert int((keep == 0).sum()) > 0
    (grad,) = torch.autograd.grad(out.sum(), source)
    assert torch.equal(grad, expected_grad)


def test_inplace_writes_the_dense_samplers_result_into_the_input_under_compile():
    x = torch.randn(4, 3, 8, 8)
    target = x.clone()
    inplace = torch.compile(lambda t: drop_block2d(t, 0.3, 3, inplace=True), backend="eager")
    plain = torch.compile(lambda t: drop_block2d(t, 0.3, 3), backend="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = inplace(target)
        torch.manual_seed(0)
        expected = plain(x)
    assert out is target and torch.equal(target, expected) and not torch.equal(target, x)


def test_same_generator_seed_gives_the_same_output_and_another_seed_does_not():
    x = torch.randn(4, 3, 12, 12)
    first = DropBlock2d(0.2, 3, generator=_generator(5))(x)
    assert torch.equal(first, DropBlock2d(0.2, 3, generator=_generator(5))(x))
    assert not torch.equal(first, DropBlock2d(0.2, 3, generator=_generator(6))(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_its_dtype(dtype):
    x = torch.randn(4, 3, 12, 12).to(dtype)
    out, keep = drop_block2d(x, 0.2, 3, generator=_generator(), return_mask=True)
    assert out.dtype == keep.dtype == dtype
    scale = (keep[0].numel() / keep.float().sum(dim=(1, 2, 3), keepdim=True)).to(dtype)
    assert torch.equal(out, x * keep * scale)


def test_runs_under_cpu_autocast_in_bfloat16():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    layer = DropBlock2d(0.2, 3)
    x = torch.randn(4, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(conv(x))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.weight.grad is not None


@pytest.mark.parametrize("per_channel", [True, False])
def test_channels_last_input_gives_the_same_values_and_gradients(per_channel):
    x = torch.randn(4, 5, 12, 9, requires_grad=True)
    x_last = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    weights = torch.randn(4, 5, 12, 9)
    out = drop_block2d(x, 0.2, 3, per_channel=per_channel, generator=_generator(6))
    out_last = drop_block2d(x_last, 0.2, 3, per_channel=per_channel, generator=_generator(6))
    assert out_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_last, out)
    (out * weights).sum().backward()
    (out_last * weights.to(memory_format=torch.channels_last)).sum().backward()
    assert torch.equal(x_last.grad, x.grad)


def test_compiled_layer_follows_set_p_without_recompiling():
    # aot_eager: dynamo and AOT autograd build the graphs Inductor would get; Inductor itself
    # compiles C++, too long for a unit test. A map size no other
    # test uses, so the coverage histogram is computed while tracing.
    torch._dynamo.reset()
    layer = DropBlock2d(0.1, 3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    rates = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in (0.1, 0.1, 0.4):
            layer.set_p(p)
            x = torch.ones(128, 8, 15, 17, requires_grad=True)
            out = compiled(x)
            keep = (out != 0).float()
            scale = 8 * 15 * 17 / keep.sum(dim=(1, 2, 3), keepdim=True)
            assert torch.allclose(out, keep * scale)  # valid: 0 or the sample's scale
            assert _runs_are_at_least(1 - keep, 3, dim=3)
            out.sum().backward()
            assert torch.allclose(x.grad, keep * scale)
            rates.append(1 - float(keep.mean()))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == graphs_before + 1  # one graph for every p
    # 1024 maps: standard error <= sqrt(0.24 * 25 / 255 / 1024) = 0.0048.
    assert rates[0] == pytest.approx(0.1, abs=0.025)
    assert rates[2] == pytest.approx(0.4, abs=0.025)


def test_compiled_layer_with_dynamic_shapes_takes_any_batch_size_in_one_graph():
    # The map size specialises (it fixes the coverage histogram); the batch size stays symbolic.
    torch._dynamo.reset()
    compiled = torch.compile(DropBlock2d(0.2, 3), backend="aot_eager", dynamic=True, fullgraph=True)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n_samples in (8, 12, 20):
        x = torch.ones(n_samples, 4, 12, 11, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        keep = (out != 0).float()
        scale = 4 * 12 * 11 / keep.sum(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(out, keep * scale)
        assert torch.allclose(x.grad, keep * scale)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before + 1
    torch._dynamo.reset()


def test_count_ones_matches_a_plain_sum():
    generator = _generator()
    for length in (sampler.BYTES_PER_PARTIAL_SUM * 3, 100):  # the word-sum path and the fallback
        flags = (torch.rand(5, length, generator=generator) < 0.3).to(torch.uint8)
        flags[0] = 1  # every byte lane at its maximum
        assert torch.equal(sampler.count_ones(flags), flags.sum(1))


def test_record_mask_keeps_the_applied_mask():
    layer = DropBlock2d(0.3, 2, per_channel=False, generator=_generator())
    layer.record_mask = True
    x = torch.randn(3, 4, 6, 6)
    out = layer(x)
    assert layer.last_mask.shape == (3, 1, 6, 6)
    scale = 36 / layer.last_mask.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, x * layer.last_mask * scale)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DropBlock2d(1.0), r"has to be in \[0, 1\), but got 1.0"),
        (lambda: DropBlock2d(-0.1), r"has to be in \[0, 1\), but got -0.1"),
        (lambda: DropBlock2d(0.1).set_p(1.5), r"has to be in \[0, 1\), but got 1.5"),
        (lambda: drop_block2d(torch.ones(1, 3, 8, 8), 1.3, 3), r"but got 1.3"),
        (lambda: drop_block2d(torch.ones(1, 3, 8, 8), float("nan"), 3), r"but got nan"),
        (lambda: DropBlock2d(0.1, 0), "block_size should be an integer >= 1, but got 0"),
        (lambda: drop_block2d(torch.ones(1, 3, 8, 8), 0.1, -2), "integer >= 1, but got -2"),
        (lambda: drop_block2d(torch.ones(1, 3, 8, 8), 0.1, 2.5), "an integer, but got 2.5"),
        (
            lambda: drop_block2d(torch.ones(3, 8, 8), 0.1, 3),
            r"4 dimensional \(N, C, H, W\), but got shape \(3, 8, 8\)",
        ),
        (lambda: DropBlock2d(0.1)(torch.ones(1, 1, 3, 8, 8)), r"but got shape \(1, 1, 3, 8, 8\)"),
    ],
)
def test_bad_arguments_raise_errors_that_say_what_was_expected_and_given(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_state_dict_holds_no_p_a_saved_p_loads_and_repr_shows_the_settings():
    layer = DropBlock2d(0.1, 5, per_channel=False)
    layer.set_p(0.25)
    assert list(layer.state_dict()) == []  # p is a setting: adding the layer adds no state
    state = {"p": layer.p.clone()}  # what a dropcluster 0.1 checkpoint holds, still loaded
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = DropBlock2d(0.1, 5, per_channel=False)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(restored.p) == 0.25
    assert repr(restored) == "DropBlock2d(p=0.25, block_size=5, per_channel=False)"
    half = restored.half()
    assert half.p.dtype == torch.float32
    assert half(torch.ones(2, 3, 8, 8, dtype=torch.float16)).dtype == torch.float16


# --- mode="reference": PyPI dropblock 0.3.0's DropBlock2D, the DropCluster paper's baseline ---

REFERENCE_CASES = [
    ((8, 64, 2, 2), 7),  # Tiny ImageNet's group 4: a map smaller than the block
    ((4, 16, 16, 16), 5),
    ((4, 16, 16, 16), 4),  # even: the package crops its padded max-pool's last row and column
    ((3, 5, 9, 7), 6),  # even, non-square
    ((5, 4, 13, 11), 3),
    ((64, 3, 1, 1), 7),  # one-pixel maps
]
PARITY_SEEDS = range(40)


def _seeded(seed, forward, x):
    """``forward(x)`` with the global CPU RNG seeded, leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return forward(x)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize(("shape", "block_size"), REFERENCE_CASES)
def test_reference_mode_matches_pypi_dropblock_0_3_0_bit_for_bit(shape, block_size, p):
    dropblock = pytest.importorskip("dropblock")  # in the test extra; skips a bare checkout
    theirs = dropblock.DropBlock2D(p, block_size)
    layer = DropBlock2d(p, block_size, mode="reference")  # p in a float32 buffer

    def functional(x):
        return drop_block2d_reference(x, p, block_size)

    x = torch.randn(shape, generator=_generator(1))
    seeds_with_drops = 0
    for seed in PARITY_SEEDS:
        expected = _seeded(seed, theirs, x)
        for ours in (layer, functional):
            out = _seeded(seed, ours, x)
            assert out.dtype == expected.dtype and torch.equal(out, expected), seed
        seeds_with_drops += bool((expected == 0).any())
    # Not vacuous: blocks were dropped for some seeds (the rarest case, (8, 64, 2, 2) at p = 0.1,
    # drops something with probability 1 - (1 - p / 49) ** 32 = 0.063 a batch: 2.5 of 40 seeds).
    assert seeds_with_drops > 0


def test_reference_mode_with_a_generator_draws_what_the_package_draws_from_the_same_seed():
    dropblock = pytest.importorskip("dropblock")
    x = torch.randn(6, 4, 10, 10, generator=_generator(2))
    expected = _seeded(3, dropblock.DropBlock2D(0.3, 3), x)
    out = DropBlock2d(0.3, 3, generator=_generator(3), mode="reference")(x)
    assert torch.equal(out, expected) and (expected == 0).any()


def test_reference_mode_gives_zeros_where_the_package_divides_by_zero():
    dropblock = pytest.importorskip("dropblock")
    # One 1 x 1 map, gamma 0.99: the seed's draw drops the batch's only pixel.
    x = torch.ones(1, 3, 1, 1)
    theirs = _seeded(0, dropblock.DropBlock2D(0.99, 1), x)
    out, keep = _seeded(0, lambda t: drop_block2d_reference(t, 0.99, 1, return_mask=True), x)
    assert int(keep.sum()) == 0 and theirs.isnan().all()
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_reference_mode_drops_whole_2x2_maps_with_the_probability_worked_out_by_hand(p):
    # 7 x 7 blocks on 2 x 2 maps: every pixel is a possible centre (the package draws centres
    # everywhere), and a block centred anywhere in the map covers all 4 pixels (3 pixels of
    # padding on each side). So a map is dropped whole iff any of its 4 centres fires, each with
    # gamma = p / 49: q = 1 - (1 - p / 49) ** 4 (0.00813 for p = 0.1, 0.0402 for p = 0.5).
    n_maps = 200_000
    q = 1 - (1 - p / 49) ** 4
    out, keep = drop_block2d_reference(
        torch.ones(n_maps, 3, 2, 2), p, 7, generator=_generator(11), return_mask=True
    )
    per_map = keep.view(n_maps, 4).sum(1)
    assert ((per_map == 0) | (per_map == 4)).all()
    # Maps are independent Bernoulli(q): standard error sqrt(q (1 - q) / n), 5 of them allowed.
    dropped = 1 - float(keep.mean())
    assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / n_maps), (dropped, q)
    # One rescaling for the whole batch, shared by the channels.
    assert torch.allclose(out, keep.expand(-1, 3, -1, -1) * keep.numel() / keep.sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reference_mode_keeps_the_input_dtype_and_shares_the_mask_across_channels(dtype):
    # 64 x 32 x 32 = 65536 pixels: a float16 product with the count would overflow (inf).
    x = torch.randn(64, 3, 32, 32, generator=_generator()).to(dtype)
    out, keep = drop_block2d_reference(x, 0.3, 3, generator=_generator(), return_mask=True)
    assert out.dtype == keep.dtype == dtype and keep.shape == (64, 1, 32, 32)
    assert torch.isfinite(out).all() and 0 < float(keep.float().mean()) < 1
    expected = x.double() * keep.double() * keep.numel() / keep.double().sum()
    tolerance = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=0)


def test_reference_mode_gradient_is_the_mask_times_the_batch_scale():
    layer = DropBlock2d(0.3, 3, mode="reference", generator=_generator(4))
    layer.record_mask = True
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    layer(x).sum().backward()
    keep = layer.last_mask
    assert keep.shape == (4, 1, 10, 10)
    assert torch.allclose(x.grad, keep.expand_as(x) * keep.numel() / keep.sum())


def test_reference_mode_is_the_identity_in_evaluation_and_at_rate_zero():
    x = torch.randn(2, 3, 8, 8)
    assert DropBlock2d(0.3, mode="reference").eval()(x) is x
    assert drop_block2d_reference(x, 0.3, 3, training=False) is x
    assert drop_block2d_reference(x, 0.0, 3) is x
    state = torch.random.get_rng_state()
    assert DropBlock2d(0.0, mode="reference")(x) is x
    assert drop_block2d_reference(x, torch.tensor(0.0), 3) is x
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn, as the package


def test_reference_mode_runs_compiled_with_p_as_a_tensor():
    torch._dynamo.reset()
    compiled = torch.compile(DropBlock2d(0.3, 3, mode="reference"), backend="eager")
    x = torch.ones(16, 4, 9, 9)
    torch.manual_seed(0)
    out = compiled(x)
    keep = (out[:, :1] != 0).float()
    assert (out == out[:, :1]).all() and 0 < float(keep.mean()) < 1
    assert torch.allclose(out, keep.expand_as(out) * keep.numel() / keep.sum())
    torch._dynamo.reset()


def test_mode_is_a_setting_reachable_by_name_shown_in_repr_and_not_in_the_state_dict():
    from dropcluster.nn import build_regularizer

    layer = build_regularizer("dropblock", 0.1, block_size=7, mode="reference")
    assert isinstance(layer, DropBlock2d) and layer.mode == "reference"
    assert repr(layer) == "DropBlock2d(p=0.1, block_size=7, mode='reference')"
    assert repr(DropBlock2d(0.1, 7)) == "DropBlock2d(p=0.1, block_size=7, per_channel=True)"
    assert list(layer.state_dict()) == []
    exact = DropBlock2d(0.2, 7)
    exact.load_state_dict(layer.state_dict())
    layer.load_state_dict({"p": torch.tensor(0.25)})  # a dropcluster 0.1 checkpoint
    assert float(layer.p) == 0.25 and layer.mode == "reference"
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).mode == "reference"


@pytest.mark.parametrize(
    "build",
    [
        lambda: DropBlock2d(0.1, 3, mode="Reference"),
        lambda: __import__("dropcluster.nn", fromlist=["x"]).build_regularizer(
            "dropblock", 0.1, block_size=7, mode="Reference"
        ),
    ],
)
def test_bad_mode_says_what_was_expected_and_given(build):
    with pytest.raises(
        ValueError, match="mode should be one of 'exact', 'reference', but got 'Reference'"
    ):
        build()


# --- DropBlock1d and DropBlock3d: the same rule on sequences and volumes ---


def _brute_coverage(sizes, block_size):
    """Coverage count of every site, by adding every valid block one at a time."""
    block = db.effective_block(block_size, *sizes)
    coverage = torch.zeros(sizes, dtype=torch.int64)
    valid = [size - extent + 1 for size, extent in zip(sizes, block, strict=True)]
    for start in torch.cartesian_prod(*(torch.arange(v) for v in valid)).view(-1, len(sizes)):
        region = tuple(slice(s, s + e) for s, e in zip(start.tolist(), block, strict=True))
        coverage[region] += 1
    return tuple(sorted(Counter(coverage.flatten().tolist()).items()))


def test_coverage_histograms_of_a_segment_and_a_cube_by_hand():
    # Length 5, segments of 3: starts 0..2 cover the positions 1, 2, 3, 2, 1 times.
    assert db.coverage_histogram(5, 3) == ((1, 2), (2, 2), (3, 1))
    # 3 x 3 x 3 with 2-cubes: per axis 1, 2, 1; products: 8 corners x1, 12 edges x2, 6 faces
    # x4, the middle x8.
    assert db.coverage_histogram(3, 3, 3, 2) == ((1, 8), (2, 12), (4, 6), (8, 1))
    expected = 1 - (2 * 0.9 + 2 * 0.9**2 + 0.9**3) / 5
    assert db.expected_drop_fraction(0.1, 5, 3) == pytest.approx(expected, abs=1e-15)
    assert db.effective_block(4, 2, 9, 3) == (2, 4, 3)


@pytest.mark.parametrize(
    ("sizes", "block_size"),
    [((9,), 4), ((6,), 9), ((1,), 3), ((4, 5, 6), 3), ((3, 7, 2), 4), ((5, 5, 5), 2)],
)
def test_coverage_histogram_in_1d_and_3d_matches_counting_every_block(sizes, block_size):
    assert db.coverage_histogram(*sizes, block_size) == _brute_coverage(sizes, block_size)


@pytest.mark.parametrize("sizes", [(1,), (7,), (64,), (1, 1, 1), (4, 6, 5), (16, 16, 16)])
def test_newton_solves_f_gamma_equals_p_exactly_in_1d_and_3d(sizes):
    for block_size in (1, 2, 3, 5):
        for p in (1e-4, 0.1, 0.5, 0.99):
            gamma = db.solve_gamma(p, *sizes, block_size)
            achieved = db.expected_drop_fraction(gamma, *sizes, block_size)
            assert achieved == pytest.approx(p, rel=1e-12, abs=1e-15), (block_size, p)
            rate = torch.tensor(p, dtype=torch.float32)
            from_tensor = db._solve_gamma_tensor(rate, *sizes, block_size)
            expected = db.solve_gamma(float(rate), *sizes, block_size)
            assert float(from_tensor) == pytest.approx(expected, rel=1e-12)


def test_solve_gamma_says_what_it_expected_for_the_wrong_number_of_sizes():
    with pytest.raises(ValueError, match=r"1 to 3 map sizes then the block size, but got 5"):
        db.solve_gamma(0.1, 4, 4, 4, 4, 3)


@pytest.mark.parametrize(("sizes", "block_size"), [((11,), 4), ((5, 6, 4), 3)])
def test_expected_fraction_matches_a_monte_carlo_of_the_centre_process_in_1d_and_3d(
    sizes, block_size
):
    # Independent of the samplers: centres by torch.rand on the valid region, blocks by a
    # transposed convolution with a ones kernel (coverage counts), dropped = covered at all.
    gamma, n_maps = 0.07, 20000
    rank = len(sizes)
    valid = (n_maps, 1, *(size - block_size + 1 for size in sizes))
    centres = (torch.rand(valid, generator=_generator()) < gamma).float()
    transpose = F.conv_transpose1d if rank == 1 else F.conv_transpose3d
    coverage = transpose(centres, torch.ones(1, 1, *(block_size,) * rank))
    assert coverage.shape[2:] == sizes
    realized = float((coverage > 0).float().mean())
    expected = db.expected_drop_fraction(gamma, *sizes, block_size)
    assert abs(realized - expected) < 5 * math.sqrt(expected * (1 - expected) / n_maps)


def _realized_fraction_nd(sizes, block_size, p, n_maps, generator, gamma=None):
    """Mean dropped fraction of ``n_maps`` masks of shape ``sizes`` from the CPU sampler."""
    if gamma is None:
        gamma = db.solve_gamma(p, *sizes, block_size)
    block = db.effective_block(block_size, *sizes)
    shape = (n_maps // 16, 16, *sizes)
    corners = sampler.sample_block_corners(shape, gamma, *block, generator)
    return int(sampler.dropped_pixels(corners, shape, block)[2].sum()) / (n_maps * math.prod(sizes))


def _maps_for(sizes, block_size, p, standard_error):
    """Maps for a standard error <= ``standard_error`` by the bound above, in whole 16s."""
    block = db.effective_block(block_size, *sizes)
    neighbours = min(1.0, math.prod(2 * e - 1 for e in block) / math.prod(sizes))
    return 16 * math.ceil(p * (1 - p) * neighbours / standard_error**2 / 16)


# Sequences and volumes, with blocks clamped along some axes ((7,) and b = 9; (3, 10, 9)).
ND_RATE_CASES = [((32,), 5, 0.2), ((7,), 9, 0.3), ((100,), 3, 0.05), ((8, 8, 8), 3, 0.2)]
ND_RATE_CASES += [((6, 5, 7), 4, 0.1), ((3, 10, 9), 5, 0.1)]


@pytest.mark.parametrize(("sizes", "block_size", "p"), ND_RATE_CASES)
def test_realized_drop_fraction_in_1d_and_3d_is_within_0_008_of_p(sizes, block_size, p):
    # Standard error <= 0.002 by the bound of the 2-D protocol (blocks of (2 b - 1) ** d
    # neighbours): 0.008 is 4 of them.
    n_maps = _maps_for(sizes, block_size, p, 0.002)
    fraction = _realized_fraction_nd(sizes, block_size, p, n_maps, _generator(block_size))
    assert abs(fraction - p) < 0.008, fraction


def test_first_order_gamma_misses_p_in_3d_where_the_solved_gamma_does_not():
    # The same sampler and protocol with torchvision's rule, p / b**3 * (sites / valid sites):
    # overlapping cubes make it drop 0.245 (its expected value) instead of 0.3 on 6 x 6 x 6
    # volumes with 3-cubes. Standard error <= 0.003 each.
    sizes, block_size, p = (6, 6, 6), 3, 0.3
    first_order = p * 216 / (27 * 64)
    assert db.expected_drop_fraction(first_order, *sizes, block_size) < 0.25
    n_maps = _maps_for(sizes, block_size, p, 0.003)
    missed = _realized_fraction_nd(sizes, block_size, p, n_maps, _generator(1), first_order)
    solved = _realized_fraction_nd(sizes, block_size, p, n_maps, _generator(2))
    assert abs(solved - p) < 0.012 < 0.05 < p - missed


@pytest.mark.parametrize(("shape", "block_size", "p"), [((512, 8, 20), 4, 0.2)])
@pytest.mark.parametrize("rank", [1, 3])
def test_dense_sampler_realizes_p_in_1d_and_3d(shape, block_size, p, rank):
    # The path of accelerators and torch.compile, on the CPU: 4096 sequences of 20 positions,
    # or 4096 volumes of 5 x 4 x 6 with 2-cubes (0.2 dropped).
    if rank == 3:
        shape, block_size = (512, 8, 5, 4, 6), 2
    x = torch.ones(shape)
    gamma = db._solve_gamma_tensor(torch.tensor(p), *shape[2:], block_size)
    out, keep = db._drop_block_dense(x, gamma, block_size, True, _generator(), True)
    # Standard error <= sqrt(0.16 / 4096) = 0.0063 (every map's sites correlated at worst).
    assert abs(1 - float(keep.mean()) - p) < 0.025
    sum_dims = tuple(range(1, x.dim()))
    assert torch.allclose(out, keep * keep[0].numel() / keep.sum(sum_dims, keepdim=True))


def test_hand_placed_segments_and_cubes_are_zeroed_and_the_rest_rescaled():
    # 1-D: one sequence of 10, segments of 3 at 1 and 3 overlap on one position: 5 dropped.
    x = torch.arange(1.0, 11.0).view(1, 1, 10).requires_grad_()
    corners = _corners((0, 0, 1), (0, 0, 3))
    out, keep = sampler.drop_blocks_at(x, corners, (3,), per_channel=True, return_mask=True)
    expected = torch.ones(1, 1, 10)
    expected[0, 0, 1:6] = 0
    assert torch.equal(keep, expected)
    assert torch.allclose(out, x * expected * 10 / 5)
    out.sum().backward()
    assert torch.allclose(x.grad, expected * 2)
    # 3-D: a 2 x 3 x 2 box at (1, 0, 2) of channel 1 of a 2-channel 4 x 4 x 4 volume: 12 of 128.
    x = torch.ones(1, 2, 4, 4, 4)
    corners = _corners((0, 1, 1, 0, 2))
    out, keep = sampler.drop_blocks_at(x, corners, (2, 3, 2), per_channel=True, return_mask=True)
    expected = torch.ones(1, 2, 4, 4, 4)
    expected[0, 1, 1:3, 0:3, 2:4] = 0
    assert torch.equal(keep, expected)
    assert torch.allclose(out, expected * 128 / 116)


@pytest.mark.parametrize(("shape", "block"), [((6, 3, 17), (4,)), ((4, 3, 6, 7, 5), (3, 4, 2))])
def test_cpu_and_dense_samplers_place_the_same_blocks_in_1d_and_3d(shape, block):
    corners = sampler.sample_block_corners(shape, 0.1, *block, _generator())
    _, dropped, n_dropped = sampler.dropped_pixels(corners, shape, block)
    assert len(corners[0]) > 0
    centres = torch.zeros(shape)
    index = [c.long() for c in corners]
    for axis, extent in enumerate(block):
        index[2 + axis] += (extent - 1) // 2
    centres[tuple(index)] = 1
    covered = db._blocks_from_centres(centres, *block)
    assert torch.equal(covered.to(torch.uint8).view(shape[0], -1), dropped)
    assert torch.equal(n_dropped, covered.view(shape[0], -1).sum(1).long())


def test_1d_masks_are_whole_segments_and_clamped_segments_cover_the_sequence():
    _, keep = drop_block1d(torch.ones(64, 4, 30), 0.3, 4, generator=_generator(), return_mask=True)
    dropped = (1 - keep)[:, :, None]  # (N, C, 1, L): runs along the last axis
    assert dropped.sum() > 0 and _runs_are_at_least(dropped, 4, dim=3)
    # Segments of 9 on sequences of 5 cover them whole: each dropped with probability p.
    _, keep = drop_block1d(
        torch.ones(20000, 1, 5), 0.2, 9, generator=_generator(), return_mask=True
    )
    per_map = keep.view(20000, -1).sum(1)
    assert ((per_map == 0) | (per_map == 5)).all()
    assert float((per_map == 0).float().mean()) == pytest.approx(0.2, abs=0.014)


@pytest.mark.parametrize(
    ("function", "shape"), [(drop_block1d, (4, 6, 40)), (drop_block3d, (4, 6, 5, 8, 7))]
)
def test_1d_and_3d_masks_rescale_per_sample_and_are_shared_across_channels_on_request(
    function, shape
):
    x = torch.randn(shape)
    sum_dims = tuple(range(1, x.dim()))
    out, own = function(x, 0.3, 3, generator=_generator(1), return_mask=True)
    assert own.shape == shape and set(own.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(out, x * own * own[0].numel() / own.sum(sum_dims, keepdim=True))
    assert not torch.equal(own[:, 0], own[:, 1]) and not torch.equal(own[0], own[1])
    out, shared = function(x, 0.3, 3, per_channel=False, generator=_generator(1), return_mask=True)
    assert shared.shape == (shape[0], 1, *shape[2:])
    assert ((out == 0) == (shared == 0)).all()  # zero exactly where the shared mask is
    scale = shared[0].numel() / shared.sum(sum_dims, keepdim=True)
    assert torch.allclose(out, x * shared * scale)


@pytest.mark.parametrize("per_channel", [True, False])
def test_3d_gradcheck_and_channels_last_3d_give_the_same_values_and_gradients(per_channel):
    def dropped(x):
        return drop_block3d(x, 0.3, 2, per_channel=per_channel, generator=_generator(4))

    x = torch.randn(1, 2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dropped, (x,))
    x = torch.randn(4, 5, 6, 7, 5, requires_grad=True)
    x_last = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    weights = torch.randn(4, 5, 6, 7, 5)
    out, out_last = dropped(x), dropped(x_last)
    assert out_last.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out_last, out)
    (out * weights).sum().backward()
    (out_last * weights).sum().backward()
    assert torch.equal(x_last.grad, x.grad)
    # The dense sampler keeps the layout too.
    gamma = db._solve_gamma_tensor(torch.tensor(0.3), 6, 7, 5, 2)
    dense = db._drop_block_dense(x_last.detach(), gamma, 2, per_channel, _generator(), False)
    assert dense.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("layer_class", [DropBlock1d, DropBlock3d])
def test_1d_and_3d_layers_record_masks_follow_schedules_and_are_identity_in_evaluation(
    layer_class,
):
    from dropcluster.nn import DropRateSchedule

    shape = (3, 4, 12) if layer_class is DropBlock1d else (3, 4, 5, 6, 6)
    layer = layer_class(0.0, 3, generator=_generator())
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    x = torch.randn(shape, requires_grad=True)
    assert torch.equal(model(x), x)  # p = 0
    DropRateSchedule(0.4, "linear", end_epoch=4).apply(model, 2.0)
    assert float(layer.p) == pytest.approx(0.2)
    layer.record_mask = True
    out = model(x)
    keep = layer.last_mask
    assert keep.shape == shape and 0 < float(keep.mean()) < 1
    sum_dims = tuple(range(1, x.dim()))
    scale = keep[0].numel() / keep.sum(sum_dims, keepdim=True)
    assert torch.allclose(out, x * keep * scale)
    out.sum().backward()
    assert torch.allclose(x.grad, keep * scale)
    assert layer.eval()(x) is x


@pytest.mark.parametrize(
    ("function", "shape"), [(drop_block1d, (4, 3, 16)), (drop_block3d, (2, 3, 4, 5, 6))]
)
def test_1d_and_3d_inplace_and_identity_cases(function, shape):
    source = torch.randn(shape, requires_grad=True)
    expected = function(source, 0.3, 3, generator=_generator(5))
    x = source * 1.0
    out = function(x, 0.3, 3, inplace=True, generator=_generator(5))
    assert out is x and torch.equal(out, expected) and (out == 0).any()
    plain = torch.randn(shape)
    assert function(plain, 0.3, 3, training=False) is plain
    assert function(plain, 0.0, 3) is plain
    assert torch.equal(function(plain, torch.tensor(0.0), 3), plain)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: drop_block1d(torch.ones(2, 3, 4, 4), 0.1, 3),
            r"input should be 3 dimensional \(N, C, L\), but got shape \(2, 3, 4, 4\)",
        ),
        (
            lambda: DropBlock1d(0.1)(torch.ones(3, 8)),
            r"3 dimensional \(N, C, L\), but got shape \(3, 8\)",
        ),
        (
            lambda: drop_block3d(torch.ones(1, 3, 8, 8), 0.1, 3),
            r"input should be 5 dimensional \(N, C, D, H, W\), but got shape \(1, 3, 8, 8\)",
        ),
        (
            lambda: DropBlock3d(0.1, mode="reference")(torch.ones(1, 3, 8, 8)),
            r"5 dimensional \(N, C, D, H, W\), but got shape \(1, 3, 8, 8\)",
        ),
        (
            lambda: drop_block3d_reference(torch.ones(1, 1, 2, 3, 8, 8), 0.1, 3),
            r"5 dimensional \(N, C, D, H, W\), but got shape \(1, 1, 2, 3, 8, 8\)",
        ),
        (lambda: DropBlock3d(0.1, 0), "block_size should be an integer >= 1, but got 0"),
        (lambda: drop_block1d(torch.ones(1, 3, 8), 1.0, 3), r"\[0, 1\), but got 1.0"),
        (lambda: DropBlock1d(0.1).set_p(-0.5), r"\[0, 1\), but got -0.5"),
        (lambda: DropBlock1d(0.1, 3, mode="Exact"), "one of 'exact', 'reference', but got"),
    ],
)
def test_1d_and_3d_bad_arguments_raise_errors_that_say_what_was_expected_and_given(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_1d_and_3d_state_dicts_hold_no_p_and_repr_shows_the_settings():
    layer = DropBlock3d(0.1, 5, per_channel=False)
    assert list(layer.state_dict()) == []
    layer.load_state_dict({"p": torch.tensor(0.25)})
    assert repr(layer) == "DropBlock3d(p=0.25, block_size=5, per_channel=False)"
    reference = DropBlock1d(0.1, 7, mode="reference")
    assert repr(reference) == "DropBlock1d(p=0.1, block_size=7, mode='reference')"
    buffer = io.BytesIO()
    torch.save(reference, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).mode == "reference"


@pytest.mark.parametrize("layer_class", [DropBlock1d, DropBlock3d])
def test_compiled_1d_and_3d_layers_follow_set_p_and_batch_size_in_one_graph(layer_class):
    # Map sizes no other test uses: the coverage histogram is computed while tracing. Dynamic
    # shapes: the batch size stays symbolic, the map size specialises.
    # aot_eager for the volume, as in 2-D; the eager backend (dynamo alone) for sequences, to
    # save a second of AOT tracing: the two share every line but the max-pool.
    torch._dynamo.reset()
    sizes = (37,) if layer_class is DropBlock1d else (5, 7, 6)
    backend = "eager" if layer_class is DropBlock1d else "aot_eager"
    layer = layer_class(0.1, 3)
    compiled = torch.compile(layer, backend=backend, dynamic=True, fullgraph=True)
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    rates = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p, n_samples in ((0.1, 96), (0.1, 80), (0.4, 128)):
            layer.set_p(p)
            x = torch.ones(n_samples, 8, *sizes, requires_grad=True)
            out = compiled(x)
            keep = (out != 0).float()
            sum_dims = tuple(range(1, x.dim()))
            scale = keep[0].numel() / keep.sum(sum_dims, keepdim=True)
            assert torch.allclose(out, keep * scale)
            out.sum().backward()
            assert torch.allclose(x.grad, keep * scale)
            rates.append(1 - float(keep.mean()))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == graphs_before + 1
    # >= 640 maps, each site's drop correlated with at most a 5 x 5 x 5 neighbourhood: the
    # standard error is below 0.01.
    assert rates[0] == pytest.approx(0.1, abs=0.04)
    assert rates[2] == pytest.approx(0.4, abs=0.04)


# mode="reference": DropBlock3d is PyPI dropblock 0.3.0's DropBlock3D; DropBlock1d the same
# formulas with one axis (the package has no 1-D class: our assumption).
REFERENCE_3D_CASES = [
    ((256, 2, 2, 2, 2), 7),  # a map smaller than the block
    ((3, 4, 6, 7, 5), 3),
    ((3, 4, 6, 6, 6), 4),  # even: the package crops its padded max-pool's last slices
    ((2, 3, 5, 9, 4), 2),
]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize(("shape", "block_size"), REFERENCE_3D_CASES)
def test_3d_reference_mode_matches_pypi_dropblock_3d_bit_for_bit(shape, block_size, p):
    dropblock = pytest.importorskip("dropblock")
    theirs = dropblock.DropBlock3D(p, block_size)
    layer = DropBlock3d(p, block_size, mode="reference")

    def functional(x):
        return drop_block3d_reference(x, p, block_size)

    x = torch.randn(shape, generator=_generator(1))
    seeds_with_drops = 0
    for seed in range(6):
        expected = _seeded(seed, theirs, x)
        for ours in (layer, functional):
            out = _seeded(seed, ours, x)
            assert out.dtype == expected.dtype and torch.equal(out, expected), seed
        seeds_with_drops += bool((expected == 0).any())
    # Not vacuous: the rarest case, (256, 2, 2, 2, 2) at p = 0.1, drops something with
    # probability 1 - (1 - 0.1 / 343) ** 2048 = 0.45 a batch (2.7 of 6 seeds).
    assert seeds_with_drops > 0


def test_1d_reference_mode_is_the_packages_3d_algorithm_on_one_row_volumes():
    # Our 1-D reference (gamma p / b, segments, one mask per sequence, one batch rescaling) is
    # what DropBlock3D computes on (N, C, 1, 1, L) volumes given gamma p / b: the same draws
    # (torch.rand of N x L), a max-pool that leaves the size-1 axes alone, the same rescaling.
    dropblock = pytest.importorskip("dropblock")
    x = torch.randn(6, 3, 40, generator=_generator(2))
    for p, block_size in ((0.1, 5), (0.4, 4), (0.3, 1)):
        package_p = p * block_size**2  # their gamma p * b**2 / b**3 is our p / b here:
        assert package_p / block_size**3 == p / block_size
        theirs = dropblock.DropBlock3D(package_p, block_size)
        for seed in range(6):
            expected = _seeded(seed, theirs, x.view(6, 3, 1, 1, 40)).view(6, 3, 40)
            out = _seeded(seed, DropBlock1d(p, block_size, mode="reference"), x)
            assert torch.equal(out, expected), (p, block_size, seed)
            functional = functools.partial(drop_block1d_reference, p=p, block_size=block_size)
            out = _seeded(seed, functional, x)
            assert torch.equal(out, expected), (p, block_size, seed)
    assert (expected == 0).any()


def test_1d_reference_mode_drops_whole_short_sequences_with_the_probability_worked_out_by_hand():
    # Segments of 7 on sequences of 3: every position is a possible centre with gamma p / 7, and
    # a segment centred anywhere covers all 3 positions (3 of padding each side), so a sequence
    # is dropped whole iff any of its 3 centres fires: q = 1 - (1 - 0.3 / 7) ** 3 = 0.123.
    n_maps, q = 100_000, 1 - (1 - 0.3 / 7) ** 3
    out, keep = drop_block1d_reference(
        torch.ones(n_maps, 2, 3), 0.3, 7, generator=_generator(11), return_mask=True
    )
    assert keep.shape == (n_maps, 1, 3)
    per_map = keep.view(n_maps, 3).sum(1)
    assert ((per_map == 0) | (per_map == 3)).all()
    assert abs(1 - float(keep.mean()) - q) < 5 * math.sqrt(q * (1 - q) / n_maps)
    assert torch.allclose(out, keep.expand(-1, 2, -1) * keep.numel() / keep.sum())
