"""`omni-train`: one process of a training job, and the commands around training.

    omni-train [train] OVERRIDES...        train one stage (Hydra overrides; one process of the job, which
                                           `omni-launch` starts)
    omni-train plan [--gpu-gb G] OVERRIDES  the per-GPU memory a configuration needs (omni_train/tools/plan.py)
    omni-train pairs ...                    on-policy speech preference triplets (omni_train/tools/pairs.py)
    omni-train eval MODEL OVERRIDES...      held-out loss (and with --speech, spoken WER) of a saved model
                                           (omni_train/tools/evaluate.py)
    omni-train report RUN_DIR...            PNG curves and a markdown page of runs (omni_train/tools/report.py)
    omni-train chat EXPORT [--prompt ...]   talk to an export: text and media in, the answer out, with a full model
                                           its speech as a WAV (omni_train/tools/chat.py)

Owns the command table and how a training process ends: a user error is one line and exit 2; a lost peer is one
line naming it (omni_train/train/liveness.py) and exit 3, after which a job with `launcher.max_restarts` resumes;
a diverged run (trainer.max_nonfinite_steps non-finite steps in a row, or non-finite weights) is one line and exit
4, and is not resumed by `resume=auto`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from omni_train.errors import DIVERGED, LAUNCHED, ConfigError, Diverged

# What gloo and NCCL say when a peer process or node is gone or silent.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL communicator")


def one_line(error: ConfigError) -> str:
    """The message of a user error; one raised in a DataLoader worker process arrives re-raised by torch with the
    worker's traceback in its text, whose last line is the message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    return text.strip().splitlines()[-1].split(": ", 1)[-1]


def _lost_peer(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.distributed.DistError) or any(s in str(error) for s in PEER_LOST)


def _entry(dict_cfg) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from omni_train.config.compose import restore_saved
    from omni_train.train.distributed import shutdown
    from omni_train.train.loop import run

    cfg = OmegaConf.to_object(dict_cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(restore_saved(cfg, list(HydraConfig.get().overrides.task)))
        shutdown()
    except ConfigError as e:  # Hydra would print a trace for an exception; a user error gets one line
        print(f"omni-train: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:  # every rank decides alike; the first says so
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"omni-train: error: {e}", file=sys.stderr)
        shutdown()
        sys.exit(0 if os.environ.get(LAUNCHED) else DIVERGED)
    except (torch.distributed.DistError, RuntimeError) as e:
        if not _lost_peer(e):
            raise
        # A peer died (connection closed) or stopped answering (the collective timeout): this rank names it (from
        # the heartbeats) and stops too; with launcher.max_restarts the job restarts and resumes from the newest
        # complete checkpoint.
        from omni_train.train import liveness

        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        print(f"omni-train: rank {rank} (host {socket.gethostname()}): lost contact with a peer in a collective "
              f"({str(e).splitlines()[0][:200]}); {liveness.lost_peers(rank, world)}; stopping", file=sys.stderr)
        liveness.stop()
        sys.exit(3)


def train(argv: list[str]) -> int:
    """Hydra's own entry (its flags: --cfg, --info, --help, ...) with `argv` as the command line; `-m` runs each
    job of the sweep as its own `omni-train` process (launch/sweep.py)."""
    import hydra

    from launch.sweep import MULTIRUN, multirun
    from omni_train.config.compose import compose
    from omni_train.config.schema import register

    if any(a in MULTIRUN for a in argv):
        if "RANK" in os.environ:
            raise ConfigError("-m inside a launched job would run every job on every rank: run the sweep with "
                              "omni-launch -m OVERRIDES... (each job its own launch)")
        return multirun("omni-train", [sys.executable, "-m", "omni_train.train"], [],
                        [a for a in argv if a not in MULTIRUN])
    if not os.environ.get(LAUNCHED) and not any(a.startswith("-") for a in argv):
        compose(argv)  # a bad override: one line and exit 2 here, as from omni-launch, not Hydra's report
    register()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(version_base=None, config_path="pkg://omni_train.conf", config_name="config")(_entry)()
    return 0


def _plan(argv: list[str]) -> int:
    from omni_train.tools.plan import main

    return main(argv)


def _pairs(argv: list[str]) -> int:
    from omni_train.tools.pairs import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from omni_train.tools.evaluate import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from omni_train.tools.report import main

    return main(argv)


def _chat(argv: list[str]) -> int:
    from omni_train.tools.chat import main

    return main(argv)


COMMANDS = {"train": (train, "train one stage (Hydra overrides); the default command"),
            "plan": (_plan, "the per-GPU memory a configuration needs"),
            "pairs": (_pairs, "on-policy speech preference triplets for talker_dpo"),
            "eval": (_eval, "held-out loss (and spoken WER) of an export or checkpoint"),
            "report": (_report, "curves of one or several runs as PNGs and a markdown page"),
            "chat": (_chat, "talk to an export: text and media in, the answer (and its speech) out")}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="omni-train", description=__doc__.split("\n\n")[0],
                                     epilog="Each command takes --help. Without a command, the arguments are "
                                            "Hydra overrides for `train`.")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, text) in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and "=" not in argv[0]:
        parser.error(f"unknown command {argv[0]!r}: the commands are {', '.join(COMMANDS)}, and without one the "
                     f"arguments are Hydra overrides (key=value) for `train`")
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]  # `omni-train stage=sft ...`: overrides, not a command
    args = parser.parse_args(argv[:1])
    try:
        sys.exit(COMMANDS[args.command][0](argv[1:]))
    except ConfigError as e:
        print(f"omni-train: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
