"""Drop-rate schedules (config, presets, the training loop, resume) and the warnings that no
DropCluster run is a silent no-op (RefitSchedule, the trainer, a sweep's dry run, the layer)."""

from __future__ import annotations

import io
import json
import re
import warnings

import pytest
import torch
from tiny_runs import tiny_config
from torch import nn

from dropcluster.cli import main
from dropcluster.experiments.presets import apply_overrides, expand_grid, load_preset
from dropcluster.experiments.sweep import dry_run
from dropcluster.nn import DropCluster2d, DropRateSchedule, RefitSchedule, StochasticDepth
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import read_log, train

TIMING_KEYS = {"seconds", "images_per_s", "refit_seconds", "eval_seconds"}
#: What `RefitSchedule(every=50, epochs=10)` says: the issue's 10-epoch run with every=50.
TEN_EPOCHS_EVERY_50 = (
    "RefitSchedule(every=50) refits first at the start of epoch 50, but the run has 10 epochs "
    "(0 to 9): DropCluster2d stays the identity for the whole run; set every below 10, e.g. "
    "every=2"
)


def _tiny_config(**changes) -> TrainConfig:
    # The loop's bookkeeping, not learning: the smallest model.
    return tiny_config(**{"model": "lenet5", **changes})


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), DropCluster2d(0.4, 3))


def _images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# -- the schedules, worked by hand ----------------------------------------------------------


def test_each_kind_gives_the_rates_worked_by_hand():
    constant = DropRateSchedule(0.2)
    linear = DropRateSchedule(0.3, "linear", start_epoch=10, end_epoch=20, start_p=0.1)
    early = DropRateSchedule(0.1, "early", end_epoch=3)
    late = DropRateSchedule(0.1, "late", start_epoch=2)
    assert [constant.value(e) for e in (0, 7.5, 1000)] == [0.2, 0.2, 0.2]
    # 0.1 + (15 - 10) / (20 - 10) * (0.3 - 0.1) = 0.2; before the ramp start_p, after it p.
    assert [linear.value(e) for e in (0, 10, 20, 99)] == [0.1, 0.1, 0.3, 0.3]
    assert linear.value(15) == pytest.approx(0.2)
    assert linear.value(12.5) == pytest.approx(0.15)
    assert [early.value(e) for e in range(5)] == [0.1, 0.1, 0.1, 0.0, 0.0]
    assert early.value(2.99) == 0.1  # fractional epochs: on until the boundary itself
    assert [late.value(e) for e in range(5)] == [0.0, 0.0, 0.1, 0.1, 0.1]


def test_a_schedule_round_trips_through_its_json_form():
    schedule = DropRateSchedule(0.1, "linear", start_epoch=0, end_epoch=50)
    values = schedule.to_dict()
    assert values == {
        "p": 0.1,
        "kind": "linear",
        "start_epoch": 0,
        "end_epoch": 50,
        "start_p": 0.0,
    }
    assert DropRateSchedule.from_dict(json.loads(json.dumps(values))) == schedule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 1.5}, r"drop probability p has to be in [0, 1], but got 1.5"),
        ({"p": -0.1}, r"drop probability p has to be in [0, 1], but got -0.1"),
        ({"p": 0.1, "kind": "linear", "start_p": 1.2}, "start_p has to be in [0, 1]"),
        (
            {"p": 0.1, "kind": "linear", "start_epoch": 5, "end_epoch": 2},
            "a linear schedule's span should not be negative (0 <= start_epoch <= end_epoch), "
            "but got start_epoch=5, end_epoch=2",
        ),
        ({"p": 0.1, "kind": "late", "start_epoch": -1}, "start_epoch should be a number >= 0"),
        ({"p": 0.1, "kind": "early"}, "end_epoch, which should be > 0 (0 never drops)"),
        (
            {"p": 0.1, "kind": "late", "start_epoch": 2, "end_epoch": 5},
            "a 'late' schedule reads p, start_epoch, but got end_epoch=5",
        ),
        ({"p": 0.1, "kind": "early", "end_epoch": 3, "start_p": 0.1}, "reads p, end_epoch"),
        ({"p": 0.1, "kind": "cosine"}, "kind should be one of"),
    ],
)
def test_bad_schedules_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        DropRateSchedule(**kwargs)
    assert "\n" not in str(error.value)


