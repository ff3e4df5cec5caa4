"""The run's checkpoints (`Checkpoints`: what a checkpoint holds, saving it atomically only when the weights and
losses are finite, resuming from it exactly), resume sources (auto | PATH | wandb:ENTITY/PROJECT/NAME:ALIAS), and
loading files that may come from other people without running their code.

Every `.pt`/`.pth` file is read with `torch.load(weights_only=True)`: only tensors and plain Python values
(and, for checkpoints written before RNG states were stored as plain values, numpy's uint32 arrays) can
come out of it. A file that needs any other global (e.g. timm's old `*.pth.tar` holding an
`argparse.Namespace`, or a crafted pickle) is refused with one line that names the global, unless the
user trusts that file with the tool's `trust_pickles` flag.
"""
from __future__ import annotations

import math
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import stops
from .cli import RunFailure, first_line
from .config import ConfigError
from .files import atomic_path, stale_temporaries

# What older checkpoints of ours hold besides tensors and plain values: numpy's RNG state (a uint32 array). An
# ndarray rebuilt by the restricted unpickler cannot run code.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_LEGACY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _multiarray._reconstruct]


def save_atomic(state: dict, path: str | os.PathLike, tear: bool = False) -> Path:
    """torch.save to a temporary name beside `path`, fsync, rename: a failed save (full disk, signal, SIGKILL)
    leaves the previous checkpoint intact. `tear`: the tests' hook, killed halfway through the write."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if tear:
            stops.tear(tmp)
    return Path(path)


def check_free_space(run_dir: Path, bytes_per_checkpoint: int, copies: int = 2) -> None:
    """Refuse to start a run whose directory cannot hold `copies` checkpoints (last.pt and best.pt), instead
    of failing at the end of the first epoch. ConfigError (one line) otherwise."""
    import shutil
    where = Path(run_dir).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = copies * bytes_per_checkpoint
    if free < need:
        raise ConfigError(f"logging.run_dir '{run_dir}': {free / 2**20:,.0f} MiB free on its disk, but the run keeps "
                          f"{copies} checkpoints of about {bytes_per_checkpoint / 2**20:,.0f} MiB each (last.pt, "
                          f"best.pt): free space or choose another run_dir")


def rng_state() -> dict:
    """RNG states as tensors and plain values, so that weights_only loading reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints: a numpy array
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals a pickle file needs beyond what weights_only loading allows (read, never executed)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (e.g. a legacy torch.save format): nothing to name
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _LEGACY_GLOBALS}
    return [g for g in found if g not in allowed]


def load_file(path: str | os.PathLike, trust: bool = False, trust_flag: str = "", what: str = "file"):
    """torch.load a file that may come from someone else: weights_only, or the full unpickler when the
    user trusts it (`trust`, set by the tool's `trust_flag`). ConfigError, one line, otherwise."""
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ConfigError(f"{what} '{path}' cannot be read ({first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = unsafe_globals(path) or re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if names:
            raise ConfigError(
                f"{what} '{path}' needs Python objects beyond tensors ({', '.join(names[:4])}): loading it could run "
                f"code, so it was not loaded; if you trust this file, set {trust_flag}=true") from None
        raise ConfigError(f"{what} '{path}' cannot be read ({first_line(e)})") from None
    except Exception as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({first_line(e)})") from None


def _download_wandb(spec: str, key: str) -> Path:
    name = spec[len("wandb:"):]
    if name.count("/") != 2 or ":" not in name:
        raise ConfigError(f"{key} '{spec}': expected wandb:ENTITY/PROJECT/NAME:ALIAS")
    import wandb
    try:
        artifact = wandb.Api(timeout=30).artifact(name, type="model")
        folder = Path(artifact.download(root=tempfile.mkdtemp(prefix="rsb_ffcv_ckpt_")))
    except Exception as e:  # no network, no credentials, unknown artifact
        raise ConfigError(f"{key} '{spec}': cannot download the W&B artifact ({first_line(e)})") from None
    found = sorted(folder.glob("*.pt"))
    if not found:
        raise ConfigError(f"{key} '{spec}': the artifact holds no .pt checkpoint")
    return found[0]


def resolve_resume(spec: str, run_dir: Path, key: str = "training.resume") -> Path | None:
    """The checkpoint file to resume from, or None for a fresh run."""
    if not spec:
        return None
    if spec == "auto":
        last = run_dir / "last.pt"
        return last if last.is_file() else None
    if spec.startswith("wandb:"):
        return _download_wandb(spec, key)
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"{key} '{spec}': no such checkpoint file")
    return p


