"""RandAugment throughput: `python -m rsb_ffcv.bench.augment [--batch 256] [--sizes 160 224]`.

Batched rsb_ffcv RandAugment (and the whole device transform: RandAugment + normalisation + Mixup/CutMix)
vs timm's PIL RandAugment image by image, on the same ImageNet-like images, in one run. Prints and saves
JSON (device name, cores, versions, images/s, ratios), plus a bar chart when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from ..augment import TrainAugment
from ..datasets.images import available_cpus
from ..randaugment import FILL, RandAugment
from .corpus import make_photo


def _time(fn, device, min_seconds=2.0, warmup=1):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= min_seconds:
            return (time.perf_counter() - t0) / n


def batch_of(size: int, n: int) -> torch.Tensor:
    imgs = [np.asarray(make_photo(np.random.default_rng([7, i])).resize((size, size), Image.BILINEAR))
            for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def run(config: str, sizes, batch: int, device: torch.device, timm_images: int) -> dict:
    rows = []
    for size in sizes:
        x = batch_of(size, batch)
        xd = x.to(device)
        ra = RandAugment(config, interpolation="bicubic")
        full = TrainAugment(1000, config, "bicubic", 0.1, 1.0).to(device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        t_ours = _time(lambda: ra(xd.clone(), generator=gen), device)
        t_full = _time(lambda: full(xd.clone(), labels), device)
        tf = rand_augment_transform(config, {"img_mean": FILL, "interpolation": str_to_pil_interp("bicubic")})
        pil = [Image.fromarray(im) for im in x[:timm_images].permute(0, 2, 3, 1).numpy()]
        t_timm = _time(lambda: [tf(im) for im in pil], torch.device("cpu"), warmup=0) / len(pil)
        row = {"size": size, "batch": batch, "ours_images_per_s": batch / t_ours,
               "ours_full_device_transform_images_per_s": batch / t_full,
               "timm_pil_one_core_images_per_s": 1 / t_timm, "ratio_ours_vs_timm_one_core": t_timm * batch / t_ours}
        rows.append(row)
        print(f"{size}px: ours {row['ours_images_per_s']:,.0f} img/s (with normalise+mixup "
              f"{row['ours_full_device_transform_images_per_s']:,.0f}), timm PIL {row['timm_pil_one_core_images_per_s']:,.0f} "
              f"img/s on one core: {row['ratio_ours_vs_timm_one_core']:.1f}x")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="rand-m6-mstd0.5-inc1")
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--timm-images", type=int, default=64, help="images timed through timm's PIL path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench_out/augment.json")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({available_cpus()} cores)"
    print(f"device: {name}, torch threads {torch.get_num_threads()}")
    rows = run(a.config, a.sizes, a.batch, device, a.timm_images)
    result = {"benchmark": "augment", "config": a.config, "device": name, "machine": platform.machine(),
              "cores": available_cpus(), "torch": torch.__version__, "results": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['size']}px" for r in rows]
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, [r["ours_images_per_s"] for r in rows], 0.4, label=f"rsb_ffcv batched ({name})")
        ax.bar(xs + 0.2, [r["timm_pil_one_core_images_per_s"] for r in rows], 0.4, label="timm PIL, 1 core")
        ax.set_xticks(xs, labels)
        ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title(f"RandAugment {a.config}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"saved {out}")


if __name__ == "__main__":
    main()