def test_from_dict_names_the_keys_it_takes():
    with pytest.raises(ValueError, match=re.escape("takes the keys ['p', 'kind', 'start_epoch'")):
        DropRateSchedule.from_dict({"p": 0.1, "kind": "linear", "end": 5})
    with pytest.raises(ValueError, match="p required"):
        DropRateSchedule.from_dict({"kind": "constant"})


def test_p_1_goes_to_stochastic_depth_and_is_refused_by_the_others_before_any_write():
    schedule = DropRateSchedule(1.0, "late", start_epoch=1)
    branch = StochasticDepth(0.2)
    assert schedule.apply(branch, 3) == 1.0 and float(branch.p) == 1.0
    model = nn.Sequential(nn.Dropout(0.2), StochasticDepth(0.2), DropCluster2d(0.2))
    with pytest.raises(ValueError, match=r"DropCluster2d '2' refuses: .*\[0, 1\), but got 1.0"):
        schedule.apply(model, 3)
    assert model[0].p == 0.2 and float(model[1].p) == pytest.approx(0.2)  # nothing written


# -- config, command line, presets ----------------------------------------------------------


def test_the_config_field_gives_a_schedule_that_reaches_the_configs_p():
    config = _tiny_config(drop_schedule={"kind": "linear", "start_epoch": 0, "end_epoch": 50})
    assert config.drop_rate_schedule() == DropRateSchedule(0.2, "linear", 0, 50)
    assert config.to_dict()["drop_schedule"] == {
        "kind": "linear",
        "start_epoch": 0,
        "end_epoch": 50,
    }
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert _tiny_config().drop_rate_schedule() is None


def test_a_config_without_a_schedule_is_the_same_dict_as_before_the_field_existed():
    # Stored configs of 0.4 (checkpoints, sweep databases) have no drop_schedule key.
    values = _tiny_config().to_dict()
    assert "drop_schedule" not in values
    assert TrainConfig.from_dict(values).same_run_as(_tiny_config())
    scheduled = _tiny_config(drop_schedule={"kind": "early", "end_epoch": 2})
    assert scheduled.run_differences(_tiny_config()) == {
        "drop_schedule": ({"kind": "early", "end_epoch": 2}, None)
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"drop_schedule": {"kind": "linear", "p": 0.3}}, "a schedule takes no p here"),
        (
            {"regularizer": "none", "drop_schedule": {"kind": "constant"}},
            "regularizer 'none' has no drop rate to schedule",
        ),
        (
            {"drop_schedule": {"kind": "linear", "start_epoch": 9, "end_epoch": 3}},
            'drop_schedule {"end_epoch": 3, "kind": "linear", "start_epoch": 9}: a linear '
            "schedule's span should not be negative",
        ),
        (
            {"drop_schedule": {"kind": "linear", "end_epoch": 3, "start_p": 1.0}},
            "drop probability p has to be in [0, 1), but got 1.0",
        ),
        ({"drop_schedule": {"kind": "early", "end": 3}}, "takes the keys"),
        ({"drop_schedule": "linear"}, "drop_schedule should be a mapping or null"),
    ],
)
def test_bad_schedules_in_a_config_are_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        _tiny_config(**changes)
    assert "\n" not in str(error.value)


def test_start_p_1_is_a_rate_stochastic_depth_takes():
    config = _tiny_config(
        regularizer="stochastic_depth",
        drop_schedule={"kind": "linear", "end_epoch": 3, "start_p": 1.0},
    )
    assert config.drop_rate_schedule().value(0) == 1.0


