"""`python -m rsb_ffcv.gradcam --gradcam.models=a1=A1.pt,a2=A2.pt,a3=A3.pt --gradcam.dataset=val.beton`

Grad-CAM (Selvaraju et al. 2017) of several models on the same images, as the RSB W&B report compares
A1/A2/A3: a PNG grid (rows: images; columns: the input, then each model's heat map over it with its
prediction and confidence) and the same content as a W&B Table. Where the beton's sidecar records object
boxes (the demo dataset), also the localisation scores per model: pointing game (the CAM maximum falls in
the box) and the share of CAM energy inside the box, next to a uniform-random CAM's.

Grad-CAM here is computed on the model's last feature map through timm's forward_features/forward_head
split: weights = spatial mean of d(score)/d(features), CAM = ReLU(sum_k weight_k * feature_k).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastargs import Param, Section
from PIL import Image

from . import cli, distributed, loaders
from .augment import Normalize
from .config import BoolStr, Choice, ConfigError, load_config, print_config
from .crop_decoder import center_box
from .datasets.betons import open_dataset
from .datasets.sources import readable_names
from .files import save_figure, save_json
from .tracking import Tracker
from .weights import label_map, load_model

Section("gradcam", "Grad-CAM comparison").params(
    models=Param(str, "comma-separated NAME=SOURCE model specs (as rsb_ffcv.evaluate)", required=True),
    dataset=Param(str, "beton to draw images from", required=True),
    images=Param(int, "number of images (seeded selection)", default=8),
    indices=Param(str, "comma-separated record indices instead of a seeded selection", default=""),
    seed=Param(int, "selection seed", default=0),
    target=Param(Choice(["true", "predicted"]), "explain the true class or each model's predicted class",
                 default="true"),
    resolution=Param(int, "input resolution", default=224),
    crop_ratio=Param(float, "centre crop side / shorter side", default=0.95),
    localisation=Param(Choice(["auto", "off"]), "auto: score every image of the beton when it has boxes",
                       default="auto"),
    device=Param(Choice(["auto", "cuda", "cpu"]), "auto: cuda when available", default="auto"),
    trust_pickles=Param(BoolStr(), "load weight files even if they hold Python objects beyond tensors (e.g. timm's "
                                   "old .pth.tar with an argparse.Namespace; only for files you trust: unpickling "
                                   "can run code)", default=False),
    out_dir=Param(str, "grid.png, scores.json and the W&B run go here", default="runs/gradcam"),
    wandb_mode=Param(Choice(["auto", "online", "offline", "disabled"]), "as the trainer's logging.wandb_mode",
                     default="auto"),
    wandb_project=Param(str, "W&B project (use the training runs' project)", default="rsb_ffcv"),
    wandb_entity=Param(str, "W&B entity ('' = default)", default=""),
)
SECTIONS = ("gradcam",)


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None):
    """(CAM N×h×w on the last feature map, unnormalised; logits N×C). target None: the predicted class."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(False)
        features = model.forward_features(x)
        features.retain_grad()
        logits = model.forward_head(features)
        if target is None:
            target = logits.argmax(1)
        model.zero_grad(set_to_none=True)
        logits.gather(1, target[:, None]).sum().backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(1)).detach()
    return cam, logits.detach()


