"""Trust and first contact: files from others never run code, W&B never costs a run, every CLI explains itself
(--help) and fails the same way (exit 0/1/2, one `error:` line), and what would fail late fails at start."""
import argparse
import http.server
import json
import pickle
import re
import shutil
import socket
import threading

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT, make_folder, run_cli, tiny_args
from fastargs import get_current_config

from rsb_ffcv import checkpoint, distributed, evaluate, gpu_check, gradcam, loaders, report, train
from rsb_ffcv.bench import __main__ as bench
from rsb_ffcv.config import load_config
from rsb_ffcv.datasets import cli as write_cli
from rsb_ffcv.train_config import SECTIONS


class RunsCode:
    """Unpickling this calls open(path, "w"): a file appears if a loader ever executes a pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# What the garbage collector prints when a finalizer of an earlier test's object raises while this test runs:
# numba 0.68's dispatcher finalizer sometimes raises KeyError from its overloads dict (seen once in 3 full
# suites, from a crop decoder's dispatcher). Not the tool's output.
FINALIZER_NOISE = re.compile(r"Exception ignored in: <finalize object[^\n]*\nTraceback \(most recent call last\):\n"
                             r"(?:  .*\n)*\w*(?:Error|Exception)[^\n]*\n")


def expect_error(rc, capsys, code=2):
    """Exit code `code` and one `error:` line, the last of stderr (progress bars may come before it)."""
    err = FINALIZER_NOISE.sub("", capsys.readouterr().err)
    lines = err.replace("\r", "\n").strip().splitlines()
    assert rc == code and lines[-1].startswith("error: ") and err.count("error:") == 1, (rc, err[-800:])
    assert "Traceback" not in err
    return lines[-1]


def test_a_pickle_that_would_run_code_is_refused_by_every_tool(tmp_path, demo_betons, monkeypatch, capsys):
    marker = tmp_path / "created-by-the-pickle"
    evil = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, evil)
    val = f"--eval.datasets={demo_betons}/val.beton"
    err = expect_error(evaluate.main([f"--eval.models=timm:resnet10t:{evil}", val, f"--eval.out_dir={tmp_path}/e"]),
                       capsys)
    assert "io.open" in err and "eval.trust_pickles=true" in err
    err = expect_error(evaluate.main([f"--eval.models=x={evil}", val, f"--eval.out_dir={tmp_path}/e"]), capsys)
    assert "eval.trust_pickles=true" in err
    err = expect_error(gradcam.main([f"--gradcam.models=x={evil}", f"--gradcam.dataset={demo_betons}/val.beton",
                                     f"--gradcam.out_dir={tmp_path}/g", "--gradcam.wandb_mode=disabled"]), capsys)
    assert "gradcam.trust_pickles=true" in err
    err = expect_error(train.main(tiny_args(demo_betons, tmp_path / "t", f"--training.resume={evil}",
                                            "--logging.wandb_mode=disabled")), capsys)
    assert "training.trust_pickles=true" in err
    monkeypatch.setattr(checkpoint, "_download_wandb", lambda spec, key: evil)  # the downloaded artifact
    err = expect_error(evaluate.main(["--eval.models=wandb:someone/project/model-x:latest", val,
                                      f"--eval.out_dir={tmp_path}/e"]), capsys)
    assert "io.open" in err
    assert not marker.exists()


def test_an_old_timm_checkpoint_loads_only_when_trusted(tmp_path, demo_betons, capsys):
    """timm's old *.pth.tar hold an argparse.Namespace beside the weights: refused, naming it, unless trusted."""
    model = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(model="resnet10t")}, path)
    args = [f"--eval.models=timm:resnet10t:{path}", f"--eval.datasets={demo_betons}/val.beton",
            "--eval.resolution=32", f"--eval.out_dir={tmp_path}/e", "--eval.num_workers=1"]
    err = expect_error(evaluate.main(args), capsys)
    assert "argparse.Namespace" in err and str(path) in err and "eval.trust_pickles=true" in err
    # trusted, it loads as before; this 1000-class model then meets the 10-class demo beton's check
    err = expect_error(evaluate.main([*args, "--eval.trust_pickles=true"]), capsys)
    assert "has 1000 classes" in err and "must be the same list" in err


