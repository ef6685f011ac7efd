"""build_regularizer: every name builds the right module; bad names and options fail clearly."""

import pytest
import torch
from torch import nn

from dropcluster.nn import (
    REGULARIZERS,
    DropBlock2d,
    DropCluster2d,
    StochasticDepth,
    build_regularizer,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", nn.Identity),
        ("dropout", nn.Dropout),
        ("spatial_dropout", nn.Dropout2d),
        ("dropblock", DropBlock2d),
        ("dropcluster", DropCluster2d),
        ("stochastic_depth", StochasticDepth),
    ],
)
def test_each_name_builds_its_module(name, expected):
    p = 0.0 if name == "none" else 0.15
    module = build_regularizer(name, p)
    assert type(module) is expected
    if name != "none":
        assert float(module.p) == pytest.approx(0.15)
    assert module(torch.ones(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_registry_lists_every_regularizer():
    assert set(REGULARIZERS) == {
        "none",
        "dropout",
        "spatial_dropout",
        "dropblock",
        "dropcluster",
        "stochastic_depth",
    }


def test_options_reach_the_module():
    module = build_regularizer("dropcluster", 0.2, n_clusters=9, per_sample=False)
    assert module.n_clusters == 9
    assert module.per_sample is False
    assert build_regularizer("dropblock", 0.1, block_size=5).block_size == 5


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="regularizer should be one of 'none', 'dropout', 'spatial_dropout'"
    ):
        build_regularizer("dropconnect", 0.1)


@pytest.mark.parametrize(
    ("name", "p", "options", "message"),
    [
        ("dropout", 1.2, {}, r"\[0, 1\)"),
        ("dropout", 0.1, {"inplace": True}, "takes no options"),
        ("dropcluster", 0.1, {"block_size": 3}, "bad options for 'dropcluster'"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, p, options, message):
    with pytest.raises(ValueError, match=message):
        build_regularizer(name, p, **options)
