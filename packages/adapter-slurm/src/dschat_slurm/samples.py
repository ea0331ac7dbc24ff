"""``dschat-core slurm samples``: the sbatch scripts of the seed's three topologies, rendered for reference.

Each topology is the seed's OPT-1.3B actor / OPT-350m reward model on Dahoas/rm-static, on a shared filesystem
at ``/shared/dschat``: one GPU, one node of 8 GPUs, two nodes of 8 GPUs. ``samples/slurm/`` holds the result and a
test checks that it is current.
"""

from __future__ import annotations

from pathlib import Path

from dschat_core.config import PIPELINES, load_config
from dschat_core.launch import depends_on, plan

from .backend import SlurmBackend

TOPOLOGIES = {
    "single-gpu": {
        "topology.nodes": "1",
        "topology.gpus_per_node": "1",
        "sft.zero_stage": "0",
        "reward.zero_stage": "0",
        "ppo.actor_zero_stage": "0",
        "ppo.critic_zero_stage": "0",
    },
    "single-node": {
        "topology.nodes": "1",
        "topology.gpus_per_node": "8",
        "sft.zero_stage": "2",
        "reward.zero_stage": "2",
        "ppo.actor_zero_stage": "2",
        "ppo.critic_zero_stage": "2",
    },
    "multi-node": {
        "topology.nodes": "2",
        "topology.gpus_per_node": "8",
        "sft.zero_stage": "3",
        "reward.zero_stage": "3",
        "ppo.actor_zero_stage": "3",
        "ppo.critic_zero_stage": "3",
    },
}
COMMON = {
    "run_name": "opt-1-3b",
    "storage.root": "/shared/dschat",
    "topology.accelerator": "cuda",
    "sft.model_name_or_path": "facebook/opt-1.3b",
    "reward.model_name_or_path": "facebook/opt-350m",
    "data.data_path": "[Dahoas/rm-static]",
    "backends.slurm.partition": "gpu",
    "backends.slurm.time": "1-00:00:00",
    "backends.slurm.venv": "/shared/dschat/venv",
    "backends.slurm.cpus_per_task": "64",
    "backends.slurm.mem": "'0'",
    "backends.slurm.extra_directives": "{--exclusive: ''}",
}


def write_samples(out_dir: str | Path) -> list[Path]:
    backend = SlurmBackend()
    written = []
    for topology, settings in TOPOLOGIES.items():
        config = load_config(None, [f"{k}={v}" for k, v in {**COMMON, **settings}.items()])
        # The seed's three stages, and DPO after stage 1 (`--set pipeline=dpo`).
        for stage, pipeline in [(s, "rlhf") for s in PIPELINES["rlhf"]] + [("dpo", "dpo")]:
            config = config.model_copy(update={"pipeline": pipeline})
            after = [f"<{dep} job>" for dep in depends_on(config, stage)]
            path = Path(out_dir) / topology / f"{stage}.sbatch"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(backend.render(plan(config, backend, stage, chained=True), after))
            written.append(path)
    return written
