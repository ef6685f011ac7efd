"""DropBlock2d: the exact drop rate, block placement, edge cases, state."""

import io

import pytest
import torch
from conftest import compile_counting_graphs

from dropcluster.nn import DropBlock2d, drop_block2d
from dropcluster.nn import dropblock as db


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _dropped_fraction(height, block_size, p, seed=0, per_channel=True):
    # 2**23 pixels per case: the standard error of the mean fraction stays below 0.0007 even
    # where a single block covers the whole map (then each map is one Bernoulli(p) draw).
    n_maps = max(64, (1 << 23) // (height * height))
    x = torch.ones(n_maps // 16, 16, height, height)
    _, keep = drop_block2d(
        x, p, block_size, generator=_generator(seed), per_channel=per_channel, return_mask=True
    )
    return 1.0 - float(keep.float().mean())


@pytest.mark.parametrize("height", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_realized_drop_fraction_matches_p_for_every_block_size(height, p):
    for block_size in range(1, 8):
        fraction = _dropped_fraction(height, block_size, p, seed=block_size)
        assert abs(fraction - p) < 0.005, (height, block_size, p, fraction)


def test_coverage_histogram_of_a_3x3_map_with_2x2_blocks():
    # Origins form a 2x2 grid; corners are covered once, edge midpoints twice, the centre 4x.
    assert db.coverage_histogram(3, 3, 2) == ((1, 4), (2, 4), (4, 1))
    gamma = 0.2
    expected = 1 - (4 * 0.8 + 4 * 0.8**2 + 0.8**4) / 9
    assert db.expected_drop_fraction(gamma, 3, 3, 2) == pytest.approx(expected, abs=1e-15)


def test_solved_gamma_gives_p_exactly_and_first_order_gamma_does_not():
    height, block, p = 16, 7, 0.3
    gamma = db.solve_gamma(p, height, height, block)
    assert db.expected_drop_fraction(gamma, height, height, block) == pytest.approx(p, abs=1e-12)
    # torchvision's formula: p * HW / (block^2 * (H - block + 1)^2), first order in gamma.
    first_order = p * height**2 / (block**2 * (height - block + 1) ** 2)
    realised = db.expected_drop_fraction(first_order, height, height, block)
    assert abs(realised - p) > 0.05  # overlapping blocks: about 0.23 instead of 0.3


def test_tensor_solver_matches_the_float_solver():
    for height, block, p in [(8, 3, 0.1), (16, 7, 0.3), (5, 2, 0.05), (1, 3, 0.2)]:
        expected = db.solve_gamma(p, height, height, block)
        got = float(
            db._solve_gamma_tensor(torch.tensor(p, dtype=torch.float64), height, height, block)
        )
        assert got == pytest.approx(expected, rel=1e-9)


def test_monte_carlo_of_the_origin_process_matches_the_formula():
    gamma = torch.tensor(0.05, dtype=torch.float64)
    keep = db._dense_keep((2000, 1, 9, 9), gamma, 3, _generator(), torch.float32, "cpu")
    expected = db.expected_drop_fraction(0.05, 9, 9, 3)
    assert 1 - float(keep.mean()) == pytest.approx(expected, abs=0.004)


def test_dense_and_sparse_samplers_both_match_p():
    gamma = db.solve_gamma(0.1, 16, 16, 3)
    sparse = db._sparse_keep((512, 16, 16, 16), gamma, 3, _generator(1), torch.float32)
    dense = db._dense_keep(
        (512, 16, 16, 16), torch.tensor(gamma, dtype=torch.float64), 3, _generator(2),
        torch.float32, "cpu",
    )  # fmt: skip
    assert 1 - float(sparse.mean()) == pytest.approx(0.1, abs=0.003)
    assert 1 - float(dense.mean()) == pytest.approx(0.1, abs=0.003)


@pytest.mark.parametrize("block_size", [2, 3, 4])
def test_a_block_covers_exactly_block_size_rows_and_columns(monkeypatch, block_size):
    # One origin at valid position (1, 2) of a 6x7 map: rows 1.., columns 2.. are dropped.
    cols = 7 - block_size + 1
    monkeypatch.setattr(db, "_bernoulli_positions", lambda n, g, gen: torch.tensor([cols + 2]))
    keep = db._sparse_keep((1, 1, 6, 7), 0.01, block_size, None, torch.float32)
    expected = torch.ones(6, 7)
    expected[1 : 1 + block_size, 2 : 2 + block_size] = 0
    assert torch.equal(keep[0, 0], expected)


def test_scale_is_count_over_count_ones_per_sample(monkeypatch):
    monkeypatch.setattr(db, "_bernoulli_positions", lambda n, g, gen: torch.tensor([0]))
    x = torch.ones(2, 1, 4, 4)
    out, keep = drop_block2d(x, 0.1, 2, return_mask=True)
    # Sample 0 lost a 2x2 block: 16 / 12; sample 1 lost nothing: scale 1.
    assert torch.allclose(out[0], keep[0] * 16 / 12)
    assert torch.equal(out[1], x[1])


def test_block_larger_than_the_map_drops_whole_maps_with_probability_p():
    _, keep = drop_block2d(
        torch.ones(20000, 1, 3, 3), 0.2, 7, generator=_generator(), return_mask=True
    )
    per_map = keep.view(20000, -1)
    assert ((per_map.sum(1) == 0) | (per_map.sum(1) == 9)).all()
    assert float((per_map.sum(1) == 0).float().mean()) == pytest.approx(0.2, abs=0.012)


def test_one_pixel_maps_drop_pixels_with_probability_p():
    assert _dropped_fraction(1, 3, 0.3) == pytest.approx(0.3, abs=0.005)


def test_shared_mask_is_identical_across_channels_and_per_channel_is_not():
    x = torch.ones(4, 8, 16, 16)
    _, shared = drop_block2d(x, 0.3, 3, per_channel=False, generator=_generator(), return_mask=True)
    assert shared.shape == (4, 1, 16, 16)
    out = drop_block2d(x, 0.3, 3, per_channel=False, generator=_generator())
    assert all(torch.equal(out[:, 0], out[:, c]) for c in range(8))
    _, own = drop_block2d(x, 0.3, 3, generator=_generator(), return_mask=True)
    assert not torch.equal(own[:, 0], own[:, 1])


def test_gradient_flows_only_through_kept_pixels():
    layer = DropBlock2d(0.2, 3, generator=_generator(3))
    layer.record_mask = True
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    weights = torch.randn(4, 3, 10, 10)
    (layer(x) * weights).sum().backward()
    keep = layer.last_mask
    scale = 300 / keep.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, weights * keep * scale, atol=1e-5)


def test_evaluation_and_zero_rate_are_the_identity():
    x = torch.randn(2, 3, 8, 8)
    assert DropBlock2d(0.3).eval()(x) is x
    assert torch.equal(DropBlock2d(0.0)(x), x)


def test_same_generator_seed_gives_the_same_output():
    x = torch.randn(4, 3, 12, 12)
    first = DropBlock2d(0.2, 3, generator=_generator(5))(x)
    assert torch.equal(first, DropBlock2d(0.2, 3, generator=_generator(5))(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_kept(dtype):
    out = DropBlock2d(0.1, 3)(torch.ones(4, 3, 12, 12, dtype=dtype))
    assert out.dtype == dtype


def test_channels_last_input_stays_channels_last_with_the_same_values():
    x = torch.randn(4, 3, 12, 12)
    expected = drop_block2d(x, 0.2, 3, generator=_generator(6))
    out = drop_block2d(x.to(memory_format=torch.channels_last), 0.2, 3, generator=_generator(6))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)


def test_compiled_layer_does_not_recompile_when_p_changes():
    layer = DropBlock2d(0.1, 3)
    compiled, calls = compile_counting_graphs(layer)
    x = torch.ones(64, 4, 16, 16)
    low = float((compiled(x) == 0).float().mean())
    n_graphs = len(calls)
    layer.set_p(0.4)
    high = float((compiled(x) == 0).float().mean())
    assert len(calls) == n_graphs
    assert low < high  # the new rate is used (dense sampler with the tensor gamma solver)
    assert high == pytest.approx(0.4, abs=0.03)


def test_state_dict_carries_p_through_save_and_load():
    layer = DropBlock2d(0.1, 5)
    layer.set_p(0.25)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = DropBlock2d(0.1, 5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(restored.p) == 0.25


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DropBlock2d(1.0), r"\[0, 1\)"),
        (lambda: DropBlock2d(0.1, 0), "block_size should be a positive int"),
        (lambda: drop_block2d(torch.ones(3, 8, 8), 0.1, 3), "4 dimensional"),
        (lambda: drop_block2d(torch.ones(1, 3, 8, 8), -0.2, 3), r"\[0, 1\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
