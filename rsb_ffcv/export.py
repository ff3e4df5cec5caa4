"""`python -m rsb_ffcv.export --export.model=runs/a3/best.pt --export.out=exports/resnet50_a3
[--export.weights=auto|ema|model] [--export.evals=runs/eval,...] [--export.push_to=ORG/NAME [--export.private]]`

A run's checkpoint as a folder that timm and the Hugging Face Hub load as they are. The reference matched is timm's
own exporter and the Hub layout of timm's released weights (e.g. `timm/resnet50.a1_in1k`): the folder is written by
`timm.models.save_for_hf`, checked by loading it back, pushed as it is in one commit (`HfApi.upload_folder`), and
loads with
`timm.create_model("local-dir:FOLDER", pretrained=True)` (or `"hf-hub:ORG/NAME"` once pushed). It holds
- `model.safetensors`: the plain timm state dict (no `module.` / `_orig_mod.` keys) of the model or its EMA;
- `config.json`: architecture, num_classes, label_names (the training beton's classes, from the checkpoint) and a
  pretrained_cfg whose input_size is the run's test resolution, crop_pct its test crop ratio, with its eval
  interpolation and the normalisation's mean/std, set as the model's pretrained_cfg (timm's pretrained_cfg_overlay)
  that save_for_hf writes, so `timm.data.resolve_model_data_config(model)` gives back the preprocessing the run
  evaluated with;
- `args.yaml`: the run's full resolved config (the checkpoint's, without keys today's trainer no longer knows; the
  trainer reads it back with --config);
- `README.md`: a Hub model card: the recipe table (rsb_ffcv.report's, the paper's Table 1 rows from this config),
  val / V2 / ReaL top-1 from evaluate's results.json (or "not evaluated"), the training cost from run.json and
  metrics.jsonl, the W&B run, how to load it. Every figure on it is read from the run's files.

export.weights=auto exports the EMA weights when the run kept EMA and they scored a higher val top-1 than the model
at the checkpoint's epoch (metrics.jsonl), else the model; the card says which and why. The folder is written under
a temporary name beside export.out, checked by loading it back with timm, then renamed: a failure leaves nothing.
export.push_to pushes it afterwards; without a token or a reachable Hub it stops with one line (exit 2), the local
folder written.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch
import yaml
from fastargs import Param, Section
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import cli
from .cli import first_line
from .config import BoolStr, Choice, ConfigError, known_keys, load_config, nest
from .files import atomic_path
from .report import dataset_kind, group, ingredients_rows, markdown_table, read_run
from .tracking import read_metrics
from .weights import checkpoint_weights, load_checkpoint, parse_spec

Section("export", "a run's checkpoint as a timm / Hugging Face Hub folder").params(
    model=Param(str, "the checkpoint: an rsb_ffcv .pt (runs/a3/best.pt) or wandb:ENTITY/PROJECT/NAME:ALIAS",
                required=True),
    out=Param(str, "the folder to write (it must not exist): model.safetensors, config.json, args.yaml, README.md",
              required=True),
    weights=Param(Choice(["auto", "ema", "model"]),
                  "which weights: auto = the EMA's if the run kept EMA and it scored a higher val top-1 than the model "
                  "at the checkpoint's epoch (metrics.jsonl), else the model's", default="auto"),
    evals=Param(str, "evaluate outputs of this checkpoint (folders holding results.json, or the files), "
                     "comma-separated: the card's val / V2 / ReaL top-1 ('' = not evaluated)", default=""),
    run_dir=Param(str, "the run folder (config.yaml, metrics.jsonl, run.json) ('' = the checkpoint's folder)",
                  default=""),
    push_to=Param(str, "ORG/NAME: also push the folder to this Hugging Face Hub repository (needs a token: HF_TOKEN "
                       "or `hf auth login`) ('' = local only)", default=""),
    private=Param(BoolStr(), "create the Hub repository private (when push_to creates it; false: the account's "
                             "default; an existing one keeps its visibility)", default=False),
    trust_pickles=Param(BoolStr(), "load the checkpoint even if it holds Python objects beyond tensors (only for "
                                   "files you trust: unpickling can run code)", default=False),
)
SECTIONS = ("export",)
FILES = ("model.safetensors", "config.json", "args.yaml", "README.md")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
RSB_PAPER = ("arXiv:2110.00476", "ResNet strikes back: An improved training procedure in timm")
# What timm's registry says about its own released weights of the architecture (the tag, license, notes, test-time
# sizes): not true of these weights, so the exported pretrained_cfg starts without them.
NOT_OURS = dict(tag=None, license=None, description=None, origin_url=None, paper_name=None, paper_ids=None,
                notes=None, label_names=None, label_descriptions=None, label_offset=None, test_input_size=None,
                test_crop_pct=None, test_pool_size=None)


# ---- reading the run ------------------------------------------------------------------------------------------
def eval_row(rows: list[dict], epoch: int) -> dict | None:
    """metrics.jsonl's record of the evaluation that ended epoch `epoch` (0-based), or None."""
    found = [r for r in rows if r.get("epoch") == epoch and "val/top1" in r]
    return found[-1] if found else None


