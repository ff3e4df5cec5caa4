"""RandAugment throughput: `python -m rsb_ffcv.bench augment [--bench_augment.batch=256] [--bench_augment.sizes=160,224]`.

Batched rsb_ffcv RandAugment (and the whole device transform: RandAugment + normalisation + Mixup/CutMix)
on the available device vs timm's PIL RandAugment image by image on one CPU core, on the same
ImageNet-like images, in one run. Prints and saves JSON (device, cores, versions, images/s, ratios) and
a bar chart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastargs import Param, Section
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from ..augment import TrainAugment
from ..config import ConfigError, load_config
from ..randaugment import FILL, RandAugment
from .common import describe, machine, pick_device, save, timed
from .corpus import make_photo

Section("bench_augment", "the RandAugment benchmark").params(
    config=Param(str, "timm RandAugment string", default="rand-m6-mstd0.5-inc1"),
    sizes=Param(str, "comma-separated image sizes", default="160,224"),
    batch=Param(int, "batch size", default=256),
    timm_images=Param(int, "images timed through timm's PIL path", default=64),
)
SECTIONS = ("bench", "bench_augment")


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
        t_ours = timed(lambda: ra(xd.clone(), generator=gen), device)
        t_full = timed(lambda: full(xd.clone(), labels), device)
        tf = rand_augment_transform(config, {"img_mean": FILL, "interpolation": str_to_pil_interp("bicubic")})
        pil = [Image.fromarray(im) for im in x[:timm_images].permute(0, 2, 3, 1).numpy()]
        t_timm = timed(lambda: [tf(im) for im in pil], torch.device("cpu"), warmup=0) / len(pil)
        row = {"size": size, "batch": batch, "ours_images_per_s": batch / t_ours,
               "ours_full_device_transform_images_per_s": batch / t_full,
               "timm_pil_one_core_images_per_s": 1 / t_timm, "ratio_ours_vs_timm_one_core": t_timm * batch / t_ours}
        rows.append(row)
        print(f"{size}px: ours {row['ours_images_per_s']:,.0f} img/s (with normalise+mixup "
              f"{row['ours_full_device_transform_images_per_s']:,.0f}), timm PIL {row['timm_pil_one_core_images_per_s']:,.0f} "
              f"img/s on one core: {row['ratio_ours_vs_timm_one_core']:.1f}x")
    return rows


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench augment", description=__doc__)
    try:
        sizes = [int(v) for v in cfg["bench_augment.sizes"].split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"bench_augment.sizes '{cfg['bench_augment.sizes']}': expected sizes like 160,224") from None
    config, batch = cfg["bench_augment.config"], cfg["bench_augment.batch"]
    device = pick_device(cfg["bench.device"])
    info = machine(device)
    print(f"device: {describe(info)}, torch threads {torch.get_num_threads()}")
    rows = run(config, sizes, batch, device, cfg["bench_augment.timm_images"])
    result = {"benchmark": "augment", "config": config, "machine": info, "results": rows}
    bars = {}
    for r in rows:
        bars[f"{r['size']}px rsb_ffcv batched"] = r["ours_images_per_s"]
        bars[f"{r['size']}px + normalise + Mixup/CutMix"] = r["ours_full_device_transform_images_per_s"]
        bars[f"{r['size']}px timm PIL, 1 core"] = r["timm_pil_one_core_images_per_s"]
    save(result, Path(cfg["bench.out_dir"]) / "augment.json", bars,
         f"RandAugment {config}, batch {batch} ({describe(info)})", log_scale=True)
    return result

