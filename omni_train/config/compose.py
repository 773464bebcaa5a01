"""The composed configuration of a run, as every entry point sees it.

Owns `compose(overrides)`: Hydra's composition of `conf/` (shipped as `omni_train.conf`) under the schema, with
Hydra's and OmegaConf's errors turned into one `ConfigError` line. `omni-train` itself composes through
`hydra.main` (for Hydra's own flags); the launcher, `omni-train plan`, the demo, benchmarks and tests call this.
Both then apply `restore_saved`: a resumed run is the run it was (its saved `RUN_DIR/config.yaml`), with only what
the command line sets on top, and never with a change that would break its exact continuation.
"""

from __future__ import annotations

from pathlib import Path

from omni_train.config.schema import Config, register
from omni_train.errors import ConfigError

REDACTED = "<redacted>"  # what a saved config holds in place of a credential (omni_train/train/metrics.py)
# What a resumed run keeps whatever the command line says: the data order, the rows and the model depend on them.
# (The number of processes and data.workers may change: the checkpoint and the data position are re-dealt.)
FIXED_ON_RESUME = ("stage.objective", "stage.trainable", "stage.lora", "deepspeed.enabled", "model.preset", "model.path", "model.compose",
                   "model.hf_config", "trainer.precision", "talker.reference", "data.sources", "data.max_len",
                   "data.chunk_samples", "data.pad_to_multiple_of", "data.resample", "trainer.seed",
                   "trainer.micro_batch_size")
# Keys that always come from the command line, never from the saved config.
CURRENT = ("resume", "run_dir")
# Keys that were renamed: old key -> (new key, old value -> new value).
RENAMED = {"model.dtype": ("trainer.precision", {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"})}


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    for key in set_keys(overrides):
        if key in RENAMED:
            new, values = RENAMED[key]
            raise ConfigError(f"{key} is now {new} ({' | '.join(sorted(set(values.values())))} | auto): set that "
                              "instead")
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
    return restore_saved(cfg, overrides)


def set_keys(overrides: list[str]) -> list[str]:
    """The config keys (or config groups) a Hydra override list sets: `a.b=1`, `+a.b=1`, `~a.b`, `model=small`."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("hydra") and key not in keys:
            keys.append(key)
    return keys


def restore_saved(cfg: Config, overrides: list[str]) -> Config:
    """With `resume` set and a `config.yaml` in `run_dir`: that saved configuration, with the keys the command line
    sets (`overrides`) taken from `cfg` (the fresh composition) and credentials (redacted in the saved file) from
    `cfg` too. An override of a FIXED_ON_RESUME key to another value is refused with the way out. Else `cfg`."""
    saved_file = Path(cfg.run_dir) / "config.yaml"
    if cfg.resume == "none" or not saved_file.is_file():
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    fresh = OmegaConf.structured(cfg)
    try:
        saved = OmegaConf.merge(OmegaConf.structured(Config), _renamed(OmegaConf.load(saved_file)))
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"{saved_file} no longer matches this framework's settings ({' '.join(str(e).split())[:200]})"
                          ": resume with resume=PATH into a new run_dir and the settings on the command line") from None
    before = OmegaConf.create(OmegaConf.to_container(saved))
    given = set_keys(overrides)
    for key in [*given, *CURRENT]:
        OmegaConf.update(saved, key, OmegaConf.select(fresh, key), merge=False)
    _unredact(saved, fresh)
    for fixed in FIXED_ON_RESUME:
        touched = any(fixed == key or fixed.startswith(key + ".") or key.startswith(fixed + ".") for key in given)
        old, new = OmegaConf.select(before, fixed), OmegaConf.select(saved, fixed)
        if touched and OmegaConf.to_container(OmegaConf.create({"v": old})) != OmegaConf.to_container(
                OmegaConf.create({"v": new})):
            raise ConfigError(
                f"resume: {fixed} would change from {_short(old)} to {_short(new)}, and a resumed run keeps it (the "
                f"data order, the rows and the model depend on it). Keep it, or start a new run_dir from this run's "
                f"export or checkpoint with model.path=...")
    return OmegaConf.to_object(saved)


def _renamed(saved):
    """A config saved before a RENAMED key's rename, with the key under its new name."""
    from omegaconf import OmegaConf

    for old, (new, values) in RENAMED.items():
        value = OmegaConf.select(saved, old)
        if value is not None:
            parent, name = old.rsplit(".", 1)
            OmegaConf.select(saved, parent).pop(name)
            OmegaConf.update(saved, new, values.get(str(value), value), force_add=True)
    return saved


def _unredact(saved, fresh) -> None:
    """Credentials are saved as REDACTED: take them from the fresh composition."""
    from omegaconf import DictConfig

    for key in list(saved.keys()):
        mine = fresh[key] if fresh is not None and key in fresh else None
        if isinstance(saved._get_node(key), DictConfig):
            _unredact(saved[key], mine if isinstance(mine, DictConfig) else None)
        elif saved.get(key) == REDACTED and mine is not None:
            saved[key] = mine


def _short(value) -> str:
    from omegaconf import OmegaConf

    text = str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return text if len(text) <= 80 else text[:77] + "..."
