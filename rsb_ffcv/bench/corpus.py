"""An ImageNet-shaped JPEG ImageFolder for benchmarks, generated deterministically (no downloads).

Longer side mostly 500 px (some smaller), mixed 4:3 / 3:4 / square / wide aspect ratios, textured
content with objects and sensor-like grain, JPEG quality 90: sizes near ImageNet's (~100 KB average).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..datasets import demo

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


def generate(root: str | os.PathLike, n: int, classes: int = 10, seed: int = 0, workers: int = 0) -> dict:
    """Create the missing images of the corpus (in parallel); existing ones are kept."""
    from concurrent.futures import ProcessPoolExecutor

    from ..datasets.images import available_cpus
    root = Path(root)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(generate(a.root, a.n, a.classes, a.seed)))


if __name__ == "__main__":
    main()
