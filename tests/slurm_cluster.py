"""A real single-node SLURM cluster for tests: private munged, slurmctld and slurmd in a temporary folder.

Nothing is mocked: jobs go through sbatch/srun, signals and requeues are SLURM's own. Everything lives under one
temporary folder (munge key and socket, slurm.conf, state, spool, logs) and uses free ports, so it touches no system
configuration and several test sessions on one machine do not interfere. Verified with Debian 12's slurm-wlm 22.05
and munge 0.5.15, as root, without cgroups:

    apt-get install -y slurmctld slurmd slurm-client munge
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); install with: {INSTALL}"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root (SlurmdUser=root); run the tests as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """``start()`` it, point commands at it with ``env`` (SLURM_CONF), ``stop()`` it."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged wants its socket's folder reachable by everyone
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = self.root / "munge.sock"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: sock.exists(), timeout, "munged socket")
        self.conf.write_text(self.slurm_conf(sock))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout, timeout, "idle node")
        return self

    def slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=ablatetest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Schedule every second (default 60 s), so a requeued job starts as soon as it is eligible.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            # SIGTERM -> SIGKILL grace for a cancelled / requeued job: time to write a checkpoint.
            "KillWait=10",
            "MinJobAge=600",
            "JobRequeue=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def stop(self) -> None:
        """Cancel every job, wait for them to leave the node, stop the daemons this object started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            with contextlib.suppress(TimeoutError):
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 30, "empty queue")
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def job_field(self, job_id: str, field: str) -> str | None:
        """A ``scontrol show job`` field (e.g. JobState, Restarts) of a job the controller still remembers."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(f"{field}="):
                return token.split("=", 1)[1]
        return None

    def jobs(self) -> list[str]:
        """Ids of the jobs in the queue (pending, running or completing)."""
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def logs(self, tail: int = 40) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode} while waiting for {what}\n"
                                       f"{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:.0f} s\n{self.logs()}")
