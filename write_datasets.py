#!/usr/bin/env python
"""Convert ImageNet / any ImageFolder / ImageNet-V2 / the demo data into FFCV .beton files.

    python write_datasets.py                                   # the bundled demo dataset
    python write_datasets.py --source.kind=imagefolder --source.root=/data/imagenet/train \
        --writer.out=/data/betons/train_500_0.50_90.beton
    python write_datasets.py --config rsb_configs/write_imagenet_val.yaml

All options: python write_datasets.py --help (see rsb_ffcv/datasets/cli.py).
"""
import sys

from rsb_ffcv.datasets.cli import main

if __name__ == "__main__":
    sys.exit(main())
