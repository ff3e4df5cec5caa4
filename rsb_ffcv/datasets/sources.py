"""Where the images come from: file lists with labels, in a fixed, documented order.

* ImageFolder (`root/<class>/<image>`): classes = sorted directory names, files in torchvision's
  `make_dataset` order, so labels equal torchvision's `ImageFolder` (ImageNet synsets get their
  standard indices).
* Flat ImageNet val + labels (`LOC_val_solution.csv`, or `ILSVRC2012_validation_ground_truth.txt`
  with the devkit's synset order): files sorted by name, labelled with train's class indices.
* ImageNet-V2: directories `0`…`999` named by class index.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Source:
    kind: str
    root: str
    classes: list[str]
    files: list[str]  # absolute paths, in record order
    labels: list[int]
    ignored: list[list[str]] = field(default_factory=list)  # [path, reason]: not images by extension
    boxes: list[list[int]] | None = None  # per file [x0, y0, x1, y1] (demo data)

    def select(self, indices) -> "Source":
        idx = list(indices)
        return Source(self.kind, self.root, self.classes, [self.files[i] for i in idx],
                      [self.labels[i] for i in idx], self.ignored,
                      None if self.boxes is None else [self.boxes[i] for i in idx])

    def drop(self, bad: set[str]) -> "Source":
        return self.select(i for i, f in enumerate(self.files) if f not in bad)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _require_dir(root) -> Path:
    p = Path(root)
    if not p.is_dir():
        raise ConfigError(f"source.root '{root}' is not a directory")
    return p


def _walk_images(class_dir: Path, ignored: list) -> list[str]:
    """torchvision's order: sorted(os.walk(...)) then sorted file names."""
    out = []
    for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(fnames):
            path = os.path.join(dirpath, fname)
            if _is_image(fname):
                out.append(path)
            else:
                ignored.append([path, "not an image file extension (skipped, as torchvision does)"])
    return out


IMAGENET1K = "imagenet1k"  # classes_from value: ImageNet-1k's synset order (timm's ImageNetInfo)


def imagenet_synsets() -> list[str]:
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def load_classes(classes_from: str) -> list[str]:
    """Class names in index order from a beton sidecar (.json), a text file (one per line) or an
    ImageFolder directory (sorted sub-directories), or imagenet1k (timm's ImageNet-1k synset order)."""
    if classes_from == IMAGENET1K:
        return imagenet_synsets()
    p = Path(classes_from)
    if p.is_dir():
        classes = sorted(e.name for e in os.scandir(p) if e.is_dir())
    elif p.suffix == ".json" and p.is_file():
        try:
            classes = json.loads(p.read_text())["classes"]
        except (ValueError, KeyError):
            raise ConfigError(f"source.classes_from '{p}' is not a beton sidecar (no 'classes' list)") from None
    elif p.is_file():
        classes = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    else:
        raise ConfigError(f"source.classes_from '{p}' not found (give train's sidecar .json, a class list "
                          f"file or train's ImageFolder directory)")
    if not classes:
        raise ConfigError(f"source.classes_from '{p}' lists no classes")
    return classes


def _check_same_classes(found: list[str], expected: list[str], what: str) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ConfigError(f"{what} has a class set that differs from source.classes_from: "
                          f"missing {missing[:10]}{'…' if len(missing) > 10 else ''} ({len(missing)}), "
                          f"unknown {extra[:10]}{'…' if len(extra) > 10 else ''} ({len(extra)})")


