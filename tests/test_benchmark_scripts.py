"""The benchmark scripts' own arithmetic, on hand-made inputs (their timings are not tested)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_breakdown_splits_a_runs_wall_time_into_its_parts(tmp_path):
    breakdown = _script("demo_breakdown")
    records = [
        {"epoch": 0, "seconds": 10.0, "loss": 1.0},
        {"epoch": 1, "seconds": 11.0, "refit_seconds": 0.5, "eval_seconds": 3.0, "top1": 50.0},
        {"epoch": 2, "seconds": 12.0, "eval_seconds": 3.5, "top1": 60.0},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "corruptions.json").write_text(json.dumps({"rows": [], "seconds": 7.0}))
    parts = breakdown.run_breakdown(tmp_path, wall=50.0)
    assert parts["train"] == 33.0 and parts["eval"] == 6.5 and parts["tests"] == 2
    assert parts["refit"] == 0.5 and parts["corruptions"] == 7.0
    assert parts["rest"] == pytest.approx(50.0 - 33.0 - 6.5 - 0.5 - 7.0)
    unknown = breakdown.run_breakdown(tmp_path, wall=None)
    assert unknown["rest"] != unknown["rest"]  # NaN: the wall time was not recorded


def test_check_corruptions_figures_on_hand_made_arrays():
    check = _script("check_corruptions")
    clean = np.array([[10, 10], [10, 10]], dtype=np.uint8)
    corrupted = np.array([[12, 8], [10, 14]], dtype=np.uint8)  # d = +2, -2, 0, +4
    histogram = check.signed_histogram(corrupted, clean)
    assert histogram.shape == (511,) and histogram.sum() == pytest.approx(1.0)
    assert histogram[255 + 2] == 0.25 and histogram[255 - 2] == 0.25
    assert histogram[255] == 0.25 and histogram[255 + 4] == 0.25
    # Against "no change" (all mass at 0) three quarters of the mass has to move.
    assert check.total_variation(histogram, check.signed_histogram(clean, clean)) == 0.75
    assert check.total_variation(histogram, histogram) == 0.0
    mean_change, std_change = check.change_statistics(corrupted, clean)
    assert mean_change == 2.0  # (2 + 2 + 0 + 4) / 4
    assert std_change == pytest.approx(np.sqrt(((2 - 1) ** 2 + 9 + 1 + 9) / 4))  # mean d = 1
    ours = np.array([0, 1, 2, 3, 250, 255, 7, 7], dtype=np.uint8)
    ref = np.array([0, 0, 0, 3, 255, 250, 7, 7], dtype=np.uint8)  # |d| = 0 1 2 0 5 5 0 0
    figures = check.pixel_agreement(ours, ref)
    assert figures["mean"] == 13 / 8 and figures["max"] == 5
    assert figures["over1"] == 100 * 3 / 8  # 2, 5 and 5 are more than one level apart
    assert figures["p99"] == pytest.approx(5.0)


def test_check_corruptions_replayed_glass_draws_give_the_reference_loop():
    """The script's replay of the reference's draws, fed to ours, gives what the reference's
    sequential loop gives on the same draws (d = 2, so chains of copies occur)."""
    check = _script("check_corruptions")
    from dropcluster.data.corruptions import glass_shuffle

    height, width, max_shift, iterations, seed = 11, 9, 2, 2, 1234
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = image.copy()
    np.random.seed(seed)  # noqa: NPY002 (the reference's global generator)
    for _ in range(iterations):
        for h in range(height - max_shift, max_shift, -1):
            for w in range(width - max_shift, max_shift, -1):
                dx, dy = np.random.randint(-max_shift, max_shift, size=(2,))  # noqa: NPY002
                # The reference's "swap" of two views: (h, w) gets a copy of the source pixel.
                expected[h, w], expected[h + dy, w + dx] = expected[h + dy, w + dx], expected[h, w]
    draws = check.replay_glass_offsets((1.0, max_shift, iterations), height, width, seed)
    assert draws.shape == (iterations, height - 2 * max_shift, width - 2 * max_shift, 2)
    levels = torch.from_numpy(image).permute(2, 0, 1)[None]
    for iteration in range(iterations):
        levels = glass_shuffle(levels, max_shift, offsets=torch.from_numpy(draws[None, iteration]))
    assert np.array_equal(levels[0].permute(1, 2, 0).numpy(), expected)
    assert not np.array_equal(expected, image)


def test_check_corruptions_hands_the_reference_angles_to_our_motion_blur():
    check = _script("check_corruptions")
    from dropcluster.data.corruptions import SEVERITY_PARAMETERS, corrupt, motion_blur_at

    images = torch.rand(
        2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    angles = np.array([-30.0, 12.5])
    with check.ours_with_draws("motion_blur", angles):
        given = corrupt(images, "motion_blur", 2, family="imagenet")
    radius, sigma = SEVERITY_PARAMETERS["imagenet"]["motion_blur"][1]
    wanted = motion_blur_at(images, radius, sigma, torch.from_numpy(angles)).clamp(0, 1)
    torch.testing.assert_close(given, wanted)
    # A patch that ours never calls must not pass silently.
    with pytest.raises(RuntimeError, match="called 0 times"):
        with check.ours_with_draws("motion_blur", angles):
            pass


def test_check_corruptions_skips_what_is_not_implemented_and_says_why():
    check = _script("check_corruptions")
    calls = []

    def fake_corrupt(images, name, severity, *, family, generator):
        calls.append((name, severity, family, tuple(images.shape)))
        if name == "snow":
            raise KeyError(name)
        if name == "fog":
            raise NotImplementedError("fog is being written")
        if name == "frost":
            raise FileNotFoundError("frost needs the six frost images")
        return images

    available, skipped = check.available_corruptions(
        ["gaussian_noise", "snow", "frost", "fog", "pixelate"], fake_corrupt
    )
    assert available == ["gaussian_noise", "pixelate"]
    assert list(skipped) == ["snow", "frost", "fog"]
    assert skipped["snow"].startswith("not implemented yet (KeyError")
    assert skipped["fog"] == "not implemented yet (NotImplementedError: fog is being written)"
    assert skipped["frost"].startswith("fails (FileNotFoundError: frost needs")
    assert calls[0] == ("gaussian_noise", 1, "imagenet", (1, 3, 224, 224))


def test_check_corruptions_options_are_checked_before_the_reference_is_needed():
    check = _script("check_corruptions")
    from dropcluster.data.corruptions import CORRUPTIONS, PAPER

    assert check.parse_arguments([]).corruptions == CORRUPTIONS
    args = check.parse_arguments(["--corruptions", "paper,snow", "--speed-size", "224"])
    assert args.corruptions == (*PAPER, "snow") and args.speed_size == 224
    for bad in (
        ["--photos", "0"],
        ["--corruptions", "rain"],
        ["--speed-images", "10", "--speed-reference-images", "11"],
        ["--speed-size", "128"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            check.main(bad)
        assert exit_info.value.code == 2  # argparse's usage error, not the missing reference
    seeds = {
        s
        for name in ("snow", "fog")
        for severity in (1, 2)
        for run in (0, 1)
        for s in check.reference_seeds(0, name, severity, 50, run)
    }
    assert len(seeds) == 2 * 2 * 2 * 50 and max(seeds) < 2**32


def test_check_corruptions_records_a_failure_and_carries_on(capsys):
    check = _script("check_corruptions")
    failures = check.Failures()
    with failures.guard("speed", "snow"):
        raise ValueError("snow needs C = 1 or 3\nand more detail")
    with failures.guard("speed", "fog"):
        pass
    assert len(failures.items) == 1
    assert failures.items[0].startswith("speed: snow: ValueError: snow needs C = 1 or 3 (")
    assert "test_benchmark_scripts.py:" in failures.items[0]
    assert "snow" in capsys.readouterr().out.splitlines()[0]


def test_compare_releases_times_every_case_under_both_trees(capsys):
    # The baseline is this checkout itself: the script runs, each case gets both times.
    compare = _script("compare_releases")
    source = Path(__file__).resolve().parents[1] / "src"
    assert (
        compare.main(
            ["--baseline", str(source), "--rounds", "1", "--reps", "1", "--shape", "8", "4", "8"]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    cases = [row for row in rows if row and row[-1].replace(".", "").isdigit() and "ms" in row]
    assert len(cases) == 6
    assert all(float(row[-1]) > 0 for row in cases)
