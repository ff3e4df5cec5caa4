"""Training input pipelines side by side: `python -m rsb_ffcv.bench loader [--bench.n=2000] [--bench_loader.res=160]`.

All rows read the same ImageNet-shaped JPEG corpus on the same cores, in one run, in rounds (every
pipeline once per round, back to back; ratios are taken within a round, then the median over rounds):
- rsb_ffcv: the trainer's own train loader (our crop decoder: RandomResizedCrop + flip), CPU side;
- rsb_ffcv + CPU RandAugment: the same, then our batched RandAugment on the CPU (no-GPU machines);
- rsb_ffcv, whole-image decode: our decoder decoding whole JPEGs (what the region decode saves);
- stock FFCV: FFCV 1.0.2's RandomResizedCrop decoder + flip in the same loader;
- timm A3: ImageFolder + timm.data.create_transform(res, is_training=True,
  auto_augment='rand-m6-mstd0.5-inc1', interpolation='bicubic') in a torch DataLoader;
- timm without RandAugment;
- decode floor: every JPEG fully decoded (libjpeg-turbo, as FFCV) in the same loader, nothing else. Our
  decoder can match it while also resizing: it decodes only each crop's region.
The betons hold every image as JPEG (write_mode=jpg), so every pipeline decodes every image, like timm.
A last row uses ffcv-imagenet's usual beton (half the images stored raw), which skips half the decodes.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import torch
from fastargs import Param, Section
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba import get_num_threads

from ..config import load_config
from ..loaders import epoch, train_loader
from ..randaugment import RandAugment
from .common import describe, machine, save
from .corpus import among_first, corpus_beton, generate

RAND_AUGMENT = "rand-m6-mstd0.5-inc1"  # A3's
Section("bench_loader", "the loader benchmark (A3 settings)").params(
    res=Param(int, "RandomResizedCrop output size", default=160),
    batch=Param(int, "batch size", default=128),
    epochs=Param(int, "timed epochs per pipeline and round", default=1),
    rounds=Param(int, "rounds (every pipeline once per round; medians over rounds)", default=5),
)
SECTIONS = ("bench", "bench_loader")


class DecodeOnly(SimpleRGBImageDecoder):
    """The floor: decode each record's full JPEG (one buffer per worker, reused, as our decoder does);
    output one pixel."""

    def declare_state_and_memory(self, previous_state):
        self.size = int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3
        u8 = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=(1, 1, 3), dtype=u8), AllocationQuery((1, 1, 3), u8)

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        size = self.size

        def decode(batch_indices, destination, metadata, storage_state):
            n = len(batch_indices)
            workers = max(1, min(get_num_threads(), n))
            scratch = np.empty((workers, size), np.uint8)
            for worker in my_range(workers):
                for ix in range(worker, n, workers):
                    field = metadata[batch_indices[ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    h, w = field["height"], field["width"]
                    if field["mode"] == jpg:
                        imdecode_c(data, scratch[worker], h, w, h, w, 0, 0, 1, 1, False, False)
                        destination[ix, 0, 0] = scratch[worker, :3]
                    else:
                        destination[ix, 0, 0] = data[:3]
            return destination[:n]

        decode.is_parallel = True
        return decode


def trainer_loader(beton: str, decoder: str, res: int, batch: int, cores: int, region_decode: bool = True):
    """The trainer's own train loader (CPU side)."""
    loader, _ = train_loader(beton, batch, res, torch.device("cpu"), num_workers=cores, seed=0, repeats=0, rank=0,
                             world=1, batches_ahead=3, decoder=decoder, region_decode=region_decode)
    return loader


def ffcv_rows(beton: str, raw_beton: str, res: int, batch: int, cores: int):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    floor = Loader(beton, batch_size=batch, num_workers=cores, order=OrderOption.RANDOM, os_cache=True,
                   pipelines={"image": [DecodeOnly()], "label": [IntDecoder()]})
    ours = trainer_loader(beton, "fast", res, batch, cores)  # timed with and without CPU RandAugment
    return {
        "rsb_ffcv": (ours, None),
        "rsb_ffcv + CPU RandAugment": (ours, RandAugment(RAND_AUGMENT, interpolation="bicubic")),
        "rsb_ffcv, whole-image decode": (trainer_loader(beton, "fast", res, batch, cores, region_decode=False), None),
        "stock FFCV": (trainer_loader(beton, "ffcv", res, batch, cores), None),
        "decode floor": (floor, None),
        "rsb_ffcv, ffcv-imagenet beton (50% raw)": (trainer_loader(raw_beton, "fast", res, batch, cores), None),
    }


def cpu_seconds() -> float:
    """CPU time of this process (FFCV's threads) and its children (DataLoader workers): the work done,
    which a noisy shared machine disturbs far less than wall time."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def timed_epochs(batches, epochs: int, augment=None) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `epochs` passes of batches()."""
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for images, _ in batches():
            if augment is not None:
                images = augment(images)
            n += len(images)
    return n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)