def test_checkpoints_written_before_plain_rng_states_still_resume(demo_model, demo_betons, tmp_path):
    """Older checkpoints of ours stored numpy's RNG state as an ndarray: weights_only reads it (allow-listed)."""
    ck = torch.load(demo_model / "last.pt", weights_only=True)
    ck["rng"] = ck.pop("rank_states")[0]["rng"]  # older still: rank 0's RNG states only, under "rng"
    ck["rng"]["numpy"] = np.random.RandomState(7).get_state()  # as an ndarray
    ck["scheduler"] = {"t_in_epochs": False, "t_initial": 15 * 31}  # and a scheduler stepped per update
    legacy = tmp_path / "legacy.pt"
    torch.save(ck, legacy)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(legacy, weights_only=True)  # needs the allow-list
    run_dir = tmp_path / "resumed"
    cfg = load_config(SECTIONS, ["--config", str(ROOT / "rsb_configs" / "demo.yaml"), *tiny_args(
        demo_betons, run_dir, f"--training.resume={legacy}", "--resolution.train=64", "--resolution.test=64",
        "--logging.wandb_mode=disabled", "--training.epochs=13")[2:]])
    t = train.Trainer(cfg, distributed.init("cpu"))
    assert t.progress.epoch == 12
    assert np.array_equal(np.random.get_state()[1], np.random.RandomState(7).get_state()[1])
    t.recipe.set_lr(t.progress.epoch, t.progress.step)  # this run's schedule (one rate per epoch, 13 epochs)
    fresh = train.Trainer(load_config(SECTIONS, ["--config", str(ROOT / "rsb_configs" / "demo.yaml"), *tiny_args(
        demo_betons, tmp_path / "fresh", "--logging.wandb_mode=disabled", "--training.epochs=13")[2:]]),
        distributed.init("cpu"))
    fresh.recipe.set_lr(12, step=0)
    assert t.recipe.optimizer.param_groups[0]["lr"] == fresh.recipe.optimizer.param_groups[0]["lr"] > 1e-6
    for x in (t, fresh):
        x.tracker.finish()


@pytest.fixture
def unreachable_wandb(monkeypatch):
    """Credentials, but the server is a closed port: a compute node without a route out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_wandb_online_without_a_route_stops_at_start_in_one_line(unreachable_wandb, demo_betons, tmp_path, capsys):
    err = expect_error(train.main(tiny_args(demo_betons, tmp_path / "t", "--logging.wandb_mode=online")), capsys)
    assert "cannot be reached" in err and "logging.wandb_mode=offline" in err
    assert not (tmp_path / "t" / "metrics.jsonl").exists()
    err = expect_error(evaluate.main(["--eval.models=timm:resnet10t", f"--eval.datasets={demo_betons}/val.beton",
                                      "--eval.wandb_mode=online", f"--eval.out_dir={tmp_path}/e"]), capsys)
    assert "eval.wandb_mode=offline" in err
    err = expect_error(gradcam.main(["--gradcam.models=timm:resnet10t", f"--gradcam.dataset={demo_betons}/val.beton",
                                     "--gradcam.wandb_mode=online", f"--gradcam.out_dir={tmp_path}/g"]), capsys)
    assert "gradcam.wandb_mode=offline" in err


def test_wandb_auto_without_a_route_trains_offline_and_says_how_to_sync(unreachable_wandb, demo_betons, tmp_path,
                                                                         capsys):
    run_dir = tmp_path / "auto"
    assert train.main(tiny_args(demo_betons, run_dir, "--logging.wandb_mode=auto", "--training.epochs=1")) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1 and "logging offline instead" in notes[0] and "wandb sync" in notes[0]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1 and "upload it with: wandb sync" in out


@pytest.fixture
def refusing_wandb():
    """A W&B server that answers, but refuses every request with 401 (an expired key, a wrong entity): a real HTTP
    server on 127.0.0.1."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def refuse(self):
            body = b'{"errors": [{"message": "user is not logged in"}]}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = refuse

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_port}"}
    server.shutdown()
    server.server_close()