def choose_weights(mode: str, ck: dict, rows: list[dict]) -> tuple[bool, str]:
    """(export the EMA?, why), for export.weights=mode."""
    has_ema = bool(ck.get("ema"))
    if mode == "model":
        return False, "the model's weights, as asked (export.weights=model)"
    if mode == "ema":
        if not has_ema:
            raise ConfigError("export.weights=ema but the checkpoint holds no EMA weights (the run had "
                              "training.ema=false): use export.weights=model or auto")
        return True, "the EMA weights, as asked (export.weights=ema)"
    if not has_ema:
        return False, "the model's weights: the run kept no EMA (training.ema=false)"
    epoch = ck.get("epoch", 0) - 1  # the checkpoint holds the weights at the end of epoch `epoch`
    row = eval_row(rows, epoch) if ck.get("epoch_steps_done", 0) == 0 else None
    if row is None or "val_ema/top1" not in row:
        return False, ("the model's weights: metrics.jsonl holds no val top-1 of both the model and the EMA for the "
                       "checkpoint's weights, so the EMA was not chosen (export.weights=ema exports it)")
    model, ema = row["val/top1"], row["val_ema/top1"]
    if ema > model:
        return True, (f"the EMA weights: they scored {ema:.2f}% val top-1 against the model's {model:.2f}% at the "
                      f"checkpoint's epoch {epoch + 1} (metrics.jsonl; export.weights=auto)")
    return False, (f"the model's weights: the EMA scored {ema:.2f}% val top-1, not more than the model's "
                   f"{model:.2f}%, at the checkpoint's epoch {epoch + 1} (metrics.jsonl; export.weights=auto)")


def run_files(run_dir: Path | None, given: bool, cfg: dict) -> dict:
    """What the run folder says: report.read_run's run (config, run.json facts, figures), the metrics rows, notes."""
    notes: list[str] = []
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        if given:
            raise ConfigError(f"export.run_dir '{run_dir}' is not a run folder (no config.yaml): give the "
                              f"logging.run_dir of the run that wrote the checkpoint")
        notes.append("the run folder (config.yaml, metrics.jsonl, run.json) was not found beside the checkpoint: "
                     "training cost, scores during training and the W&B run are missing (give export.run_dir)")
        run = {"name": "run", "path": "", "config": cfg, "facts": {}, "notes": []}
        return {"run": run, "rows": [], "notes": notes, "dir": None}
    run = read_run(run_dir)
    on_disk = run["config"]
    run["config"] = cfg  # the weights' own config: the checkpoint's
    differ = sorted(k for k in set(on_disk) | set(cfg) if on_disk.get(k) != cfg.get(k))
    if differ:
        notes.append(f"{run_dir / 'config.yaml'} differs from the checkpoint's config (a run resumed with other "
                     f"settings) in {', '.join(differ[:6])}: args.yaml is the checkpoint's")
    notes += run["notes"]
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    return {"run": run, "rows": rows, "notes": notes, "dir": run_dir}


