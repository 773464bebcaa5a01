"""`omni-launch`: validate the composed config, then start the training processes.

Owns: composing the same Hydra config `omni-train` will see (so a bad override fails here with one line, before
any process starts) and turning the `launcher` group into a process launch:
- `local`: N processes on this machine (torchrun --standalone);
- `torchrun`: this node's torchrun in a multi-node job, meeting the others at a c10d rendezvous (run the same
  command on every node; `launcher.node_rank` optional, `launcher.elastic=MIN:MAX`, `launcher.max_restarts`);
- `deepspeed`: DeepSpeed's launcher with `launcher.hostfile` (it reaches the hosts over ssh/pdsh; with
  `launcher.node_rank` each node runs its own launcher instead, without ssh);
- `slurm`: an sbatch script (one torchrun per node through srun, the rendezvous on the job's first node) written
  into run_dir and submitted with sbatch.
`--dry-run` prints the command (or the sbatch script) instead; `--wait` makes sbatch wait for the job's end.
`-m` (`--multirun`) runs one job per combination of swept values (`trainer.lr=1e-3,3e-3`), job N in RUN_DIR/N,
each its own launch (launch/sweep.py). Hydra's flags that print (`--cfg job|hydra|all`, `--resolve`, `-p KEY`,
`--info`, `--hydra-help`, `--version`) answer as `omni-train` answers them, without starting anything.

Imports neither torch nor the model at start-up (`--help` answers at once); the checks before launch are the
training layer's (`omni_train.train.loop.preflight`), imported when a launch is asked for.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omni_train import slurm
from omni_train.config.compose import compose
from omni_train.config.schema import Config, Launcher
from omni_train.errors import DIVERGED, LAUNCHED, ConfigError, Diverged


TRAIN = ["-m", "omni_train.train"]
FLAGS = ("--dry-run", "--wait")
# Hydra's flags that print instead of running (answered by `omni-train`'s hydra.main); `-p`/`--package` and `--cfg`
# take a value.
HYDRA_PRINT = ("--cfg", "-c", "--info", "-i", "--resolve", "--hydra-help", "--version", "-p", "--package")
# torchrun's c10d rendezvous shares its TCPStore with the workers by default, and then a node that comes back after
# a failure never joins the restarted round: the old node caches the store's address and does not publish it again
# under the new round's keys, the new one waits for it, and both time out (pytorch/pytorch#135712; seen here with
# torch 2.13). With the sharing off, every round publishes its own address.
RDZV_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _torchrun(la, nodes: str, endpoint: str, rdzv_id: str, node_rank: int | None) -> list[str]:
    args = [sys.executable, "-m", "launch.torchrun", f"--nnodes={nodes}",
            f"--nproc_per_node={la.nproc_per_node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={rdzv_id}", f"--max_restarts={la.max_restarts}"]
    if node_rank is not None:
        # the node that hosts the rendezvous store says so: with several nodes on one host (tests, a big box)
        # torchrun cannot tell from the address alone
        args += [f"--node_rank={node_rank}", f"--rdzv_conf=is_host={int(node_rank == 0)}"]
    if la.local_addr:
        args += [f"--local_addr={la.local_addr}"]
    return args


def command(cfg: Config, overrides: list[str]) -> list[str]:
    """The command line that starts this machine's training processes (local, torchrun, deepspeed)."""
    la = cfg.launcher
    if la.name in (Launcher.local, Launcher.none):
        return [sys.executable, "-m", "launch.torchrun", "--standalone",
                f"--nproc_per_node={la.nproc_per_node}", f"--max_restarts={la.max_restarts}", *TRAIN, *overrides]
    if la.name == "torchrun":
        return [*_torchrun(la, la.elastic or str(la.nodes), la.rdzv_endpoint, la.rdzv_id, la.node_rank), *TRAIN,
                *overrides]
    if la.name == "deepspeed":
        # with node_rank, every node runs its own launcher (no ssh); without, this node reaches the others over ssh
        node = [] if la.node_rank is None else ["--no_ssh", f"--node_rank={la.node_rank}"]
        # --no_local_rank: the rank is in LOCAL_RANK; a `--local_rank=N` argument would be a bad Hydra override
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={la.hostfile}",
                f"--num_nodes={la.nodes}", f"--num_gpus={la.nproc_per_node}",
                *([f"--master_addr={la.master_addr}"] if la.master_addr else []), f"--master_port={la.master_port}",
                *node, "--no_local_rank", "--module", "omni_train.train",
                *overrides]
    raise ConfigError(f"launcher={la.name} has no command line: it submits a script (see sbatch_script)")


