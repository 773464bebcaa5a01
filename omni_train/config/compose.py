"""The composed configuration of a run, as every entry point sees it.

Owns `compose(overrides)`: Hydra's composition of `conf/` (shipped as `omni_train.conf`) under the schema, with
Hydra's and OmegaConf's errors turned into one `ConfigError` line. `omni-train` itself composes through
`hydra.main` (for Hydra's own flags); the launcher, `omni-train plan`, the demo, benchmarks and tests call this.
"""

from __future__ import annotations

from omni_train.config.schema import Config, register
from omni_train.errors import ConfigError


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_module("omni_train.conf", version_base=None):
            cfg = OmegaConf.to_object(hydra_compose("config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's own message, with its cause (which names the offending key), on one line.
        reason = " ".join(str(e).split())
        cause = e.__cause__
        if cause is not None and str(cause).split("\n")[0] not in reason:
            reason += f" ({str(cause).splitlines()[0]})"
        raise ConfigError(reason) from None
    return cfg