def timm_loader(corpus: str, n: int, res: int, batch: int, cores: int, rand_augment: bool, pin_memory: bool = False):
    """timm's A3 input pipeline on the first n corpus images (the betons hold the same ones); pin_memory for
    a GPU, as timm's loader does."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    tf = create_transform(res, is_training=True, auto_augment=RAND_AUGMENT if rand_augment else None,
                          interpolation="bicubic", color_jitter=None)
    folder = ImageFolder(corpus, transform=tf, is_valid_file=lambda f: among_first(f, n))
    return torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=cores,
                                       persistent_workers=True, drop_last=True, pin_memory=pin_memory)


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench loader", description=__doc__)
    res, batch, rounds_n = cfg["bench_loader.res"], cfg["bench_loader.batch"], cfg["bench_loader.rounds"]
    info = machine()
    cores = cfg["bench.cores"] or info["cores"]
    torch.set_num_threads(cores)
    corpus_dir, n = cfg["bench.corpus"], cfg["bench.n"]
    corpus = generate(corpus_dir, n)
    print(f"corpus {corpus_dir}: {corpus}; {describe(info)}; {cores} cores for every pipeline")
    betons = {mode: corpus_beton(corpus_dir, n, mode, cores) for mode in ("jpg", "proportion")}

    ffcv = ffcv_rows(betons["jpg"], betons["proportion"], res, batch, cores)
    timm = {"timm A3 (RandAugment)": timm_loader(corpus_dir, n, res, batch, cores, True),
            "timm without RandAugment": timm_loader(corpus_dir, n, res, batch, cores, False)}
    runs = {name: (lambda loader=loader: epoch(loader, cores), augment) for name, (loader, augment) in ffcv.items()}
    runs.update({name: (lambda loader=loader: loader, None) for name, loader in timm.items()})
    print("warming up (numba compilation, worker start)...")
    for batches, augment in runs.values():
        timed_epochs(batches, 1, augment)

    rounds = {name: [] for name in runs}
    cpu_rounds = {name: [] for name in runs}
    for r in range(rounds_n):
        for name, (batches, augment) in runs.items():
            wall, cpu = timed_epochs(batches, cfg["bench_loader.epochs"], augment)
            rounds[name].append(wall)
            cpu_rounds[name].append(cpu)
            print(f"round {r + 1} {name:42s} {wall:8,.0f} img/s  {cpu:7,.0f} img per CPU-s", flush=True)

    # This machine's speed drifts by tens of percent within minutes: ratios are taken within each round
    # (pipelines timed back to back), then the median over rounds. Ratios of images per CPU-second (work
    # per image) are steadier still; with every pipeline keeping all cores busy the two agree.
    pairs = {"rsb_ffcv / stock FFCV": ("rsb_ffcv", "stock FFCV"),
             "rsb_ffcv / timm A3": ("rsb_ffcv", "timm A3 (RandAugment)"),
             "rsb_ffcv / decode floor": ("rsb_ffcv", "decode floor"),
             "rsb_ffcv / rsb_ffcv whole-image decode": ("rsb_ffcv", "rsb_ffcv, whole-image decode"),
             "rsb_ffcv + CPU RandAugment / timm A3": ("rsb_ffcv + CPU RandAugment", "timm A3 (RandAugment)")}

    def ratio_table(data):
        per_round = {k: [x / y for x, y in zip(data[p], data[q], strict=True)] for k, (p, q) in pairs.items()}
        return {k: float(np.median(v)) for k, v in per_round.items()}, per_round

    med = {name: float(np.median(v)) for name, v in rounds.items()}
    cpu_med = {name: float(np.median(v)) for name, v in cpu_rounds.items()}
    ratios, per_round = ratio_table(rounds)
    cpu_ratios, cpu_per_round = ratio_table(cpu_rounds)
    print(f"\n{'pipeline (median of rounds)':44s} {'images/s':>9s} {'img/CPU-s':>9s}")
    for name in med:
        print(f"{name:44s} {med[name]:9,.0f} {cpu_med[name]:9,.0f}")
    print(f"\n{'ratio':44s} {'wall':>6s} {'CPU':>6s}   wall ratio per round")
    for name in ratios:
        print(f"{name:44s} {ratios[name]:5.2f}x {cpu_ratios[name]:5.2f}x   "
              + ", ".join(f"{r:.2f}" for r in per_round[name]))
    result = {"benchmark": "loader", "machine": info, "cores_used": cores,
              "settings": {"resolution": res, "batch": batch, "epochs_per_round": cfg["bench_loader.epochs"],
                           "rounds": rounds_n,
                           "rand_augment": RAND_AUGMENT, "interpolation": "bicubic", "corpus": corpus},
              "images_per_s_median": med, "images_per_cpu_s_median": cpu_med, "ratios_median": ratios,
              "ratios_cpu_median": cpu_ratios, "rounds": rounds, "cpu_rounds": cpu_rounds,
              "ratios_per_round": per_round, "ratios_cpu_per_round": cpu_per_round}
    save(result, Path(cfg["bench.out_dir"]) / "loader.json", med,
         f"Training input pipeline at {res} px, {cores} cores of {info['cpu']} (median of rounds)")
    return result

