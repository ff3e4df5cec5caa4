"""Atomic checkpoints and resume sources (auto | PATH | wandb:ENTITY/PROJECT/NAME:ALIAS)."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary name beside `path`, fsync, rename: a failed save (full disk, signal)
    leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _download_wandb(spec: str) -> Path:
    name = spec[len("wandb:"):]
    if name.count("/") != 2 or ":" not in name:
        raise ConfigError(f"training.resume '{spec}': expected wandb:ENTITY/PROJECT/NAME:ALIAS")
    import wandb
    try:
        artifact = wandb.Api().artifact(name, type="model")
        folder = Path(artifact.download(root=tempfile.mkdtemp(prefix="rsb_ffcv_ckpt_")))
    except Exception as e:  # no network, no credentials, unknown artifact
        raise ConfigError(f"training.resume '{spec}': cannot download the W&B artifact ({e})") from None
    found = sorted(folder.glob("*.pt"))
    if not found:
        raise ConfigError(f"training.resume '{spec}': the artifact holds no .pt checkpoint")
    return found[0]


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint file to resume from, or None for a fresh run."""
    if not spec:
        return None
    if spec == "auto":
        last = run_dir / "last.pt"
        return last if last.is_file() else None
    if spec.startswith("wandb:"):
        return _download_wandb(spec)
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"training.resume '{spec}': no such checkpoint file")
    return p


def load(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"checkpoint '{path}' cannot be read ({e})") from None
