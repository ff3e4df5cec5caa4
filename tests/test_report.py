"""The RSB report from real runs: three tiny recipes and a second seed of one, trained on the demo betons, evaluated
(val and a V2-kind beton) and compared with Grad-CAM; the page opened in headless Chromium (Debian's package)."""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from conftest import ROOT, metrics, run_cli, tiny_args

RECIPES = {  # name: extra overrides; a3 twice (seeds 0 and 1: a3_s1, see second_seed) is one group
    "a3_s0": [],
    "a1": ["--training.label_smoothing=0.1", "--model.drop_path=0.05", "--training.repeated_aug=3",
           "--training.max_device_batch=4", "--augment.mixup_alpha=0.2", "--optim.weight_decay=0.01", "--lr.lr=0.005"],
    "a2": ["--model.drop_path=0.05", "--training.repeated_aug=3", "--training.max_device_batch=4",
           "--augment.rand_augment=rand-m7-mstd0.5-inc1", "--lr.lr=0.005"],
}


def second_seed(run: Path, to: Path, seed: int, shift: float) -> None:
    """A copy of `run` as the report would read a run of another seed (config.yaml's training.seed) whose val top-1
    came out `shift` lower: training one would give the report nothing else to read."""
    shutil.copytree(run, to)
    cfg = yaml.safe_load((to / "config.yaml").read_text())
    cfg["training"]["seed"] = seed
    (to / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{**m, "val/top1": m["val/top1"] - shift} if "val/top1" in m else m for m in metrics(to)]
    (to / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def inputs(demo_betons, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = {name: subprocess.Popen(  # side by side: each run waits on its own start-up much of its time
        [sys.executable, "-m", "rsb_ffcv.train", *tiny_args(demo_betons, root / "runs" / name,
                                                           "--logging.wandb_mode=disabled", "--data.num_workers=1",
                                                           "--training.cpu_threads=1",
                                                           *extra)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name, extra in RECIPES.items()}
    for name, p in runs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, (name, out[-3000:])
    second_seed(root / "runs" / "a3_s0", root / "runs" / "a3_s1", seed=1, shift=7.5)
    v2 = root / "v2"  # an ImageNet-V2-shaped folder (class-index directories) from the demo val images
    images = Path(demo_betons) / "images" / "val"
    classes = json.loads((Path(demo_betons) / "train.json").read_text())["classes"]
    for i, c in enumerate(classes):
        shutil.copytree(images / c, v2 / "imgs" / str(i))
    run_cli("write_datasets.py", "--source.kind=v2", f"--source.root={v2 / 'imgs'}",
            f"--source.classes_from={demo_betons}/train.json", f"--writer.out={v2 / 'v2.beton'}",
            "--writer.max_resolution=96")
    models = ",".join(f"{n}={root / 'runs' / n / 'last.pt'}" for n in [*RECIPES, "a3_s1"])
    gradcam_models = f"a3={root / 'runs/a3_s0/last.pt'},a1={root / 'runs/a1/last.pt'}"
    tools = [  # side by side too
        ["-m", "rsb_ffcv.evaluate", f"--eval.models={models}", f"--eval.datasets={demo_betons}/val.beton,"
         f"{v2 / 'v2.beton'}", "--eval.resolution=32", f"--eval.out_dir={root / 'eval'}", "--eval.wandb_mode=disabled"],
        ["-m", "rsb_ffcv.gradcam", f"--gradcam.models={gradcam_models}", f"--gradcam.dataset={demo_betons}/val.beton",
         "--gradcam.images=3", "--gradcam.resolution=32", f"--gradcam.out_dir={root / 'gradcam'}",
         "--gradcam.wandb_mode=disabled"]]
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for args in tools]
    for args, p in zip(tools, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, (args[1], out[-3000:])
    out = root / "out"
    p = run_cli("-m", "rsb_ffcv.report", f"--report.runs={root / 'runs'}/*", f"--report.evals={root / 'eval'}",
                f"--report.gradcam={root / 'gradcam'}", f"--report.out={out}", "--report.wandb_mode=disabled")
    return root, out, p.stdout


@pytest.mark.slow
def test_summary_holds_the_runs_own_figures_and_seed_groups(inputs):
    root, out, stdout = inputs
    summary = json.loads((out / "summary.json").read_text())
    groups = {tuple(sorted(g["runs"])): g for g in summary["groups"]}
    assert set(groups) == {("a3_s0", "a3_s1"), ("a1",), ("a2",)}
    finals = [[m for m in metrics(root / "runs" / n) if "val/top1" in m][-1]["val/top1"] for n in ("a3_s0", "a3_s1")]
    assert finals[0] - finals[1] == pytest.approx(7.5)
    seeds = groups[("a3_s0", "a3_s1")]["figures"]["val_top1"]
    assert seeds["n"] == 2 and seeds["mean"] == pytest.approx(statistics.fmean(finals))
    assert seeds["std"] == pytest.approx(statistics.stdev(finals))
    results = json.loads((root / "eval" / "results.json").read_text())["results"]
    v2 = {r["model"]: r["top1"] for r in results if r["dataset"] == "v2"}
    val = {r["model"]: r["top1"] for r in results if r["dataset"] == "val"}
    assert groups[("a1",)]["figures"]["v2_top1"]["mean"] == pytest.approx(v2["a1"])
    assert groups[("a1",)]["figures"]["val_minus_v2"]["mean"] == pytest.approx(val["a1"] - v2["a1"])
    a2 = [m["train/images_per_s"] for m in metrics(root / "runs" / "a2") if "train/images_per_s" in m]
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["a2"]["images_per_s"] == pytest.approx(statistics.median(a2))
    assert runs["a2"]["status"] == "finished" and runs["a2"]["facts"]["accum"] == 4
    assert {g["paper_recipe"] for g in summary["groups"]} == {"A1", "A2", "A3"}
    assert set(summary["gradcam"]) == {"a3", "a1"}
    assert summary["wandb_report"] is None and "W&B Report" not in stdout  # report.wandb_mode=disabled
    table = (out / "table.md").read_text()
    assert "| A1, paper |" in table and "resnet50.a3_in1k (timm)" in table and table in stdout


@pytest.mark.slow
def test_page_marks_differences_from_the_paper_and_opens_offline_in_chromium(inputs):
    root, out, _ = inputs
    page = (out / "index.html").read_text()
    assert "≠ paper: set model.arch" in page and "≠ paper: set training.epochs" in page  # resnet10t, 2 epochs
    assert "http://" not in page and "https://" not in page  # nothing to fetch: images are inline
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        msg = "chromium is not installed (make test installs Debian's chromium package)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    shot, netlog = root / "page.png", root / "netlog.json"
    # Chromium's own background services (component updates, accounts, time) still ask for URLs: every host name
    # resolves to nothing and every connection goes to a closed local port, so nothing leaves the machine
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-pings",
            "--disable-extensions", "--disable-features=Translate,OptimizationHints,MediaRouter,SpellCheck",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", f"--user-data-dir={root / 'chr'}",
            f"--log-net-log={netlog}", "--window-size=1400,2400"]
    p = subprocess.run([*base, f"--screenshot={shot}", (out / "index.html").as_uri()], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", (out / "index.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<table") >= 4 and "data:image/png;base64," in dom and "training curves" in dom
    urls = set(re.findall(r'"url":"([^"]+)"', netlog.read_text()))
    own = ("google.com", "googleapis.com", "gvt1.com")  # Chromium's services, not the page
    assert [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and
            not urlparse(u).hostname.endswith(own)] == []
    from PIL import Image
    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((140, 240)).getcolors(maxcolors=100000)
    assert img.size == (1400, 2400) and len(colours) > 50  # tables, text and plots, not a blank page


@pytest.mark.slow
def test_a_partial_run_is_read_and_a_non_run_fails_in_one_line(inputs, tmp_path):
    root, _, _ = inputs
    cut = tmp_path / "cut"
    shutil.copytree(root / "runs" / "a1", cut)
    text = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(text[:-25])  # killed in the middle of writing its last line
    p = run_cli("-m", "rsb_ffcv.report", f"--report.runs={cut}", f"--report.out={tmp_path / 'out'}",
                "--report.wandb_mode=disabled")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "partial line" in summary["runs"][0]["notes"][0] and "report:" in p.stdout
    assert "partial line" in (tmp_path / "out" / "index.html").read_text()
    (tmp_path / "empty").mkdir()
    p = run_cli("-m", "rsb_ffcv.report", f"--report.runs={tmp_path / 'empty'}", f"--report.out={tmp_path / 'o2'}",
                check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "is not a run folder" in p.stderr


@pytest.mark.slow
def test_the_wandb_report_is_built_from_the_same_content(inputs, tmp_path):
    """The W&B Report (wandb-workspaces' own validation of every block), with links to the runs' W&B ids; it is
    not saved here (no W&B server): publishing is report.save(). Without credentials, auto says so in one line."""
    from rsb_ffcv import report
    root, out, _ = inputs
    run = report.read_run(root / "runs" / "a1")
    (Path(run["path"]) / "wandb" / "offline-run-20261202_000000-abc123").mkdir(parents=True)
    built = report.wandb_report("t", "me", "rsb_ffcv", [run], (out / "table.md").read_text())
    assert built.title == "t" and built.project == "rsb_ffcv" and len(built.blocks) == 6
    assert "/me/rsb_ffcv/runs/abc123" in built.blocks[3].text
    p = run_cli("-m", "rsb_ffcv.report", f"--report.runs={root / 'runs' / 'a2'}", f"--report.out={tmp_path / 'o'}",
                "--report.wandb_mode=auto", env_extra={"WANDB_API_KEY": "", "HOME": str(tmp_path)})
    assert p.stdout.count("W&B Report: not published (no W&B credentials") == 1
