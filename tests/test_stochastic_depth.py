"""StochasticDepth and StochasticDepthResidual: rates, rescaling, the skip variant, state."""

import io

import pytest
import torch
from conftest import compile_counting_graphs
from torch import nn

from dropcluster.nn import StochasticDepth, StochasticDepthResidual, stochastic_depth


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_row_mode_drops_each_sample_with_probability_p():
    _, keep = stochastic_depth(
        torch.ones(20000, 3), 0.25, "row", generator=_generator(), return_mask=True
    )
    # Binomial standard error sqrt(0.25 * 0.75 / 20000) = 0.003; 0.012 is 4 of them.
    assert 1 - float(keep.mean()) == pytest.approx(0.25, abs=0.012)


def test_batch_mode_drops_the_whole_batch_with_probability_p():
    generator = _generator(1)
    dropped = []
    for _ in range(2000):
        out = stochastic_depth(torch.ones(8, 2), 0.3, "batch", generator=generator)
        assert bool((out == 0).all()) or bool((out != 0).all())
        dropped.append(bool((out == 0).all()))
    # Standard error sqrt(0.21 / 2000) = 0.010.
    assert sum(dropped) / 2000 == pytest.approx(0.3, abs=0.04)


def test_kept_samples_are_rescaled_so_the_mean_is_unchanged():
    out = stochastic_depth(torch.ones(40000, 1), 0.2, generator=_generator(2))
    assert set(out.unique().tolist()) == {0.0, 1.25}
    assert float(out.mean()) == pytest.approx(1.0, abs=0.012)


def test_evaluation_and_zero_rate_are_the_identity():
    x = torch.randn(5, 3)
    assert StochasticDepth(0.5).eval()(x) is x
    assert stochastic_depth(x, 0.0) is x


def test_gradient_flows_only_through_kept_samples():
    layer = StochasticDepth(0.5, generator=_generator(3))
    layer.record_mask = True
    x = torch.randn(16, 4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, layer.last_mask.expand(16, 4) * 2.0)


def test_same_seed_same_mask():
    x = torch.ones(64, 3)
    assert torch.equal(
        stochastic_depth(x, 0.4, generator=_generator(4)),
        stochastic_depth(x, 0.4, generator=_generator(4)),
    )


def _branch():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))


def test_skipping_dropped_samples_equals_masking_in_output_and_gradients():
    x = torch.randn(12, 4, 6, 6)
    results = []
    for skip in (False, True):
        block = StochasticDepthResidual(_branch(), 0.4, skip_dropped=skip, generator=_generator(5))
        out = block(x)
        out.square().sum().backward()
        results.append((out, [p.grad.clone() for p in block.branch.parameters()]))
    (masked, masked_grads), (skipped, skipped_grads) = results
    assert torch.allclose(masked, skipped, atol=1e-6)
    for a, b in zip(masked_grads, skipped_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_skip_variant_handles_all_and_none_dropped():
    x = torch.randn(1, 4, 5, 5)
    block = StochasticDepthResidual(_branch(), 0.99, skip_dropped=True, generator=_generator(6))
    assert torch.equal(block(x), x)  # the one sample is dropped with this seed
    keep_all = StochasticDepthResidual(_branch(), 0.0, skip_dropped=True)
    assert torch.allclose(keep_all(x), x + keep_all.branch(x))
    batch = StochasticDepthResidual(_branch(), 0.99, "batch", skip_dropped=True)
    assert torch.equal(batch(x), x)


def test_evaluation_of_the_residual_block_uses_the_branch_as_is():
    block = StochasticDepthResidual(_branch(), 0.5).eval()
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(block(x), x + block.branch(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_kept(dtype):
    assert stochastic_depth(torch.ones(8, 3, dtype=dtype), 0.3).dtype == dtype


def test_compiled_layer_does_not_recompile_when_p_changes():
    layer = StochasticDepth(0.1)
    compiled, calls = compile_counting_graphs(layer)
    x = torch.ones(4000, 2)
    low = float((compiled(x) == 0).float().mean())
    n_graphs = len(calls)
    layer.set_p(0.5)
    high = float((compiled(x) == 0).float().mean())
    assert len(calls) == n_graphs
    assert low < 0.2 < 0.4 < high


def test_state_dict_carries_p_through_save_and_load():
    layer = StochasticDepth(0.1)
    layer.set_p(0.3)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = StochasticDepth(0.1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(restored.p) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StochasticDepth(1.0), r"\[0, 1\)"),
        (lambda: StochasticDepth(0.1, "channel"), "mode should be one of"),
        (lambda: stochastic_depth(torch.ones(3), -0.1), r"\[0, 1\)"),
        (lambda: StochasticDepthResidual(nn.Identity(), 0.1, "x"), "mode should be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
