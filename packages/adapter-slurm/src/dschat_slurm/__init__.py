"""dschat's Slurm backend."""
