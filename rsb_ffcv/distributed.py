"""torchrun process groups (NCCL on GPUs, gloo on CPU; one process when WORLD_SIZE is unset), and how the
ranks agree, at one optimizer step, to stop or to checkpoint.

Ranks: the global RANK decides what a process does for the run (its share of the data, whether it writes:
rank 0 only); the node-local LOCAL_RANK / LOCAL_WORLD_SIZE decide what it takes of its node (its GPU, its
share of the CPU cores). torchrun sets all four, on one node or several (scripts/slurm/rsb.sbatch)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    cpu_group: object = None  # a gloo group of all ranks, for Python objects (world > 1)

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


def init(device_choice: str = "auto", key: str = "training.device") -> Dist:
    """`key` names the option that chose the device, for the error message."""
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
    cpu_group = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", store=_attempt_store(), rank=rank, world_size=world)
        cpu_group = dist.new_group(backend="gloo")
    return Dist(rank, world, local_rank, local_world, device, cpu_group)


def _attempt_store() -> dist.Store:
    """torchrun's store (env://), its keys prefixed by the attempt. After an elastic restart (--max-restarts)
    the agent's store still holds the failed attempt's keys, among them each rank's address for the process
    groups' connections: a rank that read its dead peer's address could not connect (torch 2.14: 2 restarts
    in 3 failed so, none with the prefix)."""
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class StepAgreement:
    """Every rank leaves the training loop, or checkpoints, at the same optimizer step when any rank asks.

    A signal only sets a flag on the rank that got it; a rank's clock says when a timed checkpoint is due. At
    every optimizer step each rank calls `poll(stop, checkpoint)`: it reads the sums of the flags that the ranks
    sent at the previous step, then sends its current flags, as an asynchronous all-reduce of two CPU floats on
    a gloo group of its own. All ranks read the same sums at the same step, so they act together, one or two
    steps after the first rank asked. Nothing waits on the GPU (the values live on the host), and the wait for
    the previous step's all-reduce is over before it starts unless another rank's host is a step behind, which
    the next gradient all-reduce would wait for anyway. Why not piggyback on the loss check every `log_every`
    steps: that can be 50 steps, over a minute for A1 on V100s, longer than torchrun's or a scheduler's grace
    period before SIGKILL.
    """

    def __init__(self, world: int):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.pending = None  # (work, tensor) sent at the previous step

    def poll(self, stop: bool, checkpoint: bool = False) -> tuple[bool, bool]:
        """(stop, checkpoint) as agreed by all ranks for this step."""
        if self.world == 1:
            return stop, checkpoint
        agreed = (False, False)
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            agreed = (flags[0].item() > 0, flags[1].item() > 0)  # a CPU tensor: no device sync
        flags = torch.tensor([float(stop), float(checkpoint)])
        self.pending = (dist.all_reduce(flags, group=self.group, async_op=True), flags)
        return agreed

    def close(self) -> None:
        """Wait for the last all-reduce (every rank sent it) so that no collective is left in flight."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
