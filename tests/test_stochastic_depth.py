"""StochasticDepth and StochasticDepthResidual: rates, rescaling, the skip variant, state."""

import io
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from dropcluster.nn import StochasticDepth, StochasticDepthResidual, stochastic_depth


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _four_standard_errors(p, n):
    """Four binomial standard errors of a fraction estimated from n draws at rate p: a fixed
    seed passes or fails deterministically, and a correct sampler would fail with another seed
    with probability about 6e-5."""
    return 4 * math.sqrt(p * (1 - p) / n)


class _CountingBranch(nn.Module):
    """A small conv branch (no normalisation) that records its inputs and their batch sizes."""

    def __init__(self, channels=4):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.layers = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 4, 1)
            )
        self.inputs, self.batch_sizes = [], []

    def forward(self, x):
        self.inputs.append(x)
        self.batch_sizes.append(x.shape[0])
        return self.layers(x)


# Rates


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_row_mode_drops_each_sample_with_probability_p(p):
    n = 20000
    x = torch.randn(n, 3, 2) + 3  # no zeros in x: a zero in the output means dropped
    out, keep = stochastic_depth(x, p, "row", generator=_generator(), return_mask=True)
    assert keep.shape == (n, 1, 1)
    dropped = (out == 0).flatten(1)
    assert torch.equal(dropped.all(1), dropped.any(1))  # whole samples are dropped
    assert torch.equal(dropped.all(1), keep.flatten() == 0)
    assert float(dropped.all(1).float().mean()) == pytest.approx(p, abs=_four_standard_errors(p, n))


def test_small_rates_are_not_quantised_by_a_low_precision_input():
    # A bfloat16 uniform draw takes multiples of 2**-8, so it would drop with probability
    # 2**-8 = 0.0039 for p = 0.002: 8 standard errors away. The draw is float32 whatever x is.
    n, p = 40000, 0.002
    keep = stochastic_depth(
        torch.ones(n, 1, dtype=torch.bfloat16), p, generator=_generator(12), return_mask=True
    )[1]
    assert 1 - float(keep.float().mean()) == pytest.approx(p, abs=_four_standard_errors(p, n))


def test_row_mode_draws_samples_independently():
    # Pairs of neighbouring samples are both dropped with probability p**2 = 0.09.
    keep = stochastic_depth(torch.ones(20000, 1), 0.3, generator=_generator(7), return_mask=True)[1]
    both_dropped = float(((keep[1:] == 0) & (keep[:-1] == 0)).float().mean())
    assert both_dropped == pytest.approx(0.09, abs=_four_standard_errors(0.09, 20000))


def test_batch_mode_drops_the_whole_batch_with_probability_p():
    generator, n_draws, p = _generator(1), 2000, 0.3
    dropped = []
    for _ in range(n_draws):
        out = stochastic_depth(torch.ones(8, 2), p, "batch", generator=generator)
        assert bool((out == 0).all()) or bool((out != 0).all())
        dropped.append(bool((out == 0).all()))
    assert sum(dropped) / n_draws == pytest.approx(p, abs=_four_standard_errors(p, n_draws))


def test_kept_samples_are_rescaled_so_the_mean_is_unchanged():
    n, p = 40000, 0.2
    x = torch.rand(n, 1, generator=_generator(11)) + 0.5  # mean 1, standard deviation 0.29
    out, keep = stochastic_depth(x, p, generator=_generator(2), return_mask=True)
    assert torch.allclose(out, x * keep / (1 - p))
    # out_i = x_i * B_i / (1 - p): variance E[x^2] / (1 - p) - E[x]^2 = (1 + 1/12) / 0.8 - 1.
    standard_error = math.sqrt((1 + 1 / 12) / (1 - p) - 1) / math.sqrt(n)
    assert float(out.mean()) == pytest.approx(float(x.mean()), abs=4 * standard_error)


