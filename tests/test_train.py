"""Training: config, checkpoints, metrics, exact resume, and a short real-data run."""

import errno
import json
import re

import pytest
import torch
from tiny_runs import tiny_config as _tiny_config

from dropcluster.errors import CheckpointError
from dropcluster.train.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import read_log, topk_correct, train

TIMING_KEYS = {"seconds", "images_per_s", "refit_seconds", "eval_seconds"}


def _without_timings(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def test_config_round_trips_through_json(tmp_path):
    config = _tiny_config(regularizer_options={"n_clusters": 9}, lr_milestones=[2])
    config.save(tmp_path / "config.json")
    assert TrainConfig.from_file(tmp_path / "config.json") == config


def test_weight_decay_defaults_to_the_papers_value_per_data_set():
    assert TrainConfig(dataset="cifar100").resolved_weight_decay() == 5e-4
    assert TrainConfig(dataset="tiny-imagenet").resolved_weight_decay() == 1e-4
    assert TrainConfig(dataset="tiny-imagenet", weight_decay=0.0).resolved_weight_decay() == 0.0


def test_config_loads_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset: cifar100\nmodel: resnet50\nepochs: 250\n")
    config = TrainConfig.from_file(tmp_path / "run.yaml")
    assert (config.dataset, config.model, config.epochs) == ("cifar100", "resnet50", 250)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 0}, "epochs should be an integer >= 1, but got 0"),
        ({"test_every": 0}, "test_every should be an integer >= 1, but got 0"),
        ({"train_fraction": 0.0}, r"train_fraction should be a number > 0.0, but got 0.0"),
        ({"p": 1.0}, r"p should be a number < 1.0, but got 1.0"),
        ({"lr_milestones": [200, 150]}, "increasing"),
        ({"learning_rate": 0.1}, "unknown config keys"),
        # Wrongly typed values (as a hand-written JSON or YAML config gives them).
        ({"p": "0.1"}, r"p should be a finite number, but got '0.1' \(str\)"),
        ({"momentum": None}, r"momentum should be a finite number, but got None"),
        ({"dataset": ["cifar100"]}, r"dataset should be a string, but got \['cifar100'\]"),
        ({"seed": 1.5}, r"seed should be an integer, but got 1.5"),
        ({"epochs": True}, r"epochs should be an integer, but got True"),
        ({"amp": "yes"}, r"amp should be true or false, but got 'yes'"),
        ({"lr_milestones": [1.5]}, r"lr_milestones should be a list of an integer"),
        # Meaningless numbers: a run with them would diverge or do nothing.
        ({"lr": float("nan")}, "lr should be a finite number, but got nan"),
        ({"lr": float("inf")}, "lr should be a finite number, but got inf"),
        ({"lr": 0.0}, "lr should be a number > 0.0"),
        ({"weight_decay": float("nan")}, "weight_decay should be a finite number or null"),
        ({"weight_decay": -1e-4}, "weight_decay should be a number >= 0.0"),
        ({"lr_gamma": -0.1}, "lr_gamma should be a number > 0.0, but got -0.1"),
        ({"momentum": 1.0}, "momentum should be a number < 1.0"),
        ({"dataset": "imagenet"}, "dataset should be one of 'cifar100', 'tiny-imagenet'"),
        ({"model": "vgg"}, "model should be one of 'resnet50'"),
        ({"regularizer": "dropconnect"}, "regularizer should be one of 'none'"),
        ({"device": "gpu0"}, "device should be 'auto', 'cpu'"),
    ],
)
def test_bad_config_values_raise_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_the_default_device_is_auto_and_a_run_says_which_device_it_takes(monkeypatch):
    from dropcluster.train.config import describe_device

    assert TrainConfig().device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainConfig().resolved_device() == torch.device("cpu")
    assert describe_device("auto") == "device: cpu (auto: no CUDA device is visible)"
    assert describe_device("cpu") == "device: cpu"
    # A machine with two GPUs (faked: only the decision is looked at).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"GPU{index}")
    assert TrainConfig().resolved_device() == torch.device("cuda")
    assert describe_device("auto") == "device: cuda:0, GPU0 (auto: 2 CUDA device(s) visible)"
    assert describe_device("cuda:1") == "device: cuda:1, GPU1"
    assert describe_device("auto", world=2) == (
        "device: cuda, one GPU per process (2 processes, by local rank) (auto: 2 CUDA device(s) "
        "visible)"
    )
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        describe_device("cuda:2")


def test_topk_correct_on_a_hand_made_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == [1, 2, 3]


def _checkpoint_state(epoch):
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(epoch=epoch, history=[], model={"weight": torch.full((3,), float(epoch))})
    return state


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint_state(1))
    real_save = torch.save

    def disk_full(obj, stream, *args, **kwargs):
        real_save(obj, stream)  # half the bytes reach the disk, then it is full
        stream.truncate(stream.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _checkpoint_state(2))
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit-flipped", "not-a-checkpoint"])
def test_damaged_checkpoint_is_refused_with_its_name(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint_state(1))
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bit-flipped":
        # Flip bits of the zip directory at the end, where torch looks first.
        for offset in range(len(data) - 60, len(data) - 20):
            data[offset] ^= 0xFF
    else:
        torch.save({"epoch": 1}, path)
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path):
    config = _tiny_config()
    straight = train(config, tmp_path / "straight")
    train(config, tmp_path / "resumed", stop_after_epoch=1)
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert _without_timings(resumed.history) == _without_timings(straight.history)
    assert resumed.top1 == straight.top1
    # cluster_every=1: no clusters before epoch 1, then a refit at the start of epochs 1 and 2.
    assert ["structured" in record for record in straight.history] == [False, True, True]
    lines = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result["top1"] == pytest.approx(straight.top1)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    config = _tiny_config(epochs=1)
    train(config, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path)


