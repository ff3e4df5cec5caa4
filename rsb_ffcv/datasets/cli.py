"""`python write_datasets.py [--config F.yaml] [--section.key=value ...]`: images → FFCV betons.

With no source given it writes the bundled demo dataset (train + val betons under data/demo).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastargs import Param, Section

from .. import cli
from ..config import BoolStr, Choice, ConfigError, load_config, print_config
from . import demo as demo_data
from .betons import sidecar_path
from .sources import flat_val, image_folder, imagenet_v2, stratified_subset
from .writer import WriteOptions, summary_line, write_beton

Section("source", "where the images come from").params(
    kind=Param(Choice(["demo", "imagefolder", "flatval", "v2"]),
               "demo (bundled, generated) | imagefolder (root/<class>/<img>) | flatval (flat ImageNet val + "
               "labels_file) | v2 (ImageNet-V2: root/<class index>/<img>)", default="demo"),
    root=Param(str, "image directory (imagefolder, flatval, v2)", default=""),
    labels_file=Param(str, "flatval: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt", default=""),
    synsets_file=Param(str, "flatval with the devkit ground truth: meta.mat or synsets in ILSVRC2012_ID order",
                       default=""),
    classes_from=Param(str, "class order to use: train's beton sidecar (.json), a class list file, or train's "
                            "ImageFolder; the source's class set must equal it. imagefolder also takes "
                            "'imagenet1k': synset-named class directories (Imagenette, Imagewoof ...) keep their "
                            "ImageNet-1k indices", default=""),
    subset=Param(int, "write N images only (seeded, stratified by class); 0 = all", default=0),
    seed=Param(int, "seed for subset and demo generation", default=0),
)
Section("writer", "how the beton is written").params(
    out=Param(str, "output .beton path (a .json sidecar is written beside it); demo: ignored", default=""),
    max_resolution=Param(int, "resize so the longer side is at most this (0: keep)", default=500),
    jpeg_quality=Param(int, "JPEG quality for compressed records", default=90),
    compress_probability=Param(float, "share of records stored as JPEG (write_mode=proportion)", default=0.5),
    write_mode=Param(Choice(["raw", "jpg", "smart", "proportion"]), "FFCV RGBImageField write mode",
                     default="proportion"),
    page_mib=Param(int, "beton page size in MiB, a power of two >= 2 (0: FFCV's 8 MiB). 2 lets the page-local "
                        "order (data.in_memory=false) mix classes as well with a quarter of the memory, for "
                        "~8% more file", default=0),
    num_workers=Param(int, "writer processes; 0 = all available cores", default=0),
    chunk_size=Param(int, "images per work item", default=100),
    on_error=Param(Choice(["fail", "skip"]), "unreadable images: fail (write nothing, list them) or skip",
                   default="fail"),
    overwrite=Param(BoolStr(), "replace an existing output", default=False),
    verify=Param(BoolStr(), "read every record back through an FFCV Loader after writing", default=False),
)
Section("demo", "the bundled demo dataset (source.kind=demo)").params(
    out_dir=Param(str, "where the demo images and betons go", default="data/demo"),
    train_per_class=Param(int, "training images per class", default=100),
    val_per_class=Param(int, "validation images per class", default=30),
)


SECTIONS = ("source", "writer", "demo")


def options_from(cfg: dict) -> WriteOptions:
    return WriteOptions(**{k.split(".", 1)[1]: v for k, v in cfg.items()
                           if k.startswith("writer.") and k != "writer.out"})


def build_source(cfg: dict):
    kind, root = cfg["source.kind"], cfg["source.root"]
    if not root:
        raise ConfigError(f"source.root is required for source.kind={kind}")
    classes_from = cfg["source.classes_from"] or None
    if kind == "imagefolder":
        src = image_folder(root, classes_from)
    elif kind == "flatval":
        if not cfg["source.labels_file"]:
            raise ConfigError("source.labels_file is required for source.kind=flatval")
        src = flat_val(root, cfg["source.labels_file"], cfg["source.synsets_file"] or None, classes_from)
    else:
        src = imagenet_v2(root, classes_from)
    if cfg["source.subset"] > 0:
        src = src.select(stratified_subset(src.labels, cfg["source.subset"], cfg["source.seed"]))
    return src


def write_demo(cfg: dict, opts: WriteOptions) -> dict:
    """Generate the demo images (once per seed/size) and write train.beton + val.beton."""
    out_dir = Path(cfg["demo.out_dir"])
    seed = cfg["source.seed"]
    results = {}
    for split, per_class, split_seed in (("train", cfg["demo.train_per_class"], seed),
                                         ("val", cfg["demo.val_per_class"], seed + 10_000)):
        img_dir = out_dir / "images" / split
        stamp = img_dir / demo_data.BOXES_FILE
        params = {"per_class": per_class, "seed": split_seed}
        if not stamp.exists() or json.loads((img_dir / "params.json").read_text()) != params:
            demo_data.generate(img_dir, per_class=per_class, seed=split_seed)
            (img_dir / "params.json").write_text(json.dumps(params))
        src = image_folder(img_dir, classes_from=str(out_dir / "train.json") if split == "val" else None)
        boxes = json.loads(stamp.read_text())
        src.boxes = [boxes[Path(f).relative_to(img_dir).as_posix()] for f in src.files]
        src.kind = "demo"
        beton = out_dir / f"{split}.beton"
        results[str(beton)] = write_beton(src, beton, opts, extra={"demo": params})
    return results


def write(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="write_datasets.py", description=__doc__)
    opts = options_from(cfg)
    try:
        if cfg["source.kind"] == "demo":
            opts.overwrite = True  # the demo is regenerated from its seed: nothing to lose
            results = write_demo(cfg, opts)
        else:
            if not cfg["writer.out"]:
                raise ConfigError("writer.out is required (the .beton path to write)")
            print("config:")
            print_config({k: v for k, v in cfg.items() if not k.startswith("demo.")})
            results = {cfg["writer.out"]: write_beton(build_source(cfg), cfg["writer.out"], opts)}
    except KeyboardInterrupt:
        raise KeyboardInterrupt("nothing was written") from None
    for path, s in results.items():
        print(summary_line(path, s) + (" verified" if s.get("verified") else ""))
        print(f"  sidecar: {sidecar_path(path)}")
    return 0


def main(argv=None) -> int:
    return cli.run(write, argv)