def sbatch_script(cfg: Config, overrides: list[str]) -> str:
    """The sbatch script of a SLURM job: one torchrun per node (srun, one task per node), meeting at a c10d
    rendezvous on the job's first node; the job's log goes to `launcher.slurm.output` (under run_dir)."""
    la, sl = cfg.launcher, cfg.launcher.slurm
    output = sl.output if os.path.isabs(sl.output) else os.path.join(os.path.abspath(cfg.run_dir), sl.output)
    port = la.rdzv_endpoint.rpartition(":")[2]
    lines = slurm.header(sl, la.nodes, output)
    run = _torchrun(la, "$SLURM_JOB_NUM_NODES", "$head_node:" + port, "$SLURM_JOB_ID", None)
    quoted = " ".join(arg if arg.startswith(("--rdzv", "--nnodes")) else shlex.quote(arg)
                      for arg in [*run, *TRAIN, *overrides])
    env = "".join(f"export {k}={v}\n" for k, v in {**RDZV_ENV, LAUNCHED: "1"}.items())
    env += "" if sl.gpus_per_node else "export DS_ACCELERATOR=cpu\n"
    return "\n".join(lines) + f"""
set -euo pipefail
# the rendezvous store runs on the job's first node
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
{env}echo "omni-launch: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
    "rendezvous $head_node:{port}"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 {quoted}
# a diverged run's ranks end with 0 (no restart); the job ends with {DIVERGED}
if grep -q '"ended": "diverged"' {shlex.quote(os.path.join(os.path.abspath(cfg.run_dir), "summary.json"))} 2>/dev/null; then
    exit {DIVERGED}
fi
"""


def _submit(cfg: Config, overrides: list[str], dry_run: bool, wait: bool) -> int:
    from omni_train.files import write_text_atomic

    script = sbatch_script(cfg, overrides)
    if dry_run:
        print(script, end="")
        return 0
    path = Path(cfg.run_dir) / "slurm.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / os.path.dirname(cfg.launcher.slurm.output)).mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, script)
    job, status, message = slurm.submit(path, ["--wait"] if wait else [])
    log = cfg.launcher.slurm.output.replace("%x", cfg.launcher.slurm.job_name).replace("%j", job)
    print(f"omni-launch: job {job} submitted ({path}); its log: {log}", file=sys.stderr)
    if status != 0:  # --wait: the job ran and failed
        print(f"omni-launch: job {job} ended with exit {status} (sbatch: {message}); see its log", file=sys.stderr)
    return status


def launch(argv: list[str]) -> int:
    from omni_train.train.loop import ended_as, preflight

    overrides = [a for a in argv if a not in FLAGS]
    dry_run, wait = "--dry-run" in argv, "--wait" in argv
    cfg = compose(overrides)
    saved = Path(cfg.run_dir) / "config.yaml"
    if cfg.resume != "none" and saved.is_file():
        from omni_train.config.compose import CURRENT, set_keys

        given = [k for k in set_keys(overrides) if k not in CURRENT]
        print(f"omni-launch: resuming with {saved}" + (f"; from the command line: {', '.join(given)}" if given else ""),
              file=sys.stderr)
    preflight(cfg)
    if cfg.launcher.name == Launcher.slurm:
        return _submit(cfg, overrides, dry_run, wait)
    cmd = command(cfg, overrides)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    import torch

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **RDZV_ENV, **{LAUNCHED: "1"})
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than have every rank warn that it guessed
    started = time.time()
    code = subprocess.call(cmd, env=env)
    summary = Path(cfg.run_dir) / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= started and ended_as(cfg.run_dir).get("ended") == "diverged":
        return DIVERGED  # its ranks said why in one line and ended with 0, so that torchrun did not restart them
    return code


def _run(argv: list[str]) -> int:
    from launch.sweep import MULTIRUN, multirun

    if any(a.split("=", 1)[0] in HYDRA_PRINT for a in argv):
        return subprocess.call([sys.executable, *TRAIN, *argv])
    unknown = [a for a in argv if a.startswith("-") and a not in (*FLAGS, *MULTIRUN)]
    if unknown:
        raise ConfigError(f"unknown flag {unknown[0]}: omni-launch takes --dry-run, --wait, -m and Hydra's "
                          f"{', '.join(HYDRA_PRINT)}; overrides look like key=value (omni-launch --help)")
    if any(a in MULTIRUN for a in argv):
        flags = [a for a in argv if a in FLAGS]
        return multirun("omni-launch", [sys.executable, "-m", "launch.cli"], flags,
                        [a for a in argv if a not in (*FLAGS, *MULTIRUN)])
    return launch(argv)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        argparse.ArgumentParser(
            prog="omni-launch", usage="omni-launch [--dry-run] [--wait] [-m] OVERRIDES...",
            description=__doc__.split("\n\nImports")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="Config groups: model, deepspeed, data, stage, launcher (conf/); every key: docs/CONFIG.md.",
        ).print_help()
        return
    try:
        sys.exit(_run(argv))
    except ConfigError as e:
        print(f"omni-launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"omni-launch: error: {e}", file=sys.stderr)
        sys.exit(DIVERGED)


if __name__ == "__main__":
    main()
