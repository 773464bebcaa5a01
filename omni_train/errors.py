"""The one error type a user sees without a trace.

Base layer: imported by data_prep, launch and every layer of omni_train; imports nothing.
"""


class ConfigError(ValueError):
    """A problem with the user's configuration, input data or environment: reported as one line, no trace."""
