"""End-to-end training throughput and data stall: `python -m rsb_ffcv.bench train [--bench_train.config=rsb_configs/a3.yaml]`.

The trainer's own step (device RandAugment + normalise + Mixup/CutMix, forward/backward under the configured
precision, optimizer) runs fed by the trainer's FFCV loader from a beton of the ImageNet-shaped corpus (real),
and on one device-resident batch of the same shape (synthetic: no loading at all), in the order model step,
synthetic, real, synthetic, model step (the faster of each pair counts: machines drift). The model step alone
is forward/backward/optimizer on one batch augmented beforehand: what the device augmentation costs is the gap
to synthetic. Timing happens inside epochs: each epoch's first 3 batches (the loader starting up) run untimed,
as they are a one-off per epoch that a 1.28M-image ImageNet epoch amortises. data stall = (synthetic rate -
real rate) / synthetic rate; data wait = the share of the timed real steps the main thread spent waiting for
the next batch. GPU when present; on a CPU the default is a small model at a lower resolution (a ResNet-50
step takes seconds there).
"""
from __future__ import annotations

import contextlib
import math
import shlex
import tempfile
import time
from pathlib import Path

import torch
from fastargs import Param, Section

from .. import distributed, train_config
from ..config import ConfigError, load_config
from ..tracking import StepMeter
from ..train import Trainer
from .common import describe, machine, save, sync
from .corpus import corpus_beton, generate

WARMUP_BATCHES = 3
Section("bench_train", "the end-to-end training benchmark").params(
    config=Param(str, "trainer YAML", default="rsb_configs/a3.yaml"),
    arch=Param(str, "model ('' = the config's on a GPU, resnet18 on a CPU)", default=""),
    res=Param(int, "training resolution (0 = the config's on a GPU, 112 on a CPU)", default=0),
    batch=Param(int, "per-device batch (0 = 256 on a GPU, 32 on a CPU)", default=0),
    accum=Param(int, "micro-batches per optimizer step (A1/A2 on one GPU: 3 or more, for repeated augmentation)",
                default=1),
    steps=Param(int, "timed micro-batches per measurement, rounded up to whole optimizer steps (0 = 50 on a GPU, "
                     "8 on a CPU)", default=0),
    trainer_args=Param(str, "more trainer overrides, space-separated --section.key=value", default=""),
    name=Param(str, "results go to bench.out_dir/NAME.json and NAME.png", default="train"),
)
SECTIONS = ("bench", "bench_train")


def timed_steps(trainer: Trainer, epochs, micro_batches: int, augment=None) -> dict:
    """The trainer's optimizer steps (Recipe.train_step: `accum` micro-batches each, `augment` or the recipe's) on
    the batches of `epochs()` (a fresh iterator per epoch) until `micro_batches` timed micro-batches are done (whole
    steps: rounded up); the clock runs only inside epochs, after each epoch's first WARMUP_BATCHES micro-batches
    (whole steps too)."""
    data, device = trainer.data, trainer.d.device
    warmup, target = math.ceil(WARMUP_BATCHES / data.accum), math.ceil(micro_batches / data.accum)
    if data.steps_per_epoch <= warmup:
        raise ConfigError(f"an epoch of {data.steps_per_epoch} steps holds no more than the {warmup} warm-up steps: "
                          f"use a larger corpus (bench.n) or a smaller batch")
    timed, seconds, wait = 0, 0.0, 0.0
    while timed < target:
        meter = StepMeter(trainer.d, 0)
        with contextlib.closing(epochs()) as it:
            batches = meter.batches(it)
            for step in range(min(data.steps_per_epoch, warmup + target - timed)):
                if step == warmup:
                    sync(device)
                    t0, meter.wait = time.perf_counter(), 0.0
                trainer.recipe.train_step(batches, step, augment)
                timed += step >= warmup
            sync(device)  # the clock stops before the loader's thread is stopped
            seconds, wait = seconds + time.perf_counter() - t0, wait + meter.wait
    images = timed * data.accum * data.micro_batch
    return {"images_per_s": images / seconds, "data_wait_fraction": wait / seconds, "steps": timed * data.accum}


def measure(trainer: Trainer, steps: int) -> dict:
    trainer.recipe.train_model.train()
    fixed = trainer.data.train.first_batch()
    n = trainer.data.steps_per_epoch * trainer.data.accum

    def synthetic_epochs():
        return (fixed for _ in range(n))

    def real_epochs():
        return trainer.data.train.epoch(0)

    augmented = trainer.recipe.augment(*fixed)  # once: the model step alone, its ceiling

    def model_step():
        return timed_steps(trainer, lambda: (augmented for _ in range(n)), steps, augment=lambda x, y: (x, y))
    model = model_step()
    synthetic = timed_steps(trainer, synthetic_epochs, steps)
    real = timed_steps(trainer, real_epochs, steps)
    synthetic2 = timed_steps(trainer, synthetic_epochs, steps)  # bracket real (and synthetic): machines drift
    model2 = model_step()
    synth_rate = max(synthetic["images_per_s"], synthetic2["images_per_s"])
    return {"real_images_per_s": real["images_per_s"], "synthetic_images_per_s": synth_rate,
            "model_step_images_per_s": max(model["images_per_s"], model2["images_per_s"]),
            "data_stall_fraction": max(0.0, (synth_rate - real["images_per_s"]) / synth_rate),
            "data_wait_fraction": real["data_wait_fraction"], "timed_steps": real["steps"]}


