"""The recipe's components, built from timm: model, EMA, optimizer, LR schedule, loss, precision, device
augmentation; and `Recipe.train_step`, the one optimizer step (micro-batches, DDP's gradient sync on the last
one, GradScaler, clipping, EMA, the per-update rate) that the trainer, the benchmarks and the GPU check run.

Device-specific choices (autocast dtype, GradScaler, compile) are decided here once, from the device.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
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


@dataclass
class Recipe:
    """The built recipe of one process. `train_model` is what runs forward (DDP-wrapped and/or compiled);
    `model` the plain module whose state is saved, evaluated and averaged by the EMA."""
    model: torch.nn.Module
    ema: object  # timm ModelEmaV3 or None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: object
    total_epochs: int  # with cooldown
    step_unit: str  # epoch | update
    ddp: torch.nn.parallel.DistributedDataParallel | None
    train_model: torch.nn.Module
    augment: torch.nn.Module  # TrainAugment
    loss_fn: object
    precision: Precision
    accum: int
    clip_grad: float
    rebuild_buckets: bool = False  # set on resume: the first step settles DDP's buckets first

    def set_lr(self, epoch: int, step: int) -> None:
        """The rate at the start of `epoch` (step_unit=epoch, timm 2021) or of update `step` (update)."""
        if self.step_unit == "epoch":
            self.scheduler.step(epoch)
        else:
            self.scheduler.step_update(num_updates=step)

    def train_step(self, batches, step: int, augment=None) -> torch.Tensor:
        """Optimizer step `step` (counted from 0) on the next `accum` micro-batches of the iterator `batches`, taken
        one at a time (FFCV reuses its buffers): device augmentation (`augment`, default the recipe's), forward
        under autocast, scaled backward (DDP all-reduces the gradients on the last micro-batch only), then clip,
        GradScaler step, EMA and, per update, the next rate. Returns the mean micro-batch loss (not synced)."""
        augment = augment or self.augment
        loss_sum = 0.0
        for k in range(self.accum):
            images, labels = next(batches)
            x, y = augment(images, labels)
            if self.rebuild_buckets:
                self.settle_ddp_buckets(x, y)
            with self.ddp.no_sync() if self.ddp is not None and k < self.accum - 1 else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.loss_fn(self.train_model(x), y)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum = loss_sum + loss.detach()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        if self.step_unit == "update":
            self.scheduler.step_update(num_updates=step + 1)
        return loss_sum / self.accum

    def settle_ddp_buckets(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Give a resumed run's fresh DDP the gradient buckets the uninterrupted run had at this step.

        DDP puts every parameter into one bucket for its first backward and rebuilds its buckets in the order the
        gradients became ready after it (torch/nn/parallel/distributed.py, `compute_bucket_size_limits`). At 3 or
        more ranks the all-reduce's float sums depend on where a gradient sits in its bucket (a ring sums each
        chunk in another rank order), so the first update after a resume differed from the uninterrupted run's
        in the 7th digit. This runs that first backward on the step's own micro-batch, same shapes and graph as a
        training step, and leaves nothing behind: gradients dropped, random state forked, BatchNorm buffers
        restored. Costs one forward/backward per resume."""
        self.rebuild_buckets = False
        if self.ddp is None:
            return
        buffers = [b.detach().clone() for b in self.model.buffers()]
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with self.precision.autocast():
                loss = self.loss_fn(self.train_model(x), y)
            (loss * 0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)

    def reduce_batchnorm(self, world: int, mode: str) -> None:
        """Make the BatchNorm running statistics of every rank equal (timm's --dist-bn with its distribute_bn:
        reduce = average, broadcast = rank 0's), so that every rank evaluates, and a checkpoint holds, one model."""
        if world == 1 or mode == "none":
            return
        from timm.utils import distribute_bn
        for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
            distribute_bn(model, world, reduce=mode == "reduce")

    def weights_finite(self) -> bool:
        return bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all())  # one device sync

    def checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: the weights, the optimizer's moments (LAMB/AdamW: 2 per weight, SGD
        with momentum: 1) and the EMA's copy."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        moments = 1 if isinstance(self.optimizer, torch.optim.SGD) else 2
        return weights * (1 + moments + (self.ema is not None))


def build_recipe(cfg: dict, d, num_classes: int, steps_per_epoch: int, accum: int, loss_hook=None) -> Recipe:
    """Everything of the trainer's config but the data, for process d.rank: the weights from training.seed (the
    same on every rank), then torch/numpy/random seeded with seed + rank (augmentation differs per rank).
    `loss_hook(loss_fn)`: a wrapper of the loss (the tests' NaN hook)."""
    from .augment import TrainAugment
    torch.manual_seed(cfg["training.seed"])
    configure_backends(d.device)
    precision = choose_precision(cfg["training.precision"], d.device)
    model = build_model(cfg["model.arch"], num_classes, cfg["model.drop_path"], cfg["model.channels_last"], d.device)
    ema = None
    if cfg["training.ema"]:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg["training.ema_decay"])
    optimizer = build_optimizer(model, cfg["optim.opt"], cfg["lr.lr"], cfg["optim.weight_decay"],
                                cfg["optim.momentum"])
    ddp = None
    if d.world > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg["augment.rand_augment_compile"] and cfg["augment.rand_augment_batching"] != "masked":
        raise ConfigError("augment.rand_augment_compile=true needs augment.rand_augment_batching=masked (grouped "
                          "reads its group sizes on the host: there is no one graph to compile)")
    augment = TrainAugment(num_classes, cfg["augment.rand_augment"], cfg["augment.interpolation"],
                           cfg["augment.mixup_alpha"], cfg["augment.cutmix_alpha"], cfg["augment.mixup_prob"],
                           cfg["augment.mixup_switch_prob"], cfg["augment.mixup_mode"],
                           cfg["training.label_smoothing"], cfg["augment.rand_augment_batching"],
                           cfg["augment.rand_augment_compile"]).to(d.device)
    loss_fn = build_loss(cfg["training.loss"], augment.mixup_active, cfg["training.label_smoothing"],
                         cfg["training.bce_target_thresh"])
    scheduler, total_epochs = build_scheduler(
        optimizer, cfg["training.epochs"], steps_per_epoch, cfg["lr.warmup_epochs"], cfg["lr.warmup_lr"],
        cfg["lr.min_lr"], cfg["lr.cooldown_epochs"], cfg["lr.step_unit"])
    seed = cfg["training.seed"] + d.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return Recipe(model, ema, optimizer, precision.grad_scaler(), scheduler, total_epochs, cfg["lr.step_unit"], ddp,
                  compile_model(ddp or model, cfg["model.compile"]), augment,
                  loss_hook(loss_fn) if loss_hook else loss_fn, precision, accum, cfg["optim.clip_grad"])
