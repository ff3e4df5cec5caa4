"""Batch transforms on the device, between the loader and the model.

uint8 N×3×H×W (channels-last) → RandAugment (optional, batched, per image: rsb_ffcv.randaugment) → float,
ImageNet normalisation → Mixup/CutMix
(timm's `Mixup`, whose soft targets include label smoothing). The output keeps the memory format.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup

from .randaugment import RandAugment


class Normalize(torch.nn.Module):
    """uint8 → float, (x/255 − mean) / std, in one fused multiply-add; keeps the memory format."""

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)


class TrainAugment(torch.nn.Module):
    """The training batch transforms; returns (images, targets) where targets are soft when mixing."""

    def __init__(self, num_classes: int, rand_augment: str = "", interpolation: str = "bicubic",
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mixup_prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.0,
                 rand_augment_batching: str = "grouped", rand_augment_compile: bool = False):
        super().__init__()
        self.rand_augment = RandAugment(rand_augment, interpolation, batching=rand_augment_batching,
                                        compile=rand_augment_compile) if rand_augment else None
        self.normalize = Normalize()
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    @property
    def mixup_active(self) -> bool:
        return self.mixup is not None

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.rand_augment is not None:
            images = self.rand_augment(images)
        x = self.normalize(images)
        if self.mixup is not None:
            x, labels = self.mixup(x, labels)
        return x, labels
