"""dropcluster.robustness: metrics worked by hand, any model scored, ``evaluate --model``."""

from __future__ import annotations

import json

import pytest
import torch
from test_cifar10 import write_cifar10
from torch import nn

from dropcluster.cli import main
from dropcluster.data.corruptions import BENCHMARK
from dropcluster.robustness import (
    ALEXNET_IMAGENET_C_ERRORS,
    ModelLoadError,
    RobustnessResult,
    build_model,
    corruption_errors,
    evaluate_model,
    load_weights,
    mean_corruption_error,
    relative_corruption_errors,
)

# ------------------------------------------------------------------------------------ metrics


def test_metrics_on_a_case_worked_by_hand():
    errors = {"a": {1: 10.0, 2: 30.0}, "b": {1: 20.0, 2: 40.0}}
    assert mean_corruption_error(errors, ["a", "b"], [1, 2]) == 25.0
    baseline = {"a": {1: 20.0, 2: 40.0}, "b": {1: 40.0, 2: 40.0}}
    # CE_a = (10 + 30) / (20 + 40), CE_b = (20 + 40) / (40 + 40)
    assert corruption_errors(errors, baseline, ["a", "b"]) == pytest.approx(
        {"a": 100 * 40 / 60, "b": 75.0}
    )
    # relative: ((10 - 5) + (30 - 5)) / ((20 - 10) + (40 - 10)) = 30 / 40
    relative = relative_corruption_errors(errors, 5.0, baseline, 10.0, ["a"])
    assert relative == pytest.approx({"a": 75.0})
    with pytest.raises(ValueError, match="missing: a 3"):
        mean_corruption_error(errors, ["a"], [1, 2, 3])
    with pytest.raises(ValueError, match="baseline has no error on a at severities \\[2\\]"):
        corruption_errors(errors, {"a": {1: 5.0}}, ["a"])
    with pytest.raises(ValueError, match="loses no accuracy on a"):
        relative_corruption_errors(errors, 5.0, {"a": {1: 9.0, 2: 10.0}}, 10.0, ["a"])


def test_alexnet_normalises_its_own_errors_to_100_and_needs_all_five_severities():
    alexnet_like = {
        name: dict.fromkeys(range(1, 6), error) for name, error in ALEXNET_IMAGENET_C_ERRORS.items()
    }
    ce = corruption_errors(alexnet_like, ALEXNET_IMAGENET_C_ERRORS)
    assert set(ce) == set(BENCHMARK) and all(value == pytest.approx(100.0) for value in ce.values())
    half = {name: {s: error / 2 for s, error in by.items()} for name, by in alexnet_like.items()}
    assert corruption_errors(half, ALEXNET_IMAGENET_C_ERRORS)["snow"] == pytest.approx(50.0)
    partial = {name: {1: 50.0} for name in BENCHMARK}
    with pytest.raises(ValueError, match="needs severities 1-5"):
        corruption_errors(partial, ALEXNET_IMAGENET_C_ERRORS)


def _rows(error_of, clean_top1=90.0):
    rows = [{"corruption": "clean", "severity": 0, "top1": clean_top1, "top5": 99.0, "images": 10}]
    for index, name in enumerate(BENCHMARK):
        for severity in range(1, 6):
            rows.append(
                {
                    "corruption": name,
                    "severity": severity,
                    "top1": 100.0 - error_of(index, severity),
                    "top5": 100.0,
                    "images": 10,
                }
            )
    return tuple(rows)


