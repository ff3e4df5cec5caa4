"""RSB as timm's train.py ran it in 2021 (v0.4.12 / v0.5.4): the rows of the README's Fidelity table that no
other test file covers, computed from timm's own classes where timm still has them."""
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_args
from timm.data import Mixup
from timm.data.mixup import FastCollateMixup
from timm.scheduler import CosineLRScheduler

from rsb_ffcv import distributed, recipe, rsb_paper, train
from rsb_ffcv.augment import Normalize, TrainAugment
from rsb_ffcv.config import load_config
from rsb_ffcv.train_config import SECTIONS

RECIPES = {name.lower(): (r["training.epochs"], r["lr.lr"]) for name, r in rsb_paper.RECIPES.items()}


def timm_2021_epoch_lrs(lr, epochs, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6, cooldown=0):
    """The rate of every epoch as train.py v0.5.4 stepped timm's scheduler: create_scheduler builds
    CosineLRScheduler(t_initial=epochs, t_in_epochs=True default, cycle_limit=1) and runs epochs + cooldown
    epochs; step_update() is a no-op; step(epoch + 1) after each epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
                              cycle_limit=1, t_in_epochs=True)
    lrs = []
    for epoch in range(epochs + cooldown):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(num_updates=(epoch + 1) * 100)  # what train.py called every update: nothing happens
        sched.step(epoch + 1)
    return lrs


def closed_form(lr, epochs, e, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6):
    if e < warmup_epochs:
        return warmup_lr + e * (lr - warmup_lr) / warmup_epochs
    if e >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * e / epochs))


def recipe_trainer(name, demo, tmp_path, *extra):
    argv = ["--config", str(ROOT / "rsb_configs" / f"{name}.yaml"), f"--data.train_dataset={demo}/train.beton",
            f"--data.val_dataset={demo}/val.beton", f"--logging.run_dir={tmp_path}/{name}",
            "--logging.wandb_mode=disabled", "--training.batch_size=32", "--training.max_device_batch=8",
            "--data.num_workers=1", "--model.arch=resnet10t", *extra]
    return train.Trainer(load_config(SECTIONS, argv), distributed.init("cpu"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_lr_per_epoch_is_timms_2021_schedule(name, demo_betons, tmp_path):
    """Every epoch of every recipe, on every parameter group (with and without weight decay), as the
    trainer sets it at the start of the epoch, also when it starts there (a resume: timm's
    step(start_epoch))."""
    epochs, lr = RECIPES[name]
    t = recipe_trainer(name, demo_betons, tmp_path)
    want = timm_2021_epoch_lrs(lr, epochs)
    assert t.recipe.total_epochs == epochs and len(want) == epochs
    got = []
    for e in range(epochs):
        t.recipe.set_lr(e, step=0)
        got.append({g["lr"] for g in t.recipe.optimizer.param_groups})
    assert all(len(g) == 1 for g in got) and [g.pop() for g in got] == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx([closed_form(lr, epochs, e) for e in range(epochs)], rel=1e-12)
    assert want[0] == 1e-4  # epoch 0 entirely at warmup_lr
    assert max(want) < lr  # warmup inside the cosine (warmup_prefix=False): the peak rate is never run
    resumed = recipe.build_recipe(t.cfg, t.d, len(t.data.classes), t.data.steps_per_epoch, t.data.accum)  # starts there
    resumed.set_lr(epochs // 3, step=0)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(want[epochs // 3], rel=1e-12)
    t.tracker.finish()


def test_cooldown_is_one_key_and_runs_at_min_lr(demo_betons, tmp_path):
    t = recipe_trainer("a3", demo_betons, tmp_path, "--lr.cooldown_epochs=10")
    want = timm_2021_epoch_lrs(0.008, 100, cooldown=10)
    assert t.recipe.total_epochs == 110 and want[100:] == [1e-6] * 10
    for e in (0, 50, 99, 100, 109):
        t.recipe.set_lr(e, step=0)
        assert t.recipe.optimizer.param_groups[0]["lr"] == pytest.approx(want[e], rel=1e-12)
    t.tracker.finish()


def test_a_training_run_uses_one_rate_per_epoch(demo_betons, tmp_path):
    """The rate logged at every step of a real run (4 epochs x 3 steps, warmup 1 epoch) is timm's for
    that step's epoch."""
    from conftest import step_lrs
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(demo_betons, run_dir, "--training.epochs=4", "--lr.lr=0.008", "--lr.warmup_epochs=1",
                                "--logging.wandb_mode=disabled")) == 0
    want = timm_2021_epoch_lrs(0.008, 4, warmup_epochs=1)
    steps = step_lrs(run_dir)
    assert sorted(steps) == list(range(1, 13))
    for step, rate in steps.items():
        assert rate == pytest.approx(want[(step - 1) // 3], rel=1e-12), step


def test_bce_target_threshold_binarises_the_mixed_targets():
    """timm's BinaryCrossEntropy (2021 and now): targets > thresh become 1, the rest 0; mean over B x C."""
    loss = recipe.build_loss("bce", mixup_active=True, label_smoothing=0.1, bce_target_thresh=0.2)
    assert loss.smoothing == 0.0  # with Mixup the smoothing is in the soft targets, as timm's train.py
    logits, soft = torch.randn(8, 10), torch.rand(8, 10) * 0.5
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, (soft > 0.2).float())
    assert loss(logits, soft) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_on_the_device_equals_timms_collate_mixing_but_for_rounding(mode):
    """timm 2021 mixed uint8 batches in the loader (FastCollateMixup: float mix, rounded to uint8) before
    normalising; we mix the normalised float batch on the device (timm's Mixup). Same decisions, lambda, boxes
    and targets from the same numpy draws; pixels differ only by that rounding (< 0.5 level)."""
    kw = dict(mixup_alpha=0.2 if mode == "mixup" else 0.0, cutmix_alpha=1.0 if mode == "cutmix" else 0.0,
              prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1, num_classes=10)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    labels = torch.tensor(rng.integers(0, 10, 8))
    np.random.seed(3)
    collated, timm_targets = FastCollateMixup(**kw)([(im, int(y)) for im, y in zip(images, labels)])
    np.random.seed(3)
    ours, targets = Mixup(**kw)(Normalize()(torch.from_numpy(images)), labels.clone())
    theirs = Normalize()(collated)
    assert torch.allclose(targets, timm_targets)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    diff = ((ours - theirs).abs() * std * 255).max()  # in uint8 levels
    assert diff <= 0.5 + 1e-4 and (diff == 0) == (mode == "cutmix"), float(diff)


def test_train_transforms_are_rsbs_and_nothing_else():
    """RSB (Table 1): RandAugment, Mixup + CutMix, no random erasing, no colour jitter (timm drops it when
    RandAugment is on), no EMA. Our device transforms: RandAugment, normalise, Mixup/CutMix."""
    aug = TrainAugment(1000, "rand-m7-mstd0.5-inc1", "bicubic", 0.2, 1.0, label_smoothing=0.1)
    assert [name for name, _ in aug.named_children()] == ["rand_augment", "normalize"]
    assert aug.mixup is not None and aug.mixup_active
    for name in RECIPES:
        cfg = load_config(SECTIONS, ["--config", str(ROOT / "rsb_configs" / f"{name}.yaml")],
                          defaults={"data.train_dataset": "x.beton", "data.val_dataset": "y.beton"})
        assert cfg["training.ema"] is False and cfg["training.dist_bn"] == "reduce"
        assert (cfg["lr.step_unit"], cfg["lr.cooldown_epochs"]) == ("epoch", 0)
        assert (cfg["data.train_interpolation"], cfg["augment.interpolation"]) == ("bicubic", "bicubic")
        assert cfg["training.max_device_batch"] == 512  # RSB's per-GPU batch: 2048 on 4 GPUs


def test_auto_precision_is_bf16_where_supported_else_fp16_with_loss_scaling(monkeypatch):
    """timm 2021 ran --amp: fp16 autocast + loss scaling (V100s have no bf16). We pick bf16 where the GPU
    has it (the same range as fp32: no loss scaling) and fp16 + GradScaler otherwise."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert recipe.choose_precision("auto", cuda).name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert recipe.choose_precision("auto", cuda).name == "fp16"
    assert recipe.choose_precision("fp16", torch.device("cpu")).grad_scaler().is_enabled()  # loss scaling on
    assert not recipe.choose_precision("bf16", torch.device("cpu")).grad_scaler().is_enabled()