def test_resume_with_another_config_is_refused(tmp_path):
    train(_tiny_config(epochs=2), tmp_path, stop_after_epoch=1)
    with pytest.raises(ValueError, match="different config"):
        train(_tiny_config(epochs=2, p=0.3), tmp_path, resume=True)


def test_short_fashion_mnist_training_with_dropcluster_learns(tmp_path):
    from conftest import require_fashion_mnist

    require_fashion_mnist()
    config = TrainConfig(
        dataset="fashion-mnist",
        model="lenet5",  # DropCluster after its first conv: learning, in 3 s
        regularizer="dropcluster",
        p=0.1,
        epochs=3,
        batch_size=128,
        lr=0.05,
        cluster_every=1,
        cluster_images=256,
        train_fraction=0.05,
        average_last=1,
        test_every=3,  # the one averaged epoch: the same result, two evaluations fewer
        seed=0,
    )
    result = train(config, tmp_path)
    # 3000 training images, 3 epochs: 63.48 % top-1 measured here (torch 2.13 CPU, seed 0);
    # chance is 10 %. The margin allows for other CPUs' arithmetic.
    assert result.top1 > 50.0
    assert result.history[-1]["structured"][0] > 0


def test_clusters_are_refitted_in_a_compiled_model():
    from dropcluster.models import build_model, place_regularizer
    from dropcluster.nn import DropCluster2d, fit_clusters

    model = build_model("lenet5", n_classes=10, in_channels=1)
    place_regularizer(model, "dropcluster", 0.1, "fashion-mnist")
    compiled = torch.compile(model, backend="eager")
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    info = fit_clusters(
        compiled, images, 32, prepare=lambda batch: batch.float() / 255, batch_size=16
    ).record()
    layer = next(m for m in model.modules() if isinstance(m, DropCluster2d))
    assert layer.fitted and info["channels"] == [6]


def test_test_every_skips_test_evaluations_but_not_the_averaged_epochs(tmp_path):
    every = train(_tiny_config(epochs=4, average_last=1, model="lenet5"), tmp_path / "every")
    sparse = train(
        _tiny_config(epochs=4, average_last=1, test_every=3, model="lenet5"), tmp_path / "sparse"
    )
    # Tested after epoch 3 (every third) and epoch 4 (averaged): 1-based, so 0-based 2 and 3.
    assert [("top1" in record) for record in sparse.history] == [False, False, True, True]
    assert all("eval_seconds" in record for record in sparse.history[2:])
    # Evaluation draws no random numbers: the training and the result are the same.
    assert _without_timings(every.history)[2:] == _without_timings(sparse.history)[2:]
    assert [r["loss"] for r in every.history] == [r["loss"] for r in sparse.history]
    assert (sparse.top1, sparse.top5) == (every.top1, every.top5)
    log = read_log(tmp_path / "sparse" / "log.jsonl")
    assert [("top1" in record) for record in log] == [False, False, True, True]
    # Not part of the run's identity: the run resumes under another test_every.
    assert _tiny_config(test_every=3).same_run_as(_tiny_config())


def test_checkpoint_every_repeats_the_epochs_after_the_last_checkpoint_with_the_same_result(
    tmp_path, monkeypatch
):
    from dropcluster.train import loop

    config = _tiny_config(epochs=5, checkpoint_every=2, cluster_every=2, model="lenet5")
    whole = train(_tiny_config(epochs=5, cluster_every=2, model="lenet5"), tmp_path / "whole")
    real_epoch = loop.train_epoch

    def crash_in_the_fourth_epoch(run, epoch, **kwargs):
        if epoch == 3:
            raise RuntimeError("power cut")
        return real_epoch(run, epoch, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", crash_in_the_fourth_epoch)
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, tmp_path / "run")
    # Checkpoints after epochs 2 and 4 (and the last): the crash keeps the one after epoch 2,
    # while the log already holds epoch 3.
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert len(read_log(tmp_path / "run" / "log.jsonl")) == 3
    monkeypatch.setattr(loop, "train_epoch", real_epoch)
    resumed = train(config, tmp_path / "run", resume=True)
    assert _without_timings(resumed.history) == _without_timings(whole.history)
    assert (resumed.top1, resumed.top5) == (whole.top1, whole.top5)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 4


def test_build_run_gives_dropcluster_layers_their_shapes_before_any_wrapper():
    from dropcluster.nn import DropCluster2d
    from dropcluster.train.setup import build_run

    run = build_run(_tiny_config(), torch.device("cpu"))
    layers = [m for m in run.model.modules() if isinstance(m, DropCluster2d)]
    assert layers and all(layer.input_shape is not None for layer in layers)
    assert not any(layer.fitted for layer in layers)


def test_evaluate_runs_under_the_given_autocast_and_counts_like_topk_correct():
    from dropcluster.train.loop import evaluate

    torch.manual_seed(0)
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(12, 7)

        def forward(self, x):
            out = self.linear(x.flatten(1))
            seen.append(out.dtype)
            return out

    model = Probe()
    images = torch.randint(0, 256, (50, 3, 2, 2), dtype=torch.uint8)
    labels = torch.randint(0, 7, (50,))

    def prepare(batch):
        return batch.float() / 255

    top1, top5 = evaluate(model, images, labels, prepare, batch_size=16)
    assert set(seen) == {torch.float32} and len(seen) == 4
    with torch.no_grad():
        expected = topk_correct(model(prepare(images)), labels)
    assert (top1, top5) == (100 * expected[0] / 50, 100 * expected[1] / 50)
    seen.clear()
    evaluate(model, images, labels, prepare, batch_size=16, amp_dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16}
