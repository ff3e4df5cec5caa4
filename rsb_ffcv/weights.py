"""Trained weights for evaluation and Grad-CAM, from any of the places users keep them.

A model spec is `[NAME=]SOURCE`, SOURCE one of
- a checkpoint of ours (`runs/a3/best.pt`): architecture and class list come with it;
- `wandb:ENTITY/PROJECT/NAME:ALIAS`: a model artifact logged by the trainer;
- `timm:ARCH:WEIGHTS`: a timm-format state dict (.pth/.bin/.safetensors) for timm model ARCH, e.g. the
  RSB weights `timm:resnet50:resnet50_a1_0-14fe96d1.pth`; `timm:ARCH` alone fetches timm's pretrained
  weights (needs the network). 1000-output models take ImageNet-1k's class order.
- `local-dir:FOLDER`: a folder in timm's Hugging Face layout (config.json + model.safetensors), as
  `python -m rsb_ffcv.export` writes it, loaded by timm itself (`timm.create_model("local-dir:FOLDER",
  pretrained=True)`); the class list is config.json's `label_names` (else ImageNet-1k's order for 1000
  outputs, else the output indices).
Files are read without running code (rsb_ffcv.checkpoint.load_file: weights_only, or safetensors); a
file that needs more is refused unless the tool's `trust_pickles` flag trusts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from . import checkpoint
from .cli import first_line
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
        if spec.startswith(LOCAL_DIR):
            name = Path(spec[len(LOCAL_DIR):]).name or spec
    if not source:
        raise ConfigError(f"model spec '{spec}' is empty after '='")
    return name, source


LOCAL_DIR = "local-dir:"


def load_checkpoint(name: str, source: str, trust: bool = False, trust_flag: str = "eval.trust_pickles",
                    key: str = "") -> tuple[Path, dict]:
    """The file and content of an rsb_ffcv checkpoint named by `source` (a path or wandb:ENTITY/PROJECT/NAME:ALIAS,
    downloaded); ConfigError (one line, naming `key`, else the model) when it is missing or not ours."""
    what = key or f"model '{name}'"
    if source.startswith("wandb:"):
        path = checkpoint.resolve_resume(source, Path("."), key=what)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what}: checkpoint '{source}' not found")
    ck = checkpoint.load(path, trust, trust_flag)
    if not checkpoint.is_ours(ck):
        hint = (f"for a timm-format state dict write timm:ARCH:{source}" if not key else
                "give a checkpoint written by python -m rsb_ffcv.train (runs/NAME/best.pt or last.pt)")
        raise ConfigError(f"{what}: '{source}' is not an rsb_ffcv checkpoint; {hint}")
    return path, ck


def checkpoint_weights(ck: dict, use_ema: bool, name: str, source: str) -> dict:
    """The model's or the EMA's state dict of a checkpoint of ours, with plain timm keys (no `module.` of the EMA
    wrapper or DDP, no `_orig_mod.` of torch.compile)."""
    weights = ck["model"]
    if use_ema:
        if not ck.get("ema"):
            raise ConfigError(f"model '{name}': checkpoint '{source}' holds no EMA weights")
        weights = ck["ema"]
    return {plain_key(k): v for k, v in weights.items()}


def plain_key(key: str) -> str:
    """A state-dict key without the wrappers' prefixes (`module.`: ModelEmaV3, DDP; `_orig_mod.`: torch.compile)."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _local_dir_model(name: str, folder: str) -> tuple[torch.nn.Module, list[str]]:
    """timm's own loader of an exported folder; the class list from its config.json."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model '{name}': '{folder}' is not an exported folder (no config.json; write one with "
                          f"python -m rsb_ffcv.export)")
    try:
        model = timm.create_model(f"{LOCAL_DIR}{path}", pretrained=True)
    except Exception as e:  # timm: unknown arch, no weights file, weights that do not fit (strict load)
        raise ConfigError(f"model '{name}': timm cannot load '{folder}' ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    n = model.num_classes
    labels = model.pretrained_cfg.get("label_names")
    if isinstance(labels, (list, tuple)) and len(labels) == n:
        classes = [str(c) for c in labels]
    else:
        classes = imagenet_synsets() if n == 1000 else [str(i) for i in range(n)]
    return model, classes


def load_model(spec: str, device: torch.device, use_ema: bool = False, trust: bool = False,
               trust_flag: str = "eval.trust_pickles") -> LoadedModel:
    """Build the model in eval mode, channels-last, on `device`. `trust`: load pickles that need more than
    tensors (the user set `trust_flag`)."""
    name, source = parse_spec(spec)
    if source.startswith(LOCAL_DIR):
        if use_ema:
            raise ConfigError(f"'{source}': an exported folder holds one set of weights (its card says which); "
                              f"evaluate it without use_ema")
        model, classes = _local_dir_model(name, source[len(LOCAL_DIR):])
    elif source.startswith("timm:"):
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
        _, ck = load_checkpoint(name, source, trust, trust_flag)
        classes = ck["classes"]
        model = _timm_model(ck["arch"], num_classes=len(classes))
        _load_weights(model, checkpoint_weights(ck, use_ema, name, source), f"model '{name}': checkpoint '{source}'")
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
