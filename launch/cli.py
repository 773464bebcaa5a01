"""`omni-launch`: validate the composed config, then start the training processes.

Owns: composing the same Hydra config `omni-train` will see (so a bad override fails here with one line, before
any process starts) and turning the `launcher` group into a process launch. Today: `launcher=local`, N processes
on this machine through torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from omni_train.config import Config, ConfigError, register, validate


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


def command(cfg: Config, overrides: list[str]) -> list[str]:
    """The torchrun command line that starts `cfg.launcher.nproc_per_node` training processes here."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={cfg.launcher.nproc_per_node}", "-m", "omni_train.train", *overrides,
    ]


def launch(overrides: list[str]) -> int:
    from omni_train.engine import check_patterns
    from omni_train.loader import NEEDS_SPEECH, check_speech
    from omni_train.model import thinker_parameter_names

    cfg = compose(overrides)
    validate(cfg)
    check_patterns(thinker_parameter_names(cfg.model, talker=cfg.stage.objective != "thinker"),
                   list(cfg.stage.trainable))
    check_speech(cfg.data.sources, NEEDS_SPEECH[cfg.stage.objective])
    if cfg.launcher.name != "local":
        raise ConfigError(f"launcher={cfg.launcher.name} is not available yet: use launcher=local")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than have every rank warn that it guessed
    return subprocess.call(command(cfg, overrides), env=env)


def main() -> None:
    try:
        sys.exit(launch(sys.argv[1:]))
    except ConfigError as e:
        print(f"omni-launch: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