def read_evals(spec: str, ck_path: Path, source: str, use_ema: bool) -> list[dict]:
    """The rows of the given results.json files that evaluated this checkpoint's exported weights."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        p = Path(item)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"export.evals '{item}' has no results.json (write it with python -m rsb_ffcv.evaluate "
                              f"--eval.models={source})")
        try:
            content = json.loads(f.read_text())
            rows, ecfg = content["results"], content.get("config", {})
            sources = [r["source"] for r in rows]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"export.evals: '{f}' is not an evaluate results.json") from None
        mine = [r for r in rows if _same_source(r["source"], ck_path, source)]
        if not mine:
            raise ConfigError(f"export.evals: '{f}' holds no evaluation of '{source}' (it evaluated "
                              f"{', '.join(dict.fromkeys(sources)) or 'nothing'})")
        if bool(ecfg.get("eval.use_ema", False)) != use_ema:
            raise ConfigError(f"export.evals: '{f}' evaluated the {'EMA' if ecfg.get('eval.use_ema') else 'model'}'s "
                              f"weights, but the export holds the {'EMA' if use_ema else 'model'}'s: evaluate again "
                              f"with --eval.use_ema={'true' if use_ema else 'false'} (or set export.weights)")
        for r in mine:
            out.append({**r, "kind": dataset_kind(r), "results": str(f), "eval": {
                k.split(".", 1)[1]: ecfg.get(k) for k in ("eval.resolution", "eval.crop_ratio", "eval.interpolation",
                                                          "eval.flip_tta")}})
    return out


def _same_source(evaluated: str, ck_path: Path, source: str) -> bool:
    if evaluated == source:
        return True
    if evaluated.startswith(("wandb:", "timm:", "local-dir:")):
        return False
    with contextlib.suppress(OSError):
        return Path(evaluated).resolve() == ck_path.resolve()
    return False


# ---- what the folder holds ------------------------------------------------------------------------------------
def data_config(cfg: dict) -> dict:
    """The preprocessing the run evaluated with, in timm's data-config keys: the val loader's centre crop (shorter
    side resized to int(test / crop ratio), then the centre test x test), its filter, Normalize's mean and std."""
    size = int(cfg["resolution.test"])
    return {"input_size": (3, size, size), "crop_pct": float(cfg["resolution.test_crop_ratio"]), "crop_mode": "center",
            "interpolation": cfg.get("data.test_interpolation", "bicubic"),
            "mean": tuple(float(v) for v in IMAGENET_DEFAULT_MEAN),  # augment.Normalize's defaults
            "std": tuple(float(v) for v in IMAGENET_DEFAULT_STD)}


def label_info(classes: list[str]) -> dict:
    """config.json's label_names (the class list, in output order), and for ImageNet synsets their descriptions."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    synsets = list(info.label_names())
    out = {"label_names": list(classes)}
    index = {s: i for i, s in enumerate(synsets)}
    if all(c in index for c in classes):
        out["label_descriptions"] = {c: info.index_to_description(index[c]) for c in classes}
    return out


def build_model(ck: dict, use_ema: bool, name: str, source: str, dcfg: dict) -> torch.nn.Module:
    """A fresh timm model (CPU, eval mode) holding the chosen weights. Its pretrained_cfg (timm's mechanism, which
    save_for_hf writes into config.json) is the architecture's, cleared of what timm's registry says about its own
    released weights, with the run's preprocessing `dcfg` and the RSB paper."""
    import timm

    from .weights import _load_weights
    default = timm.models.get_pretrained_cfg(ck["arch"])
    overlay = {**NOT_OURS, **dcfg, "paper_ids": RSB_PAPER[0], "paper_name": RSB_PAPER[1]}
    if default is None or tuple(default.input_size[1:]) != tuple(dcfg["input_size"][1:]):
        overlay["pool_size"] = None  # the feature map's size at another input size (as save_for_hf does)
    model = timm.create_model(ck["arch"], pretrained=False, num_classes=len(ck["classes"]),
                              pretrained_cfg_overlay=overlay)
    _load_weights(model, checkpoint_weights(ck, use_ema, name, source), f"checkpoint '{source}'")
    return model.eval()


def hub_config(ck: dict) -> dict:
    """save_for_hf's / push_to_hf_hub's model_config: the class labels (config.json's label_names)."""
    return label_info(ck["classes"])


def retired_keys(cfg: dict) -> list[str]:
    """The keys of a checkpoint's config that today's trainer no longer knows (an older rsb_ffcv wrote them)."""
    from . import train_config
    return sorted(set(cfg) - known_keys(train_config.SECTIONS))