def load(path: str | os.PathLike, trust: bool = False, trust_flag: str = "training.trust_pickles"):
    """A checkpoint file (weights_only unless trusted)."""
    return load_file(path, trust, trust_flag, what="checkpoint")


def is_ours(ck) -> bool:
    """An rsb_ffcv checkpoint (not a bare state dict)."""
    return isinstance(ck, dict) and "model" in ck and "arch" in ck


class LossNotFinite(RunFailure):
    every_rank = True  # the ranks agree on it


@dataclass
class Progress:
    """Where a run is: epochs done, optimizer steps done, steps done of the current epoch, best val top-1."""
    epoch: int = 0
    step: int = 0
    epoch_steps_done: int = 0
    best_top1: float = -1.0


def _buffers(model: torch.nn.Module) -> dict:
    return {name: b.detach().cpu().clone() for name, b in model.named_buffers()}


def _load_buffers(model: torch.nn.Module, saved: dict | None) -> None:
    if saved:
        for name, b in model.named_buffers():
            b.copy_(saved[name])


class Checkpoints:
    """last.pt (every save), best.pt (the best val top-1 so far) and W&B model artifacts of one run. Every rank
    calls `save` and `resume`: a checkpoint holds every rank's random states, BatchNorm buffers and loss sum
    (`rank_state`), so that a resumed run continues exactly as the uninterrupted one would have, on as many ranks.
    Nothing non-finite is saved: `save` first agrees across ranks that the weights and this epoch's losses are
    finite (one small all-reduce per save), else raises LossNotFinite naming the last finite checkpoint."""

    def __init__(self, run_dir: Path, d, cfg: dict, classes: list[str], tear_at: int | None = None):
        self.run_dir, self.d, self.cfg, self.classes = Path(run_dir), d, cfg, classes
        self.last_finite: str | None = None  # "PATH (step N)": the last checkpoint known to be finite
        self.tear_at = tear_at  # the tests' hook: the step whose save is killed halfway
        if d.is_main:  # a save killed mid-write (SIGKILL, a lost node) left its temporary file
            for name in ("last.pt", "best.pt"):
                for left in stale_temporaries(self.run_dir / name):
                    left.unlink()
                    print(f"removed {left}: a checkpoint write that was killed before it finished", flush=True)

    def rank_state(self, recipe, epoch_loss: torch.Tensor) -> dict:
        """What differs between ranks: the random states (augmentation, Mixup), the BatchNorm statistics of the
        model and its EMA (each rank updates its own from its batches; dist_bn reduces them at an epoch's end) and
        its sum of this epoch's losses. The weights are the same everywhere; the crops need no state (keyed by
        seed, rank, epoch, batch)."""
        state = {"rng": rng_state(), "buffers": _buffers(recipe.model), "epoch_loss": epoch_loss.item()}
        if recipe.ema is not None:
            state["ema_buffers"] = _buffers(recipe.ema.module)
        return state

    def run_state(self, recipe, progress: Progress, rank_states: list[dict], wandb_run_id: str | None) -> dict:
        """The checkpoint. The scheduler is not in it: timm's schedulers are functions of (epoch, step) and the
        resumed run's config (Recipe.set_lr)."""
        return {"model": recipe.model.state_dict(), "ema": recipe.ema.state_dict() if recipe.ema else None,
                "optimizer": recipe.optimizer.state_dict(), "scaler": recipe.scaler.state_dict(),
                "epoch": progress.epoch, "step": progress.step, "epoch_steps_done": progress.epoch_steps_done,
                "best_top1": progress.best_top1, "config": self.cfg, "classes": self.classes,
                "arch": self.cfg["model.arch"], "rank_states": rank_states, "wandb_run_id": wandb_run_id}

    def not_finite(self, progress: Progress) -> LossNotFinite:
        last = f"the last finite checkpoint is {self.last_finite}" if self.last_finite else "no checkpoint was saved"
        return LossNotFinite(f"loss is not finite at step {progress.step} (epoch {progress.epoch}); stopped, {last}")

    def save(self, recipe, progress: Progress, epoch_loss: torch.Tensor, tracker, top1: float | None = None,
             artifact: bool = False, end_of_epoch: bool = True) -> None:
        """last.pt, and best.pt when top1 is the best so far, and a W&B artifact if asked; end_of_epoch=False: a
        mid-epoch checkpoint (last.pt only)."""
        bad = float(not (math.isfinite(epoch_loss.item()) and recipe.weights_finite()))
        if self.d.all_sum([bad])[0]:
            raise self.not_finite(progress)
        rank_states = self.d.gather(self.rank_state(recipe, epoch_loss))
        is_best = top1 is not None and top1 >= progress.best_top1
        if top1 is not None:
            progress.best_top1 = max(progress.best_top1, top1)
        last = self.run_dir / "last.pt"
        self.last_finite = f"{last} (step {progress.step})"
        if not self.d.is_main:
            return
        state = self.run_state(recipe, progress, rank_states, tracker.run_id)
        save_atomic(state, last, tear=progress.step == self.tear_at)
        if not end_of_epoch:
            return
        aliases = ["latest", f"epoch-{progress.epoch}"]
        if is_best:
            save_atomic(state, self.run_dir / "best.pt")
            aliases.append("best")
        if artifact:
            tracker.log_checkpoint(last, aliases, {"epoch": progress.epoch, "step": progress.step, "val_top1": top1})

    def resume(self, path: Path, recipe, progress: Progress, epoch_loss: torch.Tensor, log) -> str | None:
        """Load `path` into the recipe, the progress and this rank's state; returns its W&B run id."""
        s = load(path, self.cfg["training.trust_pickles"])
        if not is_ours(s):
            raise ConfigError(f"training.resume: '{path}' is not an rsb_ffcv checkpoint")
        recipe.model.load_state_dict(s["model"])
        if recipe.ema is not None and s.get("ema"):
            recipe.ema.load_state_dict(s["ema"])
        recipe.optimizer.load_state_dict(s["optimizer"])
        recipe.scaler.load_state_dict(s["scaler"])
        recipe.rebuild_buckets = True
        progress.epoch, progress.step, progress.best_top1 = s["epoch"], s["step"], s["best_top1"]
        progress.epoch_steps_done = s["epoch_steps_done"]
        ranks = s.get("rank_states") or [{"rng": s["rng"]}]  # older checkpoints: rank 0's random state only
        if len(ranks) != self.d.world:
            log(f"note: the checkpoint holds the random states of {len(ranks)} process(es) and this run has "
                f"{self.d.world}: augmentation draws continue from fresh seeds, not as the saved run would have")
        else:
            mine = ranks[self.d.rank]
            set_rng_state(mine["rng"])
            _load_buffers(recipe.model, mine.get("buffers"))
            epoch_loss.fill_(mine.get("epoch_loss", 0.0))
            if recipe.ema is not None:
                _load_buffers(recipe.ema.module, mine.get("ema_buffers"))
        self.last_finite = f"{path} (step {progress.step})"
        log(f"resumed from {path}: epoch {progress.epoch}, step {progress.step}")
        return s.get("wandb_run_id")
