"""rsb_ffcv.evaluate and rsb_ffcv.gradcam on real betons, real timm models, offline W&B."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
import wandb_records
from conftest import ROOT, metrics, run_cli, torchrun

from rsb_ffcv import evaluate, gradcam, loaders
from rsb_ffcv.augment import Normalize
from rsb_ffcv.datasets import cli as write_cli
from rsb_ffcv.datasets.sources import imagenet_synsets, readable_names
from rsb_ffcv.evaluate import real_accuracy
from rsb_ffcv.weights import load_model

SYNSETS = imagenet_synsets()


def last_val_top1(run_dir):
    return [m["val/top1"] for m in metrics(run_dir) if "val/top1" in m][-1]


def test_evaluating_a_checkpoint_reproduces_the_trainers_val_top1(demo_model, demo_betons, tmp_path, capsys):
    """With more batches than FFCV's ring of batch buffers: on the CPU a batch's labels are FFCV's buffer itself,
    which later batches overwrite unless copied."""
    out = tmp_path / "eval"
    p = run_cli("-m", "rsb_ffcv.evaluate", f"--eval.models=demo={demo_model}/last.pt",
                f"--eval.datasets={demo_betons}/val.beton", "--eval.resolution=64", f"--eval.out_dir={out}",
                "--eval.wandb_mode=offline", "--eval.batch_size=4")  # 15 batches: FFCV reuses its buffers
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["images"] == 60 and row["top1"] == pytest.approx(last_val_top1(demo_model), abs=1e-6)
    assert "demo" in p.stdout and "top1" in p.stdout.splitlines()[-3]
    run = wandb_records.run_file(out)
    assert any(r.WhichOneof("record_type") == "summary" for r in wandb_records.records(run))
    assert evaluate.main([f"--eval.models={demo_model}/last.pt", "--eval.flip_tta=true", "--eval.resolution=64",
                          f"--eval.datasets={demo_betons}/val.beton", f"--eval.out_dir={out}/tta"]) == 0
    flipped = json.loads((out / "tta" / "results.json").read_text())["results"][0]
    assert flipped["images"] == 60 and "error" not in capsys.readouterr().err
    cpu = torch.device("cpu")  # flip TTA by its definition: the mean of the logits of each image and its mirror
    model, normalize = load_model(f"{demo_model}/last.pt", cpu).model, Normalize()
    loader = loaders.val_loader(f"{demo_betons}/val.beton", 16, 64, 0.95, cpu, num_workers=1, rank=0, world=1,
                                batches_ahead=1)
    hits, changed = 0, False
    with torch.no_grad():
        for x, y in loaders.epoch(loader, 1):
            x = normalize(x)
            plain, mirrored = model(x), model(x.flip(3))
            hits += int(((plain + mirrored) / 2).argmax(1).eq(y).sum())
            changed |= not torch.allclose(plain, mirrored)
    assert changed and flipped["top1"] == pytest.approx(100 * hits / 60, abs=1e-9)


def _write_subset(tmp_path, layout: str, per_class=(4, 2, 2)):
    """Demo-like images in ImageNet layouts: synset folders with val file names (imagefolder + imagenet1k), or
    class-index folders (ImageNet-V2). Returns the beton and the records' class indices."""
    from conftest import natural_image
    root = tmp_path / layout
    k = 0
    for c, n in zip((0, 7, 42), per_class, strict=True):
        d = root / (SYNSETS[c] if layout == "synsets" else str(c))
        d.mkdir(parents=True)
        for _ in range(n):
            k += 1
            natural_image(k, 80, 60).save(d / f"ILSVRC2012_val_{k:08d}.JPEG", quality=95)
    beton = tmp_path / f"{layout}.beton"
    kind = ["--source.kind=imagefolder", "--source.classes_from=imagenet1k"] if layout == "synsets" else \
        ["--source.kind=v2"]
    assert write_cli.main([*kind, f"--source.root={root}", f"--writer.out={beton}", "--writer.num_workers=1"]) == 0
    return beton


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory):
    """A timm-format resnet10t state dict whose prediction ranking is fixed: 7, then 0, 3, 4, 5 (bias only)."""
    model = timm.create_model("resnet10t", num_classes=1000)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-10)
        for rank, c in enumerate((7, 0, 3, 4, 5)):
            model.fc.bias[c] = 10 - rank
    path = tmp_path_factory.mktemp("timm") / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    return path


