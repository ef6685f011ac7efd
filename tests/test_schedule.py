"""DropRateSchedule: values over epochs, writing into every kind of regularizer."""

import pytest
import torch
from conftest import compile_counting_graphs
from torch import nn

from dropcluster.nn import DropCluster2d, DropRateSchedule


def test_constant_schedule_is_p_everywhere():
    schedule = DropRateSchedule(0.2)
    assert [schedule.value(e) for e in (0, 5, 1000)] == [0.2, 0.2, 0.2]


def test_linear_ramp_from_start_p_to_p_between_two_epochs():
    schedule = DropRateSchedule(0.3, "linear", start_epoch=10, end_epoch=20)
    assert schedule.value(0) == 0.0
    assert schedule.value(10) == 0.0
    assert schedule.value(12.5) == pytest.approx(0.075)
    assert schedule.value(15) == pytest.approx(0.15)
    assert schedule.value(20) == 0.3
    assert schedule.value(100) == 0.3


def test_apply_sets_buffers_in_place_and_torch_dropout_attributes():
    model = nn.Sequential(DropCluster2d(0.1), nn.Dropout(0.1), nn.Dropout2d(0.1), nn.ReLU())
    buffer = model[0].p
    rate = DropRateSchedule(0.4, "linear", 0, 4).apply(model, 2)
    assert rate == pytest.approx(0.2)
    assert model[0].p is buffer  # same tensor: a compiled graph keeps reading it
    assert float(model[0].p) == pytest.approx(0.2)
    assert model[1].p == pytest.approx(0.2)
    assert model[2].p == pytest.approx(0.2)


def test_a_resumed_run_gets_its_rate_from_the_schedule_not_the_state_dict():
    schedule = DropRateSchedule(0.3, "linear", 0, 10)
    layer = DropCluster2d(0.3)
    schedule.apply(layer, 5)
    assert "p" not in layer.state_dict()  # a setting, not state: checkpoints stay loadable
    restored = DropCluster2d(0.3)
    restored.load_state_dict(layer.state_dict())
    assert float(restored.p) == pytest.approx(0.3)
    schedule.apply(restored, 5)  # what a resuming loop does at the epoch it resumes
    assert float(restored.p) == pytest.approx(0.15) == float(layer.p)


def test_set_p_does_not_recompile():
    layer = nn.Sequential(nn.Conv2d(1, 2, 3), DropCluster2d(0.1))
    layer[1].fit(torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(0)))
    compiled, calls = compile_counting_graphs(layer)
    x = torch.randn(4, 1, 8, 8)
    compiled(x)
    compiled_once = len(calls)
    schedule = DropRateSchedule(0.3, "linear", 0, 3)
    for epoch in (1, 2, 3):
        schedule.apply(layer, epoch)
        compiled(x)
    assert len(calls) == compiled_once


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 1.5}, r"\[0, 1\]"),
        ({"p": 0.1, "kind": "cosine"}, "kind should be one of"),
        ({"p": 0.1, "kind": "linear", "start_epoch": 5, "end_epoch": 2}, "start_epoch"),
        ({"p": 0.1, "start_p": -0.5}, "start_p"),
    ],
)
def test_bad_schedules_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropRateSchedule(**kwargs)
