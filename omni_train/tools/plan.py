"""`omni-train plan`: print the per-GPU memory plan of a configuration (omni_train/train/memory.py) and say
whether it fits a GPU of the given size. Exit 0 when it fits, 1 when not, 2 on a config error."""

from __future__ import annotations

import argparse
import sys

from omni_train.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="omni-train plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="the GPU's memory in GiB (default 80)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `omni-train` (model=..., stage=...)")
    args = parser.parse_intermixed_args(argv)
    from omni_train.config.compose import compose
    from omni_train.train.memory import report

    try:
        text, fits = report(compose(args.overrides), args.gpu_gb)
    except ConfigError as e:
        print(f"omni-train plan: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if fits else 1
