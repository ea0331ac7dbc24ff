"""The one entry point that runs on every rank, on every platform.

    python -m dschat_core.worker STAGE [--config resolved.yaml | --config-data TOKEN]

It accepts torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the deepspeed
launcher's ``--local_rank`` argument. ``preflight`` needs no config file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import NoReturn

from .errors import TrainingStopped, UserError

#: stage name -> "module:function"; each function takes the resolved RunConfig (or None for preflight).
STAGE_ENTRY_POINTS = {
    "preflight": "dschat_core.preflight:run",
    "sft": "dschat_core.stages.sft:run",
    "reward": "dschat_core.stages.reward:run",
    "ppo": "dschat_core.stages.rl.stage:run",
    "dpo": "dschat_core.stages.dpo:run",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dschat_core.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=sorted(STAGE_ENTRY_POINTS))
    parser.add_argument("--config", help="resolved run config (YAML); required except for preflight")
    parser.add_argument("--config-data", help="the resolved config inline, as encoded by dschat-core (T9K jobs)")
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; torchrun uses LOCAL_RANK instead",
    )
    return parser.parse_args(argv)


#: DeepSpeed's CPU shared-memory communication op, as its builder names it: an all-reduce for DeepSpeed inference's
#: tensor parallelism (``inference_all_reduce``), which training never calls.
SHM_OP_NAME = "deepspeed_shm_comm"


def prepare_environment() -> None:
    """Before DeepSpeed and the Hugging Face libraries load: what a rank's log should and should not hold.

    - Library warnings at most once each (ZeRO-3 repeats the same FutureWarnings every step), no progress bars
      (a log is no terminal), and DeepSpeed told it runs on the CPU instead of warning that it guessed so.
    - DeepSpeed compiles its C++ ops the first time one is used (CPU Adam under offload: about a minute): kept per
      environment (virtualenv, torch and DeepSpeed versions), so two environments do not rebuild each other's.
    """
    import warnings

    warnings.simplefilter("once")
    # A filter alone does not hold: libraries change the filters after this (ZeRO-3's all_gather FutureWarning came
    # back on every step), so warnings are also deduplicated where they are shown.
    shown: set[tuple[type, str]] = set()
    show = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are kept: TORCH_EXTENSIONS_DIR if set, else a folder of the user's cache per
    environment (torch's JIT rebuilds an op whose compile command changed, and each virtualenv's paths are in it)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import hashlib
    from importlib.metadata import version

    key = hashlib.sha256(f"{sys.prefix} {version('torch')} {version('deepspeed')}".encode()).hexdigest()[:12]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dschat", "torch_extensions", key)


#: What ``deepspeed.autotuning`` imports if it can, only for autotuning.
AUTOTUNER_TRACKERS = ("mlflow",)


def import_deepspeed() -> None:
    """Load DeepSpeed without the experiment trackers its autotuner imports when they are installed (ranks never
    autotune, and mlflow alone took 1.2-1.5 s of every rank's start, about 40% of importing DeepSpeed; the mlflow
    sink imports it when a run tracks there), and on CPU ranks without its shared-memory communication op."""
    blocked = [name for name in AUTOTUNER_TRACKERS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        import deepspeed
    finally:
        for name in blocked:
            del sys.modules[name]
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # Without the shared-memory op DeepSpeed's communication takes torch.distributed's (gloo) path, as
        # training's collectives always do. Left compatible, every CPU start loads it: built on an environment's
        # first run (30-80 s) and mapping two 69 MB /dev/shm buffers per run, which a killed run leaves behind.
        deepspeed.ops.__compatible_ops__[SHM_OP_NAME] = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    prepare_environment()
    config = None
    try:
        import_deepspeed()
        if args.config_data:
            from .config import decode_config

            config = decode_config(args.config_data)
        elif args.stage != "preflight":
            if not args.config:
                raise UserError(f"stage {args.stage} needs --config FILE (the resolved run config)")
            from .config import load_config

            config = load_config(args.config)
        if args.stage != "preflight":
            from .training.stopping import install_signal_handlers

            install_signal_handlers()
        module_name, func_name = STAGE_ENTRY_POINTS[args.stage].split(":")
        entry = getattr(importlib.import_module(module_name), func_name)
        return int(entry(config) or 0)
    except (UserError, TrainingStopped) as exc:
        return report_error(exc.format_message(), exc.exit_code)
    except Exception as exc:  # a bug, or the platform failing under us: the traceback goes to the log too
        places = []
        if config is not None and args.stage != "preflight" and config.stage(args.stage).output_dir:
            places.append(os.path.dirname(str(config.stage(args.stage).output_dir)))
        full = out_of_space(exc, places)
        if full:
            return report_error(full, 1)
        import traceback

        traceback.print_exc()
        return report_error(f"{type(exc).__name__}: {exc} (the traceback is in the job's log)".replace("\n", " "), 1)


def out_of_space(exc: BaseException, places: list[str] | None = None) -> str:
    """One line for a write that failed because its disk is full (the error, or one it arose from); ``places``:
    where the stage writes, to name when the error names no file."""
    import errno

    from .backend import disk_full_at

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            candidates = ([os.path.dirname(str(seen.filename))] if seen.filename else []) + list(places or [])
            full = disk_full_at(*candidates) or f"no space left on the disk of {(candidates or ['?'])[0]}"
            what = seen.filename or "its outputs"
            return (
                f"could not write {what}: {full}; the last complete checkpoint is kept; fix: free space there, "
                "then run the same command again to resume"
            )
        seen = seen.__cause__ or seen.__context__
    return ""


def report_error(message: str, exit_code: int) -> int:
    """Print the one-line error (rank-tagged off rank 0) and leave it where the platform reads it
    (``DSCHAT_ERROR_FILE``): the backend shows that line instead of the launcher's traceback."""
    rank = int(os.environ.get("RANK", "0"))
    print(f"error: {message}" if rank == 0 else f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    from .errors import write_job_error

    write_job_error(message, exit_code, rank)
    return exit_code


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as Python would (threads that are not daemons waited for, atexit handlers run, output flushed) but
    without freeing every module and object one by one: after a stage has closed its outputs that teardown took
    1.2 s of each rank, on every launch."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
