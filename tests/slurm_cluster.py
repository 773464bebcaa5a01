"""A real one-node SLURM cluster on this machine, for the SLURM launcher's test: munged with its own key and socket,
slurmctld and slurmd with a configuration written into a temporary directory (ports chosen free, process tracking
without cgroups so it runs in a container), torn down afterwards. Clients reach it through SLURM_CONF.

Debian's `slurm-wlm` and `munge` provide the daemons (`.ci/run` installs them); `missing()` says what is absent.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _config(root: Path, node: str, user: str) -> str:
    return f"""ClusterName=omnitest
SlurmctldHost={node}
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=omni Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """`with Cluster(tmp) as env:` starts the daemons and gives the environment that points clients at them."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else f"(no {name} log)"

    def __enter__(self) -> dict:
        root = self.root
        root.chmod(0o755)  # munged refuses a socket directory others cannot enter
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "plugstack.conf").write_text("")
        (root / "slurm.conf").write_text(_config(root, self.node, getpass.getuser()))
        try:
            subprocess.run([_exe("munged"), "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                            f"--log-file={root}/log/munged.log", f"--pid-file={root}/munged.pid",
                            f"--seed-file={root}/munged.seed"], check=True, capture_output=True, text=True)
            subprocess.run([_exe("slurmctld")], env=self.env, check=True, capture_output=True, text=True)
            subprocess.run([_exe("slurmd"), "-N", self.node], env=self.env, check=True, capture_output=True,
                           text=True)
            self._wait_idle()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.env

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test SLURM node never became idle (sinfo: {state.stdout.strip()!r} "
                           f"{state.stderr.strip()!r})\nslurmctld: {self.log('slurmctld')}\nslurmd: {self.log('slurmd')}")

    def __exit__(self, *exc) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pidfile = self.root / f"{name}.pid"
            try:
                pid = int(pidfile.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(100):  # slurmctld saves its state before it exits
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
