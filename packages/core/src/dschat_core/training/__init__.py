"""Training machinery shared by every stage: DeepSpeed engines, the loop core, checkpoints and outputs."""