def test_result_computes_errors_mce_and_normalised_metrics_and_round_trips(tmp_path):
    result = RobustnessResult("cifar10-c", "released", _rows(lambda i, s: 10.0 * s), {"seed": 0})
    assert result.clean_error == 10.0
    assert result.error_by_corruption["fog"] == 30.0
    assert result.mce == pytest.approx(30.0)
    baseline = RobustnessResult(
        "cifar10-c", "released", _rows(lambda i, s: 20.0 * s, 80.0), {"seed": 0}
    )
    assert result.normalised_mce(baseline) == pytest.approx(50.0)
    # relative: sum(10 s - 10) / sum(20 s - 20) = 0.5 for every corruption
    assert result.relative_mce(baseline) == pytest.approx(50.0)
    imagenet_sized = RobustnessResult("own test set", "generated", result.rows)
    assert imagenet_sized.normalised_mce("alexnet") == pytest.approx(
        sum(100 * 30.0 / e for e in ALEXNET_IMAGENET_C_ERRORS.values()) / 15
    )
    with pytest.raises(ValueError, match="do not normalise a cifar10-c result"):
        result.normalised_mce("alexnet")
    with pytest.raises(ValueError, match="baseline was evaluated on cifar100-c"):
        result.normalised_mce(RobustnessResult("cifar100-c", "released", baseline.rows))
    generated = RobustnessResult("cifar10-c", "generated", baseline.rows, {"seed": 0})
    with pytest.warns(UserWarning, match="source 'generated' vs 'released'"):
        result.normalised_mce(generated)
    path = result.save(tmp_path / "r.json")
    again = RobustnessResult.from_json(path)
    assert again == result and json.loads(path.read_text())["mce"] == pytest.approx(30.0)
    text = result.table()
    assert "mCE (unnormalised, 15 benchmark corruptions x 5): 30.00" in text
    assert "clean error: 10.00" in text
    incomplete = RobustnessResult("cifar10-c", "released", result.rows[:-1])
    assert incomplete.mce is None and "mCE: not computed" in incomplete.table()
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="bad.json is not a robustness result"):
        RobustnessResult.from_json(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------ loading


FACTORIES = '''
import torch
from torch import nn

def small(num_classes=10, width=4):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )

def broken():
    raise RuntimeError("no GPU here")

def not_a_module():
    return 3

class Constant(nn.Module):
    """Logits that always pick one class, whatever the image: its accuracy is the share of
    that class in the labels."""

    def __init__(self, num_classes=10, label=3):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[label] = 1.0
        self.seen = []
        self.modes = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        self.modes.append(self.training)
        return self.bias.expand(x.shape[0], -1)
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def test_build_model_from_a_file_or_a_module_with_options(factories, monkeypatch):
    model = build_model(f"{factories}:small", {"num_classes": 7})
    assert model[-1].out_features == 7
    monkeypatch.syspath_prepend(str(factories.parent))
    assert isinstance(build_model("factories:Constant"), nn.Module)
    for spec, message in (
        ("factories", "should be MODULE:FACTORY"),
        ("factories:nothing", "factories has no 'nothing'"),
        ("factories:broken", "factories:broken\\(\\) failed: RuntimeError: no GPU here"),
        ("factories:not_a_module", "should return an nn.Module, but returned int"),
        ("no_such_module_here:f", "cannot import no_such_module_here"),
        (f"{factories.parent}/missing.py:f", "no Python file at"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            build_model(spec)


def test_load_weights_takes_state_dicts_in_common_wrappers_and_names_what_does_not_fit(
    factories, tmp_path
):
    source = build_model(f"{factories}:small")
    state = source.state_dict()
    variants = {
        "plain.pt": state,
        "wrapped.pt": {"state_dict": state, "epoch": 3},
        "ddp.pt": {"model": {f"module.{k}": v for k, v in state.items()}},
    }
    for name, content in variants.items():
        torch.save(content, tmp_path / name)
        target = build_model(f"{factories}:small")
        load_weights(target, tmp_path / name)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    wider = build_model(f"{factories}:small", {"num_classes": 100})
    with pytest.raises(
        ModelLoadError,
        match=r"do not fit the model: shapes differ: 4.weight \(10, 4\) in the file, \(100, 4\)",
    ):
        load_weights(wider, tmp_path / "plain.pt")
    torch.save({"other": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(
        ModelLoadError, match="missing 0.weight, 0.bias, 4.weight and 1 more; unexpected other"
    ):
        load_weights(source, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(ModelLoadError, match="not a weights file"):
        load_weights(source, tmp_path / "text.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="holds no state dict"):
        load_weights(source, tmp_path / "list.pt")


# ------------------------------------------------------------------------------ evaluate_model


@pytest.fixture
def cifar10_test(tmp_path):
    _, arrays = write_cifar10(tmp_path / "data", n_test=20, seed=1)
    return tmp_path / "data", torch.tensor(arrays["test"][1])


def test_evaluate_model_generated_scores_every_row_exactly_and_normalises_the_input(
    factories, cifar10_test
):
    data_dir, labels = cifar10_test
    model = build_model(f"{factories}:Constant", {"label": 3})
    result = evaluate_model(
        model,
        "cifar10-c",
        data_dir=data_dir,
        source="generated",
        corruptions="gaussian_noise,defocus_blur",
        severities="1,5",
        normalize=((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)),
        batch_size=7,
    )
    share = 100.0 * float((labels == 3).float().mean())
    assert [(r["corruption"], r["severity"]) for r in result.rows] == [
        ("clean", 0),
        ("gaussian_noise", 1),
        ("gaussian_noise", 5),
        ("defocus_blur", 1),
        ("defocus_blur", 5),
    ]
    assert all(r["top1"] == pytest.approx(share) and r["images"] == 20 for r in result.rows)
    assert result.clean_error == pytest.approx(100 - share) and result.mce is None
    assert result.settings["normalize"] == [[0.5, 0.5, 0.5], [0.25, 0.5, 1.0]]
    # The first batches the model saw: the output check (2 images), then clean images 0-6.
    from dropcluster.data.datasets import load_dataset

    clean = load_dataset("cifar10", "test", data_dir).images[:7].float() / 255
    expected = (clean - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(model.seen[1], expected)
    assert model.training and not any(model.modes)  # scored in eval mode, then restored


def test_evaluate_model_refuses_bad_input_before_scoring(factories, cifar10_test):
    data_dir, _ = cifar10_test
    hundred = build_model(f"{factories}:small", {"num_classes": 100})
    with pytest.raises(
        ValueError,
        match=r"output should be \(N, 10\) logits for cifar10-c's 10 classes, but for 2 "
        r"images it is \(2, 100\)",
    ):
        evaluate_model(hundred, "cifar10-c", data_dir=data_dir, source="generated")
    small = build_model(f"{factories}:small")
    for options, message in (
        ({"corruptions": "snowy"}, "unknown corruption 'snowy'"),
        ({"severities": "0-2"}, "severities should be ints in 1..5"),
        ({"normalize": ((0.5,), (0.5,))}, "normalize should give 3 means"),
        ({"source": "web"}, "source should be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate_model(
                small, "cifar10-c", data_dir=data_dir, **{"source": "generated", **options}
            )
    with pytest.raises(ValueError, match="dataset should be one of"):
        evaluate_model(small, "imagenet-c", data_dir=data_dir)


# -------------------------------------------------------------------------------- the command


def test_evaluate_model_command_writes_json_and_refuses_weights_that_do_not_fit(
    factories, cifar10_test, tmp_path, capsys
):
    data_dir, labels = cifar10_test
    weights = tmp_path / "w.pt"
    torch.save(build_model(f"{factories}:Constant", {"label": 5}).state_dict(), weights)
    out = tmp_path / "r.json"
    common = [
        "evaluate",
        "--model",
        f"{factories}:Constant",
        "--dataset",
        "cifar10-c",
        "--data-dir",
        str(data_dir),
        "--source",
        "generated",
        "--device",
        "cpu",
    ]
    status = main(
        [
            *common,
            "--weights",
            str(weights),
            "--corruptions",
            "shot_noise",
            "--severities",
            "2",
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document = json.loads(out.read_text())
    share = 100.0 * float((labels == 5).float().mean())
    assert document["rows"][1]["corruption"] == "shot_noise"
    assert document["rows"][1]["top1"] == pytest.approx(share)
    printed = capsys.readouterr()
    assert "shot_noise" in printed.out and f"results written to {out}" in printed.out
    torch.save(build_model(f"{factories}:small", {"num_classes": 100}).state_dict(), weights)
    assert main([*common, "--weights", str(weights)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) <= 2 and "do not fit the model" in error[-1]
    for extra, message in (
        (["--jpeg-quality", "85"], "--jpeg-quality go with --checkpoint"),
        (["--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
        (["--json", str(tmp_path / "nowhere" / "r.json")], "nowhere does not exist"),
    ):
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", f"{factories}:small"]) == 2
    assert "--model needs --dataset" in capsys.readouterr().err


def test_evaluate_model_on_a_test_set_of_ones_own(factories):
    images = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 4)
    model = build_model(f"{factories}:Constant", {"num_classes": 3, "label": 1})
    result = evaluate_model(model, (images, labels), corruptions="contrast", severities=[2])
    assert result.source == "generated" and result.dataset == "own test set"
    assert [r["top1"] for r in result.rows] == pytest.approx([100 / 3, 100 / 3])
    with pytest.raises(ValueError, match="has no released copy"):
        evaluate_model(model, (images, labels), source="released")
    two = build_model(f"{factories}:Constant", {"num_classes": 2, "label": 1})
    with pytest.raises(ValueError, match=r"\(N, K\) with K >= 3 logits"):
        evaluate_model(two, (images, labels))
    with pytest.raises(ValueError, match="labels should be int64"):
        evaluate_model(model, (images, labels.int()))
    with pytest.raises(ValueError, match="or \\(images, labels\\), but got list"):
        evaluate_model(model, [images, labels])


def test_evaluate_model_on_released_files_with_and_without_the_clean_set(factories, tmp_path):
    from test_corrupted_sets import write_cifar_c

    _, _, labels = write_cifar_c(
        tmp_path / "c", "cifar10-c", corruptions=("gaussian_noise", "fog"), marked=True
    )
    share = 100.0 * float((torch.from_numpy(labels[:4]).long() == 3).float().mean())
    model = build_model(f"{factories}:Constant", {"label": 3})
    result = evaluate_model(model, "cifar10-c", data_dir=tmp_path / "c", corruptions="fog")
    # No clean CIFAR-10 test set beside the files: the clean row is left out.
    assert [(r["corruption"], r["severity"]) for r in result.rows] == [
        ("fog", s) for s in range(1, 6)
    ]
    assert all(r["top1"] == pytest.approx(share) and r["images"] == 4 for r in result.rows)
    assert result.clean_error is None and result.source == "released"
    with pytest.raises(FileNotFoundError, match="lacks snow 1, snow 2, snow 3, snow 4 and 1 more"):
        evaluate_model(model, "cifar10-c", data_dir=tmp_path / "c", corruptions="snow")
    with pytest.raises(
        FileNotFoundError, match="no released cifar100 corrupted files .*download_cifar100_c"
    ):
        evaluate_model(model, "cifar100-c", data_dir=tmp_path / "c")
    write_cifar10(tmp_path / "c", n_test=4, seed=1)
    with_clean = evaluate_model(model, "cifar10-c", data_dir=tmp_path / "c", corruptions="fog")
    assert with_clean.rows[0]["corruption"] == "clean" and len(with_clean.rows) == 6


def test_every_corruption_is_checked_before_any_image_is_scored(factories):
    images = torch.randint(0, 256, (6, 2, 16, 16), dtype=torch.uint8)  # 2 channels: no HSV
    labels = torch.tensor([0, 1, 2] * 2)
    model = build_model(f"{factories}:Constant", {"num_classes": 3, "label": 1})
    with pytest.raises(ValueError, match="saturate needs"):
        evaluate_model(model, (images, labels), corruptions="gaussian_noise,saturate")
    assert len(model.seen) == 1  # the output check only: nothing was scored
