"""Training machinery shared by every stage: the run chassis, DeepSpeed engines, checkpoints, metrics, final
saves and the stop protocol."""
