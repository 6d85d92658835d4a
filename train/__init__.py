"""Training: data pipeline, objectives, trainer, checkpoints, SLURM launch."""