def readable_names(classes: list[str]) -> list[str]:
    """Class names for people: an ImageNet synset id becomes its first lemma ('n01440764' → 'tench')."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    index = {s: i for i, s in enumerate(info.label_names())}
    return [info.index_to_description(index[c]).split(",")[0] if c in index else c for c in classes]


def image_folder(root, classes_from: str | None = None) -> Source:
    """classes_from=imagenet1k: the class directories are ImageNet synsets (Imagenette, Imagewoof, any
    subset) and keep their ImageNet-1k indices, so 1000-class models score the beton directly."""
    root = _require_dir(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ConfigError(f"source.root '{root}' has no class sub-directories (expected root/<class>/<image>)")
    present = set(classes)
    if classes_from == IMAGENET1K:
        synsets = imagenet_synsets()
        unknown = sorted(present - set(synsets))
        if unknown:
            raise ConfigError(f"ImageFolder '{root}': {len(unknown)} class directories are not ImageNet-1k synsets "
                              f"({', '.join(unknown[:5])}{'…' if len(unknown) > 5 else ''}); "
                              f"source.classes_from=imagenet1k needs synset ids such as n01440764")
        classes = synsets
    elif classes_from:
        _check_same_classes(classes, load_classes(classes_from), f"ImageFolder '{root}'")
        classes = load_classes(classes_from)
    files, labels, ignored, empty = [], [], [], []
    for idx, name in enumerate(classes):
        if name not in present:  # an ImageNet class the subset does not hold
            continue
        found = _walk_images(root / name, ignored)
        if not found:
            empty.append(name)
        files += found
        labels += [idx] * len(found)
    if empty:
        raise ConfigError(f"ImageFolder '{root}': {len(empty)} class directories hold no images: "
                          f"{', '.join(empty[:20])}{'…' if len(empty) > 20 else ''} (remove them or add images)")
    return Source("imagefolder", str(root), classes, files, labels, ignored)


def _read_val_labels(labels_file: Path, synsets_file: str | None) -> dict[str, str]:
    """{file stem: synset} from LOC_val_solution.csv or the devkit ground-truth file."""
    if not labels_file.is_file():
        raise ConfigError(f"source.labels_file '{labels_file}' not found")
    if labels_file.suffix == ".csv":
        with open(labels_file, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise ConfigError(f"source.labels_file '{labels_file}': expected the header "
                              f"'ImageId,PredictionString' (LOC_val_solution.csv)")
        out = {}
        for n, row in enumerate(rows[1:], start=2):
            if len(row) < 2 or not row[1].split():
                raise ConfigError(f"source.labels_file '{labels_file}' line {n}: expected 'ImageId,synset ...'")
            out[row[0].strip()] = row[1].split()[0]
        return out
    # ILSVRC2012_validation_ground_truth.txt: line i holds the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}.
    if not synsets_file:
        raise ConfigError(f"source.labels_file '{labels_file}' holds devkit class ids: also give "
                          f"source.synsets_file (devkit meta.mat, or a text file of synsets in ILSVRC2012_ID order)")
    synsets = _devkit_synsets(Path(synsets_file))
    out = {}
    for i, line in enumerate(labels_file.read_text().split(), start=1):
        try:
            k = int(line)
            if not 1 <= k <= len(synsets):
                raise IndexError
            out[f"ILSVRC2012_val_{i:08d}"] = synsets[k - 1]
        except (ValueError, IndexError):
            raise ConfigError(f"source.labels_file '{labels_file}' line {i}: '{line}' is not a class id "
                              f"in 1..{len(synsets)}") from None
    return out


def _devkit_synsets(p: Path) -> list[str]:
    if not p.is_file():
        raise ConfigError(f"source.synsets_file '{p}' not found")
    if p.suffix == ".mat":
        from scipy.io import loadmat  # only needed for the devkit's meta.mat
        meta = loadmat(str(p), squeeze_me=True)["synsets"]
        leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in meta if int(s["num_children"]) == 0)
        return [w for _, w in leaves]
    return [ln.strip().split()[0] for ln in p.read_text().splitlines() if ln.strip()]


def flat_val(root, labels_file, synsets_file: str | None = None, classes_from: str | None = None) -> Source:
    root = _require_dir(root)
    labels = _read_val_labels(Path(labels_file), synsets_file)
    ignored, by_stem = [], {}
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.is_file():
            continue
        if _is_image(e.name):
            by_stem[Path(e.name).stem] = e.path
        else:
            ignored.append([e.path, "not an image file extension"])
    unknown = sorted(set(labels) - set(by_stem))
    unlabelled = sorted(set(by_stem) - set(labels))
    if unknown:
        raise ConfigError(f"source.labels_file '{labels_file}' names {len(unknown)} files not in '{root}': "
                          f"{', '.join(unknown[:10])}{'…' if len(unknown) > 10 else ''}")
    if unlabelled:
        raise ConfigError(f"{len(unlabelled)} images in '{root}' have no entry in '{labels_file}': "
                          f"{', '.join(unlabelled[:10])}{'…' if len(unlabelled) > 10 else ''}")
    found = sorted(set(labels.values()))
    if classes_from:
        classes = load_classes(classes_from)
        if classes_from == IMAGENET1K:  # any subset of ImageNet-1k's classes
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ConfigError(f"labels file '{labels_file}' names classes that are not ImageNet-1k synsets: "
                                  f"{', '.join(unknown[:5])}{'…' if len(unknown) > 5 else ''}")
        else:
            _check_same_classes(found, classes, f"labels file '{labels_file}'")
    else:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    stems = sorted(by_stem)
    return Source("flatval", str(root), classes, [by_stem[s] for s in stems],
                  [index[labels[s]] for s in stems], ignored)


def imagenet_v2(root, classes_from: str | None = None, num_classes: int = 1000) -> Source:
    root = _require_dir(root)
    classes = load_classes(classes_from) if classes_from else [str(i) for i in range(num_classes)]
    dirs = [e.name for e in os.scandir(root) if e.is_dir()]
    bad = [d for d in dirs if not d.isdigit() or int(d) >= len(classes)]
    if bad:
        raise ConfigError(f"ImageNet-V2 root '{root}': directories must be class indices 0..{len(classes) - 1}; "
                          f"found {', '.join(sorted(bad)[:10])}")
    if not dirs:
        raise ConfigError(f"ImageNet-V2 root '{root}' has no class directories 0..{len(classes) - 1}")
    files, labels, ignored = [], [], []
    for d in sorted(dirs, key=int):
        found = _walk_images(root / d, ignored)
        files += found
        labels += [int(d)] * len(found)
    return Source("imagenet_v2", str(root), classes, files, labels, ignored)


def stratified_subset(labels: list[int], n: int, seed: int) -> list[int]:
    """n indices, seeded, with each class's share proportional to its count; returned in source order."""
    if n >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(len(idx))
        # The k-th pick of class c ranks at (k + jitter) / count_c: taking the n smallest keys
        # interleaves classes in proportion to their sizes.
        keys[idx[perm]] = (np.arange(len(idx)) + rng.uniform(0, 1)) / len(idx)
    return sorted(np.argsort(keys, kind="stable")[:n].tolist())
