"""Reading source images: any PIL mode to RGB uint8, with full-decode validation.

FFCV's RGBImageField accepts only uint8 H×W×3 arrays, and its JPEG decoder silently turns corrupt data
into garbage pixels at training time; so every image is decoded completely, once, and the writer hands
those pixels to FFCV.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile

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


def _pixels(img: Image.Image) -> np.ndarray:
    img.load()  # raises on truncated or corrupt data
    arr = to_rgb(img)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has no pixels (shape {arr.shape})")
    return arr


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode a file completely (format found by content, not extension) into RGB uint8."""
    with Image.open(path) as img:
        return _pixels(img)


def read_checked(path: str | os.PathLike) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 array, None) after a full decode and PIL's structural checks, or (None, the reason). The file
    is opened once, except for formats whose PIL plugin checks more than decoding does (PNG's CRCs: verify(),
    then open again to decode)."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as img:
            if type(img).verify is ImageFile.ImageFile.verify:  # JPEG and most formats: decoding is the check
                return _pixels(img), None
            img.verify()
        return load_rgb(path), None
    except Exception as e:  # PIL raises many types; every one is a reason to list the file
        return None, f"{type(e).__name__}: {first_line(e)}"


def available_cpus() -> int:
    """Cores this process may use (cpu_count() ignores affinity limits such as taskset or cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

