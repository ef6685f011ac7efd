"""One run on several processes: ``torchrun -m dropcluster train`` with DistributedDataParallel.

Two CPU processes (gloo) train LeNet-5 (no batch norm) on the synthetic set; the runs are
compared with one process on the same global batch, with themselves after a kill and a resume,
and their DropCluster clusters across the processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from waiting import wait_until

from dropcluster.data import DeviceLoader
from dropcluster.train.loop import read_log

TIMING_KEYS = {"seconds", "images_per_s", "refit_seconds", "eval_seconds"}
ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--model",
    "lenet5",
    "--train-fraction",
    "0.25",
    "--batch-size",
    "64",
    "--no-channels-last",
    "--lr",
    "0.05",
    "--seed",
    "3",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(*args: str, processes: int = 2, **kwargs) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "dropcluster",
        *args,
    ]
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, output
    return output


def _history(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_log(run_dir / "log.jsonl")
    ]


def test_two_processes_train_as_one_process_on_the_whole_batch(tmp_path):
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "dropcluster",
            *ARGS,
            "--regularizer",
            "none",
            "--epochs",
            "3",
            "--out",
            str(tmp_path / "one"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr
    output = _finish(
        _torchrun(*ARGS, "--regularizer", "none", "--epochs", "3", "--out", str(tmp_path / "two"))
    )
    assert "on 2 processes (DistributedDataParallel)" in output
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [r["epoch"] for r in two] == [0, 1, 2]
    for first, second in zip(one, two, strict=True):
        for key in ("loss", "train_top1", "top1", "top5", "lr"):
            assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["epochs"] == 3
    # Rank 0 alone wrote the folder.
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt",
        "config.json",
        "log.jsonl",
        "result.json",
    ]


def test_killed_ddp_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    # Enough short epochs that the kill below lands mid-run.
    dropcluster = [
        *ARGS,
        "--regularizer",
        "dropcluster",
        "--p",
        "0.2",
        "--cluster-every",
        "2",
        "--cluster-images",
        "64",
        "--epochs",
        "20",
    ]
    straight = tmp_path / "straight"
    _finish(_torchrun(*dropcluster, "--out", str(straight)))
    history = _history(straight)
    # DropCluster refits under DDP: rank 0 fitted, every process holds the same clusters.
    refits = [epoch for epoch in range(20) if epoch >= 2 and epoch % 2 == 0]
    assert [r["epoch"] for r in history if r.get("clusters_agree")] == refits
    assert all(r["structured"][0] > 0 for r in history if "structured" in r)

    killed = tmp_path / "killed"
    process = _torchrun(*dropcluster, "--out", str(killed))
    wait_until(
        lambda: (killed / "log.jsonl").is_file() and len(read_log(killed / "log.jsonl")) >= 2,
        "the run did not log two epochs",
        process=process,
    )
    # kill -9 of torchrun and of both training processes (torchrun starts them in sessions of
    # their own: they are found by the run folder on their command line).
    subprocess.run(["pkill", "-KILL", "-f", str(killed)], check=False)
    process.communicate(timeout=60)
    assert not (killed / "result.json").exists()
    # Another number of processes cannot continue it exactly: refused with the fix.
    wrong = subprocess.run(
        [sys.executable, "-m", "dropcluster", *dropcluster, "--out", str(killed), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert wrong.returncode == 2
    assert "was trained by 2 process(es), this is 1" in wrong.stderr
    _finish(_torchrun(*dropcluster, "--out", str(killed), "--resume"))
    assert _history(killed) == history


def test_loader_shares_make_up_the_single_process_batches():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)

    def batches(rank, world):
        generator = torch.Generator().manual_seed(5)
        loader = DeviceLoader(images, labels, 8, generator=generator, rank=rank, world=world)
        return [batch for _ in range(2) for batch in loader]

    whole = batches(0, 1)
    shares = [batches(rank, 4) for rank in range(4)]
    for index, (batch_images, batch_labels) in enumerate(whole):
        assert torch.equal(torch.cat([s[index][0] for s in shares]), batch_images)
        assert torch.equal(torch.cat([s[index][1] for s in shares]), batch_labels)
    with pytest.raises(ValueError, match="should be a multiple of the 3 processes"):
        DeviceLoader(images, labels, 8, rank=0, world=3)


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one, standing in for a larger one where only the set-up and
    the first steps are looked at."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path}/rendezvous",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=120),
    )
    yield
    dist.destroy_process_group()


def test_sync_batchnorm_is_refused_on_the_cpu_before_training(group_of_one):
    from dropcluster.train.config import TrainConfig
    from dropcluster.train.distributed import Ranks
    from dropcluster.train.setup import build_run

    config = TrainConfig(
        dataset="synthetic",
        model="resnet20",
        regularizer="none",
        p=0.0,
        batch_size=64,
        train_fraction=0.1,
        sync_batchnorm=True,
    )
    # A group of one standing in for two processes: only the set-up is looked at.
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA devices"):
        build_run(config, torch.device("cpu"), Ranks(rank=0, world=2))
    run = build_run(
        config.replace(sync_batchnorm=False), torch.device("cpu"), Ranks(rank=0, world=2)
    )
    assert isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    assert run.loader.world == 2


def test_a_small_share_per_process_without_sync_batchnorm_is_said_once(
    group_of_one, tmp_path, monkeypatch
):
    import warnings

    import dropcluster.train.loop as loop
    from dropcluster.train.config import TrainConfig
    from dropcluster.train.distributed import Ranks

    config = TrainConfig(
        dataset="synthetic", model="resnet20", regularizer="none", p=0.0, batch_size=32
    )
    message = (
        "each of the 2 processes computes batch norm statistics over its own 16 images "
        "(batch_size 32 / 2), fewer than 32: noisy statistics can cost accuracy; "
        "--sync-batchnorm (CUDA) computes them over the whole batch, or raise --batch-size"
    )
    assert config.batch_norm_warning(2) == message
    assert config.batch_norm_warning(1) is None  # one process normalises over the whole batch
    assert config.replace(batch_size=64).batch_norm_warning(2) is None  # 32 each
    assert config.replace(sync_batchnorm=True).batch_norm_warning(2) is None
    # A group of one standing in for two processes; the run stops before its first epoch.
    for rank, model, said in (
        (0, "resnet20", True),
        (1, "resnet20", False),
        (0, "lenet5", False),
    ):
        monkeypatch.setattr(loop, "from_environment", lambda device, r=rank: (device, Ranks(r, 2)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train(
                config.replace(model=model, train_fraction=0.1),
                tmp_path / f"{model}-{rank}",
                stop_after_epoch=0,
            )
        texts = [str(w.message) for w in caught if "batch norm" in str(w.message)]
        assert texts == ([message] if said else []), (rank, model)


def test_the_dry_run_shows_the_processes_and_the_batch_norm_choice(tmp_path, capsys):
    from dropcluster.cli import main

    out = str(tmp_path / "run")
    assert (
        main(["train", "--out", out, "--nproc-per-node", "4", "--batch-size", "64", "--dry-run"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:6] == [
        "device: cpu (auto: no CUDA device is visible)",
        "processes: 4 (DistributedDataParallel), 16 images each per step",
        "sync-batchnorm: off",
        "warning: each of the 4 processes computes batch norm statistics over its own 16 images "
        "(batch_size 64 / 4), fewer than 32: noisy statistics can cost accuracy; "
        "--sync-batchnorm (CUDA) computes them over the whole batch, or raise --batch-size",
        "tracker: none (the curves are in log.jsonl)",
    ]
    assert lines[0].endswith("(dry run: nothing is trained or written)")
    assert lines[6].startswith('config: {"amp": true,')
    argv = ["train", "--out", out, "--model", "lenet5", "--nproc-per-node", "2", "--dry-run"]
    assert main([*argv, "--sync-batchnorm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == [
        "processes: 2 (DistributedDataParallel), 64 images each per step",
        "sync-batchnorm: on: statistics over the whole batch (no effect: lenet5 has no batch norm)",
    ]
    assert (
        main(
            [
                "train",
                "--out",
                out,
                "--model",
                "resnet20",
                "--dry-run",
                "--sync-batchnorm",
                "--nproc-per-node",
                "2",
            ]
        )
        == 0
    )
    assert (
        "sync-batchnorm: on: statistics over the whole batch (needs CUDA devices: the run would "
        "be refused on the CPU)" in capsys.readouterr().out.splitlines()
    )
    assert main(["train", "--out", out, "--dry-run"]) == 0
    assert "processes: 1 (sync-batchnorm has no effect on one process)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# -- one line when a process of the group fails ------------------------------------------------


def _rank_pid(out: Path, rank: int) -> int:
    """The pid of the training process of ``rank`` whose command line names ``out``."""
    found = subprocess.run(["pgrep", "-f", "--", f"--out {out}"], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} for {out}")


def _launched(out: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """A long 2-process run under `--nproc-per-node`, once it has logged an epoch; its command.

    The environment leaves OMP_NUM_THREADS unset: torchrun would warn that it sets it."""
    args = [
        sys.executable,
        "-m",
        "dropcluster",
        *ARGS,
        "--regularizer",
        "none",
        "--epochs",
        "500",
        "--out",
        str(out),
        *extra,
    ]
    env = {key: value for key, value in ENV.items() if key != "OMP_NUM_THREADS"}
    process = subprocess.Popen(
        [*args, "--nproc-per-node", "2"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(
        lambda: (out / "log.jsonl").is_file() and read_log(out / "log.jsonl"),
        "the launched run did not log an epoch",
        process=process,
    )
    return process, args


def test_a_killed_process_ends_the_launched_run_with_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    process, args = _launched(out)
    os.kill(_rank_pid(out, 1), 9)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert [line for line in err.splitlines() if not line.startswith("epoch ")] == [
        "dropcluster: error: process 1 of 2 was killed by SIGKILL (kill -9, or the out-of-memory "
        "killer); continue the run from its last checkpoint with the same command plus --resume"
    ]
    # Resuming on another number of processes: refused by every process, said once.
    wrong = subprocess.run(
        [*args, "--resume", "--nproc-per-node=3"],
        env=ENV,
        text=True,
        capture_output=True,
        timeout=240,
    )
    assert wrong.returncode == 2
    assert len(wrong.stderr.splitlines()) == 1 and "was trained by 2 process(es), this is 3" in (
        wrong.stderr
    )


def test_rank_failures_are_told_apart_and_said_once(monkeypatch, tmp_path, capsys):
    from dropcluster.train.launch import LAUNCHED_VARIABLE, peer_lost, rank_failure

    gloo = RuntimeError(
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5338: "
        "Connection reset by peer. This is typically caused by ..."
    )
    assert peer_lost(gloo) and not peer_lost(RuntimeError("CUDA out of memory"))
    # An NCCL error of this process's own GPU is its own, not a dead peer's.
    assert not peer_lost(
        RuntimeError(
            "NCCL error in: ... unhandled cuda error, Last error: Cuda failure 'out of memory'"
        )
    )
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv(LAUNCHED_VARIABLE, raising=False)
    # Plain torchrun: rank 0 says it, the others only record it for torchrun's summary.
    assert rank_failure(gloo, 0, 2) == 2
    assert capsys.readouterr().err == (
        "dropcluster: error: process 1 of 2 stopped (Read error [127.0.0.1]:5338: Connection "
        "reset by peer); continue the run from its last checkpoint with the same command plus "
        "--resume\n"
    )
    assert json.loads(error_file.read_text())["dropcluster_peer_lost"] is True
    assert rank_failure(ValueError("bad value"), 1, 3) == 2
    assert capsys.readouterr().err == ""
    recorded = json.loads(error_file.read_text())
    assert recorded["message"]["message"] == "bad value" and not recorded["dropcluster_peer_lost"]
    # Under the launcher the launcher speaks; an internal error keeps its traceback (None).
    monkeypatch.setenv(LAUNCHED_VARIABLE, "1")
    assert rank_failure(ValueError("bad value"), 0, 2) == 2 and capsys.readouterr().err == ""
    assert rank_failure(KeyError("bug"), 1, 2) is None
    assert "process 1 of 2 stopped on an internal error" in capsys.readouterr().err


def test_the_launchers_line_prefers_an_outside_kill_then_an_own_error():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dropcluster.train.launch import SWEEP_ADVICE, failure_summary

    def failure(tmp: Path, rank: int, exitcode: int, message: str | None = None, lost=False):
        path = tmp / f"error{rank}.json"
        if message is not None:
            path.write_text(
                json.dumps(
                    {
                        "message": {
                            "message": message,
                            "extraInfo": {"py_callstack": message, "timestamp": "1"},
                        },
                        "dropcluster_peer_lost": lost,
                    }
                )
            )
        return ProcessFailure(
            local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path)
        )

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        lost = failure(tmp, 0, 2, "process 1 of 2 stopped (...)", lost=True)
        assert failure_summary({0: lost, 1: failure(tmp, 1, -9)}, 2)[1].startswith(
            "process 1 of 2 was killed by SIGKILL"
        )
        # SIGTERM is how the launcher stops the others: the own error is the line.
        own = failure(tmp, 2, 2, "the disk is full")
        assert failure_summary({0: lost, 1: failure(tmp, 1, -15), 2: own}, 3) == (
            2,
            "the disk is full",
        )
        assert failure_summary({0: failure(tmp, 0, 1, "process 0 of 2: internal error: x")}, 2) == (
            1,
            "process 0 of 2: internal error: x",
        )
        # A sweep's run is continued by running the sweep again, not by --resume.
        status, line = failure_summary({1: failure(tmp, 1, -9)}, 2, SWEEP_ADVICE)
        assert line.endswith("run the sweep again to continue the run from its last checkpoint")


def test_nproc_per_node_is_left_out_of_the_launched_command():
    from dropcluster.cli import _without_nproc

    for given in (["--nproc-per-node", "2"], ["--nproc-per-node=2"], ["--nproc", "2"]):
        assert _without_nproc(["train", *given, "--out", "x"]) == ["train", "--out", "x"]


def test_ctrl_c_and_sigterm_stop_a_launched_run_with_one_line(tmp_path):
    import signal

    process, _ = _launched(tmp_path / "interrupted")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert [line for line in err.splitlines() if not line.startswith("epoch ")] == [
        "",
        "dropcluster: interrupted; a training run continues from its last finished epoch with "
        "--resume",
    ]
    process, _ = _launched(tmp_path / "terminated", "--resume")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM  # ended by the signal, as it was meant
    assert [line for line in err.splitlines() if not line.startswith("epoch ")] == [
        "dropcluster: error: stopped by SIGTERM; continue the run from its last checkpoint with "
        "the same command plus --resume"
    ]
