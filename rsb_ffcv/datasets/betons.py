"""Reading what write_datasets.py wrote: a beton's sidecar (X.json beside X.beton: classes, counts, record
order), and a check at start-up that the beton holds every record its index points to, so that a copy
cut short fails in one line before training instead of mid-epoch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import ConfigError


def sidecar_path(beton: str | os.PathLike) -> Path:
    return Path(beton).with_suffix(".json")


def read_sidecar(beton: str | os.PathLike) -> dict:
    side = sidecar_path(beton)
    if not Path(beton).is_file():
        raise ConfigError(f"dataset '{beton}' not found (write it with write_datasets.py)")
    if not side.is_file():
        raise ConfigError(f"dataset '{beton}' has no sidecar '{side.name}' (rewrite it with write_datasets.py)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"sidecar '{side}' cannot be read ({e}): rewrite the dataset with write_datasets.py") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise ConfigError(f"sidecar '{side}' holds no class list: rewrite the dataset with write_datasets.py")
    return meta


def check_beton(beton: str | os.PathLike) -> int:
    """The number of records, once the file is known to hold all of them: FFCV's header, its field
    descriptions and metadata, every record's data and the allocation table (written last) must lie
    inside the file, and every record must have its data."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE
    size = os.path.getsize(beton)
    try:
        reader = Reader(str(beton))
        n = int(reader.num_samples)
        table = reader.alloc_table
        table_at = int(reader.header["alloc_table_ptr"])
        whole = (len(reader.metadata) == n and table_at <= size
                 and table_at + len(table) * ALLOC_TABLE_TYPE.itemsize == size
                 and (len(table) == 0 or int((table["ptr"] + table["size"]).max()) <= table_at)
                 and (len(table) == 0 or np.array_equal(np.unique(table["sample_id"]), np.arange(n))))
    except Exception as e:  # FFCV raises assertions and numpy errors on damaged files
        raise ConfigError(f"dataset '{beton}' is truncated or damaged: FFCV cannot read its index ({type(e).__name__}: "
                          f"{e}); copy it again or rewrite it with write_datasets.py") from None
    if not whole:
        raise ConfigError(f"dataset '{beton}' is truncated or damaged ({size:,} bytes; its records do not all lie "
                          f"inside the file): copy it again or rewrite it with write_datasets.py")
    return n


def open_dataset(beton: str | os.PathLike) -> dict:
    """The sidecar of a beton that is whole, and agrees with it on the number of records."""
    meta = read_sidecar(beton)
    n = check_beton(beton)
    labels = meta.get("labels")
    if labels is not None and len(labels) != n:
        raise ConfigError(f"dataset '{beton}' holds {n} records but its sidecar '{sidecar_path(beton).name}' lists "
                          f"{len(labels)}: they were not written together; rewrite the dataset")
    return meta
