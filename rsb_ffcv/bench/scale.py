"""ImageNet's record count: `python -m rsb_ffcv.bench scale [--bench_scale.sizes=10000,100000,1281167]`.

Generates N tiny JPEGs (24-64 px, 256 distinct images) over 1,000 class folders in a folder it owns, then at
each size, side by side on the same file list and cores:
- our writer (write_datasets.py's path: every image decoded once with full validation, the sidecar written)
  against stock FFCV's `DatasetWriter` fed the way ffcv-imagenet feeds it (a torchvision-ImageFolder-style
  dataset of PIL images), both at the writer's defaults (500 px, proportion 0.5, quality 90): images/s, the
  ratio, and the peak proportional set size (Pss) of each writer's process tree, sampled every 0.25 s;
- the train loader on the written beton: construction time, first batch, one epoch's order for 4 processes x
  repeats 3, for 1 process x 4 accumulation, and the page-local order, and the memory the loader adds;
- the val loader over the first 50,000 records: construction and one sequential pass.
Each writer runs in its own process (`python -m rsb_ffcv.bench.scale`), timed from when its file list is loaded.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from fastargs import Param, Section
from PIL import Image

from ..config import ConfigError, load_config
from ..datasets.images import available_cpus
from .common import machine, save
from .corpus import claim

Section("bench_scale", "the record-count benchmark").params(
    sizes=Param(str, "record counts, comma-separated (each at most the largest, which is generated)",
                default="10000,100000,1281167"),
    corpus=Param(str, "folder of the tiny JPEG corpus (owned by the benchmarks)", default="bench_out/tiny_corpus"),
    classes=Param(int, "class folders", default=1000),
)
SECTIONS = ("bench", "bench_scale")
VARIANTS = 256


def tiny_jpegs(seed: int = 0) -> list[bytes]:
    """VARIANTS small photo-like JPEGs (gradients, a disc, grain), 24-64 px a side."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(VARIANTS):
        w, h = (int(v) for v in rng.integers(24, 65, size=2))
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * x[..., None] + rng.uniform(-2, 2, 3) * y[..., None]
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 20)
        base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def generate_tiny(root: Path, n: int, classes: int) -> None:
    """img{i}.JPEG in class{i % classes}: the first k files of the listing cover every class for any k."""
    claim(root)
    blobs = tiny_jpegs()
    done = root / f".complete_{n}_{classes}"
    if done.exists():
        return
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        path = root / f"class{i % classes:04d}" / f"img{i:07d}.JPEG"
        if not path.exists():
            path.write_bytes(blobs[i % VARIANTS])
        if i % 100000 == 0:
            print(f"tiny corpus: {i:,}/{n:,} files ({time.perf_counter() - t0:.0f} s)", flush=True)
    done.touch()


def file_list(root: Path, n: int, classes: int) -> dict:
    """The first n files (by index), in ImageFolder record order (class, then file name)."""
    from ..datasets.sources import image_folder
    source = image_folder(root)
    keep = [i for i, f in enumerate(source.files) if int(Path(f).stem[3:]) < n]
    sub = source.select(keep)
    return {"root": str(root), "classes": sub.classes, "files": sub.files, "labels": sub.labels}