def test_wandb_auto_refused_by_the_server_trains_offline_and_says_why(refusing_wandb, demo_betons, tmp_path):
    """logging.wandb_mode=auto: the server answers the probe but refuses the run; the run trains, logging offline,
    with one line saying why. (A process of its own: W&B's service would outlive an in-process run.)"""
    run_dir = tmp_path / "refused"
    p = run_cli("-m", "rsb_ffcv.train", *tiny_args(demo_betons, run_dir, "--logging.wandb_mode=auto",
                                                   "--training.epochs=1"), env_extra=refusing_wandb)
    notes = [line for line in p.stdout.splitlines() if "logging offline instead" in line]
    assert len(notes) == 1 and "refused the run (CommError: user is not logged in)" in notes[0], p.stdout[-3000:]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1 and (run_dir / "last.pt").is_file()


def _keys(sections):
    return [".".join(path) for path in get_current_config().entries if path[0] in sections]


@pytest.mark.parametrize("name,main,argv,sections", [
    ("write_datasets.py", write_cli.main, [], write_cli.SECTIONS),
    ("train", train.main, [], SECTIONS),
    ("evaluate", evaluate.main, [], evaluate.SECTIONS),
    ("gradcam", gradcam.main, [], gradcam.SECTIONS),
    ("gpu_check", gpu_check.main, [], gpu_check.SECTIONS),
    ("bench loader", bench.main, ["loader"], ("bench", "bench_loader")),
    ("bench augment", bench.main, ["augment"], ("bench", "bench_augment")),
    ("bench train", bench.main, ["train"], ("bench", "bench_train")),
    ("bench writer", bench.main, ["writer"], ("bench",)),
    ("bench corpus", bench.main, ["corpus"], ("bench", "bench_corpus")),
    ("bench memory", bench.main, ["memory"], ("bench", "bench_memory")),
    ("bench scale", bench.main, ["scale"], ("bench", "bench_scale")),
    ("report", report.main, [], report.SECTIONS),
])
def test_every_cli_help_lists_every_key_with_type_default_and_help(name, main, argv, sections, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: ")
    keys = _keys(sections)
    assert keys and all(f"--{k}=" in out for k in keys), [k for k in keys if f"--{k}=" not in out]
    assert out.count("[default ") + out.count("[required]") >= len(keys) - 2  # set-by-config keys say so
    for section in sections:
        assert f"\n{section}: " in out  # grouped by section, with its description


def test_help_after_a_config_shows_its_values(capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "rsb_configs" / "a3.yaml"), "--help"])
    out = capsys.readouterr().out
    assert "--resolution.train=INT   [160 from the config; default 224]" in out
    assert "--lr.step_unit={epoch,update}   [default 'epoch']" in out
    p = run_cli("write_datasets.py", "--help")  # and the real entry point
    assert "--writer.out=STR" in p.stdout and "--source.kind={demo,imagefolder,flatval,v2}" in p.stdout


def test_runtime_failures_exit_1_in_one_line(demo_model, demo_betons, tmp_path, monkeypatch, capsys, small_disk):
    def dead(loader, threads):
        raise loaders.LoaderDied("the FFCV loader thread died; its error is printed above")
    with monkeypatch.context() as m:
        m.setattr(loaders, "epoch", dead)
        expect_error(evaluate.main([f"--eval.models={demo_model}/last.pt", f"--eval.datasets={demo_betons}/val.beton",
                                    f"--eval.out_dir={tmp_path}/e"]), capsys, code=1)
        assert not (tmp_path / "e" / "results.json").exists()
    folder = make_folder(tmp_path / "imgs", per_class=40, size=(300, 300))
    err = expect_error(write_cli.main(["--source.kind=imagefolder", f"--source.root={folder}", "--writer.num_workers=1",
                                       f"--writer.out={small_disk}/x.beton", "--writer.write_mode=raw"]), capsys, code=1)
    assert "No space left on device" in err
    assert list(small_disk.iterdir()) == []


