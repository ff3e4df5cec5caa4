"""Writer throughput on an ImageNet-shaped JPEG folder: `python -m rsb_ffcv.bench writer [--bench.n=2000]`.

Prints and saves JSON (machine, cores, versions, images/s, bytes) for write_datasets.py's path:
full-decode validation + FFCV write at ffcv-imagenet's settings (500 px, proportion 0.5, quality 90).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..config import load_config
from ..datasets.writer import WriteOptions, write_beton
from ..files import save_json
from .common import machine
from .corpus import corpus_source, generate

SECTIONS = ("bench",)


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench writer", description=__doc__)
    t0 = time.perf_counter()
    corpus = generate(cfg["bench.corpus"], cfg["bench.n"])
    print(f"corpus: {corpus} ({time.perf_counter() - t0:.0f} s)")
    opts = WriteOptions(num_workers=cfg["bench.cores"], overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_beton(corpus_source(cfg["bench.corpus"], cfg["bench.n"]), Path(tmp) / "bench.beton", opts)
    result = {"benchmark": "writer", "machine": machine(), "workers": opts.workers, "corpus": corpus,
              "settings": {"max_resolution": 500, "write_mode": "proportion", "compress_probability": 0.5,
                           "jpeg_quality": 90},
              **summary}
    out = Path(cfg["bench.out_dir"]) / "writer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, result)
    print(json.dumps(result, indent=1))
    return result

