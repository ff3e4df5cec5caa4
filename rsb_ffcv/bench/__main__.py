"""`python -m rsb_ffcv.bench {loader,augment,train,writer,scale,memory,corpus,figures} [--config F.yaml] [--section.key=value ...]`

Each benchmark measures side by side in one run and saves JSON (machine, versions, settings, figures) and
a PNG chart under bench.out_dir; `python -m rsb_ffcv.bench NAME --help` lists its keys."""
import importlib
import sys

from .. import cli

BENCHMARKS = {
    "loader": "training input pipelines: rsb_ffcv vs stock FFCV vs timm vs the JPEG-decode floor",
    "augment": "batched RandAugment (+ normalise + Mixup/CutMix) vs timm's PIL RandAugment",
    "train": "end-to-end training images/s from betons vs synthetic device batches (data stall)",
    "writer": "write_datasets.py throughput",
    "scale": "ImageNet's record count: our writer vs stock FFCV's at 10k/100k/1.28M tiny JPEGs; loader figures",
    "memory": "a beton larger than RAM (cgroup limit): bytes fetched, memory, images/s per data.in_memory; Pss",
    "corpus": "generate the ImageNet-shaped JPEG corpus the benchmarks share",
    "figures": "rewrite the README's figures from the benchmarks' JSON results (results/)",
}


def usage() -> str:
    return __doc__ + "\n\nbenchmarks:\n" + "\n".join(f"  {name:8s} {what}" for name, what in BENCHMARKS.items())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        cli.error(f"unknown benchmark '{argv[0]}': choose one of {', '.join(BENCHMARKS)}")
        return 2
    module = importlib.import_module(f"rsb_ffcv.bench.{argv[0]}")

    def benchmark(args) -> int:
        module.main(args)  # returns the result dict, also saved as JSON
        return 0
    return cli.run(benchmark, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