def test_imagenet_subset_keeps_imagenet_indices_and_timm_weights_score_it(tmp_path, constant_model):
    beton = _write_subset(tmp_path, "synsets")
    meta = json.loads(beton.with_suffix(".json").read_text())
    assert meta["classes"] == SYNSETS and meta["labels"] == [0] * 4 + [7] * 2 + [42] * 2
    assert readable_names(meta["classes"][:1]) == ["tench"]
    out = tmp_path / "eval"
    assert evaluate.main([f"--eval.models=const=timm:resnet10t:{constant_model}", f"--eval.datasets={beton}",
                          "--eval.resolution=64", f"--eval.out_dir={out}"]) == 0
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["top1"] == pytest.approx(100 * 2 / 8) and row["top5"] == pytest.approx(100 * 6 / 8)


def test_imagenet_v2_layout_scores_by_directory_index(tmp_path, constant_model):
    beton = _write_subset(tmp_path, "v2", per_class=(1, 3, 2))
    out = tmp_path / "eval"
    assert evaluate.main([f"--eval.models=timm:resnet10t:{constant_model}", f"--eval.datasets={beton}",
                          "--eval.resolution=64", f"--eval.out_dir={out}"]) == 0
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["top1"] == pytest.approx(100 * 3 / 6) and row["top5"] == pytest.approx(100 * 4 / 6)


