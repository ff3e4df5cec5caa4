"""`python -m rsb_ffcv.evaluate --eval.models=a3=runs/a3/best.pt --eval.datasets=data/imagenet/val.beton`

Top-1/top-5 of one or more models (rsb_ffcv checkpoints, W&B model artifacts, timm-format weights: see
rsb_ffcv/weights.py) on one or more betons (ImageNet val, ImageNet-V2, ImageNet subsets), plus
ImageNet-ReaL accuracy where real.json is given. The images go through the trainer's validation loader
(timm's eval geometry: resize the shorter side to int(size / crop_ratio), centre crop). Prints a table,
writes results.json, logs a W&B summary and table when logging is on. torchrun for several devices.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastargs import Param, Section

from . import cli, distributed, loaders
from .augment import Normalize
from .config import BoolStr, Choice, ConfigError, load_config, print_config
from .datasets.betons import open_dataset
from .files import save_json
from .recipe import choose_precision
from .tracking import Tracker
from .weights import label_map, load_model

Section("eval", "evaluation").params(
    models=Param(str, "comma-separated model specs [NAME=]SOURCE: a checkpoint .pt, "
                      "wandb:ENTITY/PROJECT/NAME:ALIAS, timm:ARCH[:WEIGHTS], or local-dir:FOLDER (an export)",
                 required=True),
    datasets=Param(str, "comma-separated betons (each with its .json sidecar)", required=True),
    real_labels=Param(str, "ImageNet-ReaL labels: a real.json path, or 'timm' for the copy timm ships; scores "
                           "the datasets whose files are ILSVRC2012_val_*", default=""),
    resolution=Param(int, "test resolution", default=224),
    crop_ratio=Param(float, "centre crop side / shorter side (timm crop_pct)", default=0.95),
    interpolation=Param(Choice(["bicubic", "bilinear"]), "resize filter", default="bicubic"),
    flip_tta=Param(BoolStr(), "average the logits of the image and its mirror", default=False),
    use_ema=Param(BoolStr(), "evaluate the EMA weights of rsb_ffcv checkpoints", default=False),
    batch_size=Param(int, "images per batch per device", default=256),
    num_workers=Param(int, "FFCV decode threads; 0 = available cores / local processes", default=0),
    device=Param(Choice(["auto", "cuda", "cpu"]), "auto: cuda when available", default="auto"),
    trust_pickles=Param(BoolStr(), "load weight files even if they hold Python objects beyond tensors (e.g. timm's "
                                   "old .pth.tar with an argparse.Namespace; only for files you trust: unpickling "
                                   "can run code)", default=False),
    out_dir=Param(str, "results.json, metrics.jsonl and the W&B run go here", default="runs/eval"),
    wandb_mode=Param(Choice(["auto", "online", "offline", "disabled"]), "as the trainer's logging.wandb_mode",
                     default="disabled"),
    wandb_project=Param(str, "W&B project", default="rsb_ffcv"),
    wandb_entity=Param(str, "W&B entity ('' = default)", default=""),
)
SECTIONS = ("eval",)
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")
IMAGENET_VAL = 50_000


def read_real_labels(real_json: str) -> list[list[int]]:
    """ImageNet-ReaL's real.json: one label set per val image, in file-number order."""
    try:
        if real_json == "timm":
            import pkgutil
            real = json.loads(pkgutil.get_data("timm.data", "_info/imagenet_real_labels.json"))
        else:
            real = json.loads(Path(real_json).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"eval.real_labels '{real_json}' cannot be read ({e})") from None
    if not isinstance(real, list) or len(real) != IMAGENET_VAL:
        raise ConfigError(f"eval.real_labels '{real_json}' has {len(real) if isinstance(real, list) else 'no'} "
                          f"entries; ImageNet-ReaL's real.json lists {IMAGENET_VAL} (one per val image)")
    return real


def real_label_sets(real: list[list[int]], files: list[str], beton: str) -> list[list[int]]:
    """ReaL label sets in record order, from the val file names the beton's sidecar recorded."""
    out = []
    for f in files:
        m = VAL_NAME.search(Path(f).name)
        if not m:
            raise ConfigError(f"'{beton}': record file '{f}' is not named ILSVRC2012_val_NNNNNNNN, so ReaL "
                              f"labels cannot be matched to it")
        out.append(real[int(m.group(1)) - 1])
    return out


def real_accuracy(top: np.ndarray, label_sets: list[list[int]], k: int) -> float:
    """timm's RealLabelsImagenet: images with an empty label set are left out; a hit when any of the top-k
    predictions is in the set."""
    hits = [any(p in labels for p in row[:k]) for row, labels in zip(top, label_sets, strict=True) if labels]
    return 100.0 * float(np.mean(hits)) if hits else float("nan")


