"""`python -m rsb_ffcv.bench corpus`: the ImageNet-shaped JPEG ImageFolder the benchmarks share, generated
deterministically (no downloads), and its betons.

Longer side mostly 500 px (some smaller), mixed 4:3 / 3:4 / square / wide aspect ratios, textured
content with objects and sensor-like grain, JPEG quality 90: sizes near ImageNet's (~100 KB average).
The folder belongs to the benchmarks: a marker file says so, and a folder without it that holds anything
is refused, so a benchmark never writes into a user's dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from fastargs import Param, Section
from PIL import Image

from ..config import ConfigError
from ..datasets import demo
from . import common  # noqa: F401  (declares the shared `bench` section)

MARKER = ".rsb_ffcv_bench_corpus"
Section("bench_corpus", "the generated corpus").params(
    classes=Param(int, "classes (sub-directories)", default=10),
    seed=Param(int, "generation seed", default=0),
)

ASPECTS = [(4 / 3, 0.45), (3 / 4, 0.2), (1.0, 0.15), (3 / 2, 0.1), (16 / 9, 0.1)]


def make_photo(rng: np.random.Generator) -> Image.Image:
    aspects, probs = zip(*ASPECTS)
    aspect = aspects[rng.choice(len(aspects), p=probs)]
    longer = 500 if rng.uniform() < 0.85 else int(rng.integers(200, 500))
    w, h = (longer, int(longer / aspect)) if aspect >= 1 else (int(longer * aspect), longer)
    base, _ = demo.make_image(rng, int(rng.integers(len(demo.CLASSES))))
    img = np.asarray(base.resize((w, h), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, rng.uniform(6, 14), size=(h, w, 1)) + rng.normal(0, 4, size=(h, w, 3))
    return Image.fromarray(np.clip(img + grain, 0, 255).astype(np.uint8))


def _make(args) -> int:
    root, i, classes, seed = args
    path = Path(root) / f"class{i % classes:04d}" / f"img{i:07d}.JPEG"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        make_photo(np.random.default_rng([seed, i])).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, path)  # an interrupted run leaves no truncated JPEG behind
    return path.stat().st_size


def claim(root: Path) -> None:
    """Make `root` the benchmarks' own folder, or refuse it: a folder that holds anything and has no
    marker is somebody's data."""
    marker = root / MARKER
    if root.is_dir() and not marker.exists() and any(root.iterdir()):
        raise ConfigError(f"bench.corpus '{root}' is not a corpus made by the benchmarks (no {MARKER} file) and is "
                          f"not empty: the benchmarks generate their own images, so give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()


def generate(root: str | os.PathLike, n: int, classes: int = 10, seed: int = 0, workers: int = 0) -> dict:
    """Create the missing images of the corpus (in parallel); existing ones are kept."""
    from concurrent.futures import ProcessPoolExecutor

    from ..datasets.images import available_cpus
    root = Path(root)
    claim(root)
    for c in range(min(classes, n)):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), i, classes, seed) for i in range(n)]
    workers = workers or available_cpus()
    if workers == 1:
        sizes = list(map(_make, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_make, jobs, chunksize=32))
    return {"images": n, "classes": classes, "mean_kb": round(float(np.mean(sizes)) / 1024, 1)}


def among_first(path: str | os.PathLike, n: int) -> bool:
    """Whether a corpus file is one of its first n images (the folder may hold more, from a larger n)."""
    name = Path(path)
    return name.suffix == ".JPEG" and int(name.stem[len("img"):]) < n


def corpus_source(root: str | os.PathLike, n: int):
    """The first n images of the corpus as a writer Source."""
    from ..datasets.sources import image_folder
    source = image_folder(root)
    return source.select([i for i, f in enumerate(source.files) if among_first(f, n)])


def corpus_beton(root: str | os.PathLike, n: int, write_mode: str = "proportion", workers: int = 0) -> str:
    """The corpus written as a beton beside it (once: reused while it exists), e.g. corpus_2000_jpg.beton.
    proportion: ffcv-imagenet's settings (half the images raw); jpg: every image a JPEG, as timm reads them."""
    from ..datasets.writer import WriteOptions, write_beton
    root = Path(root)
    beton = root.with_name(f"{root.name}_{n}_{write_mode}.beton")
    if not beton.exists():
        write_beton(corpus_source(root, n), beton, WriteOptions(write_mode=write_mode, num_workers=workers))
    return str(beton)


SECTIONS = ("bench", "bench_corpus")


def main(argv=None):
    from ..config import load_config
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench corpus", description=__doc__)
    print(json.dumps(generate(cfg["bench.corpus"], cfg["bench.n"], cfg["bench_corpus.classes"],
                              cfg["bench_corpus.seed"], cfg["bench.cores"])))