def test_a_tensor_rate_draws_the_same_mask_as_the_float_rate():
    x = torch.randn(256, 3)
    from_float = stochastic_depth(x, 0.3, generator=_generator(9))
    from_tensor = stochastic_depth(x, torch.tensor(0.3), generator=_generator(9))
    assert torch.allclose(from_float, from_tensor)
    assert torch.equal(from_float == 0, from_tensor == 0)


# Identity cases


def test_evaluation_and_zero_rate_are_the_identity():
    x = torch.randn(5, 3)
    assert StochasticDepth(0.5).eval()(x) is x
    assert stochastic_depth(x, 0.5, training=False) is x
    assert stochastic_depth(x, 0.0) is x
    assert torch.equal(StochasticDepth(0.0)(x), x)  # a 0 buffer draws a mask that keeps all


def test_torchvision_positional_arguments_mean_the_same_here():
    # torchvision: stochastic_depth(input, p, mode, training=True)
    x = torch.randn(64, 3)
    assert stochastic_depth(x, 0.5, "row", False) is x
    positional = stochastic_depth(x, 0.3, "batch", True, generator=_generator(2))
    keyword = stochastic_depth(x, 0.3, mode="batch", training=True, generator=_generator(2))
    assert torch.equal(positional, keyword)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_rate_one_drops_every_branch_in_training_as_torchvision(mode):
    x = torch.randn(6, 3, 4, 4)
    for rate in (1.0, torch.tensor(1.0)):
        out, keep = stochastic_depth(x, rate, mode, generator=_generator(), return_mask=True)
        assert torch.equal(out, torch.zeros_like(x))  # zeros, not 0 * inf = NaN
        assert int(keep.sum()) == 0
    layer = StochasticDepth(1.0, mode)
    assert torch.equal(layer(x), torch.zeros_like(x))
    assert layer.eval()(x) is x
    layer.set_p(0.5)
    layer.set_p(1.0)  # a schedule may end at 1
    assert float(layer.p) == 1.0
    x = torch.randn(6, 4, 4, 4)
    for skip in (False, True):
        block = StochasticDepthResidual(_CountingBranch(), 1.0, mode, skip_dropped=skip)
        assert torch.equal(block(x), x)  # the shortcut alone
        assert block.branch.batch_sizes == ([] if skip else [6])


def test_evaluation_of_the_residual_block_uses_the_branch_as_is():
    for skip in (False, True):
        block = StochasticDepthResidual(_CountingBranch(), 0.5, skip_dropped=skip).eval()
        x = torch.randn(3, 4, 5, 5)
        assert torch.equal(block(x), x + block.branch(x))


# Gradients


def test_gradient_flows_only_through_kept_samples():
    layer = StochasticDepth(0.5, generator=_generator(3))
    layer.record_mask = True
    x = torch.randn(16, 4, requires_grad=True)
    layer(x).sum().backward()
    kept = layer.last_mask.flatten() == 1
    assert 0 < int(kept.sum()) < 16
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], 2.0))


def test_gradient_matches_finite_differences_for_a_fixed_mask():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    for mode in ("row", "batch"):
        # Reseeding inside makes every evaluation draw the same mask.
        assert torch.autograd.gradcheck(
            lambda x, mode=mode: stochastic_depth(x, 0.4, mode, generator=_generator(5)), (x,)
        )


# Randomness


def test_same_seed_same_mask_and_another_seed_another_mask():
    x = torch.ones(64, 3)
    first = stochastic_depth(x, 0.4, generator=_generator(4))
    assert torch.equal(first, stochastic_depth(x, 0.4, generator=_generator(4)))
    assert not torch.equal(first, stochastic_depth(x, 0.4, generator=_generator(5)))
    modules = [StochasticDepth(0.4, generator=_generator(4)) for _ in range(2)]
    assert torch.equal(modules[0](x), modules[1](x))


# Skipping the dropped samples' branch