def args_yaml(cfg: dict) -> str:
    """The config as the trainer writes config.yaml (and reads with --config), without its retired keys (which
    --config would refuse)."""
    retired = set(retired_keys(cfg))
    return yaml.safe_dump(nest({k: v for k, v in cfg.items() if k not in retired}), sort_keys=True)


# ---- the model card -------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def datasets_of(ck: dict) -> list[str]:
    """The card's `datasets`: imagenet-1k for ImageNet-1k's classes, else the training beton's source."""
    from .datasets.sources import imagenet_synsets
    if list(ck["classes"]) == imagenet_synsets():
        return ["imagenet-1k"]
    beton = Path(ck["config"].get("data.train_dataset", "train"))
    side = beton.with_suffix(".json")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        src = json.loads(side.read_text()).get("source", {})
        if src.get("kind") == "demo":
            return ["rsb_ffcv-demo"]
        if src.get("root"):
            return [Path(src["root"]).name]
    return [beton.stem]


def recipe_section(run: dict) -> tuple[str, str]:
    """The paper's Table 1 for this run (rsb_ffcv.report's ingredients table) as Markdown, and the closest recipe."""
    g = group([run])
    header, rows = ingredients_rows(g)
    header[1] = "this run"
    cells = [[f"**{text or '(off)'}**" if differs else text or "(off)" for text, differs, _ in row] for row in rows]
    diffs = g[0]["differs_from_paper"]
    note = (f"Closest paper recipe: **{g[0]['paper_recipe']}**; bold cells differ from it"
            + (f" ({', '.join(diffs)})." if diffs else " (none: the paper's recipe)."))
    return markdown_table(header, cells), note