@contextlib.contextmanager
def bench_trainer(config: str, beton: str, device: str, batch: int, overrides=(), accum: int = 1):
    """The trainer from `config` + `overrides` on `beton`: per-device batch `batch`, `accum` micro-batches
    per step (the virtual-rank data order of `accum` GPUs), W&B off, a temporary run directory."""
    d = distributed.init(device, key="bench.device")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(train_config.SECTIONS, [
            "--config", config, f"--data.train_dataset={beton}", f"--data.val_dataset={beton}",
            f"--training.batch_size={batch * accum * d.world}", f"--training.max_device_batch={batch}",
            "--logging.wandb_mode=disabled", f"--logging.run_dir={run_dir}", "--resolution.progressive_start=0",
            *overrides], prog="bench train")
        trainer = Trainer(cfg, d)
        try:
            yield trainer
        finally:
            trainer.tracker.finish(0)


def settings_of(trainer: Trainer) -> dict:
    cfg, data = trainer.cfg, trainer.data
    return {"arch": cfg["model.arch"], "resolution": cfg["resolution.train"], "batch": data.micro_batch,
            "accumulation": data.accum, "repeated_aug": cfg["training.repeated_aug"],
            "precision": trainer.recipe.precision.name, "compile": cfg["model.compile"],
            "channels_last": cfg["model.channels_last"], "rand_augment": cfg["augment.rand_augment"],
            "rand_augment_batching": cfg["augment.rand_augment_batching"],
            "rand_augment_compile": cfg["augment.rand_augment_compile"],
            "decoder": cfg["data.decoder"], "loader_workers": data.decode_threads}


def run(config: str, beton: str, device: str, batch: int, steps: int, overrides=(), accum: int = 1) -> dict:
    """Measure the trainer built by bench_trainer: figures and settings."""
    with bench_trainer(config, beton, device, batch, overrides, accum) as trainer:
        device = trainer.d.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        figures = measure(trainer, steps)
        if device.type == "cuda":
            figures["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return {**figures, "settings": {"config": config, "steps": steps, **settings_of(trainer)}}


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench train", description=__doc__)
    device = cfg["bench.device"]
    gpu = (device == "cuda") or (device == "auto" and torch.cuda.is_available())
    info = machine(torch.device("cuda" if gpu else "cpu"))
    corpus = generate(cfg["bench.corpus"], cfg["bench.n"], workers=cfg["bench.cores"])
    beton = corpus_beton(cfg["bench.corpus"], cfg["bench.n"], "proportion", cfg["bench.cores"])  # ffcv-imagenet's
    batch = cfg["bench_train.batch"] or (256 if gpu else 32)
    steps = cfg["bench_train.steps"] or (50 if gpu else 8)
    overrides = shlex.split(cfg["bench_train.trainer_args"])
    if cfg["bench_train.arch"] or not gpu:
        overrides.append(f"--model.arch={cfg['bench_train.arch'] or 'resnet18'}")
    if cfg["bench_train.res"] or not gpu:
        overrides.append(f"--resolution.train={cfg['bench_train.res'] or 112}")
    result = run(cfg["bench_train.config"], beton, device, batch, steps, overrides, cfg["bench_train.accum"])
    s = result["settings"]
    print(f"{describe(info)}: {s['arch']} at {s['resolution']} px, batch {batch}, {s['precision']}, "
          f"channels_last={s['channels_last']}, compile={s['compile']}: from betons "
          f"{result['real_images_per_s']:,.0f} img/s, synthetic {result['synthetic_images_per_s']:,.0f} img/s, "
          f"model step alone {result['model_step_images_per_s']:,.0f} img/s, "
          f"data stall {100 * result['data_stall_fraction']:.1f}%, main-thread data wait "
          f"{100 * result['data_wait_fraction']:.1f}%")
    result = {"benchmark": "train", "machine": info, "corpus": corpus, **result}
    save(result, Path(cfg["bench.out_dir"]) / f"{cfg['bench_train.name']}.json",
         {"from betons (FFCV)": result["real_images_per_s"],
          "synthetic device batches": result["synthetic_images_per_s"],
          "model step alone": result["model_step_images_per_s"]},
         f"Training {s['arch']} at {s['resolution']} px, batch {batch} ({describe(info)}): data stall "
         f"{100 * result['data_stall_fraction']:.1f}%")
    distributed.shutdown()
    return result
