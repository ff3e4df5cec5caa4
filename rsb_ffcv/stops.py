"""When the training loop stops or saves: signals (SIGTERM before a time limit, Ctrl-C), the timed checkpoint
clock, and the step at which every rank agrees to act on them; plus the fault-injection hooks of the tests.

A signal only sets a flag on the rank that got it, and a rank's clock says when a timed checkpoint is due.
`StepAgreement` turns those per-rank flags into one decision at one optimizer step for all ranks. The handlers
are installed for the training only (`StopControl.running()`) and the previous ones restored after it, so a
tool that trains and then does other work in the same process (make demo's report) gets its Ctrl-C back.

Test hooks live in environment variables, not in the config: they are not part of the product's surface
(`--help`, config.yaml, W&B). They fire only in a run that did not resume, or a resumed run would fault again:
- RSB_FFCV_TEST_SIGNAL_AT='RANK:STEP[:TERM|KILL|STOP][@ATTEMPT],...': that rank sends itself the signal after
  that global step (STOP: it freezes, as a rank in a hung collective or a stuck read would); with @ATTEMPT, in
  that torchrun restart attempt instead (resumed or not), for faults one after another;
- RSB_FFCV_TEST_NAN_AT_STEP=N: the loss of global step N (counted from 0, before the update) is made NaN;
- RSB_FFCV_TEST_TEAR_SAVE_AT=N: rank 0 is SIGKILLed halfway through writing the checkpoint of step N.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist

from .config import ConfigError

SIGNAL_HOOK = "RSB_FFCV_TEST_SIGNAL_AT"
NAN_HOOK = "RSB_FFCV_TEST_NAN_AT_STEP"
TEAR_HOOK = "RSB_FFCV_TEST_TEAR_SAVE_AT"
HOOK_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "STOP": signal.SIGSTOP}


def parse_signal_hook(spec: str, attempt: int, resumed: bool) -> dict[tuple[int, int], int]:
    """'RANK:STEP[:TERM|KILL|STOP][@ATTEMPT],...' → {(rank, step): signal number} of the items that fire in this
    start: an item with @ATTEMPT in that torchrun restart attempt (TORCHELASTIC_RESTART_COUNT), one without in a
    run that did not resume."""
    out = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        item, at = item.split("@", 1) if "@" in item else (item, "")
        rank, step, name = (item.split(":") + ["TERM"])[:3] if item.count(":") in (1, 2) else ("", "", "")
        if not (rank.isdigit() and step.isdigit() and name in HOOK_SIGNALS and (at == "" or at.isdigit())):
            raise ConfigError(f"{SIGNAL_HOOK}='{spec}': expected RANK:STEP[:TERM|KILL|STOP][@ATTEMPT][,...]")
        if (at == "" and not resumed) or (at != "" and int(at) == attempt):
            out[int(rank), int(step)] = HOOK_SIGNALS[name]
    return out


def hook_step(name: str) -> int | None:
    """The step number in the hook variable `name` (NAN_HOOK, TEAR_HOOK), or None."""
    value = os.environ.get(name, "")
    if value and not value.isdigit():
        raise ConfigError(f"{name}='{value}': expected a step number")
    return int(value) if value else None


def tear(path) -> None:
    """The tear hook: cut the file being written to half its length and SIGKILL this process, as a kill in the
    middle of the write would leave it."""
    with open(path, "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size // 2)
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss_fn, at_step: int, step):
    """loss_fn, whose loss is NaN while step() == at_step (the NaN test hook)."""
    def poisoned(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if step() == at_step else loss
    return poisoned


class StepAgreement:
    """Every rank leaves the training loop, or checkpoints, at the same optimizer step when any rank asks.

    At every optimizer step each rank calls `poll(stop, checkpoint)`: it reads the sums of the flags that the
    ranks sent at the previous step, then sends its current flags, as an asynchronous all-reduce of two CPU floats
    on a gloo group of its own. All ranks read the same sums at the same step, so they act together, one or two
    steps after the first rank asked. Nothing waits on the GPU (the values live on the host), and the wait for the
    previous step's all-reduce is over before it starts unless another rank's host is a step behind, which the
    next gradient all-reduce would wait for anyway. Not piggybacked on the logging step's sync: that can be 50
    steps, over a minute for A1 on V100s, longer than torchrun's or a scheduler's grace period before SIGKILL.
    """

    def __init__(self, world: int, timeout=None):
        self.world = world
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
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

    def close(self, wait: bool = True) -> None:
        """Wait for the last all-reduce (every rank sent it) so that no collective is left in flight; or, on a
        failure, leave it (it may wait on a rank that stopped answering)."""
        if self.pending is not None and wait:
            self.pending[0].wait()
        self.pending = None


class StopControl:
    """One rank's view: `requested` (a signal came), the timed-save clock, the agreement, the signal hook."""

    def __init__(self, rank: int, world: int, checkpoint_every_min: float, resumed: bool, timeout=None):
        self.rank = rank
        self.requested = False
        self.every_s = 60 * checkpoint_every_min
        self.last_save = time.monotonic()
        self.agreement = StepAgreement(world, timeout)
        self.hook_signals = parse_signal_hook(os.environ.get(SIGNAL_HOOK, ""),
                                              int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), resumed)

    def poll(self, step: int) -> tuple[bool, bool]:
        """After optimizer step `step`: (stop, save) as all ranks agree on them at this step."""
        if (self.rank, step) in self.hook_signals:
            os.kill(os.getpid(), self.hook_signals[self.rank, step])
        due = 0 < self.every_s <= time.monotonic() - self.last_save
        return self.agreement.poll(self.requested, due)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self, wait: bool = True) -> None:
        self.agreement.close(wait)

    def _on_signal(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice: stop now
            raise KeyboardInterrupt
        if self.requested:  # Slurm signals every process of a step, and torchrun passes it on again
            return
        self.requested = True
        print(f"signal {signum} on rank {self.rank}: the ranks finish the current step together, then save",
              flush=True)

    @contextlib.contextmanager
    def running(self):
        """While inside, SIGTERM and SIGINT request a stop. On the way out the previous handlers come back and the
        agreement's last all-reduce is waited for, or left on an error (it may wait on a rank that stopped)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        except BaseException:
            self.close(wait=False)
            raise
        else:
            self.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
