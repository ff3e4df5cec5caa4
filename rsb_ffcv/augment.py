"""Batch transforms on the device, between the loader and the model.

uint8 N×3×H×W (channels-last) → RandAugment (optional) → float, ImageNet normalisation → Mixup/CutMix
(timm's `Mixup`, whose soft targets include label smoothing). The output keeps the memory format.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp


class TimmPILRandAugment(torch.nn.Module):
    """timm's own RandAugment, image by image through PIL on the CPU.

    Exactly timm's semantics (it is timm's code), but per image and slow: the reference the batched
    device implementation is proven against, and the trainer's RandAugment until that one lands.
    Randomness comes from Python's `random` module, as in timm.
    """

    def __init__(self, config_str: str, interpolation: str = "bicubic"):
        super().__init__()
        fill = tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)  # (124, 116, 104), as timm
        self.transform = rand_augment_transform(config_str, {"img_mean": fill,
                                                             "interpolation": str_to_pil_interp(interpolation)})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([np.asarray(self.transform(Image.fromarray(im))) for im in hwc])
        result = torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device, non_blocking=True)
        return result.contiguous(memory_format=torch.channels_last) \
            if images.is_contiguous(memory_format=torch.channels_last) else result.contiguous()


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
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.0):
        super().__init__()
        self.rand_augment = TimmPILRandAugment(rand_augment, interpolation) if rand_augment else None
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
