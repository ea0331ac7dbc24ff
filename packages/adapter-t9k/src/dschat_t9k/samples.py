"""``dschat-core t9k samples``: the seed's three topologies as run configs and as the DeepSpeedJobs they render to.

The run configs ship in this package (``sample_configs/``) so the command works anywhere; ``samples/t9k/`` in the
repository holds its output and a test keeps it current.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dschat_core.config import PIPELINES, load_config
from dschat_core.launch import depends_on, plan

from .backend import T9kBackend
from .manifests import debug_job, download_job, to_yaml

#: The seed's three topologies, and its walkthrough's own shape (2 workers x 2 GPUs, OPT-1.3B, the PVC `gpt`).
TOPOLOGIES = ("single-gpu", "single-node", "multi-node", "seed-walkthrough")
#: The seed's file names per stage.
SEED_FILE_NAMES = {"sft": "actor", "reward": "reward", "ppo": "rlhf", "dpo": "dpo"}
DOWNLOAD = {
    "models": ["facebook/opt-1.3b", "facebook/opt-350m"],
    "datasets": ["Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise"],
}


def write_samples(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = T9kBackend()
    written = []
    for topology in TOPOLOGIES:
        text = resources.files(__package__).joinpath("sample_configs", f"{topology}.yaml").read_text()
        config_path = out / f"{topology}.yaml"
        config_path.write_text(text)
        written.append(config_path)
        config = load_config(config_path)
        # The seed's three stages, and DPO after stage 1 (`--set pipeline=dpo`).
        for stage, pipeline in [(s, "rlhf") for s in PIPELINES["rlhf"]] + [("dpo", "dpo")]:
            config = config.model_copy(update={"pipeline": pipeline})
            after = [f"{config.run_name}-{dep}" for dep in depends_on(config, stage)]
            path = out / topology / f"{SEED_FILE_NAMES[stage]}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(backend.render(plan(config, backend, stage, chained=True), after))
            written.append(path)
    config = load_config(out / "single-gpu.yaml")
    settings, layout = backend.settings(config), backend.storage(config)
    extra = {
        "download.yaml": download_job("dschat-download", DOWNLOAD["models"], DOWNLOAD["datasets"], settings, layout),
        "debug.yaml": debug_job("dschat-debug", 1, settings, layout),
    }
    for name, manifest in extra.items():
        (out / name).write_text(to_yaml(manifest))
        written.append(out / name)
    return written
