"""The recipe's components, built from timm: model, optimizer, LR schedule, loss, precision.

Device-specific choices (autocast dtype, GradScaler, compile) are decided here once, from the device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import timm
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .config import ConfigError


def build_model(arch: str, num_classes: int, drop_path: float, channels_last: bool, device) -> torch.nn.Module:
    try:
        model = timm.create_model(arch, num_classes=num_classes, drop_path_rate=drop_path)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.arch: {e}") from None
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_optimizer(model, opt: str, lr: float, weight_decay: float, momentum: float):
    """timm's factory: no weight decay on biases and 1-D (norm) parameters; LAMB clips the global
    grad norm to 1.0 and applies its trust ratio only where weight decay is non-zero."""
    kwargs = {"momentum": momentum} if opt == "sgd" else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float, warmup_lr: float,
                    min_lr: float, cooldown_epochs: int = 0):
    """timm's cosine schedule with linear warmup, stepped per optimizer update (step_update(t))."""
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
        min_lr=min_lr, cooldown_epochs=cooldown_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler, total_epochs


def build_loss(kind: str, mixup_active: bool, label_smoothing: float, bce_target_thresh: float):
    """As timm's train.py: with Mixup/CutMix the smoothing lives in the soft targets."""
    thresh = bce_target_thresh if bce_target_thresh > 0 else None
    if kind == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else label_smoothing, target_threshold=thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else torch.nn.CrossEntropyLoss()


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    device_type: str

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def choose_precision(requested: str, device: torch.device) -> Precision:
    if device.type == "cuda":
        name = requested if requested != "auto" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    else:
        name = "fp32" if requested == "auto" else requested
    return Precision(name, device.type)


def maybe_compile(model, enabled: bool, device: torch.device, log=print):
    if not enabled:
        return model
    if device.type != "cuda":
        log("note: model.compile skipped on CPU (compile targets the CUDA path)")
        return model
    return torch.compile(model)