def upsample(cam: torch.Tensor, size: int) -> torch.Tensor:
    """CAM to the input size, each scaled to [0, 1] (an all-zero CAM stays zero)."""
    up = F.interpolate(cam[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return up / peak


def overlay(image: np.ndarray, cam: np.ndarray) -> Image.Image:
    from matplotlib import colormaps
    heat = colormaps["jet"](cam)[..., :3] * 255
    return Image.fromarray((0.5 * image + 0.5 * heat).astype(np.uint8))


def boxes_in_crop(meta: dict, beton: str, indices: np.ndarray, size: int, crop_ratio: float) -> np.ndarray:
    """The sidecar's object boxes (source pixels) in the centre crop's output pixels: N×4 (x0, y0, x1, y1)."""
    from ffcv.reader import Reader
    stored = Reader(beton).metadata["f0"]  # the image field: stored width and height per record
    out = []
    for i in indices:
        x0, y0, x1, y1 = meta["boxes"][i]
        w0, h0 = meta["box_image_sizes"][i]
        h, w = int(stored["height"][i]), int(stored["width"][i])
        sx, sy = w / w0, h / h0
        cy, cx, ch, cw = center_box(h, w, size, crop_ratio)
        out.append([(x0 * sx - cx) * size / cw, (y0 * sy - cy) * size / ch,
                    (x1 * sx - cx) * size / cw, (y1 * sy - cy) * size / ch])
    return np.clip(np.array(out), 0, size)


def localisation(cams: torch.Tensor, raw: torch.Tensor, boxes: np.ndarray) -> dict:
    """Pointing game and CAM energy inside the box, and what a uniform-random CAM scores (box area share).

    The pointing game takes the centre of the strongest cell of the feature-map CAM (`raw`): an upsampled
    coarse map has flat maxima whose first pixel sits at a cell corner, not where the evidence is."""
    n, size = cams.shape[0], cams.shape[-1]
    centres = torch.arange(size) + 0.5
    inside = torch.zeros(n, size, size, dtype=torch.bool)
    hits = torch.zeros(n)
    gh, gw = raw.shape[-2:]
    for k, (x0, y0, x1, y1) in enumerate(boxes):  # a pixel is inside when its centre is
        inside[k] = ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]
        i, j = divmod(int(raw[k].argmax()), gw)
        px, py = (j + 0.5) * size / gw, (i + 0.5) * size / gh
        hits[k] = float(x0 <= px <= x1 and y0 <= py <= y1)
    energy = (cams * inside).flatten(1).sum(1) / cams.flatten(1).sum(1).clamp_min(1e-12)
    area = inside.flatten(1).float().mean(1)
    return {"pointing_game": float(hits.mean()), "energy_in_box": float(energy.mean()),
            "random_cam_pointing_game": float(area.mean()), "random_cam_energy_in_box": float(area.mean()),
            "images": n}


def load_images(beton: str, indices: np.ndarray, size: int, crop_ratio: float, device):
    loader = loaders.val_loader(beton, 64, size, crop_ratio, device, num_workers=1, rank=0, world=1,
                                os_cache=True, batches_ahead=1, indices=indices)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loaders.epoch(loader, torch.get_num_threads())], strict=True)
    return torch.cat(xs), torch.cat(ys)


def cams_for(model, images: torch.Tensor, labels: torch.Tensor, target: str, size: int, batch: int = 32):
    """(CAMs upsampled to the input and scaled to [0, 1], CAMs on the feature map, class probabilities)."""
    normalize = Normalize().to(images.device)
    cams, raws, probs = [], [], []
    for s in range(0, len(images), batch):
        cam, logits = grad_cam(model, normalize(images[s:s + batch]),
                               labels[s:s + batch] if target == "true" else None)
        cams.append(upsample(cam, size).cpu())
        raws.append(cam.cpu())
        probs.append(logits.float().softmax(1).cpu())
    return torch.cat(cams), torch.cat(raws), torch.cat(probs)


