"""python -m rsb_ffcv.export on real runs: the demo model (conftest's demo_model) and a tiny run that kept EMA weights.
The folder must load in timm as it is, in a fresh process, and give the checkpoint's logits bit for bit; evaluate must
score it as it scores the checkpoint; the card must carry the run's own figures; failures leave nothing behind."""
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, child_env, metrics, run_cli, tiny_args
from fastargs import get_current_config
from safetensors.torch import load_file

from rsb_ffcv import evaluate, export, loaders, train
from rsb_ffcv.augment import Normalize
from rsb_ffcv.config import flatten, load_config
from rsb_ffcv.train_config import SECTIONS as TRAIN_SECTIONS
from rsb_ffcv.weights import plain_key

FILES = {"model.safetensors", "config.json", "args.yaml", "README.md"}


def expect_error(rc, capsys, code=2):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-2000:])
    return lines[0]


def nothing_left(out):
    """Neither the folder nor a temporary sibling of it (atomic_path's `.NAME.tmp-PID`)."""
    siblings = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    return not out.exists() and not [s for s in siblings if s.startswith(f".{out.name}.tmp-")]


def card_line(card: str, start: str) -> str:
    found = [line for line in card.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, card)
    return found[0]


def ck_weights(path, ema=False) -> dict:
    ck = torch.load(path, weights_only=True)
    return {plain_key(k): v for k, v in (ck["ema"] if ema else ck["model"]).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exported(demo_model, tmp_path_factory):
    """The demo run's best.pt exported by the real command line (no evaluations given)."""
    out = tmp_path_factory.mktemp("export") / "demo_resnet10t"
    p = run_cli("-m", "rsb_ffcv.export", f"--export.model={demo_model}/best.pt", f"--export.out={out}")
    assert f"exported {out}" in p.stdout and p.stderr.count("error") == 0
    return out


@pytest.fixture(scope="module")
def ema_run(demo_betons, tmp_path_factory):
    """A seconds-long run that kept EMA weights (decay 0.5: they differ from the model's, and are not the start's),
    logged to W&B offline."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    assert train.main(tiny_args(demo_betons, run_dir, "--training.ema=true", "--training.ema_decay=0.5")) == 0
    return run_dir


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    out = capsys.readouterr().out
    keys = [".".join(p) for p in get_current_config().entries if p[0] == "export"]
    assert e.value.code == 0 and out.startswith("usage: python -m rsb_ffcv.export")
    assert len(keys) >= 5 and all(f"--{k}=" in out for k in keys), out
    assert "--export.weights={auto,ema,model}" in out and "\nexport: " in out


def test_timm_loads_the_folder_in_a_fresh_process_with_the_checkpoints_logits_and_preprocessing(
        exported, demo_model, demo_betons, tmp_path):
    assert {p.name for p in exported.iterdir()} == FILES
    ck = torch.load(demo_model / "best.pt", weights_only=True)
    cfg = ck["config"]
    saved = load_file(exported / "model.safetensors")
    assert not [k for k in saved if k.startswith(("module.", "_orig_mod."))]
    assert same(saved, ck_weights(demo_model / "best.pt"))
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == ck["arch"] == "resnet10t" and config["num_classes"] == 10
    assert config["label_names"] == ck["classes"] == json.loads((demo_betons / "train.json").read_text())["classes"]
    # args.yaml: the run's full resolved config, as the trainer wrote it and reads it back
    assert (exported / "args.yaml").read_text() == (demo_model / "config.yaml").read_text()
    assert load_config(TRAIN_SECTIONS, ["--config", str(exported / "args.yaml")]) == cfg

    size, crop = cfg["resolution.test"], cfg["resolution.test_crop_ratio"]
    loader = loaders.val_loader(f"{demo_betons}/val.beton", 16, size, crop, torch.device("cpu"), num_workers=1,
                                rank=0, world=1, batches_ahead=1, interpolation=cfg["data.test_interpolation"])
    images, _ = next(iter(loaders.epoch(loader, 1)))
    x = Normalize()(images).contiguous()
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import json, sys, timm, torch\n"
        "torch.set_num_threads(1)\n"
        f"model = timm.create_model('local-dir:{exported}', pretrained=True).eval()\n"
        f"x = torch.load('{tmp_path / 'x.pt'}')\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(x), '{tmp_path / 'logits.pt'}')\n"
        "data = timm.data.resolve_model_data_config(model)\n"
        "json.dump({'data': data, 'rsb': [m for m in sys.modules if m.startswith('rsb_ffcv')]}, sys.stdout)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=child_env())
    assert p.returncode == 0, p.stderr
    fresh = json.loads(p.stdout)
    assert fresh["rsb"] == []  # timm alone read it
    import timm
    model = timm.create_model(ck["arch"], num_classes=len(ck["classes"])).eval()
    model.load_state_dict(ck["model"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert expected.argmax(1).unique().numel() > 1  # a trained model, not a constant
    data = fresh["data"]
    assert data["input_size"] == [3, size, size] and data["crop_pct"] == crop and data["crop_mode"] == "center"
    assert data["interpolation"] == cfg["data.test_interpolation"]
    normalize = Normalize()  # what the run's evaluation applied: x / 255 * scale + shift = (x / 255 - mean) / std
    std = 1 / (255 * normalize.scale.flatten())
    mean = -normalize.shift.flatten() * std
    assert torch.allclose(torch.tensor(data["mean"]), mean) and torch.allclose(torch.tensor(data["std"]), std)


def test_evaluate_scores_the_folder_as_the_checkpoint_and_the_card_shows_its_numbers(
        exported, demo_model, demo_betons, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate.main([f"--eval.models=ck={demo_model}/best.pt,local-dir:{exported}",
                        f"--eval.datasets={demo_betons}/val.beton", "--eval.resolution=64", f"--eval.out_dir={out}",
                        "--eval.batch_size=16"])
    assert rc == 0, capsys.readouterr().err
    ck_row, folder_row = json.loads((out / "results.json").read_text())["results"]
    assert folder_row["source"] == f"local-dir:{exported}" and ck_row["images"] == folder_row["images"] == 60
    assert folder_row["top1"] == ck_row["top1"] and folder_row["top5"] == ck_row["top5"]
    assert ck_row["top1"] > 50  # well above chance (10%)

    # without evaluations: "not evaluated"; with evaluate's results.json: its numbers, exactly
    card = (exported / "README.md").read_text()
    for name in ("| val (", "| ImageNet-V2 ", "| ImageNet-ReaL "):
        assert card_line(card, name).endswith("| not evaluated |")
    with_eval = tmp_path / "with_eval"
    assert export.main([f"--export.model={demo_model}/best.pt", f"--export.out={with_eval}",
                        f"--export.evals={out}"]) == 0
    card = (with_eval / "README.md").read_text()
    assert f"| {ck_row['top1']:.2f}% (val, 60 images) |" in card_line(card, "| val (")
    assert card_line(card, "| ImageNet-V2 ").endswith("| not evaluated |")
    # V2 and ReaL rows as evaluate writes them (a hand-made results.json: no ImageNet here)
    more = tmp_path / "v2_real"
    more.mkdir()
    (more / "results.json").write_text(json.dumps({"config": {"eval.use_ema": False, "eval.resolution": 224,
                                                              "eval.crop_ratio": 0.95, "eval.interpolation": "bicubic"},
                                                   "results": [
        {"model": "a", "source": str(demo_model / "best.pt"), "dataset": "imagenet_val", "beton": "/no/val.beton",
         "images": 50000, "top1": 80.37, "top5": 95.1, "real_top1": 85.71, "real_top5": 97.0},
        {"model": "a", "source": str(demo_model / "best.pt"), "dataset": "imagenetv2", "beton": "/no/v2.beton",
         "images": 10000, "top1": 68.47, "top5": 88.0},
        {"model": "other", "source": "/elsewhere/best.pt", "dataset": "imagenetv2", "beton": "/no/v2.beton",
         "images": 10000, "top1": 11.11, "top5": 22.0}]}))
    both = tmp_path / "both"
    assert export.main([f"--export.model={demo_model}/best.pt", f"--export.out={both}",
                        f"--export.evals={more}"]) == 0
    card = (both / "README.md").read_text()
    assert "| 80.37% (imagenet_val, 50,000 images) |" in card_line(card, "| val (")
    assert "| 68.47% (imagenetv2, 10,000 images) |" in card_line(card, "| ImageNet-V2 ")
    assert "| 85.71% (imagenet_val, 50,000 images) |" in card_line(card, "| ImageNet-ReaL ")
    assert "11.11" not in card  # another model's row


def test_the_card_is_the_runs_own_figures(exported, demo_model):
    card = (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "timm" and front["tags"] == ["image-classification", "timm"]
    assert front["license"] == "other" and "set the license" in card.split("---\n")[1]
    assert front["datasets"] == ["rsb_ffcv-demo"]
    cfg = flatten(yaml.safe_load((demo_model / "config.yaml").read_text()))
    rows = metrics(demo_model)
    epochs = [r for r in rows if "train/epoch_loss" in r]
    facts = json.loads((demo_model / "run.json").read_text())
    # the recipe table (rsb_ffcv.report's ingredients): this run's values beside the paper's A3
    assert card_line(card, "| ingredient |") == "| ingredient | this run | paper A3 |"
    assert card_line(card, "| epochs |") == f"| epochs | **{cfg['training.epochs']}** | 100 |"
    assert card_line(card, "| test resolution |") == f"| test resolution | **{cfg['resolution.test']}** | 224 |"
    assert card_line(card, "| optimizer |") == "| optimizer | lamb | lamb |"
    # the cost, from run.json and metrics.jsonl
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    train_s = sum(r["epoch_time_s"] for r in epochs)
    assert card_line(card, "| devices |") == f"| devices | {facts['world']} × {facts['device']} on 1 node(s) |"
    assert card_line(card, "| epochs trained |") == f"| epochs trained | {len(epochs)} of {cfg['training.epochs']} |"
    assert f"| {statistics.median(speeds):,.0f} |" in card_line(card, "| images/s")
    assert f"| {export._duration(train_s)} |" in card_line(card, "| training time")
    assert f"| {train_s * facts['world'] / 3600:.3f} |" in card_line(card, "| device-hours")
    last = [r for r in epochs if "val/top1" in r][-1]
    assert f"model {last['val/top1']:.2f}%" in card  # best.pt is the last epoch here (its best)
    assert "No W&B run was logged" in card  # the demo model ran with W&B disabled
    assert "the model's weights: the run kept no EMA" in card_line(card, "- **Weights:**")
    assert 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in card and f"local-dir:{exported}" in card


def test_an_ema_run_exports_the_weights_auto_chose(ema_run, tmp_path, capsys):
    model_w, ema_w = ck_weights(ema_run / "best.pt"), ck_weights(ema_run / "best.pt", ema=True)
    assert not same(model_w, ema_w)
    ck = torch.load(ema_run / "best.pt", weights_only=True)
    row = [r for r in metrics(ema_run) if r.get("epoch") == ck["epoch"] - 1 and "val_ema/top1" in r][-1]

    def variant(name, shift):
        """The run as if its EMA had scored `shift` points more (or less) than the model at the last epoch."""
        run = tmp_path / name
        shutil.copytree(ema_run, run)
        lines = [{**r, "val_ema/top1": r["val/top1"] + shift} if r.get("epoch") == row["epoch"]
                 and "val_ema/top1" in r else r for r in metrics(run)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return run

    for run, want_ema in [(ema_run, row["val_ema/top1"] > row["val/top1"]), (variant("ema_better", 10), True),
                          (variant("ema_worse", -5), False)]:
        out = tmp_path / f"out_{run.name}"
        assert export.main([f"--export.model={run}/best.pt", f"--export.out={out}"]) == 0
        printed = capsys.readouterr().out
        saved = load_file(out / "model.safetensors")
        assert same(saved, ema_w if want_ema else model_w), run.name
        weights = card_line((out / "README.md").read_text(), "- **Weights:**")
        scores = [r for r in metrics(run) if r.get("epoch") == row["epoch"] and "val_ema/top1" in r][-1]
        assert (("the EMA weights: they scored" if want_ema else "the model's weights: the EMA scored") in weights
                and f"{scores['val_ema/top1']:.2f}%" in weights and f"{scores['val/top1']:.2f}%" in weights), weights
        assert weights.split("- **Weights:** ")[1] in printed
    # asked for: the EMA's, or the model's, whatever the scores
    out = tmp_path / "asked_ema"
    assert export.main([f"--export.model={tmp_path / 'ema_worse'}/best.pt", f"--export.out={out}",
                        "--export.weights=ema"]) == 0
    assert same(load_file(out / "model.safetensors"), ema_w)
    # W&B: the run logged offline; the card names its id from run.json
    run_id = json.loads((ema_run / "run.json").read_text())["wandb_run_id"]
    assert run_id and f"W&B run `{run_id}`" in (out / "README.md").read_text()
    # an evaluation of the model's weights is not the EMA export's
    evals = tmp_path / "model_eval"
    evals.mkdir()
    (evals / "results.json").write_text(json.dumps({"config": {"eval.use_ema": False}, "results": [
        {"model": "m", "source": str(tmp_path / "ema_better" / "best.pt"), "dataset": "val", "images": 60,
         "top1": 1.0, "top5": 2.0}]}))
    capsys.readouterr()
    err = expect_error(export.main([f"--export.model={tmp_path / 'ema_better'}/best.pt",
                                    f"--export.out={tmp_path / 'x'}", f"--export.evals={evals}"]), capsys)
    assert "evaluated the model's weights" in err and "--eval.use_ema=true" in err and nothing_left(tmp_path / "x")


def test_a_checkpoint_of_an_older_rsb_ffcv_gives_an_args_yaml_todays_trainer_reads(demo_model, tmp_path):
    """Its config holds a key since retired and lacks one added since: args.yaml leaves out the first (the card
    says so), --config then fills in the second's default."""
    run = tmp_path / "old_run"
    shutil.copytree(demo_model, run)
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["config"] = {**{k: v for k, v in ck["config"].items() if k != "augment.rand_augment_batching"},
                    "debug.signal_at": "0:3"}
    torch.save(ck, run / "best.pt")
    out = tmp_path / "out"
    assert export.main([f"--export.model={run}/best.pt", f"--export.out={out}"]) == 0
    cfg = load_config(TRAIN_SECTIONS, ["--config", str(out / "args.yaml")])
    assert "debug.signal_at" not in cfg and cfg["augment.rand_augment_batching"] == "grouped"
    assert {k: v for k, v in cfg.items() if k != "augment.rand_augment_batching"} == \
        {k: v for k, v in ck["config"].items() if k != "debug.signal_at"}
    card = (out / "README.md").read_text()
    assert "args.yaml leaves out what today's trainer no longer knows: debug.signal_at" in card


def test_failures_are_one_line_exit_2_and_leave_no_folder(demo_model, exported, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "deeper" / "export"

    def fails(*args):
        err = expect_error(export.main([*args, f"--export.out={out}"]), capsys)
        assert nothing_left(out) and not (tmp_path / "new").exists(), err
        return err
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "theirs.pth")
    assert "is not an rsb_ffcv checkpoint" in fails(f"--export.model={tmp_path / 'theirs.pth'}")
    assert "not found" in fails(f"--export.model={tmp_path / 'no_such_run'}/best.pt")
    assert "has no results.json" in fails(f"--export.model={demo_model}/best.pt",
                                          f"--export.evals={tmp_path / 'no_such_eval'}")
    assert "is not a run folder" in fails(f"--export.model={demo_model}/best.pt",
                                          f"--export.run_dir={tmp_path / 'no_such_run'}")
    assert "holds no EMA" in fails(f"--export.model={demo_model}/best.pt", "--export.weights=ema")
    assert "ORG/NAME" in fails(f"--export.model={demo_model}/best.pt", "--export.push_to=not a repo")
    err = expect_error(export.main([f"--export.model={demo_model}/best.pt", f"--export.out={exported}"]), capsys)
    assert "already exists" in err and {p.name for p in exported.iterdir()} == FILES

    # a failure while writing (here: the load-back check) leaves nothing either, parents included
    def broken(*a):
        raise OSError(28, "No space left on device", "model.safetensors")
    monkeypatch.setattr(export, "check_folder", broken)
    assert export.main([f"--export.model={demo_model}/best.pt", f"--export.out={out}"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert nothing_left(out) and not (tmp_path / "new").exists()

    # an empty folder given as export.out, filled by someone else while the export ran: the rename must not replace
    # it, and the staged folder must not stay behind
    monkeypatch.undo()
    given = tmp_path / "given"
    given.mkdir()

    def meanwhile(folder, *a):
        (given / "theirs.txt").write_text("not the export's")
    monkeypatch.setattr(export, "check_folder", meanwhile)
    err = expect_error(export.main([f"--export.model={demo_model}/best.pt", f"--export.out={given}"]), capsys)
    assert f"export.out '{given}' was written to while the export ran" in err
    assert [p.name for p in given.iterdir()] == ["theirs.txt"] and [p.name for p in tmp_path.glob(".given*")] == []


def test_push_without_a_token_or_a_hub_stops_in_one_line_after_writing_the_folder(demo_model, tmp_path):
    """Never the real Hub: an endpoint nothing listens on, an empty HF home."""
    base = {**child_env(), "HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        base.pop(k, None)
    fake_token = {**base, "HF_TOKEN": "hf_" + "x" * 34}
    for name, env, says in [("no_token", base, "no Hugging Face token"),
                            ("no_hub", fake_token, "the push to the Hugging Face Hub failed")]:
        out = tmp_path / name
        p = subprocess.run([sys.executable, "-m", "rsb_ffcv.export", f"--export.model={demo_model}/best.pt",
                            f"--export.out={out}", "--export.push_to=someone/rsb-demo"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
        assert f"hf upload someone/rsb-demo {out}" in lines[0]
        assert {q.name for q in out.iterdir()} == FILES and [q.name for q in tmp_path.glob(".*tmp-*")] == []
        assert re.search(r'timm.create_model\("hf-hub:someone/rsb-demo"', (out / "README.md").read_text())


def test_a_push_uploads_the_checked_folder_as_it_is_in_one_commit(demo_model, tmp_path, monkeypatch, capsys):
    """The Hub cannot be reached from the tests: huggingface_hub's HfApi is replaced by a recorder that keeps a copy of
    what each call would send."""
    import huggingface_hub
    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok=False, private=None, **kw):
            calls.append(("create_repo", repo_id, exist_ok, private))

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kw):
            files = {f.name: f.read_bytes() for f in Path(folder_path).iterdir()
                     if any(f.match(pattern) for pattern in allow_patterns)}
            calls.append(("upload_folder", repo_id, files))
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_" + "x" * 34)
    out = tmp_path / "out"
    assert export.main([f"--export.model={demo_model}/best.pt", f"--export.out={out}",
                        "--export.push_to=someone/rsb-demo", "--export.private=true"]) == 0
    assert [c[0] for c in calls] == ["token", "create_repo", "upload_folder"]
    assert calls[1] == ("create_repo", "someone/rsb-demo", True, True)
    sent = calls[2][2]
    assert sent == {f.name: f.read_bytes() for f in out.iterdir()} and set(sent) == FILES  # one commit, as checked
    assert "pushed: https://huggingface.co/someone/rsb-demo" in capsys.readouterr().out