def test_real_labels(tmp_path, constant_model, capsys):
    beton = _write_subset(tmp_path, "synsets")
    real = [[] for _ in range(50_000)]
    # records: val images 1-4 (class 0), 5-6 (class 7), 7-8 (class 42); the model always says 7.
    real[0], real[1], real[2], real[3] = [0, 7], [0], [], [3]   # 1 of 3 labelled images has 7; 4 has 3 (top-5)
    real[4], real[5], real[6], real[7] = [7], [7, 1], [42, 7], [42]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    out = tmp_path / "eval"
    assert evaluate.main([f"--eval.models=timm:resnet10t:{constant_model}", f"--eval.datasets={beton}",
                          "--eval.resolution=64", f"--eval.real_labels={path}", f"--eval.out_dir={out}"]) == 0
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["real_top1"] == pytest.approx(100 * 4 / 7)   # hits: images 1, 5, 6, 7 of 7 labelled
    assert row["real_top5"] == pytest.approx(100 * 6 / 7)   # + images 2 (0 in top-5) and 4 (3 in top-5)
    path.write_text(json.dumps(real[:100]))
    capsys.readouterr()
    rc = evaluate.main([f"--eval.models=timm:resnet10t:{constant_model}", f"--eval.datasets={beton}",
                        f"--eval.real_labels={path}", f"--eval.out_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and "has 100 entries" in err and err.count("\n") == 1


def test_real_accuracy_equals_timms_real_labels(tmp_path):
    from timm.data import RealLabelsImagenet
    rng = np.random.default_rng(0)
    real = [sorted(set(rng.integers(0, 20, rng.integers(0, 4)).tolist())) for _ in range(50_000)]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    files = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(50_000)]  # timm's class wants all of val
    logits = torch.randn(50_000, 20)
    theirs = RealLabelsImagenet(files, real_json=str(path))
    theirs.add_result(logits)
    top = logits.topk(5, 1).indices.numpy()
    assert real_accuracy(top, real, 1) == pytest.approx(theirs.get_accuracy(1))
    assert real_accuracy(top, real, 5) == pytest.approx(theirs.get_accuracy(5))


def test_bad_inputs_are_one_line_errors(tmp_path, demo_betons, constant_model, demo_model, capsys):
    from rsb_ffcv import evaluate

    def fails(*args):  # in-process: the same main() the CLI runs
        rc = evaluate.main([*args, f"--eval.out_dir={tmp_path}/e"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        return err
    val = f"--eval.datasets={demo_betons}/val.beton"
    assert "weights file 'x.pth' not found" in fails("--eval.models=timm:resnet10t:x.pth", val)
    assert "Unknown model" in fails(f"--eval.models=timm:no_such_net:{constant_model}", val)
    assert "do not fit the architecture" in fails(f"--eval.models=timm:resnet18:{constant_model}", val)
    assert "must be the same list" in fails(f"--eval.models=timm:resnet10t:{constant_model}", val)
    shutil.copy(f"{demo_betons}/val.beton", tmp_path / "lonely.beton")
    assert "has no sidecar" in fails(f"--eval.models={demo_model}/last.pt", f"--eval.datasets={tmp_path}/lonely.beton")
    assert "not an rsb_ffcv checkpoint" in fails(f"--eval.models={constant_model}", val)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    assert "cannot be read as safetensors" in fails(f"--eval.models=timm:resnet10t:{tmp_path}/bad.safetensors", val)
    if not torch.cuda.is_available():
        assert "eval.device=cuda but no CUDA device" in fails("--eval.device=cuda", f"--eval.models={demo_model}/last.pt",
                                                              val)


def test_grad_cam_equals_class_activation_map_for_a_global_pool_linear_head():
    """For GAP + linear heads Grad-CAM reduces to CAM (Zhou et al.): ReLU(sum_k W[c, k] A_k) / (h w)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    target = torch.tensor([0, 3, 4])
    cam, logits = gradcam.grad_cam(model, x, target)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = torch.relu(torch.einsum("nkhw,nk->nhw", feats, model.fc.weight[target])) / feats[0, 0].numel()
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, model(x).detach())


def test_gradcam_grid_table_and_localisation(demo_model, demo_betons, tmp_path):
    out = tmp_path / "cam"
    p = run_cli("-m", "rsb_ffcv.gradcam", f"--gradcam.models=early={demo_model}/last.pt,again={demo_model}/best.pt",
                f"--gradcam.dataset={demo_betons}/val.beton", "--gradcam.images=4", "--gradcam.resolution=64",
                f"--gradcam.out_dir={out}", "--gradcam.wandb_mode=offline")
    from PIL import Image
    w, h = Image.open(out / "grid.png").size
    assert h > w * 4 / 3 * 0.8  # 4 rows x 3 columns
    scores = json.loads((out / "scores.json").read_text())["scores"]["early"]
    assert scores["images"] == 60
    # The trained model's CAM peak lands on the object far more often than a random point does.
    assert scores["pointing_game"] > scores["random_cam_pointing_game"] + 0.15, scores
    assert scores["energy_in_box"] > scores["random_cam_energy_in_box"], scores
    run = wandb_records.run_file(out)
    tables = list(run.parent.glob("files/media/table/gradcam_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["index", "image", "label"] and "early grad-cam" in table["columns"]
    assert len(table["data"]) == 4
    assert "pointing_game" in p.stdout


@pytest.mark.slow
def test_two_process_evaluation_equals_one_and_gradcam_writes_once(demo_model, demo_betons, tmp_path):
    """torchrun shards records r::world; gathered back in record order the scores are identical. Grad-CAM in the same
    launch: rank 0 alone computes and writes its outputs."""
    args = [f"--eval.models=demo={demo_model}/last.pt", "--eval.resolution=64",
            f"--eval.datasets={demo_betons}/val.beton", "--eval.num_workers=1"]
    run_cli("-m", "rsb_ffcv.evaluate", *args, f"--eval.out_dir={tmp_path}/one")
    cam = tmp_path / "cam"
    p = torchrun(str(ROOT / "tests" / "torchrun_tools.py"), *args, f"--eval.out_dir={tmp_path}/two", "--",
                 f"--gradcam.models={demo_model}/last.pt", f"--gradcam.dataset={demo_betons}/val.beton",
                 "--gradcam.images=2", "--gradcam.resolution=64", "--gradcam.localisation=off",
                 f"--gradcam.out_dir={cam}", "--gradcam.wandb_mode=disabled", timeout=600)
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["results"][0] for d in ("one", "two"))
    assert two["images"] == one["images"] == 60 and two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert p.stdout.count("saved ") == 2 and p.stdout.count(f"saved {cam / 'grid.png'}") == 1
    images = json.loads((cam / "scores.json").read_text())["images"]
    assert (cam / "grid.png").stat().st_size > 1000 and len(images) == 2 and all(0 <= i < 60 for i in images)