def test_what_would_fail_late_fails_at_start(demo_betons, tmp_path, capsys, small_disk):
    cut = tmp_path / "cut.beton"
    data = (demo_betons / "train.beton").read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 5])  # a copy cut short
    shutil.copy(demo_betons / "train.json", tmp_path / "cut.json")
    err = expect_error(train.main(tiny_args(demo_betons, tmp_path / "r", f"--data.train_dataset={cut}",
                                            "--logging.wandb_mode=disabled")), capsys)
    assert "truncated or damaged" in err and "cut.beton" in err
    other = make_folder(tmp_path / "other", classes=("ant", "bee"), size=(56, 40))
    run_cli("write_datasets.py", "--source.kind=imagefolder", f"--source.root={other}",
            f"--writer.out={tmp_path}/other.beton", "--writer.num_workers=1")
    err = expect_error(train.main(tiny_args(demo_betons, tmp_path / "r", f"--data.val_dataset={tmp_path}/other.beton",
                                            "--logging.wandb_mode=disabled")), capsys)
    assert "train.beton' has 10 classes" in err and "other.beton' has 2" in err
    err = expect_error(train.main(tiny_args(demo_betons, small_disk / "run", "--logging.wandb_mode=disabled")), capsys)
    assert "MiB free on its disk, but the run keeps 2 checkpoints of about" in err and "last.pt, best.pt" in err
    assert list(small_disk.iterdir()) == []


def test_benchmarks_never_write_into_a_users_folder(tmp_path, capsys):
    users = make_folder(tmp_path / "my_dataset", size=(56, 40))
    before = sorted(p.relative_to(users) for p in users.rglob("*"))
    expect_error(bench.main(["corpus", f"--bench.corpus={users}", "--bench.n=5"]), capsys)
    assert sorted(p.relative_to(users) for p in users.rglob("*")) == before
    fresh = tmp_path / "corpus"
    assert bench.main(["corpus", f"--bench.corpus={fresh}", "--bench.n=3", "--bench.cores=1"]) == 0
    assert len(list(fresh.rglob("*.JPEG"))) == 3 and (fresh / ".rsb_ffcv_bench_corpus").exists()
    assert bench.main(["corpus", f"--bench.corpus={fresh}", "--bench.n=4", "--bench.cores=1"]) == 0  # its own: reused


def test_the_readme_figures_are_the_measured_json():
    """Every figure of the README's Performance section is rendered from results/*.json (a benchmark's output):
    after rerunning a benchmark, `python -m rsb_ffcv.bench figures` must be run, or this fails."""
    from rsb_ffcv.bench.figures import render, rewrite
    readme = (ROOT / "README.md").read_text()
    figures = render(ROOT / "results")
    assert rewrite(readme, figures) == readme
    for name in ("loader", "augment", "train", "writer", "demo", "memory", "scale"):
        data = json.loads((ROOT / "results" / f"{name}.json").read_text())
        assert data["machine"]["date"][:10] in figures


@pytest.mark.slow
def test_a_second_process_loads_what_importing_ffcv_compiles_from_numbas_cache(tmp_path):
    """Importing FFCV builds a numba typed Dict (ffcv.fields.rgb_image.IMAGE_MODES), which compiles numba's dict
    functions in every process: 3.7 s of each rank's start here. rsb_ffcv gives them numba's on-disk cache
    (rsb_ffcv/startup.py): the first process compiles and stores them, the next loads them."""
    probe = ("import rsb_ffcv, ffcv.fields.rgb_image; from numba.typed import typeddict as t; "
             "print([(len(getattr(t, n).stats.cache_hits), len(getattr(t, n).stats.cache_misses)) "
             "for n in ('_make_dict', '_setitem')])")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    first, second = (run_cli("-c", probe, env_extra=env).stdout.strip() for _ in range(2))
    assert (first, second) == ("[(0, 1), (0, 1)]", "[(1, 0), (1, 0)]")
