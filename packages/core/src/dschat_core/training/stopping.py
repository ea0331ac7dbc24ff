"""Stopping on request: a platform (or a signal) asks a running stage to checkpoint and exit.

Two ways in, one protocol. A platform sets ``DSCHAT_STOP_FILE`` for every rank and creates that file when the time
comes (the Slurm adapter on SIGUSR1 before the time limit, the local backend on Ctrl-C or SIGTERM); and SIGTERM
or a first Ctrl-C that reaches a rank itself (a deleted or preempted T9K pod, torchrun run by hand) sets the same
request. The stages look at each step boundary (one all-reduce, so every rank agrees and a signal to one rank stops
them all), write a checkpoint, write ``<stop file>.saved`` and exit with code 75; run again and ``resume: auto``
continues from there. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from .checkpoints import write_atomic
from .distributed import any_rank, barrier, info, rank

#: A platform asks a running stage to checkpoint and exit by creating the file this names.
STOP_FILE_ENV = "DSCHAT_STOP_FILE"
#: Written beside the stop file once the checkpoint is saved (launchers such as torchrun lose exit code 75).
STOP_ACK_SUFFIX = ".saved"
#: Written beside the stop file when the training loop starts: before it, a stop has nothing to checkpoint, so a
#: platform may end the job at once instead of waiting for a step that is not coming (a run still loading).
TRAINING_SUFFIX = ".training"

_signalled: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    if signum == signal.SIGINT and _signalled:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    _signalled.append(signum)
    if rank() == 0:
        print(f"dschat: {signal.Signals(signum).name} received: checkpointing at the next step", flush=True)


def install_signal_handlers() -> None:
    """SIGTERM and the first SIGINT become a stop request (main thread only, where Python allows handlers)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)


def stop_requested(device) -> bool:
    """Whether the platform or a signal asked to stop; every rank gets the same answer."""
    path = os.environ.get(STOP_FILE_ENV)
    local = bool(_signalled) or bool(path and os.path.exists(path))
    return any_rank(local, device)


def acknowledge_stop(stage: str, step: int) -> None:
    """After the checkpoint: tell the platform the stop was clean."""
    info(f"[{stage}] stop requested: checkpoint saved at step {step}; run again to resume")
    path = os.environ.get(STOP_FILE_ENV)
    if path and rank() == 0:
        write_atomic(Path(f"{path}{STOP_ACK_SUFFIX}"), json.dumps({"stage": stage, "step": step}))
    barrier()  # no rank exits before the acknowledgement exists: the launcher stops the rest when one exits


def announce_training() -> None:
    """Tell the platform that steps begin: from now on a stop request is answered with a checkpoint."""
    path = os.environ.get(STOP_FILE_ENV)
    if path and rank() == 0:
        write_atomic(Path(f"{path}{TRAINING_SUFFIX}"), "")
