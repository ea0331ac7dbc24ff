"""The one entry point that runs on every rank, on every platform.

    python -m dschat_core.worker STAGE [--config resolved.yaml | --config-data TOKEN]

It accepts torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the deepspeed
launcher's ``--local_rank`` argument. ``preflight`` needs no config file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import TrainingStopped, UserError

#: stage name -> "module:function"; each function takes the resolved RunConfig (or None for preflight).
STAGE_ENTRY_POINTS = {
    "preflight": "dschat_core.preflight:run",
    "sft": "dschat_core.stages.sft:run",
    "reward": "dschat_core.stages.reward:run",
    "ppo": "dschat_core.stages.ppo:run",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = None
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
        print(f"error: {exc.format_message()}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
