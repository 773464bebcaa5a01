"""Launchers: start the training entry on one machine or many (local, torchrun, DeepSpeed, SLURM)."""
