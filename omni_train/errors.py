"""The error types a user sees without a trace.

Base layer: imported by data_prep, launch and every layer of omni_train; imports nothing.
"""


class ConfigError(ValueError):
    """A problem with the user's configuration, input data or environment: reported as one line, no trace."""


DIVERGED = 4  # the exit code of a diverged run (2: a user error, 3: a lost peer)
# Set by omni-launch for the processes it starts: a diverged run's ranks then end with exit code 0, so that torchrun
# neither restarts them nor prints its failure report, and omni-launch (or the SLURM job) turns the run's
# summary.json ("ended": "diverged") into exit code 4.
LAUNCHED = "OMNI_LAUNCH"


class Diverged(RuntimeError):
    """Training produced non-finite figures it cannot step past (trainer.max_nonfinite_steps in a row) or
    non-finite weights: the run stops with one line and exit code 4, and is not resumed automatically."""
