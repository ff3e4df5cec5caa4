"""torchrun process groups (NCCL on GPUs, gloo on CPU; one process when WORLD_SIZE is unset), the sums and
gathers the ranks share, and each process's share of its node's cores (how the ranks agree to stop: `stops`).

Ranks: the global RANK decides what a process does for the run (its share of the data, whether it writes:
rank 0 only); the node-local LOCAL_RANK / LOCAL_WORLD_SIZE decide what it takes of its node (its GPU, its
share of the CPU cores). torchrun sets all four, on one node or several (scripts/slurm/rsb.sbatch)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .cli import RunFailure, first_line
from .config import ConfigError
from .datasets.images import available_cpus


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    cpu_group: object = None  # a gloo group of all ranks, for Python objects (world > 1)
    timeout: timedelta | None = None  # of every collective (None: PyTorch's); a rank that stops answering ends the run
    store: object = None  # torchrun's key-value store, this attempt's keys (world > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (for counts and totals; exact in float64)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_min(self, values: list[float]) -> list[float]:
        """The smallest of each float over ranks (for decisions every rank must share)."""
        return self._all_reduce(values, dist.ReduceOp.MIN)

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list by rank), None on the others; every rank must call it."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()


def init(device_choice: str = "auto", key: str = "training.device", timeout_min: float | None = None) -> Dist:
    """`key` names the option that chose the device, for the error message. `timeout_min`: how long a collective
    waits for the other ranks (NCCL's watchdog and gloo fail it after that), for every group made here (None:
    PyTorch's defaults, 10 min NCCL, 30 min gloo)."""
    if timeout_min is not None and not (math.isfinite(timeout_min) and timeout_min > 0):
        raise ConfigError(f"training.dist_timeout_min={timeout_min:g}: must be more than 0 (minutes a collective "
                          f"waits for the other ranks)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available: use {key}=cpu or auto")
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                              f"are visible: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    cpu_group, store, timeout = None, None, None if timeout_min is None else timedelta(minutes=timeout_min)
    if world > 1:
        if not dist.is_initialized():
            store = _attempt_store()
            dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world,
                                    timeout=timeout)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local_rank, local_world, device, cpu_group, timeout, store)


def _attempt_store() -> dist.Store:
    """torchrun's store (env://), its keys prefixed by the attempt. After an elastic restart (--max-restarts)
    the agent's store still holds the failed attempt's keys, among them each rank's address for the process
    groups' connections: a rank that read its dead peer's address could not connect (torch 2.14: 2 restarts
    in 3 failed so, none with the prefix)."""
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


TIMED_OUT = ("Timed out", "timed out", "Watchdog caught collective operation timeout")
CONNECTION_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_rank_reason(e: BaseException) -> str | None:
    """'timeout' when a collective waited `Dist.timeout` for another rank, 'connection' when its connection to one
    broke (gloo raises RuntimeError with these messages; NCCL DistBackendError), else None."""
    if not isinstance(e, RuntimeError):  # (torch.distributed.DistError is one)
        return None
    text = str(e)
    if any(m in text for m in CONNECTION_LOST) or isinstance(e, dist.DistNetworkError):
        return "connection"
    return "timeout" if any(m in text for m in TIMED_OUT) else None


def silent_ranks(d: Dist, wait_s: float) -> list[int] | None:
    """After a lost collective: the ranks that do not check in within `wait_s` through torchrun's store (every rank
    still alive checks in after its own failure, and looks for the others); None when the store cannot tell (the
    node that held it is gone)."""
    if d.store is None:
        return None
    try:
        d.store.set_timeout(timedelta(seconds=wait_s))
        d.store.set(f"rsb_alive/{d.rank}", "1")
        missing, deadline = list(range(d.world)), time.monotonic() + wait_s
        while True:
            missing = [r for r in missing if not d.store.check([f"rsb_alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except RuntimeError:  # (DistStoreError, a broken connection)
        return None


def explain_lost_rank(d: Dist, e: BaseException) -> BaseException:
    """`e` as the run's one-line failure when a collective lost a rank (which ranks stopped answering, when the
    store can tell), else `e` itself. Every rank still alive says it (torchrun may stop rank 0 first). Exit 1
    lets torchrun --max-restarts or rsb.sbatch resume the run from its last checkpoint."""
    reason = lost_rank_reason(e) if d.world > 1 else None
    if reason is None:
        return e
    limit = (f"training.dist_timeout_min={d.timeout.total_seconds() / 60:g}" if d.timeout is not None else
             "the process group's timeout")
    silent = silent_ranks(d, min(10.0, d.timeout.total_seconds() / 2 if d.timeout is not None else 10.0))
    who = ("" if silent is None else f": rank(s) {', '.join(map(str, silent))} stopped answering" if silent else
           ": every rank answered a check after it")
    what = "lost its connection to another rank" if reason == "connection" else f"got no answer within {limit}"
    return RunFailure(f"a collective {what}{who}; exiting so that torchrun --max-restarts or "
                      f"scripts/slurm/rsb.sbatch resumes the run from its last checkpoint ({first_line(e)[-160:]})")


def cores_per_process(local_world: int) -> int:
    """This process's share of the cores it may run on (its affinity mask, e.g. Slurm's allocation), when
    `local_world` processes share them."""
    return max(1, available_cpus() // local_world)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