def accuracy_section(evals: list[dict], files: dict, ck: dict) -> str:
    first = {k: next((r for r in evals if r["kind"] == k), None) for k in ("val", "v2")}
    real = next((r for r in evals if "real_top1" in r), None)

    def headline(row, key):
        return f"{_pct(row[key])}% ({row['dataset']}, {row['images']:,} images)" if row else "not evaluated"
    lines = ["| | top-1 (%) |", "|---|---|",
             f"| val (ImageNet's, or the run's val set) | {headline(first['val'], 'top1')} |",
             f"| ImageNet-V2 | {headline(first['v2'], 'top1')} |",
             f"| ImageNet-ReaL | {headline(real, 'real_top1')} |", ""]
    if evals:
        lines += ["Read from `python -m rsb_ffcv.evaluate`'s results.json:", "",
                  "| dataset | kind | images | top-1 | top-5 | ReaL top-1 | eval preprocessing | results.json |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in evals:
            e = r["eval"]
            prep = (f"{e.get('resolution')} px, crop {e.get('crop_ratio')}, {e.get('interpolation')}"
                    + (", flip TTA" if e.get("flip_tta") else ""))
            lines.append(f"| {r['dataset']} | {r['kind']} | {r['images']:,} | {_pct(r['top1'])} "
                         f"| {_pct(r.get('top5'))} | {_pct(r.get('real_top1'))} | {prep} | `{r['results']}` |")
        lines.append("")
    else:
        lines += ["No evaluation was given (export.evals): run `python -m rsb_ffcv.evaluate` on this checkpoint and "
                  "export again with `--export.evals=<its out_dir>`.", ""]
    row = eval_row(files["rows"], ck.get("epoch", 0) - 1) if ck.get("epoch_steps_done", 0) == 0 else None
    if row:
        during = f"val top-1 during training at the checkpoint's epoch {ck['epoch']} (metrics.jsonl): model " \
                 f"{_pct(row['val/top1'])}%"
        if "val_ema/top1" in row:
            during += f", EMA {_pct(row['val_ema/top1'])}%"
        lines.append(during + f" ({row.get('val/images', '?')} images).")
    return "\n".join(lines)


def cost_section(files: dict, cfg: dict) -> str:
    rows, run = files["rows"], files["run"]
    facts = run.get("facts", {})
    epochs = [r for r in rows if "train/epoch_loss" in r]
    if not epochs:
        return "Not recorded: no finished epoch in the run folder's metrics.jsonl" + (
            "" if files["dir"] else " (the run folder was not found)") + "."
    planned = cfg.get("training.epochs", 0) + cfg.get("lr.cooldown_epochs", 0)
    train_s = sum(r.get("epoch_time_s", 0) for r in epochs)
    stamps = [r["time"] for r in rows if "time" in r]
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    world = facts.get("world", 1)
    devices = f"{world} × {facts.get('device', '?')}" + (f" on {facts['nodes']} node(s)" if facts.get("nodes") else "")
    lines = ["| | |", "|---|---|",
             f"| devices | {devices} |",
             f"| precision | {facts.get('precision', '?')} |",
             f"| global batch | {cfg.get('training.batch_size')} ({facts.get('device_batch', '?')} per device × "
             f"{facts.get('accum', '?')} accumulation × {world} devices) |",
             f"| epochs trained | {len(epochs)} of {planned} |",
             f"| training time (sum of epoch times) | {_duration(train_s)} |",
             f"| wall time (first to last record of metrics.jsonl) | "
             f"{_duration(stamps[-1] - stamps[0]) if len(stamps) > 1 else '—'} |",
             f"| device-hours (training) | {train_s * world / 3600:.3f} |",
             f"| images/s (median of the logged windows, all devices) | "
             f"{f'{statistics.median(speeds):,.0f}' if speeds else '—'} |"]
    return "\n".join(lines) + "\n\nFrom the run folder's run.json and metrics.jsonl."


def wandb_section(files: dict, cfg: dict, source: str) -> str:
    run_id = files["run"].get("facts", {}).get("wandb_run_id")
    entity, project = cfg.get("logging.wandb_entity", ""), cfg.get("logging.wandb_project", "rsb_ffcv")
    if source.startswith("wandb:"):  # the artifact's entity and project are the run's
        entity, project = source[len("wandb:"):].split("/")[:2]
    files_dir = files["dir"]
    if not run_id:
        return "No W&B run was logged (logging.wandb_mode=disabled, or run.json not found)."
    from .tracking import wandb_base_url
    try:
        import warnings

        from wandb.util import app_url
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            base = app_url(wandb_base_url())
    except Exception:  # wandb missing or broken: the API address is close enough
        base = wandb_base_url()
    offline = bool(files_dir and list(files_dir.glob(f"wandb/offline-run-*-{run_id}")))
    link = f"{base}/{entity or '<your W&B entity>'}/{project}/runs/{run_id}"
    if offline:
        return (f"W&B run `{run_id}` (project `{project}`) was logged offline: upload it with `wandb sync "
                f"{files_dir}/wandb/offline-run-*`, then it is at {link}")
    return f"W&B run: [{link}]({link})" + ("" if entity else " (the entity is the W&B account's default)")


def model_card(*, title: str, ck: dict, source: str, why: str, files: dict, evals: list[dict],
               model: torch.nn.Module, dcfg: dict, out: Path, push_to: str) -> str:
    cfg = ck["config"]
    table, closest = recipe_section(files["run"])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    n = len(ck["classes"])
    datasets = datasets_of(ck)
    size = dcfg["input_size"][-1]
    epoch = ck.get("epoch", "?")
    planned = cfg.get("training.epochs", 0) + cfg.get("lr.cooldown_epochs", 0)
    hub = f"hf-hub:{push_to}" if push_to else "hf-hub:ORG/NAME"
    notes = list(files["notes"])
    retired = retired_keys(cfg)
    if retired:
        notes.append(f"args.yaml leaves out what today's trainer no longer knows: {', '.join(retired)}")
    if cfg.get("data.decoder", "fast") != "fast":
        notes.append("the run evaluated with FFCV's stock centre-crop decoder (OpenCV INTER_AREA resize); timm's "
                     f"transform uses {dcfg['interpolation']}, so accuracy may differ slightly")
    front = ["---", "tags:", "- image-classification", "- timm", "library_name: timm",
             "pipeline_tag: image-classification",
             "license: other  # placeholder: set the license of these weights (and what the training data allows) "
             "before publishing", "datasets:", *[f"- {d}" for d in datasets], "---"]
    body = [
        f"# Model card for {title}",
        "",
        f"A {ck['arch']} image classifier ({n} classes) trained with "
        f"rsb_ffcv on {', '.join(datasets)} with the machinery of \"ResNet strikes back\" "
        f"({RSB_PAPER[0]}). {closest}",
        "",
        "## Model Details",
        "- **Model type:** image classification / feature backbone",
        f"- **Architecture:** `{ck['arch']}` (timm)",
        f"- **Params (M):** {params:.1f}",
        f"- **Image size:** test {size} x {size} (crop_pct {dcfg['crop_pct']}, {dcfg['interpolation']}); "
        f"trained at {cfg.get('resolution.train')} x {cfg.get('resolution.train')}",
        f"- **Weights:** {why}",
        f"- **Checkpoint:** `{source}`, after epoch {epoch} of {planned}",
        f"- **Dataset:** {', '.join(datasets)}",
        f"- **Papers:** {RSB_PAPER[1]} ({RSB_PAPER[0]})",
        "",
        "## Recipe",
        "",
        "The paper's Table 1 ingredients, from this run's config (`rsb_ffcv.report`):",
        "",
        table,
        "The run's full resolved config is `args.yaml` (rerun it with `python -m rsb_ffcv.train --config args.yaml "
        "--logging.run_dir=NEW`).",
        "",
        "## Accuracy",
        "",
        accuracy_section(evals, files, ck),
        "",
        "## Training cost",
        "",
        cost_section(files, cfg),
        "",
        "## Tracking",
        "",
        wandb_section(files, cfg, source),
        "",
        "## How to use",
        "",
        "```python",
        "import timm",
        "import torch",
        "from PIL import Image",
        "",
        f"model = timm.create_model(\"{hub}\", pretrained=True).eval()  # or \"local-dir:{out}\"",
        f"config = timm.data.resolve_model_data_config(model)  # {size} px, crop_pct {dcfg['crop_pct']}, "
        f"{dcfg['interpolation']}, the run's mean/std",
        "transform = timm.data.create_transform(**config, is_training=False)",
        "with torch.no_grad():",
        "    logits = model(transform(Image.open(\"image.jpg\").convert(\"RGB\")).unsqueeze(0))",
        "top5 = logits.softmax(-1).topk(5)",
        "labels = [model.pretrained_cfg[\"label_names\"][i] for i in top5.indices[0]]",
        "```",
        "",
        "Scored with rsb_ffcv's evaluation (the trainer's validation loader):",
        "",
        "```bash",
        f"python -m rsb_ffcv.evaluate --eval.models=local-dir:{out} --eval.datasets=VAL.beton "
        f"--eval.resolution={size} --eval.crop_ratio={dcfg['crop_pct']} --eval.interpolation={dcfg['interpolation']}",
        "```",
    ]
    if notes:
        body += ["", "## Notes", "", *[f"- {x}" for x in notes]]
    return "\n".join(front + body) + "\n"


# ---- writing --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_folder(out: Path):
    """A temporary folder beside `out` (rsb_ffcv.files.atomic_path's name) that becomes `out` when the block ends
    without error; on any failure it is removed, with the parent folders this created."""
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:  # its files on disk, then the rename; the folder removed on any failure
            tmp.mkdir()
            yield tmp
    except BaseException as e:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and out.is_dir() \
                and any(out.iterdir()):  # the rename onto `out`, which someone filled meanwhile
            raise ConfigError(f"export.out '{out}' was written to while the export ran: it is left as it is, and "
                              f"nothing of the export is kept (choose another folder)") from None
        raise


def write_folder(folder: Path, model, ck: dict, dcfg: dict, card: str) -> None:
    from timm.models import save_for_hf
    save_for_hf(model, str(folder), model_config=hub_config(ck), safe_serialization=True)
    (folder / "args.yaml").write_text(args_yaml(ck["config"]))
    (folder / "README.md").write_text(card)
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():  # safetensors writes its file owner-only; the folder is meant to be shared
        f.chmod(0o666 & ~mask)
    check_folder(folder, model, dcfg)


def check_folder(folder: Path, model, dcfg: dict) -> None:
    """Load the folder back the way users will (timm's local-dir loader) and compare: the same tensors, the same
    preprocessing. A mismatch is a bug (exit 1), and nothing is left."""
    import timm
    back = timm.create_model(f"local-dir:{folder}", pretrained=True)
    mine, theirs = model.state_dict(), back.state_dict()
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    got = timm.data.resolve_model_data_config(back)
    want = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dcfg.items()}
    got = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in got.items() if k in want}
    if not same or got != want:
        raise RuntimeError(f"the folder written does not load back as exported (weights equal: {same}; "
                           f"preprocessing {got} vs {want})")


