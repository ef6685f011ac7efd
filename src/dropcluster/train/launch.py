"""Several processes for one run, and one line when one of them fails.

:func:`launch` is what ``torchrun --standalone --nproc-per-node N -m MODULE ...`` does (the
same elastic launcher of torch, run in this process), with two differences: the launcher's own
log lines are silenced, and a failed process ends the command with **one line** that says what
happened (the process that failed and why, or the error it reported) and how to continue,
instead of torchrun's failure summary and traceback. ``dropcluster train --nproc-per-node N``
and multi-GPU sweep workers use it; plain ``torchrun`` keeps working.

:func:`rank_failure` is the other half, run by each process of the group when it fails: under
any launcher it records its one-line message in the file torch's launcher reads
(``TORCHELASTIC_ERROR_FILE``, shown by torchrun's summary too). A lost peer (a collective that
fails because another process died) is told apart from the process's own error; only rank 0
prints under plain torchrun, so the message appears once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from dropcluster.errors import user_error_message

__all__ = [
    "ADVICE_VARIABLE",
    "ERROR_FILE_VARIABLE",
    "LAUNCHED_VARIABLE",
    "RESUME_ADVICE",
    "SWEEP_ADVICE",
    "failure_summary",
    "launch",
    "main",
    "peer_lost",
    "rank_failure",
]


#: Set for the processes :func:`launch` starts: they leave the reporting to it.
LAUNCHED_VARIABLE = "DROPCLUSTER_LAUNCHED"
#: How the processes :func:`launch` starts say to continue a stopped run (set by it).
ADVICE_VARIABLE = "DROPCLUSTER_RESUME_ADVICE"
#: The file torch's elastic launcher gives each process for its failure (set by torchrun too).
ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"
#: Texts of the errors a collective raises when the connection to another process of the group
#: is gone (its process died): gloo's transport and NCCL's remote errors. Other collective
#: errors (a timeout, an NCCL error of this process's GPU) are this process's own.
_PEER_LOST_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "ncclRemoteError",
    "remote process exited",
)
#: How to continue a run stopped by a failed process, for `dropcluster train`.
RESUME_ADVICE = "continue the run from its last checkpoint with the same command plus --resume"
#: The same for a sweep's run (the sweep resumes it when it runs again).
SWEEP_ADVICE = "run the sweep again to continue the run from its last checkpoint"


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the group is gone."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_LOST_MARKERS)


def _peer_detail(error: BaseException) -> str:
    """The clause of a collective's error that names the lost connection (gloo prefixes its
    messages with a source path and adds a paragraph of advice)."""
    text = " ".join(str(error).split())
    for marker in _PEER_LOST_MARKERS:
        at = text.find(marker)
        if at >= 0:
            start = text.rfind("] ", 0, at)
            return text[start + 2 if start >= 0 else 0 : at + len(marker)]
    return text[:160]


def rank_failure(error: BaseException, rank: int, world: int) -> int | None:
    """Report the failure of one process of a ``world``-process run (see the module docstring).

    Returns:
        2 when the failure is reported (a user error, or a lost peer): the process should end
        with that status and print nothing more; None for an internal error, which the caller
        reports as usual (its traceback), once this function has said how to continue.
    """
    launched = os.environ.get(LAUNCHED_VARIABLE) == "1"
    advice = os.environ.get(ADVICE_VARIABLE, RESUME_ADVICE)
    lost = peer_lost(error)
    if lost:
        other = f"process {1 - rank}" if world == 2 else "another process"
        message = f"{other} of {world} stopped ({_peer_detail(error)}); {advice}"
    else:
        message = user_error_message(error)
    if message is None:
        _record(
            f"process {rank} of {world}: internal error: {type(error).__name__}: {error}",
            lost=False,
        )
        print(
            f"dropcluster: process {rank} of {world} stopped on an internal error; {advice}",
            file=sys.stderr,
        )
        return None
    _record(message, lost=lost)
    if rank == 0 and not launched:
        print(f"dropcluster: error: {message}", file=sys.stderr, flush=True)
    return 2


def _record(message: str, *, lost: bool) -> None:
    """Write the message where the launcher reads a process's failure (when there is one)."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if not path:
        return
    # torch's own layout (ErrorHandler.record_exception), so torchrun shows the line as the
    # process's "traceback" in its summary.
    now = str(int(time.time()))
    document = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": now}},
        "dropcluster_peer_lost": lost,
    }
    try:
        with open(path, "w") as handle:
            json.dump(document, handle)
    except OSError:
        pass  # the launcher then reports the exit status alone


