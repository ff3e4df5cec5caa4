"""Trained weights for evaluation and Grad-CAM, from any of the places users keep them.

A model spec is `[NAME=]SOURCE`, SOURCE one of
- a checkpoint of ours (`runs/a3/best.pt`): architecture and class list come with it;
- `wandb:ENTITY/PROJECT/NAME:ALIAS`: a model artifact logged by the trainer;
- `timm:ARCH:WEIGHTS`: a timm-format state dict (.pth/.bin/.safetensors) for timm model ARCH, e.g. the
  RSB weights `timm:resnet50:resnet50_a1_0-14fe96d1.pth`; `timm:ARCH` alone fetches timm's pretrained
  weights (needs the network). 1000-output models take ImageNet-1k's class order.
Files are read without running code (rsb_ffcv.checkpoint.load_file: weights_only, or safetensors); a
file that needs more is refused unless the tool's `trust_pickles` flag trusts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from . import checkpoint
from .config import ConfigError
from .datasets.sources import imagenet_synsets


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    classes: list[str]
    source: str


def _state_dict_file(path: Path, trust: bool, trust_flag: str) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"weights '{path}' cannot be read as safetensors ({e})") from None
    sd = checkpoint.load_file(path, trust, trust_flag, what="weights")
    if checkpoint.is_ours(sd):
        raise ConfigError(f"'{path}' is an rsb_ffcv checkpoint: give its path without 'timm:ARCH:'")
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers around a state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"weights '{path}' hold no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_weights(model: torch.nn.Module, sd: dict, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"{what} do not fit the architecture: {len(missing)} missing keys {missing[:3]}, "
                          f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} of another shape "
                          f"{shapes[:3]} (is ARCH right?)")
    model.load_state_dict(sd)


def _timm_model(arch: str, **kwargs) -> torch.nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as e:  # Unknown model
        raise ConfigError(f"timm: {e}") from None


def parse_spec(spec: str) -> tuple[str, str]:
    name, sep, source = spec.partition("=")
    if not sep:
        source = spec
        name = Path(spec).parent.name if spec.endswith(".pt") else spec.split(":")[1] if ":" in spec else spec
        if spec.startswith("wandb:"):
            name = spec.split("/")[-1]
    if not source:
        raise ConfigError(f"model spec '{spec}' is empty after '='")
    return name, source


def load_model(spec: str, device: torch.device, use_ema: bool = False, trust: bool = False,
               trust_flag: str = "eval.trust_pickles") -> LoadedModel:
    """Build the model in eval mode, channels-last, on `device`. `trust`: load pickles that need more than
    tensors (the user set `trust_flag`)."""
    name, source = parse_spec(spec)
    if source.startswith("timm:"):
        arch, _, weights = source[len("timm:"):].partition(":")
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise ConfigError(f"model '{name}': weights file '{weights}' not found")
            model = _timm_model(arch, pretrained=False)
            _load_weights(model, _state_dict_file(path, trust, trust_flag), f"model '{name}': weights '{weights}'")
        else:
            try:
                model = _timm_model(arch, pretrained=True)
            except ConfigError:
                raise
            except Exception as e:  # no network / no weights for this arch
                raise ConfigError(f"model '{name}': cannot fetch timm's pretrained '{arch}' ({e}); "
                                  f"download the weights and give timm:{arch}:FILE") from None
        n = model.num_classes
        classes = imagenet_synsets() if n == 1000 else [str(i) for i in range(n)]
    else:
        if source.startswith("wandb:"):
            path = checkpoint.resolve_resume(source, Path("."), key=f"model '{name}'")
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"model '{name}': checkpoint '{source}' not found")
        ck = checkpoint.load(path, trust, trust_flag)
        if not checkpoint.is_ours(ck):
            raise ConfigError(f"model '{name}': '{source}' is not an rsb_ffcv checkpoint; for a timm-format "
                              f"state dict write timm:ARCH:{source}")
        classes = ck["classes"]
        model = _timm_model(ck["arch"], num_classes=len(classes))
        weights = ck["model"]
        if use_ema:
            if not ck.get("ema"):
                raise ConfigError(f"model '{name}': checkpoint '{source}' holds no EMA weights")
            weights = {k.removeprefix("module."): v for k, v in ck["ema"].items()}
        _load_weights(model, weights, f"model '{name}': checkpoint '{source}'")
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return LoadedModel(name, model, list(classes), source)


def label_map(model_classes: list[str], dataset_classes: list[str], model: str, dataset: str) -> None:
    """Check that dataset label i means model output i; a one-line error naming both otherwise."""
    if model_classes == dataset_classes:
        return
    numbered = dataset_classes == [str(i) for i in range(len(dataset_classes))]  # ImageNet-V2 layout
    if numbered and len(dataset_classes) == len(model_classes):
        return
    raise ConfigError(f"model '{model}' has {len(model_classes)} classes ({', '.join(model_classes[:3])}, ...) but "
                      f"'{dataset}' has {len(dataset_classes)} ({', '.join(dataset_classes[:3])}, ...): they must be "
                      f"the same list (write ImageNet subsets with source.classes_from=imagenet1k)")