def push(folder: Path, repo: str, private: bool) -> str:
    """The folder as written and checked (model.safetensors, config.json, args.yaml, README.md) in one commit,
    creating the repository if needed (private if asked)."""
    later = f"the folder {folder} is written; push it later with: hf upload {repo} {folder}"
    from huggingface_hub import HfApi, get_token
    try:
        token = get_token()
    except Exception as e:  # HF_OIDC_RESOURCE set and its exchange failed
        raise ConfigError(f"export.push_to={repo}: no Hugging Face token ({first_line(e)}); {later}") from None
    if not token:
        raise ConfigError(f"export.push_to={repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); "
                          f"{later}")
    try:
        api = HfApi(token=token)
        api.create_repo(repo, exist_ok=True, private=private or None)  # None: the account's default
        api.upload_folder(repo_id=repo, folder_path=str(folder), allow_patterns=list(FILES),
                          commit_message="Add the model, its config, the run's args.yaml and the card "
                                         "(rsb_ffcv export)")
    except Exception as e:  # no network, refused token, no rights on the organisation
        raise ConfigError(f"export.push_to={repo}: the push to the Hugging Face Hub failed ({type(e).__name__}: "
                          f"{first_line(e)}); {later}") from None
    from huggingface_hub import constants
    return f"{constants.ENDPOINT}/{repo}"


