"""Writer throughput on an ImageNet-shaped JPEG folder: `python -m rsb_ffcv.bench writer [--n 2000]`.

Prints and saves JSON (machine, cores, versions, images/s, bytes) for write_datasets.py's path:
full-decode validation + FFCV write at ffcv-imagenet's settings (500 px, proportion 0.5, quality 90).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from ..datasets.images import available_cpus
from ..datasets.sources import image_folder
from ..datasets.writer import WriteOptions, _versions, write_beton
from .corpus import generate


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--corpus", default="bench_out/corpus", help="reused between runs")
    ap.add_argument("--out", default="bench_out/writer.json")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    corpus = generate(a.corpus, a.n)
    print(f"corpus: {corpus} ({time.perf_counter() - t0:.0f} s)")
    opts = WriteOptions(num_workers=a.workers, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_beton(image_folder(a.corpus), Path(tmp) / "bench.beton", opts)
    result = {"benchmark": "writer", "machine": platform.machine(), "processor": platform.processor(),
              "cores": available_cpus(), "workers": opts.workers, "corpus": corpus, "versions": _versions(),
              "settings": {"max_resolution": 500, "write_mode": "proportion", "compress_probability": 0.5,
                           "jpeg_quality": 90},
              **summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
