"""Reading source images: any PIL mode to RGB uint8, and full-decode validation.

FFCV's RGBImageField accepts only uint8 H×W×3 arrays, and its JPEG decoder silently turns corrupt data
into garbage pixels at training time; so every image is decoded completely here, before writing.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import warnings

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..cli import first_line

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image as a uint8 H×W×3 RGB array.

    Alpha is dropped the way torchvision's loader does it (`convert('RGB')`), so betons hold the same
    pixels timm's pipeline would see; 16/32-bit integer and float images are rescaled, not clipped.
    """
    if img.mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a, 0, 65535) / 257.0 if a.max(initial=0) > 255 else a
        a = np.round(np.clip(a, 0, 255)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.round(np.clip(a, 0, 255)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's documented route for palette transparency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode a file completely (format found by content, not extension) into RGB uint8."""
    with Image.open(path) as img:
        img.load()  # raises on truncated or corrupt data
        arr = to_rgb(img)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has no pixels (shape {arr.shape})")
    return arr


def check_image(path: str) -> tuple[str, str | None, tuple[int, int] | None]:
    """(path, error or None, (width, height) or None) after a full decode."""
    try:
        if os.path.getsize(path) == 0:
            return path, "empty file (0 bytes)", None
        with Image.open(path) as img:
            img.verify()  # structural checks (e.g. PNG CRCs) that load() skips
        arr = load_rgb(path)
        return path, None, (arr.shape[1], arr.shape[0])
    except Exception as e:  # PIL raises many types; every one is a reason to list the file
        return path, f"{type(e).__name__}: {first_line(e)}", None


def validate_images(paths: list[str], num_workers: int,
                    desc: str = "validating") -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Fully decode every file in parallel: ({path: reason} for the bad ones, {path: (width, height)} for
    the good ones)."""
    bad: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    chunk = max(1, min(256, len(paths) // (num_workers * 8) or 1))
    bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)
    if num_workers <= 1 or len(paths) < 64:
        results = map(check_image, paths)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(num_workers)
        results = pool.imap(check_image, paths, chunksize=chunk)
    try:
        for path, err, size in results:
            if err is not None:
                bad[path] = err
            else:
                sizes[path] = size
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return bad, sizes


def available_cpus() -> int:
    """Cores this process may use (cpu_count() ignores affinity limits such as taskset or cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