def write(which: str, listing: dict, out: str, workers: int) -> dict:
    """One writer over the listing (in its own process): ours or stock FFCV's."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from ..datasets.sources import Source
    from ..datasets.writer import WriteOptions, write_beton
    t0 = time.perf_counter()
    if which == "ours":
        source = Source("imagefolder", listing["root"], listing["classes"], listing["files"], listing["labels"])
        write_beton(source, out, WriteOptions(num_workers=workers, overwrite=True))
    else:
        class Folder:  # torchvision ImageFolder's __getitem__: PIL image converted to RGB, label
            def __len__(self):
                return len(listing["files"])

            def __getitem__(self, i):
                with open(listing["files"][i], "rb") as f:
                    return Image.open(f).convert("RGB"), listing["labels"][i]

        fields = {"image": RGBImageField(write_mode="proportion", max_resolution=500, compress_probability=0.5,
                                         jpeg_quality=90), "label": IntField()}
        DatasetWriter(out, fields, num_workers=workers).from_indexed_dataset(Folder(), chunksize=100)
    return {"seconds": time.perf_counter() - t0, "bytes": os.path.getsize(out)}


def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_writer(which: str, listing_path: Path, out: Path, workers: int) -> dict:
    result = out.with_suffix(".result.json")
    p = subprocess.Popen([sys.executable, "-m", "rsb_ffcv.bench.scale", which, str(listing_path), str(out),
                          str(workers), str(result)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, proc = 0, psutil.Process(p.pid)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(p.stderr.read()), daemon=True)
    reader.start()
    while p.poll() is None:
        try:
            peak = max(peak, _tree_pss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.25)
    reader.join()
    if p.returncode != 0:
        raise RuntimeError(f"{which} writer failed ({p.returncode}): {''.join(stderr)[-2000:]}")
    out_json = json.loads(result.read_text())
    out_json["peak_pss_mib"] = round(peak / 2**20, 1)
    return out_json


def loader_figures(beton: str, n: int) -> dict:
    """Train loader construction, first batch, orders, memory; val loader over 50,000 records."""
    import torch

    from ..loaders import epoch, train_loader, val_loader
    from ..orders import TrainOrder, record_pages
    cpu, cores = torch.device("cpu"), available_cpus()
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    loader, _ = train_loader(beton, 256, 32, cpu, num_workers=cores, seed=0, repeats=3, rank=0, world=4,
                             batches_ahead=3)
    out = {"construct_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    it = epoch(loader, 1)
    next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    it.close()
    out["loader_rss_mib"] = round((psutil.Process().memory_info().rss - rss0) / 2**20, 1)
    pages = record_pages(loader.reader)
    orders = {"order_4proc_repeats3_s": TrainOrder(loader, 3, 0, 4, 256),
              "order_1proc_accum4_s": TrainOrder(loader, 0, 0, 1, 256, accum=4),
              "order_page_local_4proc_repeats3_s": TrainOrder(loader, 3, 0, 4, 256, pages=pages, window_pages=64)}
    for name, order in orders.items():
        t0 = time.perf_counter()
        order.sample_order(1)
        out[name] = time.perf_counter() - t0
    m = min(n, 50000)
    t0 = time.perf_counter()
    val = val_loader(beton, 256, 32, 0.95, cpu, num_workers=cores, rank=0, world=1, batches_ahead=3,
                     indices=np.arange(m))
    out["val_construct_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seen = sum(len(y) for _, y in epoch(val, 1))
    out["val_records"], out["val_pass_s"] = seen, time.perf_counter() - t0
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench scale", description=__doc__)
    try:
        sizes = sorted(int(s) for s in cfg["bench_scale.sizes"].split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"bench_scale.sizes '{cfg['bench_scale.sizes']}': expected numbers separated by commas")
    root, classes = Path(cfg["bench_scale.corpus"]), cfg["bench_scale.classes"]
    workers = cfg["bench.cores"] or available_cpus()
    generate_tiny(root, sizes[-1], classes)
    rows = []
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        for n in sizes:
            listing = Path(tmp) / f"list_{n}.json"
            listing.write_text(json.dumps(file_list(root, n, classes)))
            row = {"records": n}
            for which in ("stock", "ours"):
                row[which] = run_writer(which, listing, Path(tmp) / f"{which}_{n}.beton", workers)
                row[which]["images_per_s"] = round(n / row[which]["seconds"], 1)
                print(f"{n:,} records, {which} writer: {row[which]}", flush=True)
            row["ours_vs_stock"] = round(row["stock"]["seconds"] / row["ours"]["seconds"], 3)
            row["loader"] = loader_figures(str(Path(tmp) / f"ours_{n}.beton"), n)
            print(f"{n:,} records: ours/stock {row['ours_vs_stock']}x; loader {row['loader']}", flush=True)
            rows.append(row)
            for p in Path(tmp).glob(f"*_{n}.*"):
                p.unlink()
    from ..datasets.writer import WriteOptions
    result = {"benchmark": "scale", "machine": machine(), "workers": workers, "classes": classes,
              "settings": {"max_resolution": 500, "write_mode": "proportion", "compress_probability": 0.5,
                           "jpeg_quality": 90, "ours_page_mib": WriteOptions().page_size >> 20, "stock_page_mib": 8},
              "rows": rows}
    bars = {f"{r['records']:,} {w}": r[w]["images_per_s"] for r in rows for w in ("stock", "ours")}
    save(result, Path(cfg["bench.out_dir"]) / "scale.json", bars,
         f"beton writers at ImageNet's record count: ours vs stock FFCV, {workers} workers (images/s)")
    return result


if __name__ == "__main__":  # one writer, started by run_writer(): WHICH LISTING OUT WORKERS RESULT
    from ..files import save_json
    which, listing_path, out, workers, result_path = sys.argv[1:]
    save_json(result_path, write(which, json.loads(Path(listing_path).read_text()), out, int(workers)))
