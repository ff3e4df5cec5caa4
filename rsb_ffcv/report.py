"""`python -m rsb_ffcv.report --report.runs=runs/a1,runs/a2,runs/a3 [--report.evals=runs/eval]
[--report.gradcam=runs/gradcam] --report.out=report/`: finished (or running) runs as the RSB paper's comparison.

Reads only what the tools write: each run's config.yaml, metrics.jsonl and run.json; evaluate's results.json;
gradcam's grid.png and scores.json. Writes `index.html` (one self-contained page: images inline, no script, no
network), `summary.json` (every figure on the page) and `table.md` (the accuracy table as Markdown), and, with W&B
on, the same content as a W&B Report linking the runs. Runs whose configs differ only in the seed (and paths and
names) are one recipe: every figure of it is shown as mean ± std over its n runs (the paper's stability study).
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import statistics
import sys
from pathlib import Path

import yaml
from fastargs import Param, Section

from . import cli, rsb_paper
from .config import Choice, ConfigError, flatten, load_config
from .files import atomic_path, save_json
from .tracking import curves_figure, epoch_curves, read_metrics

Section("report", "the comparison page").params(
    runs=Param(str, "run folders or globs, comma-separated (each holds config.yaml and metrics.jsonl)", required=True),
    evals=Param(str, "evaluate outputs: results.json files or their folders, comma-separated ('' = none)", default=""),
    gradcam=Param(str, "a gradcam output folder (grid.png, scores.json) ('' = none)", default=""),
    out=Param(str, "output folder: index.html, summary.json, table.md", default="report"),
    title=Param(str, "page title", default="ResNet strikes back: A1 / A2 / A3 reproduced with rsb_ffcv"),
    wandb_mode=Param(Choice(["auto", "online", "disabled"]),
                     "publish a W&B Report too: auto (when W&B credentials are configured and the server answers), "
                     "online (fail if it cannot), disabled", default="auto"),
    wandb_project=Param(str, "W&B project of the runs and the report", default="rsb_ffcv"),
    wandb_entity=Param(str, "W&B entity ('' = default)", default=""),
)
SECTIONS = ("report",)
# Keys that name files, outputs or debugging, not the recipe: runs differing only in these (and the seed) group.
# (training.debug_*: the test hooks that older runs' config.yaml still hold.)
NOT_RECIPE = ("logging.", "data.train_dataset", "data.val_dataset", "training.resume", "training.trust_pickles",
              "training.debug_", "training.seed", "training.device", "data.num_workers")


# ---- reading --------------------------------------------------------------------------------------------------
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def read_run(folder: Path) -> dict:
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{folder}' is not a run folder (no config.yaml): give folders written by "
                          f"python -m rsb_ffcv.train (logging.run_dir)")
    cfg = flatten(yaml.safe_load(cfg_path.read_text()) or {})
    rows, note = read_metrics(folder / "metrics.jsonl")
    facts = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    epochs = [r for r in rows if "train/epoch_loss" in r]
    vals = [r for r in epochs if "val/top1" in r]
    planned = cfg.get("training.epochs", 0) + cfg.get("lr.cooldown_epochs", 0)
    windows = [r for r in rows if "train/images_per_s" in r]
    devices = facts.get("world", 1)
    run = {
        "name": folder.name, "path": str(folder), "config": cfg, "facts": facts, "notes": [note] if note else [],
        "epochs_done": len(epochs), "epochs_planned": planned,
        "status": "finished" if planned and len(epochs) >= planned else (
            f"partial: {len(epochs)} of {planned} epochs" if epochs else "no finished epoch yet"),
        "val_top1": vals[-1]["val/top1"] if vals else None,
        "val_top5": vals[-1].get("val/top5") if vals else None,
        "best_val_top1": max(r["val/top1"] for r in vals) if vals else None,
        "images_per_s": median(r["train/images_per_s"] for r in windows),
        "data_wait": median(r.get("train/data_wait") for r in windows),
        "epoch_time_s": median(r.get("epoch_time_s") for r in epochs),
        "device_hours": sum(r.get("epoch_time_s", 0) for r in epochs) * devices / 3600,
        "curves": epoch_curves(rows),
    }
    if not vals:
        run["notes"].append("no evaluation yet")
    return run


def expand(spec: str, what: str) -> list[Path]:
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise ConfigError(f"{what} '{item}' matches nothing")
        out += [Path(m) for m in matches]
    return out


def read_evals(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"report.evals '{p}' has no results.json (write it with python -m rsb_ffcv.evaluate)")
        try:
            rows += json.loads(f.read_text())["results"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"'{f}' is not an evaluate results.json") from None
    return rows


def dataset_kind(row: dict) -> str:
    """v2 or val, from the beton's sidecar (write_datasets.py records the source kind) or its name."""
    side = Path(row.get("beton", "")).with_suffix(".json")
    kind = ""
    if side.is_file():
        try:
            kind = json.loads(side.read_text()).get("source", {}).get("kind", "")
        except ValueError:
            pass
    if "v2" in kind or "v2" in row.get("dataset", "").lower():
        return "v2"
    return "val"


