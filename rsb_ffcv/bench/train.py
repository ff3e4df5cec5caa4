"""End-to-end training throughput and data stall: `python -m rsb_ffcv.bench train [--config rsb_configs/a3.yaml]`.

The trainer's own step (device RandAugment + normalise + Mixup/CutMix, forward/backward under the
configured precision, optimizer) runs `--steps` times fed by the trainer's FFCV loader from a beton of the
ImageNet-shaped corpus, then `--steps` times on one device-resident batch of the same shape (synthetic:
no loading at all). data-stall fraction = 1 - real / synthetic. GPU when present; on a CPU the default is a
small model at a lower resolution (a ResNet-50 step takes seconds there).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .. import distributed, loaders, train_config
from ..config import load_config
from ..datasets.sources import image_folder
from ..datasets.writer import WriteOptions, write_beton
from ..train import Trainer
from .common import describe, machine, save, sync
from .corpus import generate


def run_steps(trainer: Trainer, batches, steps: int) -> float:
    """images/s over `steps` optimizer steps drawn from the iterator `batches` (after 3 warm-up steps)."""
    device = trainer.device
    n = 0
    for i in range(steps + 3):
        if i == 3:
            sync(device)
            t0 = time.perf_counter()
        images, labels = next(batches)
        trainer.forward_backward(images, labels)
        trainer.optimizer_step()
        n += len(images) if i >= 3 else 0
    sync(device)
    return n / (time.perf_counter() - t0)


def real_batches(trainer: Trainer):
    while True:  # epochs back to back, as in training
        yield from loaders.epoch(trainer.train_loader, trainer.compute_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="rsb_configs/a3.yaml")
    ap.add_argument("--n", type=int, default=2000, help="corpus images (more than steps x batch is not needed)")
    ap.add_argument("--corpus", default="bench_out/corpus")
    ap.add_argument("--arch", default="", help="default: the config's on a GPU, resnet18 on a CPU")
    ap.add_argument("--res", type=int, default=0, help="default: the config's train resolution (112 on a CPU)")
    ap.add_argument("--batch", type=int, default=0, help="per-device batch; default 256 on a GPU, 32 on a CPU")
    ap.add_argument("--steps", type=int, default=0, help="timed steps; default 50 on a GPU, 8 on a CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="extra trainer overrides")
    ap.add_argument("--out", default="bench_out/train.json")
    a = ap.parse_args(argv)
    d = distributed.init(a.device)
    gpu = d.device.type == "cuda"
    info = machine(d.device)
    corpus = generate(a.corpus, a.n)
    beton = Path(a.corpus).parent / f"corpus_{a.n}_proportion.beton"  # ffcv-imagenet's beton settings
    if not beton.exists():
        write_beton(image_folder(a.corpus), beton, WriteOptions(num_workers=info["cores"]))
    batch, steps = a.batch or (256 if gpu else 32), a.steps or (50 if gpu else 8)
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["--config", a.config, f"--data.train_dataset={beton}", f"--data.val_dataset={beton}",
                     f"--training.batch_size={batch}", "--training.max_device_batch=0",
                     "--logging.wandb_mode=disabled", f"--logging.run_dir={run_dir}", "--resolution.progressive_start=0"]
        if a.arch or not gpu:
            overrides.append(f"--model.arch={a.arch or 'resnet18'}")
        if a.res or not gpu:
            overrides.append(f"--resolution.train={a.res or 112}")
        cfg = load_config(train_config.SECTIONS, [*overrides, *(f"--{s}" for s in a.set)], prog="bench train")
        trainer = Trainer(cfg, d)
        trainer.train_model.train()
        res = cfg["resolution.train"]
        print(f"{describe(info)}: {cfg['model.arch']} at {res} px, batch {batch}, {trainer.precision.name}, "
              f"channels_last={cfg['model.channels_last']}, compile={cfg['model.compile']}, {steps} steps")
        if gpu:
            torch.cuda.reset_peak_memory_stats(d.device)
        real_it = real_batches(trainer)
        fixed = tuple(t.clone() for t in next(real_it))  # FFCV reuses its buffers: keep a copy
        synthetic = run_steps(trainer, iter(lambda: fixed, None), steps)
        real = run_steps(trainer, real_it, steps)
        synthetic2 = run_steps(trainer, iter(lambda: fixed, None), steps)  # bracket real: machines drift
        trainer.tracker.finish(0)
    synthetic = max(synthetic, synthetic2)
    stall = max(0.0, 1 - real / synthetic)
    figures = {"real_images_per_s": real, "synthetic_images_per_s": synthetic, "data_stall_fraction": stall}
    if gpu:
        figures["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    print(f"from betons {real:,.0f} img/s, synthetic {synthetic:,.0f} img/s, data stall {100 * stall:.1f}%")
    result = {"benchmark": "train", "machine": info,
              "settings": {"config": a.config, "arch": cfg["model.arch"], "resolution": res, "batch": batch,
                           "steps": steps, "precision": trainer.precision.name, "compile": cfg["model.compile"],
                           "channels_last": cfg["model.channels_last"], "rand_augment": cfg["augment.rand_augment"],
                           "decoder": cfg["data.decoder"], "loader_workers": cfg["data.num_workers"] or
                           trainer.compute_threads, "corpus": corpus},
              **figures}
    save(result, a.out, {"from betons (FFCV)": real, "synthetic device batches": synthetic},
         f"Training {cfg['model.arch']} at {res} px, batch {batch} ({describe(info)}): "
         f"data stall {100 * stall:.1f}%")
    distributed.shutdown()
    return result


if __name__ == "__main__":
    main()
