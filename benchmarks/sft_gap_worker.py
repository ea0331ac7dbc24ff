"""One rank of ``python -m benchmarks sft-gap``'s ``pad-to-max`` variants: dschat's stage 1 on its own chassis, with
DeepSpeed-Chat's batch construction instead of dschat's: every row padded to ``max_seq_len`` and, as DeepSpeed-Chat
set ``labels = input_ids`` before its labels were masked, the pad tokens kept in the loss. Started under torchrun
like any stage (``python -m torch.distributed.run ... -m benchmarks.sft_gap_worker --config FILE``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main() -> int:
    from dschat_core.worker import prepare_environment

    prepare_environment()
    from dschat_core.config import load_config
    from dschat_core.stages.sft import SFTStage
    from dschat_core.training.run import run_stage

    class PaddedToMaxLength(SFTStage):
        def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
            import torch

            length, pad = self.section.max_seq_len, self.tokenizer.pad_token_id
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, row in enumerate(rows):
                tokens = row["input_ids"][:length]
                ids[i, : len(tokens)] = torch.tensor(tokens)
                mask[i, : len(tokens)] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    return int(run_stage(PaddedToMaxLength(load_config(args.config))) or 0)


if __name__ == "__main__":
    sys.exit(main())
