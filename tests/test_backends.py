"""Sweeps on Ray and on Slurm (through submitit's local executor), the worker command line and
the backend settings: every run lands once in the database, a killed sweep completes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from test_sweep import tiny_preset
from waiting import STOP_SECONDS, wait_until

from dropcluster.cli import main
from dropcluster.experiments import sweep
from dropcluster.experiments.backends import (
    BackendSettings,
    RunTask,
    start_worker,
    stop_process,
    task_environment,
    worker_command,
)
from dropcluster.experiments.presets import expand_grid
from dropcluster.experiments.run_folder import finished_results
from dropcluster.experiments.store import ResultsStore
from dropcluster.experiments.sweep import run_sweep

#: The local stand-in for Slurm: submitit runs the jobs on this machine.
SLURM_HERE = BackendSettings("slurm", cluster="local", time_minutes=10)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (starting one takes seconds); its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _assert_recorded_once(out: Path, runs: int, epochs: int) -> None:
    """Every run finished, with exactly one row per epoch and its final metrics."""
    with ResultsStore.in_folder(out, readonly=True) as store:
        records = store.runs()
        rows = store.epochs()
    assert len(records) == runs and {r.status for r in records} == {"finished"}
    assert len(rows) == runs * epochs
    assert len({(row["run_id"], row["epoch"]) for row in rows}) == len(rows)
    for record in records:
        result = json.loads((out / "runs" / record.run_id / "result.json").read_text())
        assert record.top1 == pytest.approx(result["top1"]) and record.epochs_done == epochs


def _sweep_process(preset: dict, out: Path, backend: dict) -> subprocess.Popen:
    """A sweep in its own process (and session, so it can be killed as a crash would)."""
    code = (
        "import json, sys; from dropcluster.experiments.sweep import run_sweep; "
        "from dropcluster.experiments.backends import BackendSettings; "
        "preset, out, backend = json.loads(sys.argv[1]); "
        "run_sweep(preset, out, backend=BackendSettings(**backend), poll_seconds=0.1)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps([preset, str(out), backend])],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill_when_a_checkpoint_appears(process: subprocess.Popen, out: Path) -> Path:
    """Kill the sweep (as a crash would) once a run has finished an epoch; that run's folder."""
    checkpoints = wait_until(
        lambda: list(out.glob("runs/*/checkpoint.pt")), "no run started", process=process
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return checkpoints[0].parent


def _killed_then_restarted(out: Path, backend: dict, restart: BackendSettings) -> None:
    preset = tiny_preset(epochs=3)
    interrupted = _kill_when_a_checkpoint_appears(_sweep_process(preset, out, backend), out)
    first_epoch = (interrupted / "log.jsonl").read_text().splitlines()[0]
    with ResultsStore.in_folder(out, readonly=True) as store:
        assert "running" in {r.status for r in store.runs()}  # what the crash left behind
    summary = run_sweep(preset, out, backend=restart, stream=io.StringIO(), poll_seconds=0.1)
    assert summary.finished == summary.total == 2 and not summary.failed
    _assert_recorded_once(out, runs=2, epochs=3)
    # The interrupted run continued from its checkpoint (a fresh start would log new timings).
    assert (interrupted / "log.jsonl").read_text().splitlines()[0] == first_epoch
    again = run_sweep(preset, out, backend=restart, stream=io.StringIO())
    assert again.ran == [] and again.collected == [] and again.finished == 2


def _start_a_long_task(backend, out: Path) -> RunTask:
    """Start a long run on ``backend``; return its task once it has finished an epoch."""
    spec = expand_grid(tiny_preset(epochs=500))[0]
    task = sweep._task(spec, out, None, BackendSettings())
    backend.submit(task)
    assert backend.poll() == []  # Slurm submits the runs handed over (an array) when polled
    wait_until((task.run_dir / "checkpoint.pt").is_file, "the run did not start")
    return task


def _stop_a_running_task(backend, out: Path) -> Path:
    """Start a long run on ``backend``, stop it after its first epoch; its folder."""
    task = _start_a_long_task(backend, out)
    backend.stop()
    return task.run_dir


def _assert_interrupted_not_killed(run_dir: Path) -> None:
    """The worker stopped on SIGINT, as on Ctrl-C (a killed one leaves no traceback)."""
    deadline = time.time() + STOP_SECONDS
    while not (run_dir / "worker.log").read_text().rstrip().endswith("KeyboardInterrupt"):
        assert time.time() < deadline, (
            "the worker was not interrupted: " + (run_dir / "worker.log").read_text()[-1500:]
        )
        time.sleep(0.1)
    assert not (run_dir / "result.json").exists() and (run_dir / "checkpoint.pt").is_file()


# -- the worker command and the settings -------------------------------------------------------


def test_worker_command_is_the_worker_module_or_the_launcher_with_one_process_per_gpu(tmp_path):
    assert worker_command(tmp_path, 1, python="py") == [
        "py",
        "-m",
        "dropcluster.experiments.worker",
        str(tmp_path),
    ]
    assert worker_command(tmp_path, 4, python="py") == [
        "py",
        "-m",
        "dropcluster.train.launch",
        "4",
        "dropcluster.experiments.worker",
        str(tmp_path),
    ]
    assert BackendSettings("ray", gpus_per_run=4).procs_per_run == 4
    assert BackendSettings("ray", gpus_per_run=1).procs_per_run == 1
    spec = expand_grid(tiny_preset())[0]
    # One process takes the task's GPU (or the CPU); under torchrun each rank picks its own.
    task = RunTask(spec, tmp_path, procs=1, cpus=4)
    assert task_environment(task, gpus=1) == {
        "DROPCLUSTER_DEVICE": "cuda",
        "DROPCLUSTER_THREADS": "4",
    }
    assert task_environment(task, gpus=0)["DROPCLUSTER_DEVICE"] == "cpu"
    assert task_environment(RunTask(spec, tmp_path, procs=2, cpus=4), gpus=2) == {
        "DROPCLUSTER_THREADS": "2"
    }


def test_a_worker_ends_when_the_task_that_started_it_is_gone():
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    code = (
        "import sys, time; from dropcluster.experiments.worker import watch_owner; "
        "watch_owner(int(sys.argv[1]), interval=0.1); time.sleep(60)"
    )
    orphan = subprocess.Popen(
        [sys.executable, "-c", code, str(owner.pid)], stderr=subprocess.PIPE, text=True
    )
    owner.wait()
    _, err = orphan.communicate(timeout=STOP_SECONDS)
    assert orphan.returncode == 3 and f"(pid {owner.pid}) is gone" in err


def test_local_run_on_several_gpus_launches_processes_on_its_slots_gpus(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(sweep, "start_worker", lambda *args: started.append(args))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = expand_grid(tiny_preset())[0]
    sweep._launch(spec, tmp_path, 2, 1, ["cuda:0", "cuda:2"], 3)
    command, run_dir, env = started[0]
    assert command[1:4] == ["-m", "dropcluster.train.launch", "2"]
    assert command[-1] == str(run_dir)
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3", "DROPCLUSTER_THREADS": "3"}
    # A CPU preset has no GPUs to give out: refused before anything runs.
    with pytest.raises(ValueError, match="--gpus-per-run 2 with 1 job\\(s\\) at a time needs 2"):
        run_sweep(tiny_preset(), tmp_path / "out", backend=BackendSettings(gpus_per_run=2))


def test_backend_flags_become_settings_and_bad_combinations_are_one_line(
    tmp_path, capsys, monkeypatch
):
    seen = {}

    def fake_run_sweep(preset, out, **kwargs):
        seen.update(kwargs)
        return sweep.SweepSummary(total=1, finished=1)

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    _fake_slurm(tmp_path, monkeypatch)  # the command checks Slurm's commands before the sweep
    assert (
        main(
            [
                "sweep",
                "--preset",
                "demo",
                "--out",
                str(tmp_path),
                "--backend",
                "slurm",
                "--partition",
                "gpu",
                "--time",
                "90",
                "--mem",
                "16",
                "--gpus-per-run",
                "2",
                "--cpus-per-run",
                "8",
            ]
        )
        == 0
    )
    wanted = BackendSettings(
        "slurm", gpus_per_run=2, cpus_per_run=8, partition="gpu", time_minutes=90, mem_gb=16
    )
    assert seen["backend"] == wanted and seen["jobs"] is None
    refused = [
        (["--no-wait"], "--no-wait needs --backend slurm"),
        (["--backend", "slurm", "--address", "auto"], "--address is for"),
    ]
    for flags, message in refused:
        assert main(["sweep", "--preset", "demo", "--out", str(tmp_path), *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(("backend", "extra"), [("ray", "ray"), ("slurm", "slurm")])
def test_a_missing_engine_names_the_extra_to_install(backend, extra, tmp_path, capsys, monkeypatch):
    engine = {"ray": "ray", "slurm": "submitit"}[backend]
    monkeypatch.setitem(sys.modules, engine, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, f"dropcluster.experiments.backends.{backend}", raising=False)
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(tiny_preset()))
    args = [
        "sweep",
        "--preset",
        str(preset),
        "--out",
        str(tmp_path / "out"),
        "--backend",
        backend,
        "--gpus-per-run",
        "0",
    ]
    assert main(args) == 2
    assert f"pip install -e '.[{extra}]'" in capsys.readouterr().err


def test_slurm_asks_for_gpus_explicitly_when_the_device_is_auto(tmp_path):
    # A Slurm job has GPUs only when it asks: "auto" would quietly train on CPUs.
    with pytest.raises(ValueError, match="pass --gpus-per-run 1"):
        run_sweep(tiny_preset(device="auto"), tmp_path, backend=SLURM_HERE, stream=io.StringIO())
    with ResultsStore.in_folder(tmp_path, readonly=True) as store:
        assert {r.status for r in store.runs()} == {"pending"}
    assert not (tmp_path / "slurm" / "jobs.json").exists()


# -- Ray ---------------------------------------------------------------------------------------


def test_ray_sweep_records_every_run_once(ray_address, tmp_path):
    out = tmp_path / "out"
    preset = tiny_preset(epochs=1)
    summary = run_sweep(
        preset, out, backend=BackendSettings("ray"), stream=io.StringIO(), poll_seconds=0.1
    )
    assert sorted(summary.ran) == sorted(s.run_id for s in expand_grid(preset))
    _assert_recorded_once(out, runs=2, epochs=1)
    log = (out / "runs" / summary.ran[0] / "worker.log").read_text()
    assert log.startswith("--- attempt started") and "epoch 1/1" in log


def test_ray_sweep_killed_mid_way_completes_without_duplicates(ray_address, tmp_path):
    out = tmp_path / "out"
    _killed_then_restarted(out, {"name": "ray", "address": ray_address}, BackendSettings("ray"))


def test_stopping_a_ray_sweep_interrupts_its_workers(ray_address, tmp_path):
    from dropcluster.experiments.backends.ray import RayBackend

    # Ray's workers block SIGINT, and a child inherits that: the task unblocks it for the worker.
    _assert_interrupted_not_killed(
        _stop_a_running_task(RayBackend(BackendSettings("ray")), tmp_path)
    )


# -- Slurm through submitit --------------------------------------------------------------------


def test_slurm_sweep_records_every_run_once_and_keeps_the_job_ids(tmp_path):
    out = tmp_path / "out"
    summary = run_sweep(
        tiny_preset(epochs=1), out, backend=SLURM_HERE, stream=io.StringIO(), poll_seconds=0.1
    )
    assert len(summary.ran) == 2 and not summary.failed
    _assert_recorded_once(out, runs=2, epochs=1)
    job_ids = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(job_ids) == sorted(summary.ran)


def test_slurm_sweep_killed_mid_way_completes_without_duplicates(tmp_path):
    out = tmp_path / "out"
    backend = {"name": "slurm", "cluster": "local", "time_minutes": 10}
    _killed_then_restarted(out, backend, SLURM_HERE)


def test_stopping_a_slurm_sweep_interrupts_its_workers(tmp_path):
    from dropcluster.experiments.backends.slurm import SlurmBackend

    backend = SlurmBackend(SLURM_HERE, tmp_path / "slurm")
    _assert_interrupted_not_killed(_stop_a_running_task(backend, tmp_path))


def test_a_worker_that_inherits_sigint_ignored_still_stops_as_on_ctrl_c(tmp_path):
    # A sweep started in the background (`nohup dropcluster sweep ... &`, a batch script) runs
    # with SIGINT ignored, and every process it starts inherits that: the worker handles it.
    spec = expand_grid(tiny_preset(epochs=500))[0]
    task = sweep._task(spec, tmp_path, None, BackendSettings())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = start_worker(worker_command(task.run_dir, 1), task.run_dir)
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_until((task.run_dir / "checkpoint.pt").is_file, "the run did not start", process=process)
    stop_process(process)
    assert process.returncode != -signal.SIGKILL  # it stopped on SIGINT, not killed after
    _assert_interrupted_not_killed(task.run_dir)


def test_slurm_no_wait_returns_at_once_and_collect_records_the_runs(tmp_path, capsys):
    out = tmp_path / "out"
    preset = tiny_preset(epochs=1)
    no_wait = BackendSettings("slurm", cluster="local", time_minutes=10, wait=False)
    summary = run_sweep(preset, out, backend=no_wait, stream=io.StringIO())
    assert len(summary.submitted) == 2 and summary.ran == []
    with ResultsStore.in_folder(out, readonly=True) as store:
        assert {r.status for r in store.runs()} == {"running"}
    wait_until(
        lambda: all(finished_results(out / "runs" / run_id) for run_id in summary.submitted),
        "the submitted jobs did not finish",
        interval=0.2,
    )
    assert main(["collect", str(out)]) == 0
    assert "2 run(s) recorded" in capsys.readouterr().err
    _assert_recorded_once(out, runs=2, epochs=1)
    # The same sweep command afterwards has nothing to train.
    again = run_sweep(preset, out, backend=SLURM_HERE, stream=io.StringIO())
    assert again.ran == [] and again.finished == 2


# -- why a run failed ----------------------------------------------------------------------------


def _killed_task(backend, out: Path, kill=None) -> tuple[RunTask, list]:
    """Start a long run on ``backend``, kill -9 its worker (or call ``kill(backend)``) after
    its first epoch; the task and what the backend then reports."""
    task = _start_a_long_task(backend, out)
    if kill is None:
        worker = subprocess.run(
            ["pgrep", "-f", f"dropcluster.experiments.worker {task.run_dir}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        os.kill(int(worker[0]), signal.SIGKILL)
    else:
        kill(backend)
    finished = wait_until(backend.poll, "the killed task was not reported", interval=0.1)
    return task, finished


def test_a_killed_worker_is_recorded_as_killed_not_by_its_last_progress_line(tmp_path):
    launch = lambda task, slot: sweep._launch(task.spec, tmp_path, 1, slot, [None], None)  # noqa: E731
    task, finished = _killed_task(sweep.LocalBackend(1, launch), tmp_path)
    assert finished[0].status == -signal.SIGKILL
    tail = (task.run_dir / "worker.log").read_text()
    assert tail.rstrip().splitlines()[-1].startswith("epoch")  # what 0.3 recorded as the reason
    reason = sweep.failure_reason(finished[0].status, finished[0].message, tail)
    assert reason == "the worker was killed by SIGKILL (kill -9, or the out-of-memory killer)"


def test_a_killed_slurm_job_is_recorded_by_its_state(tmp_path):
    from dropcluster.experiments.backends.slurm import SlurmBackend

    backend = SlurmBackend(SLURM_HERE, tmp_path / "slurm")

    def kill_the_job(backend) -> None:
        # As Slurm kills a job: all its processes. Here, submitit's local controller and the
        # task it started; the worker stops when its task is gone.
        controller = next(iter(backend._running.values()))[1]._process.pid
        subprocess.run(["pkill", "-KILL", "-P", str(controller)], check=False)
        os.kill(controller, signal.SIGKILL)

    task, finished = _killed_task(backend, tmp_path, kill=kill_the_job)
    # submitit's local jobs report INTERRUPTED; on a cluster the state comes from sacct.
    assert finished[0].status is None
    assert re.fullmatch(
        r"Slurm job \d+ ended in state INTERRUPTED: its process was killed", finished[0].message
    )
    assert sweep.failure_reason(None, finished[0].message, "submitit INFO ...") == (
        finished[0].message
    )
    wait_until(  # nothing of the job is left running
        lambda: subprocess.run(["pgrep", "-f", str(task.run_dir)], capture_output=True).returncode,
        "the job's worker outlived it",
        STOP_SECONDS,
        interval=0.2,
    )


@pytest.mark.parametrize(
    ("status", "message", "tail", "reason"),
    [
        (2, "", "epoch 1/2: ...\nthe disk is full", "the disk is full"),
        (
            2,
            "",
            "epoch 1/2\ndropcluster: error: process 1 of 2 was killed by SIGKILL",
            "process 1 of 2 was killed by SIGKILL",
        ),
        (-15, "", "epoch 1/2: ...", "the worker was killed by SIGTERM"),
        (3, "", "", "the task that started the worker ended, so the worker stopped"),
        (7, "", "epoch 1/2", "the worker exited with status 7"),
        (None, "Ray: WorkerCrashedError", "epoch 1/2", "Ray: WorkerCrashedError"),
    ],
)
def test_failure_reasons_say_what_happened(status, message, tail, reason):
    assert sweep.failure_reason(status, message, tail) == reason


def test_the_stored_error_starts_with_its_reason_and_results_show_it(tmp_path, capsys):
    from dropcluster.compat import error_reason

    out = tmp_path / "out"
    spec = expand_grid(tiny_preset())[0]
    with ResultsStore.in_folder(out) as store:
        store.add_run(
            spec.run_id,
            {},
            preset="tiny",
            regularizer=spec.regularizer,
            p=spec.p,
            seed=spec.seed,
            train_fraction=spec.train_fraction,
        )
        job = sweep._Active(spec, out / "runs" / spec.run_id, time.perf_counter())
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "worker.log").write_text("epoch 1/2: loss 2.3\n")
        task = RunTask(spec, job.run_dir)
        context = sweep._Context(
            out,
            store,
            None,
            BackendSettings(),
            sweep.SweepSummary(),
            io.StringIO(),
            0.1,
            time.perf_counter(),
        )
        sweep._record_exit(context, job, sweep.Finished(task, -9), {})
        error = store.run(spec.run_id).error
    assert error.splitlines()[0].startswith("the worker was killed by SIGKILL")
    assert error.splitlines()[-1] == "epoch 1/2: loss 2.3"  # the log as context
    assert error_reason(error) == error.splitlines()[0]
    # An error stored by 0.3 ("exit status N", the log, its last line the reason) still reads.
    assert error_reason("exit status 2\nepoch 1/2\nthe disk is full") == "the disk is full"
    assert main(["results", "--out", str(out)]) == 0
    assert "error: the worker was killed by SIGKILL" in capsys.readouterr().out


def test_slurm_without_its_commands_or_a_damaged_job_record_is_one_line(
    tmp_path, capsys, monkeypatch
):
    from dropcluster.experiments.backends.slurm import SlurmBackend

    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(tiny_preset()))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    assert (
        main(
            [
                "sweep",
                "--preset",
                str(preset),
                "--out",
                str(out),
                "--backend",
                "slurm",
                "--gpus-per-run",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "lacks sbatch and srun (not on PATH)" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written
    (tmp_path / "slurm").mkdir()
    for text, found in (
        ("[1, 2]", "holds list"),
        ("{", "is not valid JSON"),
        ('{"run": [1]}', "holds other values"),
    ):
        (tmp_path / "slurm" / "jobs.json").write_text(text)
        with pytest.raises(ValueError, match=f"jobs.json {found}|jobs.json .* {found}"):
            SlurmBackend(SLURM_HERE, tmp_path / "slurm")


def test_a_slurm_job_that_raises_is_recorded_with_its_exception(tmp_path):
    from dropcluster.experiments.backends.slurm import SlurmBackend

    # The run folder is not there where the job runs (a folder the node does not see).
    backend = SlurmBackend(SLURM_HERE, tmp_path / "slurm")
    spec = expand_grid(tiny_preset())[0]
    backend.submit(RunTask(spec, tmp_path / "not-on-this-node" / spec.run_id))
    finished = wait_until(backend.poll, "the job was not reported", interval=0.1)
    assert finished[0].status is None
    assert re.fullmatch(
        r"Slurm job \d+ raised FileNotFoundError: \[Errno 2\] No such file or "
        r"directory: '.*not-on-this-node.*worker.log' \(state \w+\)",
        finished[0].message,
    )


# -- cluster options: Slurm arrays, account, QoS, ...; Ray's runtime environment ---------------


def _fake_slurm(folder: Path, monkeypatch, states: dict[str, str] | None = None) -> Path:
    """sbatch, srun and sacct stand-ins on PATH: sbatch appends the script it is given to
    ``folder/sbatch.log`` and answers job 4242; sacct reports ``states`` ({job id: state}).
    The log's path."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = folder / "sbatch.log"
    scripts = {
        "sbatch": f'cat "$1" >> {log}\necho "Submitted batch job 4242"\n',
        "srun": "exit 1\n",
        "sacct": "echo 'JobID|State|NodeList'\n"
        + "".join(f"echo '{job}|{state}|node'\n" for job, state in (states or {}).items()),
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    import submitit

    submitit.SlurmJob.watcher.clear()  # states cached by another test
    return log


def test_an_option_sbatch_refuses_is_its_one_line_and_no_job_is_recorded(
    tmp_path, capsys, monkeypatch
):
    _fake_slurm(tmp_path, monkeypatch)
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
        "exit 1\n"
    )
    out = tmp_path / "out"
    args = ["sweep", "--preset", str(_four_run_preset(tmp_path)), "--out", str(out)]
    assert main([*args, *CLUSTER_FLAGS, "--no-wait"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "dropcluster: error: sbatch refused the job of 4 run(s): sbatch: error: Batch job "
        "submission failed: Invalid account"
    )
    assert not (out / "slurm" / "jobs.json").exists()


def _four_run_preset(tmp_path: Path) -> Path:
    preset = tiny_preset()
    preset["grids"][0]["seed"] = [0, 1]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(preset))
    return path


CLUSTER_FLAGS = [
    "--backend",
    "slurm",
    "--gpus-per-run",
    "0",
    "--account",
    "proj42",
    "--qos",
    "high",
    "--constraint",
    "a100",
    "--sbatch",
    "gres=gpu:a100:1",
    "--sbatch",
    "mail-type=END",
    "--job-setup",
    "module load cuda/12.1",
    "--job-setup",
    "source /nfs/venv/bin/activate",
]


def test_a_slurm_sweep_is_one_job_array_with_the_clusters_options(tmp_path, monkeypatch):
    log = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["sweep", "--preset", str(_four_run_preset(tmp_path)), "--out", str(out), "--no-wait"]
    assert main([*args, *CLUSTER_FLAGS, "--array-parallelism", "2"]) == 0
    script = log.read_text()
    assert script.count("#!/bin/bash") == 1  # one submission for the four runs
    lines = script.splitlines()
    for line in (
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --array=0-3%2",
        "#SBATCH --gres=gpu:a100:1",
        "#SBATCH --mail-type=END",
        "#SBATCH --job-name=dropcluster-out",
        "#SBATCH --time=240",
    ):
        assert line in lines
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    setup = lines.index("module load cuda/12.1")
    assert lines[setup + 1] == "source /nfs/venv/bin/activate" and setup < srun
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(jobs.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    # Again: the array tasks still queued are followed, the cancelled one alone is submitted.
    cancelled = jobs["dropout-p0.1-f0.25-s1"]
    states = {job: "PENDING" for job in jobs.values()} | {cancelled: "CANCELLED by 1000"}
    _fake_slurm(tmp_path, monkeypatch, states)
    assert main([*args, *CLUSTER_FLAGS]) == 0
    again = log.read_text().split("#!/bin/bash")[2].splitlines()
    assert not [line for line in again if line.startswith("#SBATCH --array")]  # one run
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == {
        **jobs,
        "dropout-p0.1-f0.25-s1": "4242",
    }


def test_no_array_submits_one_job_per_run_named_after_it(tmp_path, monkeypatch):
    log = _fake_slurm(tmp_path, monkeypatch)
    preset = _four_run_preset(tmp_path)
    args = ["sweep", "--preset", str(preset), "--out", str(tmp_path / "out"), "--no-wait"]
    assert main([*args, *CLUSTER_FLAGS, "--no-array"]) == 0
    scripts = log.read_text().split("#!/bin/bash")[1:]
    names = sorted(re.search(r"--job-name=(\S+)", script)[1] for script in scripts)
    assert names == sorted(
        f"dropcluster-{spec.run_id}" for spec in expand_grid(json.loads(preset.read_text()))
    )
    assert all("--array" not in script and "--qos=high" in script for script in scripts)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sbatch", "gres"], "argument --sbatch: expected NAME=VALUE"),
        (["--sbatch", "partition=gpu"], "--sbatch partition=...: use --partition instead"),
        (["--sbatch", "job_name=x"], "sets --job-name itself"),
        (["--sbatch", "mail type=END"], "with an sbatch option name"),
        (["--job-setup", " "], "--job-setup takes one shell line"),
        (["--account", ""], "--account should be a value on one line"),
        (["--array-parallelism", "2", "--no-array"], "leave out --no-array"),
        (["--backend", "ray", "--qos", "high"], "--qos is for --backend slurm, not ray"),
        (["--runtime-env", "{}"], "--runtime-env is for --backend ray, not slurm"),
    ],
)
def test_bad_cluster_options_are_one_line_before_anything_is_written(
    flags, message, tmp_path, capsys, monkeypatch
):
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["sweep", "--preset", str(_four_run_preset(tmp_path)), "--out", str(out)]
    assert _status(main, [*args, "--backend", "slurm", "--gpus-per-run", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dropcluster")  # the message's one line
    assert message in err.strip().splitlines()[-1]
    assert not out.exists()


def _status(main, args: list[str]) -> int:
    """The exit status of the command (argparse's usage errors exit instead of returning)."""
    try:
        return main(args)
    except SystemExit as error:
        return int(error.code)


def test_an_option_the_installed_submitit_lacks_is_one_line_naming_the_flag(
    tmp_path, capsys, monkeypatch
):
    import submitit.slurm.slurm as submitit_slurm

    # As an older submitit without a QoS parameter would answer.
    parameters = dict(submitit_slurm._get_default_parameters())
    del parameters["qos"]
    monkeypatch.setattr(submitit_slurm, "_get_default_parameters", lambda: parameters)
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["sweep", "--preset", str(_four_run_preset(tmp_path)), "--out", str(out)]
    assert main([*args, *CLUSTER_FLAGS]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: submitit \S+ refuses --qos: Unknown argument 'qos'", err)
    assert not out.exists()


def test_the_ray_runtime_env_goes_to_ray_init_or_with_each_task(tmp_path, monkeypatch):
    from dropcluster.experiments.backends.ray import RayBackend

    inits, options = [], []

    class Remote:
        def options(self, **kwargs):
            options.append(kwargs)
            return self

        def remote(self, *args):
            raise SystemExit  # nothing to run: the options are what is checked

    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(ray, "remote", lambda function: Remote())
    env = {"env_vars": {"HF_HOME": "/nfs/cache"}, "pip": ["einops"]}
    task = RunTask(expand_grid(tiny_preset())[0], tmp_path)
    for connected in (False, True):
        monkeypatch.setattr(ray, "is_initialized", lambda connected=connected: connected)
        backend = RayBackend(BackendSettings("ray", address="auto", runtime_env=env))
        with pytest.raises(SystemExit):
            backend.submit(task)
    # Ray started here: the job's environment. A connection already open: each task's.
    assert inits == [
        {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "ERROR",
            "address": "auto",
            "runtime_env": env,
        }
    ]
    assert "runtime_env" not in options[0] and options[1]["runtime_env"] == env


def test_runtime_env_is_json_or_a_file_and_bad_ones_are_one_line(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run_sweep(preset, out, **kwargs):
        seen.update(kwargs)
        return sweep.SweepSummary(total=1, finished=1)

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    (tmp_path / "env.yaml").write_text("working_dir: .\nenv_vars:\n  A: '1'\n")
    (tmp_path / "env.json").write_text('{"pip": ["einops"]}')
    (tmp_path / "list.json").write_text("[1]")
    args = ["sweep", "--out", str(tmp_path / "out"), "--backend", "ray", "--runtime-env"]
    for given, wanted in (
        ('{"env_vars": {"A": "1"}}', {"env_vars": {"A": "1"}}),
        (str(tmp_path / "env.yaml"), {"working_dir": ".", "env_vars": {"A": "1"}}),
        (str(tmp_path / "env.json"), {"pip": ["einops"]}),
    ):
        seen.clear()
        assert main([*args, given]) == 0
        assert seen["backend"].runtime_env == wanted
    for given, message in (
        ("{bad", "is not valid JSON"),
        (str(tmp_path / "list.json"), "list.json holds list"),
        ("nothing.json", "is neither (no such file)"),
        ('{"env_vars": {"A": 1}}', "Ray refuses it: runtime_env['env_vars'] must be of type"),
    ):
        assert _status(main, [*args, given]) == 2
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_a_ray_or_slurm_task_started_ignoring_sigint_handles_it_for_the_runs_length(
    tmp_path, monkeypatch
):
    # Ray's cancel raises KeyboardInterrupt through SIGINT's handler: with SIGINT ignored (an
    # engine started in the background) it would never reach run_worker, nor stop the worker.
    import dropcluster.experiments.backends as backends

    seen = []

    class Finished:
        def wait(self, timeout=None):
            seen.append(signal.getsignal(signal.SIGINT))
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(backends, "start_worker", lambda *args, **kwargs: Finished())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert backends.run_worker(str(tmp_path)) == 0
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # as it was, afterwards
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.default_int_handler]