def launch(nproc: int, module: str, args: list[str], advice: str = RESUME_ADVICE) -> int:
    """Run ``python -m module *args`` in ``nproc`` processes on this machine (torchrun's
    ``--standalone`` launcher, in this process); returns the command's exit status.

    Exit status: 0 when every process succeeded; 2 when a process reported an error or was
    killed (one line on stderr says which and why, and ``advice`` how to continue); 1 for an
    internal error of a process (its traceback came first). A SIGINT (Ctrl-C) stops the
    processes and raises KeyboardInterrupt; another signal stops them, says so in one line and
    ends this process by that signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The launcher logs every step at INFO or WARNING; the one line below replaces them.
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        quiet = logging.getLogger(name)
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    os.environ[LAUNCHED_VARIABLE] = "1"
    os.environ[ADVICE_VARIABLE] = advice
    # torchrun sets one thread per process (and warns) when nothing is set; say nothing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *args]))
    except ChildFailedError as error:
        status, message = failure_summary(error.failures, nproc, advice)
        if message:
            print(f"dropcluster: error: {message}", file=sys.stderr, flush=True)
        return status
    except SignalException as stop:
        if stop.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        name = signal.Signals(stop.sigval).name
        print(f"dropcluster: error: stopped by {name}; {advice}", file=sys.stderr, flush=True)
        signal.signal(stop.sigval, signal.SIG_DFL)
        os.kill(os.getpid(), stop.sigval)  # end as the signal meant, for whoever waits
        return 128 + stop.sigval
    finally:
        os.environ.pop(LAUNCHED_VARIABLE, None)
        os.environ.pop(ADVICE_VARIABLE, None)
    return 0


def failure_summary(failures: dict, world: int, advice: str = RESUME_ADVICE) -> tuple[int, str]:
    """The exit status and the one line for the failed processes of a launch.

    Args:
        failures: ``{rank: ProcessFailure}`` as torch's launcher gives them.
        world: processes in the run.
        advice: how to continue the run, added to the line of a killed process.

    The line names, in this order of preference: a process killed by a signal the launcher did
    not send (SIGTERM is how it stops the others), a process's own error, a lost peer, else the
    first exit status.
    """
    ranked = sorted(failures.items())
    for rank, failure in ranked:
        if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM:
            name = failure.signal_name()
            why = " (kill -9, or the out-of-memory killer)" if name == "SIGKILL" else ""
            return 2, f"process {rank} of {world} was killed by {name}{why}; {advice}"
    reported = [
        (rank, f)
        for rank, f in ranked
        if isinstance(f.error_file_data, dict) and "dropcluster_peer_lost" in f.error_file_data
    ]
    own = [(rank, f) for rank, f in reported if not f.error_file_data["dropcluster_peer_lost"]]
    if own or reported:
        # An internal error (status 1) printed its traceback; the line says which process.
        _, failure = (own or reported)[0]
        message = failure.message
        text = message.get("message", "") if isinstance(message, dict) else str(message)
        return (1 if failure.exitcode == 1 else 2), text
    rank, failure = ranked[0]
    if failure.exitcode < 0:
        return 2, f"process {rank} of {world} was stopped by {failure.signal_name()}"
    return (1 if failure.exitcode == 1 else 2), (
        f"process {rank} of {world} exited with status {failure.exitcode}; {advice}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m dropcluster.train.launch N MODULE [ARGS...]``: :func:`launch` as a command
    (what sweep workers of several GPUs run)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: python -m dropcluster.train.launch NPROC MODULE [ARGS...]", file=sys.stderr)
        return 2
    advice = SWEEP_ADVICE if args[1] == "dropcluster.experiments.worker" else RESUME_ADVICE
    try:
        return launch(int(args[0]), args[1], args[2:], advice)
    except KeyboardInterrupt:
        print("dropcluster: interrupted", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # the sweep sees a worker stopped by SIGINT
        return 130


if __name__ == "__main__":
    sys.exit(main())
