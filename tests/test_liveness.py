"""Naming the lost rank (omni_train/train/liveness.py) in a real gloo group of three processes: one freezes (SIGSTOP),
the other two ask who stopped answering at the same time (one surveys, the other reads its verdict) and both
name the frozen rank."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from tests.conftest import REPO, free_port

RANK = textwrap.dedent("""
    import os, signal, time
    import torch
    from omni_train.train import liveness

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    liveness.start(rank, world)
    torch.distributed.barrier()
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen: its heartbeat stops, its sockets stay open
    time.sleep(3 * liveness.INTERVAL)
    print("VERDICT", liveness.lost_peers(rank, world), flush=True)
    liveness.stop()
    os._exit(0)  # the group cannot be left cleanly with a frozen member
""")


def test_the_survivors_name_the_frozen_rank():
    world, port = 3, free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(world)]
    try:
        start = time.monotonic()
        outs = [p.communicate(timeout=120) for p in procs[:-1]]
        took = time.monotonic() - start
    finally:
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait()
    host = socket.gethostname()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"VERDICT rank 2 (host {host}) stopped answering" in out, (out, err[-2000:])
    assert took < 60, took


TIMEOUTS = textwrap.dedent("""
    import os, time
    import torch
    from omni_train.train.distributed import Timeouts, init_distributed

    rank, world = init_distributed(timeout_min=1.0)
    timeouts = Timeouts(startup_min=1.0, step_min=0.05)  # 60 s while ranks work unequally, 3 s during steps
    with timeouts.unequal_work():
        if rank == 0:
            time.sleep(6)  # rank 0 writes an export alone; the others wait at the barrier
        torch.distributed.barrier()
    print("UNEQUAL WORK PASSED", flush=True)
    timeouts.steps()
    if rank == 0:
        time.sleep(8)  # silent for longer than a step may wait
    try:
        torch.distributed.barrier()
        print("STEP PASSED", flush=True)
    except RuntimeError as e:
        print("STEP TIMED OUT", str(e).splitlines()[0][:120], flush=True)
    os._exit(0)
""")


def test_the_step_timeout_is_short_and_unequal_work_gets_the_long_one():
    """trainer.startup_timeout_min covers a rank working alone (export, checkpoint consolidation); the short
    trainer.dist_timeout_min applies from the steps on, so a silent peer is found in seconds there."""
    world, port = 2, free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TIMEOUTS], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(world)]
    outs = [p.communicate(timeout=120) for p in procs]
    for out, err in outs:
        assert "UNEQUAL WORK PASSED" in out, err[-2000:]
    assert "STEP TIMED OUT" in outs[1][0], outs[1]
