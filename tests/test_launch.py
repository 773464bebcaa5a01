"""Launchers: the command (or sbatch script) each one produces, rank detection under SLURM, two real nodes on the
loopback (two `omni-launch launcher=torchrun` invocations, node ranks 0 and 1, meeting at a c10d rendezvous and
training the tiny model under ZeRO-3 with its parameters sharded across both), a real one-node SLURM cluster, and
a node lost mid-run (killed or frozen) whose peer stops in bounded time and whose return finishes the run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.cli import command
from omni_train.config.compose import compose
from omni_train.config.validate import validate
from omni_train.errors import ConfigError
from omni_train.train.distributed import first_host
from omni_train.train.liveness import SURVEY_DEADLINE_S
from tests import slurm_cluster
from tests.conftest import REPO, data_args, free_port, launch_cmd, run_launch


def test_torchrun_command_names_the_rendezvous_nodes_and_restarts():
    cfg = compose(["launcher=torchrun", "launcher.nodes=4", "launcher.nproc_per_node=8", "launcher.node_rank=2",
                   "launcher.rdzv_endpoint=node0:29400", "launcher.max_restarts=3", "launcher.local_addr=10.1.0.3"])
    cmd = command(cfg, ["stage=sft"])
    for part in ("--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400",
                 "--max_restarts=3", "--node_rank=2", "--rdzv_conf=is_host=0", "--local_addr=10.1.0.3"):
        assert part in cmd, (part, cmd)
    assert cmd[-3:] == ["-m", "omni_train.train", "stage=sft"]
    elastic = command(compose(["launcher=torchrun", "launcher.elastic=2:4"]), [])
    assert "--nnodes=2:4" in elastic


def test_deepspeed_command_takes_the_hostfile(tmp_path, text_shards):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=8  # the first\n\nnode1 slots=8\n")
    cfg = compose(["launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.master_addr=node0",
                   *data_args(text_shards)])
    validate(cfg)
    cmd = command(cfg, ["stage=sft"])
    assert f"--hostfile={hostfile}" in cmd and "--num_nodes=2" in cmd and "--num_gpus=8" in cmd
    assert "--master_addr=node0" in cmd and "--no_ssh" not in cmd
    assert cmd[-4:] == ["--no_local_rank", "--module", "omni_train.train", "stage=sft"]
    own = command(compose(["launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.node_rank=1"]), [])
    assert "--no_ssh" in own and "--node_rank=1" in own
    # Without ssh, each node's launcher must be told where node 0 is (127.0.0.1 would be each node's own loopback);
    # with ssh DeepSpeed asks the first host itself.
    with pytest.raises(ConfigError, match="launcher.node_rank=1: every node runs its own launcher .* set it to node "
                                          "0's address"):
        validate(compose(["launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.node_rank=1",
                          *data_args(text_shards)]))
    assert not any(a.startswith("--master_addr") for a in command(compose(
        ["launcher=deepspeed", f"launcher.hostfile={hostfile}"]), []))
    with pytest.raises(ConfigError, match="launcher.hostfile=None is not a file"):
        validate(compose(["launcher=deepspeed", *data_args(text_shards)]))
    hostfile.write_text("node0 slots=8\nnode1 slots=4\n")
    with pytest.raises(ConfigError, match=r"lists 2 host\(s\) \[\('node0', 8\), \('node1', 4\)\]: the first "
                                          r"launcher.nodes=2 need launcher.nproc_per_node=8 slots each"):
        validate(compose(["launcher=deepspeed", f"launcher.hostfile={hostfile}", *data_args(text_shards)]))
    hostfile.write_text("node0 8\n")
    with pytest.raises(ConfigError, match=r"line 1 \('node0 8'\) is not 'host slots=N'"):
        validate(compose(["launcher=deepspeed", f"launcher.hostfile={hostfile}", *data_args(text_shards)]))


def test_slurm_dry_run_prints_the_sbatch_script(text_shards):
    args = ["launcher=slurm", *data_args(text_shards), "launcher.nodes=2", "launcher.slurm.partition=gpu",
            "launcher.slurm.gpus_per_node=8", "trainer.lr=3e-4", "run_dir=/shared/runs/x", "--dry-run"]
    done = subprocess.run(launch_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    script = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --output=/shared/runs/x/logs/%x-%j.out"):
        assert line in script, line
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "srun --kill-on-bad-exit=1" in script and "--rdzv_endpoint=$head_node:29400" in script
    assert "--nnodes=$SLURM_JOB_NUM_NODES" in script and "--rdzv_id=$SLURM_JOB_ID" in script
    assert "trainer.lr=3e-4" in script and "--dry-run" not in script and "DS_ACCELERATOR" not in script
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def test_bad_launcher_settings_are_named(text_shards):
    data = data_args(text_shards)
    with pytest.raises(ConfigError, match=r"launcher.node_rank=2 must lie in \[0, launcher.nodes=2\)"):
        validate(compose(["launcher=torchrun", "launcher.node_rank=2", *data]))
    with pytest.raises(ConfigError, match="launcher.elastic=4:2 must be MIN:MAX"):
        validate(compose(["launcher=torchrun", "launcher.elastic=4:2", *data]))
    with pytest.raises(ConfigError, match="launcher.rdzv_endpoint=node0 must be host:port"):
        validate(compose(["launcher=torchrun", "launcher.rdzv_endpoint=node0", *data]))


@pytest.mark.parametrize("nodelist, first", [("node[03-05,07],gpu1", "node03"), ("a1,b2", "a1"), ("solo", "solo"),
                                             ("gpu[12]", "gpu12")])
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def _torchrun(rank: int, port: int, local_addr: str | None = None) -> list[str]:
    return ["launcher=torchrun", "launcher.nodes=2", "launcher.nproc_per_node=1", f"launcher.node_rank={rank}",
            f"launcher.rdzv_endpoint=127.0.0.1:{port}", *([f"launcher.local_addr={local_addr}"] if local_addr else [])]


def _node(launcher: list[str], run_dir: Path, shards: Path, *extra: str) -> subprocess.Popen:
    """One node's `omni-launch`; its output goes to run_dir/../node{rank}-{n}.log (read by _log)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rank = next(a for a in launcher if a.startswith("launcher.node_rank=")).partition("=")[2]
    n = len(list(run_dir.parent.glob(f"node{rank}-*.log")))
    log = open(run_dir.parent / f"node{rank}-{n}.log", "w")  # noqa: SIM115 (the child holds it)
    proc = subprocess.Popen(launch_cmd(*launcher, f"run_dir={run_dir}", *data_args(shards), "trainer.warmup_steps=0",
                                       *extra),
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log.close()
    proc.log = Path(log.name)
    return proc


def _log(node: subprocess.Popen, tail: int = 4000) -> str:
    return node.log.read_text(errors="replace")[-tail:]


def _deepspeed(rank: int, port: int, hostfile: Path) -> list[str]:
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: without ssh nothing resolves them
    return ["launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.nodes=2", "launcher.nproc_per_node=1",
            f"launcher.node_rank={rank}", "launcher.master_addr=127.0.0.1", f"launcher.master_port={port}"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_the_loopback_train_one_zero3_model(launcher, text_shards, tmp_path):
    """Two launcher invocations, one per node: torchrun's c10d rendezvous, or DeepSpeed's launcher without ssh
    (each node starts its own, `--no_ssh --node_rank`)."""
    port, run_dir = free_port(), tmp_path / "run"
    args = {"torchrun": lambda r: _torchrun(r, port), "deepspeed": lambda r: _deepspeed(r, port, tmp_path / "hosts")}
    nodes = [_node(args[launcher](rank), run_dir, text_shards, "trainer.max_steps=4", "trainer.save_every=4")
             for rank in (0, 1)]
    for node in nodes:
        assert node.wait(timeout=600) == 0, _log(node)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    total = summary["total_params"]
    assert all(abs(local - total / 2) < 0.01 * total for local in summary["local_params_per_rank"])


needs_slurm = pytest.mark.skipif(bool(slurm_cluster.missing()), reason=f"SLURM is not installed here (missing: "
                                 f"{', '.join(slurm_cluster.missing())}; `apt-get install slurm-wlm munge`, as "
                                 f".ci/run does)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real one-node SLURM cluster (munged, slurmctld, slurmd started here) for this module's SLURM tests."""
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    with cluster as env:
        env["OMP_NUM_THREADS"] = "1"
        yield cluster


@needs_slurm
def test_slurm_job_on_a_real_one_node_cluster(slurm, text_shards, tmp_path):
    """`omni-launch launcher=slurm --wait`: sbatch takes the generated script, srun starts torchrun on the node, two
    ranks train under ZeRO-3 and save a checkpoint."""
    run_dir = tmp_path / "run"
    done = subprocess.run(launch_cmd("launcher=slurm", "launcher.nodes=1", "launcher.nproc_per_node=2",
                                     f"launcher.slurm.cpus_per_task={os.cpu_count()}",
                                     f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}", f"run_dir={run_dir}",
                                     *data_args(text_shards), "trainer.warmup_steps=0", "trainer.max_steps=2",
                                     "trainer.save_every=2", "--wait"),
                          cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=900)
    logs = list((run_dir / "logs").glob("omni-train-*.out"))
    job_log = logs[0].read_text() if logs else "(no job log)"
    assert done.returncode == 0, (done.stderr[-2000:], job_log[-4000:], slurm.log("slurmd"))
    job = done.stderr.split("job ")[1].split()[0]
    assert logs == [run_dir / "logs" / f"omni-train-{job}.out"], logs
    assert f"omni-launch: job {job} on 1 node(s) ({slurm.node})" in job_log, job_log[:2000]
    assert (run_dir / "slurm.sbatch").read_text().startswith("#!/bin/bash")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and {p.name for p in ckpt.glob("run_state_rank*.json")} == {
        "run_state_rank0.json", "run_state_rank1.json"}, sorted(p.name for p in run_dir.rglob("*"))[:40]


@needs_slurm
def test_a_script_sbatch_refuses_is_one_line_not_a_submission(slurm, text_shards, tmp_path):
    done = subprocess.run(launch_cmd("launcher=slurm", "launcher.slurm.partition=no_such_partition",
                                     f"run_dir={tmp_path / 'run'}", *data_args(text_shards)),
                          cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("omni-launch: error: sbatch did not submit") and "partition" in line.lower(), line
    assert "submitted" not in done.stderr


@needs_slurm
def test_a_prep_job_array_builds_its_parts_and_a_failed_task_resubmitted_alone_completes_the_merge(
        slurm, sample_corpus, text_shards_many, tmp_path):
    """`omni-prep build ... launcher=slurm launcher.array=3 --wait`: the array's task 1 fails (its directory holds
    another build), the merge after the array names it; task 1 resubmitted alone, the merge succeeds and holds the
    samples of one build."""
    out = tmp_path / "prep"
    (out / "part-1-of-3").mkdir(parents=True)
    (out / "part-1-of-3" / "_progress.jsonl").write_text('{"source": "another build"}\n')
    done = subprocess.run([sys.executable, "-m", "data_prep.cli", "build", str(sample_corpus.with_name("text.jsonl")),
                           str(out), "workers=1", "launcher=slurm", "launcher.array=3",
                           "launcher.slurm.cpus_per_task=1", "--wait"],
                          cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.out")}
    assert done.returncode == 2, (done.stderr[-2000:], logs)
    assert "omni-prep: error: part 1 of 3 is unfinished" in "".join(logs.values()), logs
    assert all((out / f"part-{i}-of-3" / "index.json").is_file() for i in (0, 2))
    (out / "part-1-of-3" / "_progress.jsonl").unlink()
    for script in ("prep.sbatch", "merge.sbatch"):
        again = subprocess.run(["sbatch", "--wait", *(["--array=1"] if script == "prep.sbatch" else []),
                                str(out / script)], env=slurm.env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, (script, again.stderr, [p.read_text()[-2000:] for p in (out / "logs").glob("*")])
    merged = json.loads((out / "index.json").read_text())
    assert merged["parts"] == 3
    assert merged["totals"]["samples"] == json.loads((text_shards_many / "index.json").read_text())["totals"]["samples"]


@needs_slurm
def test_srun_tasks_take_their_ranks_from_slurm(slurm, text_shards, tmp_path):
    """Training started by `srun` directly (one task per rank, no torchrun): each process reads its rank, the world
    size and the master (the job's first node) from SLURM's variables."""
    run_dir = tmp_path / "run"
    done = subprocess.run(["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", sys.executable, "-m",
                           "omni_train.train", "logging.wandb_mode=disabled", "logging.progress_bar=false",
                           f"run_dir={run_dir}", *data_args(text_shards), "trainer.warmup_steps=0",
                           "trainer.max_steps=2"],
                          cwd=REPO, env=dict(slurm.env, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stderr[-4000:], slurm.log("slurmd"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    total = summary["total_params"]
    assert all(abs(local - total / 2) < 0.01 * total for local in summary["local_params_per_rank"])


def _signal_tree(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal a launcher and every process under it (torchrun starts its workers in sessions of their own, so the
    launcher's process group does not reach them)."""
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _kill_tree(proc: subprocess.Popen) -> None:
    _signal_tree(proc, signal.SIGKILL)
    proc.wait(timeout=30)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes torchrun started under a launcher (the leaves: torchrun starts them through a helper
    process that carries the same command line)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
        train = [p for p in tree if "omni_train.train" in " ".join(p.cmdline())]
        return [p for p in train if not any(c in train for c in p.children())]
    except psutil.NoSuchProcess:
        return []


def _wait_for(what: str, ready, timeout: float, nodes: list[subprocess.Popen]) -> float:
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout or any(n.poll() is not None for n in nodes):
            for n in nodes:
                _kill_tree(n)
            raise AssertionError(f"{what}: not within {timeout:.0f} s; nodes' stderr:\n" +
                                 "\n---\n".join(_log(n) for n in nodes))
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.parametrize("failure, lost_rank", [("killed", 1), ("frozen", 0)])
def test_a_lost_node_stops_its_peers_and_the_restarted_job_resumes(failure, lost_rank, text_shards, tmp_path):
    """Node 1 is lost after the step-4 checkpoint, either killed (its launcher, torchrun and worker SIGKILLed: its
    sockets close) or frozen (SIGSTOP: a hung or cut-off node, whose sockets stay open and silent). Node 0's worker
    stops within the 30-s collective timeout (plus the few seconds it takes to name the lost rank), its line naming
    its rank and the lost one; its
    torchrun (max_restarts) waits at the rendezvous it hosts; node 1 comes back and the two finish from the newest
    complete checkpoint. c10d orders ranks by node address: the killed node 1 holds rank 1 (found by its stopped
    heartbeat), the frozen one rank 0 (its process hosts the store the heartbeats use, and that store goes silent)."""
    port, run_dir, timeout_s = free_port(), tmp_path / "run", 30
    args = ("trainer.max_steps=8", "trainer.save_every=4", f"trainer.dist_timeout_min={timeout_s / 60}",
            "launcher.max_restarts=2", "trainer.export=false")
    addrs = ["127.0.0.1", "127.0.0.2"][:: 1 if lost_rank == 1 else -1]
    nodes = [_node(_torchrun(rank, port, addrs[rank]), run_dir, text_shards, *args) for rank in (0, 1)]
    first = run_dir / "checkpoints" / "step_00000004" / "COMPLETE"
    _wait_for("the step-4 checkpoint", first.is_file, 600, nodes)
    workers = [_workers(node) for node in nodes]
    assert [len(w) for w in workers] == [1, 1], workers
    assert workers[1][0].environ()["RANK"] == str(lost_rank)
    _signal_tree(nodes[1], signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
    stopped = _wait_for("node 0's worker stopping", lambda: not workers[0][0].is_running(), timeout_s + 60, nodes[:1])
    assert nodes[0].poll() is None, "node 0's torchrun should wait for the lost node, not give up"
    _kill_tree(nodes[1])
    nodes[1] = _node(_torchrun(1, port, addrs[1]), run_dir, text_shards, *args)
    for node in nodes:
        assert node.wait(timeout=600) == 0, _log(node)
    err = nodes[0].log.read_text(errors="replace")
    # the survivor names itself and the rank it lost (by its heartbeat, or as the store's host)
    assert re.search(rf"omni-train: rank {1 - lost_rank} \(host [^)]+\): lost contact with a peer in a "
                     rf"collective \(.*\); rank {lost_rank} \([^)]+\) stopped answering; stopping", err), err[-4000:]
    # bounded by the collective timeout plus the survey's deadline (the frozen store never answers); a killed peer's
    # closed sockets often stop it sooner, but gloo may also just time out waiting, so only the bound is asserted
    bound = timeout_s + SURVEY_DEADLINE_S + 15
    assert stopped < bound, f"node 0's worker stopped after {stopped:.0f} s"
    if failure == "frozen":
        assert stopped > timeout_s - 2, f"node 0's worker stopped after {stopped:.0f} s, before the timeout"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2
    assert summary["resumed_from_step"] >= 4, summary


def test_a_failure_only_the_workers_see_ends_with_their_code_and_line(tmp_path):
    """Shards that pass every check before launch (a pattern that matches files) but hold garbage: each rank
    stops with the loader's one line (exit 2), and omni-launch ends with 2 without torchrun's failure report."""
    (tmp_path / "bad-000.tar").write_bytes(b"not a tar" * 500)
    result = run_launch(f"run_dir={tmp_path / 'run'}", f"data.sources=[{{name:bad,path:{tmp_path}/bad-*.tar}}]",
                        "data.max_bad_samples=3", "data.max_len=256", "trainer.max_steps=4", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "omni-train: error: 4 corrupt samples in a row in source bad" in result.stderr
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_multirun_runs_every_job_as_its_own_launch_and_records_each(text_shards, tmp_path):
    """`omni-launch -m`: one job per swept value, job N in RUN_DIR/N, each its own processes (Hydra's in-process
    multirun crashes the second job in deepspeed.initialize), each recorded with its exit status."""
    sweep = tmp_path / "sweep"
    result = run_launch("-m", f"run_dir={sweep}", *data_args(text_shards), "launcher.nproc_per_node=1",
                        "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.export=false",
                        "trainer.lr=1e-3,3e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = json.loads((sweep / "multirun.json").read_text())["jobs"]
    assert [(j["job"], j["exit"], j["run_dir"]) for j in jobs] == [(0, 0, str(sweep / "0")), (1, 0, str(sweep / "1"))]
    assert "omni-launch: multirun: 2 of 2 job(s) succeeded" in result.stderr
    import yaml

    for n, lr in enumerate((1e-3, 3e-3)):
        assert "trainer.lr=" + str(lr) in jobs[n]["overrides"]
        saved = yaml.safe_load((sweep / str(n) / "config.yaml").read_text())["trainer"]
        assert (saved["lr"], saved["precision"]) == (lr, "fp32")  # trainer.precision=auto, resolved on a CPU rank
        assert json.loads((sweep / str(n) / "summary.json").read_text())["steps"] == 2


def test_hydra_flags_answer_through_omni_launch_as_through_omni_train(tmp_path):
    args = ["--cfg", "job", "trainer.lr=0.25", f"run_dir={tmp_path / 'run'}"]
    via_launch = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
    via_train = subprocess.run([sys.executable, "-m", "omni_train.train", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert via_launch.returncode == via_train.returncode == 0, via_launch.stderr[-2000:]
    assert via_launch.stdout == via_train.stdout and "lr: 0.25" in via_launch.stdout
    assert not (tmp_path / "run").exists() and not (REPO / "multirun").exists()


@pytest.mark.parametrize("argv, message", [
    (["export"], "unknown command 'export'"),
    (["trainer.lrr=1"], "Could not override 'trainer.lrr'"),
    (["-m", "trainer.lr=1e-3,3e-3", "data.max_len=250"],
     "multirun job 0 (trainer.lr=0.001 data.max_len=250): data.max_len=250 must be a positive multiple"),
])
def test_omni_train_refuses_a_bad_command_line_in_one_line_with_exit_2(argv, message, capsys):
    from omni_train.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
