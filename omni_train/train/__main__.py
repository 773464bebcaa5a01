"""`python -m omni_train.train`: what torchrun, DeepSpeed's launcher and srun start on every rank (`omni-train`)."""

from omni_train.cli import main

main()