def _run_block(skip, mode, p, x, seed, steps=1):
    """Outputs, input gradient and summed branch parameter gradients over `steps` steps."""
    block = StochasticDepthResidual(
        _CountingBranch(), p, mode, skip_dropped=skip, generator=_generator(seed)
    )
    block.record_mask = True
    outputs, masks = [], []
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        out = block(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        masks.append(block.last_mask)
    grads = [parameter.grad for parameter in block.branch.parameters()]
    return outputs, x.grad, grads, masks, block


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_skipping_dropped_samples_equals_masking_in_output_and_gradients(p):
    x = torch.randn(12, 4, 6, 6)
    masked, masked_x_grad, masked_grads, masks, _ = _run_block(False, "row", p, x, 5)
    skipped, skipped_x_grad, skipped_grads, skip_masks, block = _run_block(True, "row", p, x, 5)
    n_kept = int(masks[0].sum())
    assert 0 < n_kept < 12  # the gather/scatter path ran
    assert block.branch.batch_sizes == [n_kept]
    assert torch.equal(masks[0], skip_masks[0])
    assert torch.allclose(masked[0], skipped[0], atol=1e-6)
    assert torch.allclose(masked_x_grad, skipped_x_grad, atol=1e-5)
    for a, b in zip(masked_grads, skipped_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_skipping_in_batch_mode_equals_masking_over_several_steps():
    x = torch.randn(6, 4, 5, 5)
    masked, masked_x_grad, masked_grads, masks, _ = _run_block(False, "batch", 0.5, x, 8, 8)
    skipped, skipped_x_grad, skipped_grads, _, block = _run_block(True, "batch", 0.5, x, 8, 8)
    n_kept_steps = sum(int(mask.sum()) for mask in masks)
    assert 0 < n_kept_steps < 8  # both a kept and a dropped batch happened
    assert block.branch.batch_sizes == [6] * n_kept_steps  # dropped batches never ran it
    for a, b in zip(masked, skipped, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(masked_x_grad, skipped_x_grad, atol=1e-5)
    for a, b in zip(masked_grads, skipped_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_skip_variant_with_everything_dropped_returns_the_shortcut_without_the_branch():
    x = torch.randn(1, 4, 5, 5)
    block = StochasticDepthResidual(
        _CountingBranch(), 0.99, skip_dropped=True, generator=_generator(6)
    )
    block.record_mask = True
    out = block(x)
    assert int(block.last_mask.sum()) == 0  # the one sample is dropped with this seed
    assert torch.equal(out, x)
    assert block.branch.batch_sizes == []
    batch = StochasticDepthResidual(
        _CountingBranch(), 0.99, "batch", skip_dropped=True, generator=_generator(6)
    )
    batch.record_mask = True
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = batch(x)
    assert int(batch.last_mask.sum()) == 0
    assert torch.equal(out, x)
    assert batch.branch.batch_sizes == []
    out.sum().backward()
    # Documented: the branch's parameters get no gradient at all (None, not zeros).
    assert all(parameter.grad is None for parameter in batch.branch.parameters())


def test_skip_variant_with_nothing_dropped_runs_the_branch_once_on_the_whole_batch():
    x = torch.randn(5, 4, 5, 5)
    block = StochasticDepthResidual(_CountingBranch(), 0.0, skip_dropped=True)
    assert torch.allclose(block(x), x + block.branch.layers(x))
    assert block.branch.batch_sizes == [5]
    assert block.branch.inputs[0] is x  # no gather and scatter when every sample is kept


def test_a_kept_single_sample_of_a_large_batch_is_scaled_and_added_back_in_place():
    x = torch.randn(32, 4, 3, 3)
    block = StochasticDepthResidual(
        _CountingBranch(), 0.99, skip_dropped=True, generator=_generator(16)
    )
    block.record_mask = True
    out = block(x)
    kept = block.last_mask.flatten().nonzero().flatten()
    assert kept.numel() == 1  # this seed keeps exactly one sample of 32
    expected = x.clone()
    expected[kept] += block.branch.layers(x[kept]) / (1 - 0.99)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_in_a_skipped_branch_sees_only_the_kept_samples():
    # Documented difference: running statistics come from the kept samples only.
    x = torch.randn(16, 3, 4, 4) + torch.arange(16.0).reshape(16, 1, 1, 1)
    block = StochasticDepthResidual(
        nn.BatchNorm2d(3), 0.5, skip_dropped=True, generator=_generator(3)
    )
    block.record_mask = True
    block(x)
    kept = block.last_mask.flatten() == 1
    assert 0 < int(kept.sum()) < 16
    expected = 0.1 * x[kept].mean(dim=(0, 2, 3))  # momentum 0.1 from a zero running mean
    assert torch.allclose(block.branch.running_mean, expected, atol=1e-5)
    assert not torch.allclose(block.branch.running_mean, 0.1 * x.mean(dim=(0, 2, 3)), atol=0.05)


def test_a_shortcut_module_is_applied_to_the_identity_path():
    shortcut = nn.Conv2d(4, 4, 1)
    for skip in (False, True):
        block = StochasticDepthResidual(
            _CountingBranch(), 0.5, skip_dropped=skip, shortcut=shortcut, generator=_generator(2)
        )
        block.record_mask = True
        x = torch.randn(8, 4, 3, 3)
        out = block(x)
        keep = block.last_mask
        expected = shortcut(x) + block.branch.layers(x) * keep / 0.5
        assert torch.allclose(out, expected, atol=1e-5)


# Dtypes and memory formats


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_kept_and_the_mask_is_in_that_dtype(dtype):
    x = torch.randn(64, 3, dtype=dtype) + 3
    out, keep = stochastic_depth(x, 0.3, generator=_generator(1), return_mask=True)
    assert out.dtype == keep.dtype == dtype
    kept = keep.flatten() == 1
    scale = torch.tensor(1 / 0.7, dtype=dtype)
    assert torch.equal(out[kept], x[kept] * scale)
    assert StochasticDepth(0.3)(x).dtype == dtype
    block = StochasticDepthResidual(nn.Linear(3, 3).to(dtype), 0.3, skip_dropped=True)
    assert block(x).dtype == dtype


def test_channels_last_is_kept_by_the_layer_and_both_residual_variants():
    channels_last = torch.channels_last
    x = torch.randn(8, 4, 5, 5).to(memory_format=channels_last)
    assert stochastic_depth(x, 0.5).is_contiguous(memory_format=channels_last)
    outputs, input_grads, branches = [], [], []
    for skip in (False, True):
        branches.append(_CountingBranch().to(memory_format=channels_last))
        block = StochasticDepthResidual(
            branches[-1], 0.5, skip_dropped=skip, generator=_generator(4)
        )
        x_skip = x.detach().requires_grad_(True)
        outputs.append(block(x_skip))
        outputs[-1].square().sum().backward()
        input_grads.append(x_skip.grad)
        assert outputs[-1].is_contiguous(memory_format=channels_last)
        assert x_skip.grad.is_contiguous(memory_format=channels_last)
    assert torch.allclose(*outputs, atol=1e-6)
    assert torch.allclose(*input_grads, atol=1e-5)
    gathered = branches[1].inputs[0]
    assert 0 < gathered.shape[0] < 8  # this seed drops some samples, not all
    # The gathered kept samples stay channels_last: the branch's convolutions keep their layout.
    assert gathered.is_contiguous(memory_format=torch.channels_last)


# torch.compile


def test_compiled_layer_does_not_recompile_when_p_changes():
    # aot_eager traces forward and backward through AOTAutograd but skips inductor's C++ build;
    # fullgraph=True fails on any graph break.
    torch._dynamo.reset()
    layer = StochasticDepth(0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.ones(4000, 2, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    low = float((out == 0).float().mean())
    layer.set_p(0.5)
    high = float((compiled(x) == 0).float().mean())
    assert counter.frame_count == 1
    assert low == pytest.approx(0.1, abs=_four_standard_errors(0.1, 4000))
    assert high == pytest.approx(0.5, abs=_four_standard_errors(0.5, 4000))
    assert torch.equal(x.grad, (out != 0).float() / 0.9)


def test_compiled_masking_residual_does_not_recompile_when_p_changes():
    torch._dynamo.reset()
    block = StochasticDepthResidual(nn.Linear(2, 2), 0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x = torch.randn(4000, 2)
    dropped = []
    for p in (0.1, 0.5):
        block.set_p(p)
        out = compiled(x)
        out.sum().backward()
        dropped.append(float(torch.isclose(out, x).all(1).float().mean()))
    assert counter.frame_count == 1
    assert dropped[0] == pytest.approx(0.1, abs=_four_standard_errors(0.1, 4000))
    assert dropped[1] == pytest.approx(0.5, abs=_four_standard_errors(0.5, 4000))


def test_compiled_skip_variant_breaks_the_graph_but_matches_eager():
    # The kept count is data-dependent: dynamo breaks the graph there (documented) and the
    # result must still be the eager one, draw for draw.
    torch._dynamo.reset()
    blocks = [
        StochasticDepthResidual(_CountingBranch(), 0.5, skip_dropped=True, generator=_generator(3))
        for _ in range(2)
    ]
    compiled = torch.compile(blocks[0], backend="aot_eager")
    x = torch.randn(8, 4, 5, 5)
    for _ in range(3):
        assert torch.allclose(compiled(x), blocks[1](x), atol=1e-6)


# Arguments and state


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StochasticDepth(1.01), r"has to be in \[0, 1\], but got 1.01"),
        (lambda: StochasticDepth(-0.1), r"has to be in \[0, 1\], but got -0.1"),
        (lambda: StochasticDepth(0.1).set_p(1.5), r"has to be in \[0, 1\], but got 1.5"),
        (lambda: stochastic_depth(torch.ones(3), -0.1), r"has to be in \[0, 1\]"),
        (lambda: stochastic_depth(torch.ones(3), 1.5), r"has to be in \[0, 1\], but got 1.5"),
        (lambda: stochastic_depth(torch.ones(3), float("nan")), "finite number, but got nan"),
        (lambda: stochastic_depth(torch.ones(3), "0.1"), "p should be a number, but got '0.1'"),
        (lambda: stochastic_depth(torch.ones(3), torch.ones(2)), "1-element float tensor"),
        (lambda: stochastic_depth(torch.ones(3), torch.tensor(0)), "1-element float tensor"),
        (lambda: stochastic_depth(torch.ones(3), 0.1, "channel"), "mode should be one of"),
        (lambda: StochasticDepth(0.1, "channel"), "mode should be one of"),
        (lambda: StochasticDepthResidual(nn.Identity(), 0.1, "x"), "mode should be one of"),
        (lambda: StochasticDepthResidual(nn.Identity(), 1.1), r"\[0, 1\]"),
        (lambda: stochastic_depth(torch.tensor(1.0), 0.1), "batch dimension"),
        (lambda: stochastic_depth(torch.ones(3, dtype=torch.int64), 0.1), "floating tensor"),
        (lambda: StochasticDepth(0.1)(torch.ones(3, dtype=torch.int64)), "floating tensor"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_modules_print_their_settings():
    assert repr(StochasticDepth(0.25, "batch")) == "StochasticDepth(p=0.25, mode='batch')"
    text = repr(StochasticDepthResidual(nn.Identity(), 0.2, skip_dropped=True))
    assert "p=0.2, mode='row', skip_dropped=True" in text


def test_p_is_a_setting_not_state_but_a_saved_p_still_loads():
    layer = StochasticDepth(0.1)
    layer.set_p(0.3)
    block = StochasticDepthResidual(nn.Linear(2, 2), 0.1)
    block.set_p(0.4)
    assert "p" not in layer.state_dict() and "p" not in block.state_dict()
    for module, fresh, rate in (
        (layer, StochasticDepth(0.1), 0.3),
        (block, StochasticDepthResidual(nn.Linear(2, 2), 0.1), 0.4),
    ):
        state = {**module.state_dict(), "p": module.p.clone()}  # a dropcluster 0.1 checkpoint
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert float(fresh.p) == pytest.approx(rate)
        assert fresh.p.dtype == torch.float32
