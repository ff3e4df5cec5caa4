"""Atomic checkpoints, resume sources (auto | PATH | wandb:ENTITY/PROJECT/NAME:ALIAS), and loading files
that may come from other people without running their code.

Every `.pt`/`.pth` file is read with `torch.load(weights_only=True)`: only tensors and plain Python values
(and, for checkpoints written before RNG states were stored as plain values, numpy's uint32 arrays) can
come out of it. A file that needs any other global (e.g. timm's old `*.pth.tar` holding an
`argparse.Namespace`, or a crafted pickle) is refused with one line that names the global, unless the
user trusts that file with the tool's `trust_pickles` flag.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .cli import first_line
from .config import ConfigError
from .files import atomic_path

# What our checkpoints written before 2026-11-28 hold besides tensors and plain values: numpy's RNG state
# (a uint32 array). An ndarray rebuilt by the restricted unpickler cannot run code.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_LEGACY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _multiarray._reconstruct]


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary name beside `path`, fsync, rename: a failed save (full disk, signal)
    leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
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