def export(cfg: dict) -> Path:
    out = Path(cfg["export.out"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export.out '{out}' already exists: remove it or choose another folder")
    repo = cfg["export.push_to"]
    if repo and not REPO_ID.match(repo):
        raise ConfigError(f"export.push_to '{repo}' is not a Hub repository id: write ORG/NAME")
    name, source = parse_spec(cfg["export.model"])
    if source.startswith(("timm:", "local-dir:")):
        raise ConfigError(f"export.model '{source}': give a checkpoint of ours (runs/NAME/best.pt or "
                          f"wandb:ENTITY/PROJECT/NAME:ALIAS); timm-format weights are exported already")
    ck_path, ck = load_checkpoint(name, source, cfg["export.trust_pickles"], "export.trust_pickles", "export.model")
    if not isinstance(ck.get("config"), dict) or not ck.get("classes"):
        raise ConfigError(f"export.model '{source}': the checkpoint holds no config or class list (written by an "
                          f"older rsb_ffcv?): it cannot be described")
    given = bool(cfg["export.run_dir"])
    run_dir = Path(cfg["export.run_dir"]) if given else None if source.startswith("wandb:") else ck_path.parent
    files = run_files(run_dir, given, ck["config"])
    use_ema, why = choose_weights(cfg["export.weights"], ck, files["rows"])
    evals = read_evals(cfg["export.evals"], ck_path, source, use_ema) if cfg["export.evals"] else []
    dcfg = data_config(ck["config"])
    model = build_model(ck, use_ema, name, source, dcfg)
    title = repo.split("/")[-1] if repo else out.name
    if title == "export":  # make demo's runs/demo-<time>/export: name the run instead
        title = f"{ck['arch']} ({Path(ck['config'].get('logging.run_dir', '')).name or 'run'})"
    card = model_card(title=title, ck=ck, source=source, why=why, files=files,
                      evals=evals, model=model, dcfg=dcfg, out=out, push_to=repo)
    with staged_folder(out) as tmp:
        write_folder(tmp, model, ck, dcfg, card)
    print(f"weights: {why}")
    print(f"exported {out}: {', '.join(FILES)}")
    print(f"load it with timm.create_model(\"local-dir:{out}\", pretrained=True)")
    if repo:
        print(f"pushed: {push(out, repo, cfg['export.private'])}")
    return out


def run(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.export", description=__doc__)
    export(cfg)
    return 0


def main(argv=None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