def test_the_train_command_takes_a_schedule_with_set_and_refuses_a_bad_one(tmp_path, capsys):
    schedule = '{"kind": "linear", "start_epoch": 4, "end_epoch": 2}'
    assert main(["train", "--out", str(tmp_path), "--set", f"drop_schedule={schedule}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dropcluster: error: drop_schedule {") and "\n" not in error
    assert "span should not be negative" in error


def test_the_paper_ours_preset_has_a_dropcluster_ramp_arm():
    specs = expand_grid(load_preset("paper-cifar100-ours"))
    ramp = [spec for spec in specs if spec.config.variant == "ramp"]
    assert [spec.run_id for spec in ramp[:2]] == [
        "dropcluster-ramp-p0.1-f1-s0",
        "dropcluster-ramp-p0.1-f1-s1",
    ]
    assert len(ramp) == 12 and {spec.regularizer for spec in ramp} == {"dropcluster"}
    schedule = ramp[-1].config.drop_rate_schedule()
    assert schedule == DropRateSchedule(0.3, "linear", start_epoch=50, end_epoch=200)
    assert [schedule.value(e) for e in (49, 50, 125, 200, 249)] == pytest.approx(
        [0.0, 0.0, 0.15, 0.3, 0.3]
    )
    # The ramp arm keeps the preset's DropCluster options ("ours"); the other arms no schedule.
    assert ramp[0].config.regularizer_options["per_sample"] is True
    assert all(spec.config.drop_schedule is None for spec in specs if spec not in ramp)


def test_set_drop_schedule_on_a_preset_schedules_every_run_but_the_baseline():
    preset = apply_overrides(
        load_preset("demo"), {"drop_schedule": {"kind": "early", "end_epoch": 2}}
    )
    specs = expand_grid(preset)
    scheduled = {spec.regularizer: spec.config.drop_schedule is not None for spec in specs}
    assert scheduled.pop("none") is False and set(scheduled.values()) == {True}
    assert {
        json.dumps(spec.config.drop_schedule) for spec in specs if spec.regularizer != "none"
    } == {'{"kind": "early", "end_epoch": 2}'}


# -- the training loop ----------------------------------------------------------------------


def _without_timings(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def test_the_loop_sets_the_scheduled_rate_each_epoch_and_logs_it(tmp_path):
    config = _tiny_config(drop_schedule={"kind": "linear", "start_epoch": 0, "end_epoch": 2})
    result = train(config, tmp_path, progress_stream=io.StringIO())
    assert [record["p"] for record in result.history] == pytest.approx([0.0, 0.1, 0.2])
    assert [record["p"] for record in read_log(tmp_path / "log.jsonl")] == pytest.approx(
        [0.0, 0.1, 0.2]
    )
    plain = train(_tiny_config(), tmp_path / "plain", progress_stream=io.StringIO())
    assert "p" not in plain.history[0]
    # Epoch 0 trains with no clusters either way; from epoch 1 the rate differs: so do losses.
    assert result.history[0]["loss"] == plain.history[0]["loss"]
    assert result.history[1]["loss"] != plain.history[1]["loss"]


def test_a_resumed_run_sets_the_same_rates_as_the_uninterrupted_one(tmp_path):
    config = _tiny_config(drop_schedule={"kind": "late", "start_epoch": 2})
    straight = train(config, tmp_path / "straight", progress_stream=io.StringIO())
    train(config, tmp_path / "resumed", stop_after_epoch=2, progress_stream=io.StringIO())
    resumed = train(config, tmp_path / "resumed", resume=True, progress_stream=io.StringIO())
    assert [record["p"] for record in straight.history] == [0.0, 0.0, 0.2]
    assert _without_timings(resumed.history) == _without_timings(straight.history)
    assert resumed.top1 == straight.top1
    with pytest.raises(ValueError, match="drop_schedule"):  # another schedule is another run
        train(_tiny_config(), tmp_path / "resumed", resume=True)


# -- no silent no-ops -----------------------------------------------------------------------


def test_a_10_epoch_run_with_every_50_is_told_at_construction():
    with pytest.warns(UserWarning, match=f"^{re.escape(TEN_EPOCHS_EVERY_50)}$"):
        RefitSchedule(every=50, epochs=10)
    with pytest.warns(UserWarning, match=re.escape("set first below 10, e.g. first=2")):
        RefitSchedule(every=5, first=10, epochs=10)


def test_a_schedule_that_fits_within_the_epochs_says_nothing():
    model, images = _model(), _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = RefitSchedule(every=2, n_images=8, epochs=4)
        for epoch in range(4):
            schedule.step(model, images, epoch, batch_size=8)
        assert schedule.finish(model) == []
    assert model[2].fitted


def test_the_last_planned_step_warns_when_a_layer_was_never_fitted():
    model, images = _model(), _images()
    schedule = RefitSchedule(every=2, n_images=8, epochs=4)
    schedule.step(model, images, 0)
    schedule.step(model, images, 1)  # the loop skips epoch 2, where the refit was due
    expected = (
        "the run ends with DropCluster2d layer(s) ['2'] never fitted: they were the identity "
        "for the whole run; call RefitSchedule.step(model, data, epoch) at the start of every "
        "epoch (this schedule fits at epoch 2, then every 2 epochs) with first below the run's "
        "epochs, or fit_clusters(model, data) before training"
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(expected)}$") as record:
        schedule.step(model, images, 3)
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule.finish(model)  # once per schedule


def test_finish_without_epochs_warns_once_and_names_the_layers():
    model = _model()
    schedule = RefitSchedule(every=5)
    with pytest.warns(UserWarning, match=re.escape("layer(s) ['2'] never fitted")):
        assert schedule.finish(model) == ["2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert schedule.finish(model) == ["2"]


def test_the_construction_warning_is_the_only_one(recwarn):
    model = _model()
    schedule = RefitSchedule(every=50, epochs=2)
    schedule.step(model, _images(), 0)
    schedule.step(model, _images(), 1)
    assert [str(w.message)[:28] for w in recwarn] == ["RefitSchedule(every=50) refi"]


def test_the_trainer_warns_before_a_run_whose_first_refit_is_past_its_epochs(tmp_path):
    expected = (
        "cluster_every=5 refits first at the start of epoch 5, but the run has 2 epochs (0 to "
        "1): DropCluster2d stays the identity for the whole run; set cluster_every below 2, "
        "e.g. cluster_every=1"
    )
    config = _tiny_config(epochs=2, cluster_every=5, average_last=1)
    with pytest.warns(UserWarning, match=f"^{re.escape(expected)}$"):
        result = train(config, tmp_path, progress_stream=io.StringIO())
    assert not any("structured" in record for record in result.history)
    assert _tiny_config(regularizer="dropblock", epochs=2, cluster_every=5).refit_warning() is None


def test_the_dry_run_says_when_epochs_40_keeps_cluster_every_50(tmp_path):
    preset = apply_overrides(load_preset("paper-cifar100"), {"epochs": 40})
    stream = io.StringIO()
    specs = dry_run(preset, tmp_path, [], stream)
    count = sum(spec.regularizer == "dropcluster" for spec in specs)
    assert count == 36
    expected = (
        f"warning: {count} DropCluster run(s): cluster_every=50 refits first at the start of "
        "epoch 50, but the run has 40 epochs (0 to 39): DropCluster2d stays the identity for "
        "the whole run; set cluster_every below 40, e.g. cluster_every=8\n"
    )
    assert expected in stream.getvalue()
    quiet = io.StringIO()
    dry_run(load_preset("paper-cifar100"), tmp_path, [], quiet)
    assert "warning:" not in quiet.getvalue()


def test_an_unfitted_layer_that_samples_in_eval_warns_once():
    layer = DropCluster2d(0.2, 3, sample_in_eval=True).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match=re.escape("DropCluster2d(sample_in_eval=True) is not")):
        assert torch.equal(layer(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer
        DropCluster2d(0.2, 3).eval()(x)  # the identity, as a fitted layer in eval: no warning
        DropCluster2d(0.2, 3, sample_in_eval=True).train()(x)


def test_a_schedule_is_refused_where_it_would_flatten_or_miss_the_rates():
    linear = {"kind": "linear", "start_epoch": 0, "end_epoch": 10}
    with pytest.raises(ValueError, match="would undo depth_rule='linear'"):
        _tiny_config(
            regularizer="stochastic_depth",
            regularizer_options={"depth_rule": "linear"},
            drop_schedule=linear,
        )
    with pytest.warns(UserWarning, match="found no layer whose rate it sets"):
        DropRateSchedule.from_dict({**linear, "p": 0.1}).apply(nn.Conv2d(1, 1, 1), 5)