@torch.no_grad()
def predict(model, loader, device, precision, k: int, threads: int, flip_tta: bool = False):
    """Top-k predictions (N×k) and labels of this rank's records, in its record order, and the sum of their
    cross-entropy losses. The trainer's validation and this tool run this one loop."""
    model.eval()
    normalize = Normalize().to(device)  # the normalisation of training (TrainAugment's)
    tops, labels, loss = [], [], torch.zeros((), dtype=torch.float64, device=device)
    with contextlib.closing(loaders.epoch(loader, threads)) as batches:
        for images, y in batches:
            x = normalize(images)
            with precision.autocast():
                logits = model(x).float()
                if flip_tta:
                    logits = (logits + model(x.flip(3)).float()) / 2
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            tops.append(logits.topk(k, dim=1).indices.cpu())
            labels.append(y.to("cpu", copy=True))  # FFCV reuses its batch buffers (on the CPU: y itself)
    return torch.cat(tops).numpy(), torch.cat(labels).numpy(), loss.item()


def gather_in_record_order(d, array: np.ndarray) -> np.ndarray:
    """Rank r holds records r, r + world, ...: interleave them back into record order."""
    if d.world == 1:
        return array
    parts = [None] * d.world
    torch.distributed.all_gather_object(parts, array)
    out = np.empty((sum(len(p) for p in parts), *array.shape[1:]), array.dtype)
    for r, p in enumerate(parts):
        out[r::d.world] = p
    return out


def evaluate(cfg: dict, d) -> list[dict]:
    betons = [b for b in cfg["eval.datasets"].split(",") if b]
    metas = {b: open_dataset(b) for b in betons}
    label_sets = {}
    if cfg["eval.real_labels"]:
        real = read_real_labels(cfg["eval.real_labels"])
        for b, meta in metas.items():
            files = meta.get("files", [])
            if files and VAL_NAME.search(Path(files[0]).name):  # an ImageNet val beton: every name must match
                label_sets[b] = real_label_sets(real, files, b)
        if not label_sets:
            raise ConfigError("eval.real_labels is given but no dataset holds ILSVRC2012_val_* files")
    precision = choose_precision("auto", d.device)
    threads = distributed.cores_per_process(d.local_world)
    workers = cfg["eval.num_workers"] or threads
    rows = []
    for spec in [s for s in cfg["eval.models"].split(",") if s]:
        m = load_model(spec, d.device, cfg["eval.use_ema"], cfg["eval.trust_pickles"], "eval.trust_pickles")
        for b in betons:
            label_map(m.classes, metas[b]["classes"], m.name, b)
            loader = loaders.val_loader(b, cfg["eval.batch_size"], cfg["eval.resolution"], cfg["eval.crop_ratio"],
                                        d.device, num_workers=workers, rank=d.rank, world=d.world, os_cache=True,
                                        batches_ahead=2, interpolation=cfg["eval.interpolation"])
            k = min(5, len(m.classes))  # top5 means top-k with fewer classes
            top, labels, _ = predict(m.model, loader, d.device, precision, k, threads, cfg["eval.flip_tta"])
            top, labels = gather_in_record_order(d, top), gather_in_record_order(d, labels)
            row = {"model": m.name, "source": m.source, "dataset": Path(b).stem, "beton": b, "images": len(labels),
                   "top1": 100.0 * float((top[:, 0] == labels).mean()),
                   "top5": 100.0 * float((top == labels[:, None]).any(1).mean())}
            if b in label_sets:
                row["real_top1"] = real_accuracy(top, label_sets[b], 1)
                row["real_top5"] = real_accuracy(top, label_sets[b], k)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["model", "dataset", "images", "top1", "top5", "real_top1", "real_top5"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def run(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.evaluate", description=__doc__)
    d = distributed.init(cfg["eval.device"], key="eval.device")
    out_dir, tracker = Path(cfg["eval.out_dir"]), None
    if d.is_main:
        print_config(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(out_dir, cfg, mode=cfg["eval.wandb_mode"], project=cfg["eval.wandb_project"],
                          entity=cfg["eval.wandb_entity"], name=out_dir.name, key="eval.wandb_mode")
    try:
        rows = evaluate(cfg, d)
    except BaseException:
        if tracker is not None:
            tracker.finish(1)
        raise
    if d.is_main:
        save_json(out_dir / "results.json", {"config": cfg, "results": rows})
        tracker.log_table("evaluation", rows)
        tracker.summary(**{f"{r['model']}/{r['dataset']}/{k}": v for r in rows for k, v in r.items()
                           if isinstance(v, float)})
        tracker.finish(0)
        print(table(rows))
        print(f"saved {out_dir / 'results.json'}")
    return 0


def main(argv=None) -> int:
    return cli.run(run, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
