"""RandAugment throughput: `python -m rsb_ffcv.bench augment [--bench_augment.batch=256] [--bench_augment.sizes=160,224]`.

Batched rsb_ffcv RandAugment (and the whole device transform: RandAugment + normalisation + Mixup/CutMix)
on the available device vs timm's PIL RandAugment image by image on one CPU core, on the same
ImageNet-like images, in one run. Also side by side, on the same draws: the two batchings of
`RandAugment` (grouped: sorted by op, one host sync; masked: every op over the whole batch, no sync), the
masked one compiled (`--bench_augment.compile`) and, on CUDA, replayed as a CUDA graph; each checked equal
to the grouped result. Prints and saves JSON (device, cores, versions, images/s, ratios) and a bar chart.
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
from ..config import BoolStr, ConfigError, load_config
from ..randaugment import FILL, RandAugment
from .common import describe, machine, pick_device, save, timed
from .corpus import make_photo

Section("bench_augment", "the RandAugment benchmark").params(
    config=Param(str, "timm RandAugment string", default="rand-m6-mstd0.5-inc1"),
    sizes=Param(str, "comma-separated image sizes", default="160,224"),
    batch=Param(int, "batch size", default=256),
    timm_images=Param(int, "images timed through timm's PIL path", default=64),
    compile=Param(BoolStr(), "also time the masked batching under torch.compile (compiles once per size: ~40 s on "
                             "a CPU)",
                  default=False),
)
SECTIONS = ("bench", "bench_augment")


def batch_of(size: int, n: int) -> torch.Tensor:
    imgs = [np.asarray(make_photo(np.random.default_rng([7, i])).resize((size, size), Image.BILINEAR))
            for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def cuda_graphed(ra: RandAugment, x: torch.Tensor, params: dict):
    """The masked forward captured once as a CUDA graph: fn(x, params) copies both into the graph's inputs and
    replays it (the output tensor is the graph's, overwritten by the next call)."""
    static_x, static_p = x.clone(), {k: v.clone() for k, v in params.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: constants, allocator pools
        ra(static_x, params=static_p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ra(static_x, params=static_p)

    def replay(x, params):
        static_x.copy_(x)
        for k, v in params.items():
            static_p[k].copy_(v)
        graph.replay()
        return static_out
    return replay


def batchings(config: str, device: torch.device, x: torch.Tensor, params: dict, compile_masked: bool) -> dict:
    """name → fn(x, params) for each way of running the same RandAugment draw."""
    grouped = RandAugment(config, interpolation="bicubic")
    masked = RandAugment(config, interpolation="bicubic", batching="masked")
    fns = {"grouped": lambda x, p: grouped(x, params=p), "masked": lambda x, p: masked(x, params=p)}
    if compile_masked:
        compiled = RandAugment(config, interpolation="bicubic", batching="masked", compile=True)
        fns["masked_compiled"] = lambda x, p: compiled(x, params=p)
    if device.type == "cuda":
        fns["masked_cuda_graph"] = cuda_graphed(masked, x, params)
    return fns


def run(config: str, sizes, batch: int, device: torch.device, timm_images: int, compile_masked: bool = False) -> list:
    rows = []
    for size in sizes:
        x = batch_of(size, batch)
        xd = x.to(device)
        full = TrainAugment(1000, config, "bicubic", 0.1, 1.0).to(device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        params = RandAugment(config).sample(batch, device, gen)
        fns = batchings(config, device, xd, params, compile_masked)
        want = fns["grouped"](xd, params)
        per_s = {name: batch / timed(lambda fn=fn: fn(xd, params), device) for name, fn in fns.items()}
        equal = {name: bool(torch.equal(fn(xd, params), want)) for name, fn in fns.items() if name != "grouped"}
        t_full = timed(lambda: full(xd.clone(), labels), device)
        tf = rand_augment_transform(config, {"img_mean": FILL, "interpolation": str_to_pil_interp("bicubic")})
        pil = [Image.fromarray(im) for im in x[:timm_images].permute(0, 2, 3, 1).numpy()]
        t_timm = timed(lambda: [tf(im) for im in pil], torch.device("cpu"), warmup=0) / len(pil)
        row = {"size": size, "batch": batch, "ours_images_per_s": per_s["grouped"],
               "ours_full_device_transform_images_per_s": batch / t_full,
               "timm_pil_one_core_images_per_s": 1 / t_timm,
               "ratio_ours_vs_timm_one_core": t_timm * per_s["grouped"],
               **{f"{name}_images_per_s": v for name, v in per_s.items() if name != "grouped"},
               **{f"ratio_{name}_vs_grouped": v / per_s["grouped"] for name, v in per_s.items() if name != "grouped"},
               **{f"{name}_equals_grouped": v for name, v in equal.items()}}
        rows.append(row)
        others = ", ".join(f"{name} {v:,.0f} ({v / per_s['grouped']:.2f}x{'' if equal[name] else ', NOT EQUAL'})"
                           for name, v in per_s.items() if name != "grouped")
        print(f"{size}px: ours {row['ours_images_per_s']:,.0f} img/s (with normalise+mixup "
              f"{row['ours_full_device_transform_images_per_s']:,.0f}), timm PIL {row['timm_pil_one_core_images_per_s']:,.0f} "
              f"img/s on one core: {row['ratio_ours_vs_timm_one_core']:.1f}x; other batchings: {others}")
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
    rows = run(config, sizes, batch, device, cfg["bench_augment.timm_images"], cfg["bench_augment.compile"])
    result = {"benchmark": "augment", "config": config, "machine": info, "results": rows}
    bars = {}
    for r in rows:
        bars[f"{r['size']}px rsb_ffcv batched (grouped)"] = r["ours_images_per_s"]
        for name in ("masked", "masked_compiled", "masked_cuda_graph"):
            if f"{name}_images_per_s" in r:
                bars[f"{r['size']}px {name.replace('_', ' ')}"] = r[f"{name}_images_per_s"]
        bars[f"{r['size']}px + normalise + Mixup/CutMix"] = r["ours_full_device_transform_images_per_s"]
        bars[f"{r['size']}px timm PIL, 1 core"] = r["timm_pil_one_core_images_per_s"]
    save(result, Path(cfg["bench.out_dir"]) / "augment.json", bars,
         f"RandAugment {config}, batch {batch} ({describe(info)})", log_scale=True)
    return result

