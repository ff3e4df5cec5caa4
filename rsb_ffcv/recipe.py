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
                    min_lr: float, cooldown_epochs: int = 0, step_unit: str = "epoch"):
    """timm's cosine schedule with linear warmup (warmup inside `epochs`, then `cooldown_epochs` at min_lr).

    step_unit=epoch: timm's CosineLRScheduler(t_in_epochs=True) as train.py ran it in 2021 (v0.4.12 and
    v0.5.4): the rate changes once per epoch, epoch 0 runs at warmup_lr; the trainer calls step(epoch) at
    the start of every epoch, which gives the rates train.py's step(epoch + 1) at epoch ends and
    step(start_epoch) on resume gave. step_unit=update: per optimizer update (timm's --sched-on-updates,
    2022-10 on); the trainer calls step_update(t) after update t. Returns (scheduler, total epochs)."""
    by_epoch = step_unit == "epoch"
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
        min_lr=min_lr, cooldown_epochs=cooldown_epochs, step_on_epochs=by_epoch,
        updates_per_epoch=0 if by_epoch else steps_per_epoch)
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


def configure_backends(device: torch.device) -> None:
    """Per-device switches, decided once: cuDNN picks the fastest convolution algorithms for the fixed
    training shapes (timm's and ffcv-imagenet's train scripts do the same)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile on any device (inductor: Triton on GPUs, C++ via the system compiler on CPUs). Compile
    the DDP-wrapped module, so that compiled graphs break at DDP's bucket boundaries (PyTorch's advice)."""
    return torch.compile(model) if enabled else model