def grid_png(path: Path, images: np.ndarray, label_names: list[str], panels: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(images), 1 + len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.25 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(f"true: {label_names[r]}", fontsize=7)
        for c, (name, p) in enumerate(panels.items(), start=1):
            axes[r, c].imshow(p["overlays"][r])
            axes[r, c].set_title(f"{name}: {p['pred_names'][r]} ({100 * p['conf'][r]:.0f}%)", fontsize=7,
                                 color="green" if p["correct"][r] else "red")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    save_figure(fig, path, dpi=110)


def run(cfg: dict, device: torch.device) -> dict:
    beton, size, ratio = cfg["gradcam.dataset"], cfg["gradcam.resolution"], cfg["gradcam.crop_ratio"]
    meta = open_dataset(beton)
    n = len(meta["labels"])
    if cfg["gradcam.indices"]:
        try:
            chosen = np.array([int(i) for i in cfg["gradcam.indices"].split(",") if i.strip()])
        except ValueError:
            raise ConfigError(f"gradcam.indices '{cfg['gradcam.indices']}': expected comma-separated integers") from None
        if len(chosen) == 0 or chosen.min() < 0 or chosen.max() >= n:
            raise ConfigError(f"gradcam.indices must lie in 0..{n - 1} ('{beton}' holds {n} images)")
    else:
        chosen = np.sort(np.random.default_rng(cfg["gradcam.seed"]).choice(n, min(cfg["gradcam.images"], n),
                                                                          replace=False))
    score_boxes = cfg["gradcam.localisation"] == "auto" and "boxes" in meta
    everything = np.arange(n) if score_boxes else chosen
    images, labels = load_images(beton, everything, size, ratio, device)
    pick = np.searchsorted(everything, chosen)
    boxes = boxes_in_crop(meta, beton, everything, size, ratio) if score_boxes else None

    names = readable_names(meta["classes"])
    shown = images[pick].permute(0, 2, 3, 1).cpu().numpy()
    true_names = [names[int(y)] for y in labels[pick]]
    panels, scores, rows = {}, {}, []
    for spec in [s for s in cfg["gradcam.models"].split(",") if s]:
        m = load_model(spec, device, trust=cfg["gradcam.trust_pickles"], trust_flag="gradcam.trust_pickles")
        label_map(m.classes, meta["classes"], m.name, beton)
        cams, raw, probs = cams_for(m.model, images, labels, cfg["gradcam.target"], size)
        conf, pred = probs.max(1)
        panels[m.name] = {"overlays": [overlay(shown[r], cams[k].numpy()) for r, k in enumerate(pick)],
                          "pred_names": [names[int(p)] for p in pred[pick]], "conf": conf[pick].tolist(),
                          "correct": (pred[pick] == labels[pick].cpu()).tolist()}
        scores[m.name] = {"top1_on_scored_images": float((pred == labels.cpu()).float().mean())}
        if boxes is not None:
            scores[m.name].update(localisation(cams, raw, boxes))
    for r, k in enumerate(pick):
        row = {"index": int(chosen[r]), "image": Image.fromarray(shown[r]), "label": true_names[r]}
        for name, p in panels.items():
            row.update({f"{name} grad-cam": p["overlays"][r], f"{name} prediction": p["pred_names"][r],
                        f"{name} confidence": round(p["conf"][r], 4)})
        rows.append(row)
    return {"chosen": chosen.tolist(), "shown": shown, "true_names": true_names, "panels": panels,
            "scores": scores, "rows": rows}


def explain(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.gradcam", description=__doc__)
    d = distributed.init(cfg["gradcam.device"], key="gradcam.device")
    if not d.is_main:  # a handful of images: rank 0 does it all, and alone writes the outputs
        return 0
    print_config(cfg)
    out_dir = Path(cfg["gradcam.out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(out_dir, cfg, mode=cfg["gradcam.wandb_mode"], project=cfg["gradcam.wandb_project"],
                      entity=cfg["gradcam.wandb_entity"], name=out_dir.name, key="gradcam.wandb_mode")
    try:
        result = run(cfg, d.device)
    except BaseException:
        tracker.finish(1)
        raise
    title = (f"Grad-CAM ({cfg['gradcam.target']} class) on {Path(cfg['gradcam.dataset']).name}, "
             f"{cfg['gradcam.resolution']} px")
    grid_png(out_dir / "grid.png", result["shown"], result["true_names"], result["panels"], title)
    save_json(out_dir / "scores.json", {"config": cfg, "images": result["chosen"], "scores": result["scores"]})
    tracker.log_table("gradcam", result["rows"])
    tracker.summary(**{f"{m}/{k}": v for m, s in result["scores"].items() for k, v in s.items()})
    tracker.finish(0)
    for name, s in result["scores"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print(f"saved {out_dir / 'grid.png'} and {out_dir / 'scores.json'}")
    return 0


def main(argv=None) -> int:
    return cli.run(explain, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