def attach_evals(runs: list[dict], rows: list[dict]) -> None:
    """Each evaluation row whose model file lies in a run folder is that run's (V2, ReaL, val top-1 at eval)."""
    by_dir = {Path(r["path"]).resolve(): r for r in runs}
    for row in rows:
        run = by_dir.get(Path(row.get("source", "")).resolve().parent)
        if run is None:
            continue
        kind = dataset_kind(row)
        ev = run.setdefault("eval", {})
        ev[f"{kind}_top1"] = row["top1"]
        if "real_top1" in row:
            ev["real_top1"] = row["real_top1"]
    for run in runs:
        ev = run.get("eval", {})
        if "val_top1" in ev and "v2_top1" in ev:
            ev["val_minus_v2"] = ev["val_top1"] - ev["v2_top1"]


# ---- grouping -------------------------------------------------------------------------------------------------
def recipe_key(cfg: dict) -> str:
    return json.dumps({k: v for k, v in sorted(cfg.items()) if not k.startswith(NOT_RECIPE)}, sort_keys=True,
                      default=str)


def stat(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


FIGURES = ["val_top1", "best_val_top1", "val_top5", "v2_top1", "real_top1", "val_minus_v2", "images_per_s",
           "data_wait", "epoch_time_s", "device_hours"]


def group(runs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(recipe_key(r["config"]), []).append(r)
    out, used = [], {}
    for members in groups.values():
        cfg = members[0]["config"]
        recipe, diffs = rsb_paper.closest_recipe(cfg)
        used[recipe] = used.get(recipe, 0) + 1
        name = recipe if used[recipe] == 1 else f"{recipe} ({members[0]['name']})"
        figures = {f: stat(r.get(f, r.get("eval", {}).get(f)) for r in members) for f in FIGURES}
        out.append({"name": name, "paper_recipe": recipe, "differs_from_paper": diffs, "config": cfg,
                    "runs": [r["name"] for r in members], "seeds": [r["config"].get("training.seed") for r in members],
                    "figures": figures, "facts": members[0]["facts"]})
    return out


# ---- rendering ------------------------------------------------------------------------------------------------
def fmt(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "—"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f} (n={s['n']})" if s["n"] > 1 else "")


def png_data_uri(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ingredients_rows(groups: list[dict]) -> tuple[list[str], list[list[tuple[str, bool, str]]]]:
    """Header and rows of the ingredients table: (text, differs from the paper, key) per cell."""
    papers = list(dict.fromkeys(g["paper_recipe"] for g in groups))
    header = ["ingredient"] + [g["name"] for g in groups] + [f"paper {p}" for p in papers]
    rows = []
    for label, key in rsb_paper.INGREDIENTS:
        row = [(label, False, "")]
        for g in groups:
            want = rsb_paper.RECIPES[g["paper_recipe"]].get(key)
            have = g["config"].get(key)
            row.append((str(have), key in rsb_paper.RECIPES[g["paper_recipe"]] and have != want, key))
        row += [(str(rsb_paper.RECIPES[p].get(key, "")), False, "") for p in papers]
        rows.append(row)
    setup = [("devices × accumulation", False, "")]
    for g in groups:
        f = g["facts"]
        setup.append((f"{f.get('world', '?')} {f.get('device', '')} × {f.get('accum', '?')}", False, ""))
    rows.append(setup + [("4 V100 × 1", False, "")] * len(papers))
    return header, rows


def accuracy_rows(groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["recipe", "runs", "val top-1 (final)", "val top-1 (best)", "val top-5", "ImageNet-V2", "ReaL",
              "val − V2", "source"]
    rows = [[g["name"], ", ".join(g["runs"]), fmt(g["figures"]["val_top1"]), fmt(g["figures"]["best_val_top1"]),
             fmt(g["figures"]["val_top5"]), fmt(g["figures"]["v2_top1"]), fmt(g["figures"]["real_top1"]),
             fmt(g["figures"]["val_minus_v2"]), "these runs"] for g in groups]
    for ref in rsb_paper.REFERENCE_ROWS:
        v = {k: ({"mean": ref[k], "std": 0, "n": 1} if k in ref else None)
             for k in ("val_top1", "v2_top1", "real_top1")}
        gap = {"mean": ref["val_top1"] - ref["v2_top1"], "std": 0, "n": 1} if "v2_top1" in ref else None
        rows.append([ref["name"], "—", fmt(v["val_top1"]), "—", "—", fmt(v["v2_top1"]), fmt(v["real_top1"]),
                     fmt(gap), ref["source"]])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def html_table(header, rows, cell=lambda c: (html.escape(str(c)), "")) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        tds = []
        for c in r:
            text, cls = cell(c)
            tds.append(f"<td{f' class={cls!r}' if cls else ''}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
body{max-width:1400px}table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f2f2f2}
td.diff{background:#ffe3b3}td.diff small{color:#8a4b00}h2{margin-top:28px}.note{color:#8a4b00}img{max-width:100%}"""


def render_html(title: str, groups, runs, eval_rows, gradcam, curves_uri) -> str:
    def ingredient_cell(c):
        text, differs, key = c
        if differs:
            return f"{html.escape(text)}<br><small>≠ paper: set {html.escape(key)}</small>", "diff"
        return html.escape(text), ""
    ing_header, ing_rows = ingredients_rows(groups)
    acc_header, acc_rows = accuracy_rows(groups)
    cost_rows = [[r["name"], r["status"], f"{r['images_per_s']:,.0f}" if r["images_per_s"] else "—",
                  f"{100 * r['data_wait']:.1f}%" if r["data_wait"] is not None else "—",
                  f"{r['epoch_time_s']:.1f} s" if r["epoch_time_s"] else "—", f"{r['device_hours']:.3f}",
                  f"{r['facts'].get('world', '?')} × {r['facts'].get('device', '?')}"] for r in runs]
    notes = [f"<li><b>{html.escape(r['name'])}</b>: {html.escape('; '.join(r['notes']))}</li>" for r in runs
             if r["notes"]]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} run(s) in {len(groups)} recipe group(s); runs that differ only in the seed are one "
             f"group, shown as mean ± std (n). Cells that differ from the paper's recipe are marked with the key "
             f"to change.</p>"]
    if notes:
        parts.append(f"<ul class='note'>{''.join(notes)}</ul>")
    parts += ["<h2>1. Ingredients (the paper's Table 1, from each run's config)</h2>",
              html_table(ing_header, ing_rows, ingredient_cell),
              "<h2>2. Accuracy</h2>", html_table(acc_header, acc_rows),
              "<h2>3. Curves</h2>", f"<img alt='training curves' src='{curves_uri}'>",
              "<h2>4. Cost</h2>", html_table(["run", "status", "images/s (median)", "data wait", "epoch time",
                                              "device-hours", "devices"], cost_rows)]
    if gradcam is not None:
        parts.append("<h2>5. Grad-CAM</h2>")
        if gradcam.get("grid"):
            parts.append(f"<img alt='Grad-CAM grid' src='{gradcam['grid']}'>")
        score_rows = [[m] + [f"{v:.3f}" if isinstance(v, float) else str(v) for v in s.values()]
                      for m, s in gradcam.get("scores", {}).items()]
        if score_rows:
            keys = list(next(iter(gradcam["scores"].values())).keys())
            parts.append(html_table(["model", *keys], score_rows))
    if eval_rows:
        parts.append("<h2>Evaluations read</h2>" + html_table(
            ["model", "dataset", "images", "top-1", "ReaL top-1"],
            [[r.get("model"), r.get("dataset"), r.get("images"), f"{r['top1']:.2f}",
              f"{r['real_top1']:.2f}" if "real_top1" in r else "—"] for r in eval_rows]))
    parts.append("<p><small>Written by python -m rsb_ffcv.report; sources of the reference rows are named in "
                 "the table.</small></p></body></html>")
    return "\n".join(parts)


def read_gradcam(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise ConfigError(f"report.gradcam '{folder}' is not a folder (give python -m rsb_ffcv.gradcam's out_dir)")
    out = {"grid": None, "scores": {}}
    if (folder / "grid.png").is_file():
        out["grid"] = "data:image/png;base64," + base64.b64encode((folder / "grid.png").read_bytes()).decode()
    if (folder / "scores.json").is_file():
        out["scores"] = json.loads((folder / "scores.json").read_text()).get("scores", {})
    return out


# ---- W&B ------------------------------------------------------------------------------------------------------
def wandb_run_ids(run: dict) -> list[str]:
    """The W&B run ids a run folder logged to (wandb/run-*-ID or offline-run-*-ID)."""
    return sorted({p.name.rsplit("-", 1)[-1] for p in Path(run["path"]).glob("wandb/*run-*") if p.is_dir()})


def wandb_report(title: str, entity: str, project: str, runs, markdown: str):
    """The W&B Report (wandb-workspaces): the accuracy table, links to the runs' W&B pages, the project's curves."""
    import wandb_workspaces.reports.v2 as wr
    from wandb.util import app_url

    from .tracking import wandb_base_url
    base = app_url(wandb_base_url())
    links = "\n".join(f"- {r['name']}: " + ", ".join(f"[{i}]({base}/{entity}/{project}/runs/{i})" for i in ids)
                      for r in runs if (ids := wandb_run_ids(r)))
    curves = wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)], panels=[
        wr.LinePlot(x="epoch", y=["train/epoch_loss"]), wr.LinePlot(x="epoch", y=["val/top1"]),
        wr.LinePlot(x="Step", y=["train/lr"])])
    return wr.Report(entity=entity, project=project, title=title, description="Generated by python -m rsb_ffcv.report",
                     blocks=[wr.H1("Accuracy"), wr.MarkdownBlock(markdown), wr.H1("Runs"),
                             wr.MarkdownBlock(links or "(no W&B runs found in the run folders)"), wr.H1("Curves"),
                             curves])


def publish_wandb(cfg: dict, runs, markdown: str) -> str | None:
    """Publish wandb_report; None when it was not published (the reason printed in one line)."""
    from .tracking import resolve_wandb_mode, wandb_credentials_present
    mode = cfg["report.wandb_mode"]
    if mode == "disabled":
        return None
    if mode == "auto" and not wandb_credentials_present():
        print("W&B Report: not published (no W&B credentials; report.wandb_mode=auto); the HTML page is complete")
        return None
    if resolve_wandb_mode(mode, "report.wandb_mode") != "online":
        print("W&B Report: not published (the W&B server cannot be reached); the HTML page is complete")
        return None
    import wandb
    report = wandb_report(cfg["report.title"], cfg["report.wandb_entity"] or wandb.Api().default_entity,
                          cfg["report.wandb_project"], runs, markdown)
    report.save()
    return report.url


# ---- the command ----------------------------------------------------------------------------------------------
def build(cfg: dict) -> dict:
    runs = [read_run(p) for p in expand(cfg["report.runs"], "report.runs")]
    eval_rows = read_evals(expand(cfg["report.evals"], "report.evals")) if cfg["report.evals"] else []
    attach_evals(runs, eval_rows)
    gradcam = read_gradcam(Path(cfg["report.gradcam"]) if cfg["report.gradcam"] else None)
    groups = group(runs)
    out = Path(cfg["report.out"])
    out.mkdir(parents=True, exist_ok=True)
    acc_header, acc_rows = accuracy_rows(groups)
    markdown = markdown_table(acc_header, acc_rows)
    curves = png_data_uri(curves_figure({r["name"]: r["curves"] for r in runs}))
    page = render_html(cfg["report.title"], groups, runs, eval_rows, gradcam, curves)
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown)
    summary = {"groups": [{k: v for k, v in g.items() if k != "config"} for g in groups],
               "runs": [{k: v for k, v in r.items() if k not in ("config", "curves")} for r in runs],
               "references": rsb_paper.REFERENCE_ROWS, "evaluations": eval_rows,
               "gradcam": gradcam["scores"] if gradcam else None}
    summary["wandb_report"] = publish_wandb(cfg, runs, markdown)
    save_json(out / "summary.json", summary)
    return summary


def run(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.report", description=__doc__)
    summary = build(cfg)
    out = Path(cfg["report.out"])
    print((out / "table.md").read_text())
    print(f"report: {out / 'index.html'} (summary.json, table.md beside it)")
    if summary["wandb_report"]:
        print(f"W&B Report: {summary['wandb_report']}")
    return 0


def main(argv=None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
