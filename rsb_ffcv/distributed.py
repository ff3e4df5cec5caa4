"""torchrun process groups (NCCL on GPUs, gloo on CPU; one process when WORLD_SIZE is unset), and how the
ranks agree to stop together."""
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (for counts and totals; exact in float64)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_min(self, values: list[float]) -> list[float]:
        """The smallest of each float over ranks (for decisions every rank must share)."""
        return self._all_reduce(values, dist.ReduceOp.MIN)

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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, local_world, device)


class StopAgreement:
    """Every rank leaves the training loop at the same optimizer step when any rank was asked to stop.

    A signal only sets a flag on the rank that got it. At every optimizer step each rank calls `poll(flag)`:
    it reads the sum of the flags that the ranks sent at the previous step, then sends its current flag,
    as an asynchronous all-reduce of one CPU float on a gloo group of its own. All ranks read the same
    sum at the same step, so they stop together, one or two steps after the first signal anywhere. Nothing
    waits on the GPU (the value lives on the host), and the wait for the previous step's all-reduce is over
    before it starts unless another rank's host is a step behind, which the next gradient all-reduce would
    wait for anyway. Why not piggyback on the loss check every `log_every` steps: that can be 50 steps,
    over a minute for A1 on V100s, longer than torchrun's or a scheduler's grace period before SIGKILL.
    """

    def __init__(self, world: int):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.pending = None  # (work, tensor) sent at the previous step

    def poll(self, requested: bool) -> bool:
        if self.world == 1:
            return requested
        agreed = False
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            agreed = flags.item() > 0  # a CPU tensor: no device sync
        flags = torch.tensor([float(requested)])
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
