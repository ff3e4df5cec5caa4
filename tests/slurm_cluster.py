"""A real two-node Slurm cluster on this machine, for tests: slurmctld plus two slurmd (`-N n1`, `-N n2`, both at
127.0.0.1 on their own ports), no authentication (auth/none, cred/none), no cgroups (proctrack/linuxproc,
task/none), state, spool and logs under a temporary directory, the config passed with SLURM_CONF. Debian's
slurm-wlm (22.05) provides the daemons; `make test-deps` installs it. The daemons are stopped by their pids.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None]


def free_ports(n: int) -> list[int]:
    """n ports that are free now, consecutive (slurm.conf gives node n[1-2] the ports P-(P+1))."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free consecutive ports")


def write_config(root: Path) -> Path:
    ctld_port, node_port, _ = free_ports(3)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    (root / "state").mkdir(parents=True, exist_ok=True)
    conf.write_text(f"""ClusterName=rsbtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
JobRequeue=1
SlurmdTimeout=10
MinJobAge=3600
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n[1-2] NodeAddr=127.0.0.1 Port={node_port}-{node_port + 1} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
    return conf


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = write_config(root)
        bin_dir = os.path.dirname(sys.executable)  # the job finds the project's Python first
        self.env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # (conftest.child_env)
                    "SLURM_CONF": str(self.conf), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        self.pids: list[int] = []

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}\n{self.logs()}")
        return p

    def start(self) -> "Cluster":
        self.run("slurmctld", "-i")
        self.pids.append(self._pid("slurmctld.pid"))
        for node in ("n1", "n2"):
            self.run("slurmd", "-N", node)
            self.pids.append(self._pid(f"slurmd-{node}.pid"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            if sum(" idle" in s for s in states) == 2:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the two nodes did not come up: {states}\n{self.logs()}")

    def _pid(self, name: str) -> int:
        path = self.root / name
        for _ in range(100):
            if path.exists() and path.read_text().strip():
                return int(path.read_text())
            time.sleep(0.1)
        raise RuntimeError(f"{path} was not written\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is left (by job id), then stop the daemons by their pids."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for pid in self.pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def kill_node(self, node: str, job_id: int) -> list[int]:
        """A node that loses power: SIGKILL its slurmd and, found through /proc by pid, every process of the job
        on it (the job step's slurmstepd, torchrun and the training processes). Returns the killed pids."""
        tasks = [pid for pid, env in _environs() if env.get("SLURMD_NODENAME") == node
                 and env.get("SLURM_JOB_ID") == str(job_id)]
        stepds = {_parent(pid) for pid in tasks} - set(tasks)
        stepds = {pid for pid in stepds if pid and "slurmstepd" in _cmdline(pid)}
        slurmd = int((self.root / f"slurmd-{node}.pid").read_text())
        victims = [slurmd, *sorted(stepds), *tasks]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return victims

    def down_nodes(self) -> list[str]:
        """Nodes that slurmctld has set DOWN (a node stops answering for SlurmdTimeout)."""
        rows = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.splitlines()
        return [r.split()[0] for r in rows if len(r.split()) == 2 and r.split()[1].startswith("down")]

    def wait_down(self, node: str, timeout: float = 120) -> None:
        """Until slurmctld has set `node` DOWN (it stopped answering for SlurmdTimeout)."""
        deadline = time.monotonic() + timeout
        while node not in self.down_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node} not down after {timeout} s\n{self.run('sinfo', '-N').stdout}{self.logs()}")
            time.sleep(0.5)

    def restart_node(self, node: str) -> None:
        """Start the node's slurmd again, as a node that rebooted would."""
        (self.root / f"slurmd-{node}.pid").unlink(missing_ok=True)
        self.run("slurmd", "-N", node)
        self.pids.append(self._pid(f"slurmd-{node}.pid"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def sbatch(self, *args, cwd=None, env_extra=None) -> int:
        """Submit from `cwd`; the job id."""
        p = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env_extra or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=60)
        if p.returncode:
            raise RuntimeError(f"sbatch failed: {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol's fields for the job (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def start_requeued_now(self, job_id: int, timeout: float = 300) -> None:
        """Once the job is requeued, let it start soon: Slurm makes a requeued job eligible only 2 minutes later
        (EligibleTime), which an administrator can lift; a test does not wait for it. Lifted only once the nodes
        have finished the first start (idle), a second later: slurmd refuses a credential of the same job issued
        in the second its previous one was revoked."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            nodes = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if info["Restarts"] != "0" and info["JobState"] == "PENDING" and nodes == ["idle", "idle"]:
                time.sleep(2)
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"):
                raise AssertionError(f"job {job_id} ended ({info['JobState']}) without being requeued")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} was not requeued within {timeout} s")

    def wait(self, job_id: int, timeout: float = 600) -> dict:
        """Until the job has ended (requeued jobs run again first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s\n{self.logs()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our child, not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _environs():
    """(pid, environment) of every process we may read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "environ").read_bytes()
            except OSError:
                continue
            yield int(entry.name), dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
