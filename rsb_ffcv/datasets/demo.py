"""The bundled demo dataset: generated from a seed, shipped as code, no downloads.

Ten object classes (one shape and hue each), drawn at varied size, position, shade and rotation on
textured, grainy backgrounds, saved as JPEGs of varied size up to ~300 px in an ImageFolder tree. A small ResNet
learns it in a few CPU epochs. Every image's object bounding box is recorded (Grad-CAM scoring uses it).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "crescent", "bars"]
BOXES_FILE = "boxes.json"  # {relative path: [x0, y0, x1, y1]} at the saved image size


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rr = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, rot, colour, bg):
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot + math.pi / 4), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif name == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)], fill=colour)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=colour)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        o = r * 0.5
        draw.ellipse([cx - r + o, cy - r - o * 0.3, cx + r + o, cy + r - o * 0.3], fill=bg)
    elif name == "bars":
        h = r * 2 / 7
        for i in range(4):
            y0 = cy - r + 2 * i * h
            draw.rectangle([cx - r, y0, cx + r, y0 + h], fill=colour)
    else:
        raise ValueError(name)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour gradient + low-frequency blobs + sensor-like grain."""
    base = rng.uniform(40, 215, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base + (xx / w)[..., None] * tilt[0] + (yy / h)[..., None] * tilt[1]
    coarse = rng.normal(0, 25, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    coarse = np.array(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                      dtype=np.float32) - 128
    img = img + coarse
    return np.clip(img, 0, 255)


def _object_colour(rng: np.random.Generator, label: int) -> tuple[int, int, int]:
    """Each class has its own hue (jittered), so a small CNN learns the demo in a few CPU epochs; the
    evidence stays on the object's pixels, which keeps Grad-CAM localisation meaningful."""
    hue = (label / len(CLASSES) + rng.normal(0, 0.02)) % 1.0
    sat, val = rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB")
    return rgb.getpixel((0, 0))


def make_image(rng: np.random.Generator, label: int):
    """One demo image and its object box [x0, y0, x1, y1]."""
    w = int(rng.integers(96, 301))
    h = int(np.clip(w * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))), 96, 300))
    bg_arr = _background(rng, w, h) * rng.uniform(0.5, 0.8)  # darker, less saturated than objects
    img = Image.fromarray(bg_arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    s = min(w, h)
    r = float(rng.uniform(0.22, 0.42) * s)
    cx = float(rng.uniform(r, w - r))
    cy = float(rng.uniform(r, h - r))
    rot = float(rng.uniform(0, 2 * math.pi))
    colour = _object_colour(rng, label)
    bg_at = tuple(int(c) for c in bg_arr[int(cy), int(cx)])
    _draw_object(draw, CLASSES[label], cx, cy, r, rot, colour, bg_at)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.0))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), size=(h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    box = [max(0, int(cx - r)), max(0, int(cy - r)), min(w, int(math.ceil(cx + r))), min(h, int(math.ceil(cy + r)))]
    return img, box


def generate(root: str | os.PathLike, per_class: int, seed: int = 0, quality_range=(70, 95)) -> Path:
    """Write an ImageFolder tree `root/<class>/<idx>.jpg` plus `root/boxes.json`; returns root.

    Deterministic for (per_class, seed). Written to a temporary directory and renamed when complete.
    """
    root = Path(root)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    boxes = {}
    try:
        for label, name in enumerate(CLASSES):
            (tmp / name).mkdir(parents=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, label, i])
                img, box = make_image(rng, label)
                rel = f"{name}/{i:05d}.jpg"
                img.save(tmp / rel, quality=int(rng.integers(*quality_range)))
                boxes[rel] = box
        (tmp / BOXES_FILE).write_text(json.dumps(boxes, indent=0, sort_keys=True))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
