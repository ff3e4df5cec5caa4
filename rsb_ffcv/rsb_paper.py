"""What the RSB paper published, as data the report compares runs with: Table 1's ingredients in this project's
config keys, and the accuracies of the paper and of timm's released weights, each with its source.

Sources: Wightman, Touvron, Jégou, "ResNet strikes back: An improved training procedure in timm" (arXiv
2110.00476, 2021), Table 1 (ingredients) and its ImageNet val column; timm's results files
(results-imagenet.csv, results-imagenetv2-matched-frequency.csv, results-imagenet-real.csv) for the released
resnet50.a1_in1k / a2_in1k / a3_in1k weights, evaluated at 224 px, crop 0.95.
"""
from __future__ import annotations

PAPER = "RSB paper (arXiv 2110.00476), Table 1"
TIMM = "timm results files, released weights, 224 px, crop 0.95"

# Table 1, in config keys. Ingredients every recipe shares come first.
_SHARED = {
    "model.arch": "resnet50", "training.batch_size": 2048, "optim.opt": "lamb", "lr.warmup_epochs": 5,
    "training.loss": "bce", "training.bce_target_thresh": 0.2, "augment.cutmix_alpha": 1.0, "augment.mixup_prob": 1.0,
    "augment.mixup_switch_prob": 0.5, "training.ema": False, "resolution.test": 224, "resolution.test_crop_ratio": 0.95,
}
RECIPES = {
    "A1": {**_SHARED, "training.epochs": 600, "lr.lr": 5e-3, "optim.weight_decay": 0.01,
           "training.label_smoothing": 0.1, "model.drop_path": 0.05, "training.repeated_aug": 3,
           "augment.rand_augment": "rand-m7-mstd0.5-inc1", "augment.mixup_alpha": 0.2, "resolution.train": 224},
    "A2": {**_SHARED, "training.epochs": 300, "lr.lr": 5e-3, "optim.weight_decay": 0.02,
           "training.label_smoothing": 0.0, "model.drop_path": 0.05, "training.repeated_aug": 3,
           "augment.rand_augment": "rand-m7-mstd0.5-inc1", "augment.mixup_alpha": 0.1, "resolution.train": 224},
    "A3": {**_SHARED, "training.epochs": 100, "lr.lr": 8e-3, "optim.weight_decay": 0.02,
           "training.label_smoothing": 0.0, "model.drop_path": 0.0, "training.repeated_aug": 0,
           "augment.rand_augment": "rand-m6-mstd0.5-inc1", "augment.mixup_alpha": 0.1, "resolution.train": 160},
}
# The ingredients table's rows: (label, config key); keys absent from RECIPES are shown without a paper value.
INGREDIENTS = [
    ("architecture", "model.arch"), ("epochs", "training.epochs"), ("global batch", "training.batch_size"),
    ("optimizer", "optim.opt"), ("learning rate", "lr.lr"), ("warmup epochs", "lr.warmup_epochs"),
    ("weight decay", "optim.weight_decay"), ("loss", "training.loss"),
    ("BCE target threshold", "training.bce_target_thresh"), ("label smoothing", "training.label_smoothing"),
    ("drop path", "model.drop_path"), ("repeated augmentation", "training.repeated_aug"),
    ("RandAugment", "augment.rand_augment"), ("Mixup α", "augment.mixup_alpha"), ("CutMix α", "augment.cutmix_alpha"),
    ("mix probability", "augment.mixup_prob"), ("CutMix switch probability", "augment.mixup_switch_prob"),
    ("EMA", "training.ema"), ("train resolution", "resolution.train"), ("test resolution", "resolution.test"),
    ("test crop ratio", "resolution.test_crop_ratio"), ("precision", "training.precision"),
]
# Published accuracies (%, ImageNet val top-1; V2 = ImageNet-V2 matched frequency; ReaL = ImageNet-ReaL).
REFERENCE_ROWS = [
    {"name": "A1, paper", "recipe": "A1", "val_top1": 80.4, "source": PAPER},
    {"name": "A2, paper", "recipe": "A2", "val_top1": 79.8, "source": PAPER},
    {"name": "A3, paper", "recipe": "A3", "val_top1": 78.1, "source": PAPER},
    {"name": "resnet50.a1_in1k (timm)", "recipe": "A1", "val_top1": 80.38, "v2_top1": 68.47, "real_top1": 85.71,
     "source": TIMM},
    {"name": "resnet50.a2_in1k (timm)", "recipe": "A2", "val_top1": 79.83, "v2_top1": 67.81, "real_top1": 85.45,
     "source": TIMM},
    {"name": "resnet50.a3_in1k (timm)", "recipe": "A3", "val_top1": 78.05, "v2_top1": 65.67, "real_top1": 84.48,
     "source": TIMM},
]


def closest_recipe(cfg: dict) -> tuple[str, list[str]]:
    """The paper recipe a config differs from least, and the keys where it differs."""
    diffs = {name: [k for k, v in want.items() if cfg.get(k) != v] for name, want in RECIPES.items()}
    name = min(diffs, key=lambda n: (len(diffs[n]), n))
    return name, diffs[name]
