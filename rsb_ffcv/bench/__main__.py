"""`python -m rsb_ffcv.bench {loader,augment,train,writer,corpus} [options]` (each takes --help)."""
import importlib
import sys

BENCHMARKS = {
    "loader": "training input pipelines: rsb_ffcv vs stock FFCV vs timm vs the JPEG-decode floor",
    "augment": "batched RandAugment (+ normalise + Mixup/CutMix) vs timm's PIL RandAugment",
    "train": "end-to-end training images/s from betons vs synthetic device batches (data-stall fraction)",
    "writer": "write_datasets.py throughput",
    "corpus": "generate the ImageNet-shaped JPEG corpus the benchmarks share",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:8s} {what}")
        return 2
    name = sys.argv[1]
    sys.argv = [f"python -m rsb_ffcv.bench {name}", *sys.argv[2:]]
    importlib.import_module(f"rsb_ffcv.bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
