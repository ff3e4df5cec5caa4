import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from rsb_ffcv.datasets import demo

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
# `make test` runs the files in 2 pytest-xdist workers (--dist loadfile: a file's tests, and so its module fixtures,
# stay in one worker), handing the files out in this order: the longest first (measured, 2 vCPUs), so that no long
# file starts last and leaves one core idle at the end. Files not named here follow in their usual order.
LONGEST_FIRST = ("test_trainer.py", "test_distributed.py", "test_slurm.py", "test_reproducible.py",
                 "test_offline_kit.py", "test_cli.py", "test_full_size.py", "test_evaluate.py", "test_report.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder of a session fixture, built once per `pytest` command: under pytest-xdist each worker is a
    process with its own session, so the first worker to need the folder builds it under a lock while the others
    wait, then all read it. build(folder) fills the empty folder; a build that failed is retried by the next."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the command's temporary folder, above the workers' own
    out = base / name
    with FileLock(f"{out}.lock"):
        if not (out / ".built").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".built").touch()
    return out


def natural_image(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    """A real-looking test image (textured background + object), not noise or a constant."""
    img, _ = demo.make_image(np.random.default_rng(seed), seed % len(demo.CLASSES))
    return img.resize((w, h), Image.BILINEAR)


def make_folder(root: Path, classes=("cat", "dog", "fish"), per_class=3, ext=".jpg", seed=0, size=None) -> Path:
    """ImageFolder of natural-looking images; varied sizes unless `size` (FFCV's full-image decoder
    needs one size per beton)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size or (40 + 8 * i, 32 + 4 * c)
            natural_image(seed + 100 * c + i, w, h).save(root / name / f"img{i}{ext}", quality=95)
    return root


def child_env(**extra) -> dict:
    """This environment for a child process, without W&B's service address: a test that ran W&B in-process set
    WANDB_SERVICE, and a child would register its runs in this process's service (a SIGKILLed child's run then
    stays 'in use' there)."""
    return {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, **extra}


def run_cli(*args, cwd=ROOT, check=True, timeout=300, env_extra=None):
    env = child_env(**(env_extra or {}))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(*args, nproc=2, check=True, timeout=600, env_extra=None):
    """`torchrun --standalone --nproc_per_node=N -m ...` on the CPU (gloo)."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([exe, "--standalone", f"--nproc_per_node={nproc}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=child_env(**(env_extra or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: writing more fails with 'no space left on device' (needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to simulate a full disk")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "train", size=(56, 40))


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory):
    """Small demo train/val betons (10 classes; 24 train and 6 val images per class, at most 96 px)."""
    return built_once(tmp_path_factory, "demo", lambda out: run_cli(
        "write_datasets.py", f"--demo.out_dir={out}", "--demo.train_per_class=24", "--demo.val_per_class=6",
        "--writer.max_resolution=96"))


def tiny_args(demo, run_dir, *extra):
    """CLI overrides for a seconds-long CPU run on the demo betons."""
    return ["--config", str(ROOT / "rsb_configs" / "demo.yaml"),
            f"--data.train_dataset={demo}/train.beton", f"--data.val_dataset={demo}/val.beton",
            f"--logging.run_dir={run_dir}", "--model.arch=resnet10t", "--resolution.train=32",
            "--resolution.test=32", "--training.batch_size=16", "--training.epochs=2",
            "--training.steps_per_epoch=3", "--logging.log_every=1", "--logging.wandb_mode=offline",
            "--augment.rand_augment=", *extra]


@pytest.fixture(scope="session")
def demo_model(demo_betons, tmp_path_factory):
    """A resnet10t trained on the small demo betons (64 px, 12 epochs, about a minute on 2 cores)."""
    return built_once(tmp_path_factory, "demo_model", lambda out: run_cli(
        "-m", "rsb_ffcv.train", "--config", str(ROOT / "rsb_configs" / "demo.yaml"),
        f"--data.train_dataset={demo_betons}/train.beton", f"--data.val_dataset={demo_betons}/val.beton",
        f"--logging.run_dir={out / 'run'}", "--resolution.train=64", "--resolution.test=64", "--training.epochs=12",
        "--augment.rand_augment=", "--augment.mixup_prob=0", "--logging.wandb_mode=disabled", timeout=1200)) / "run"


def ddp_args(demo, run_dir, *extra):
    """tiny_args for several processes: 4 epochs x 3 steps in the page-local order (one-page windows), so that
    stop, resume and digests are proven for it too."""
    return tiny_args(demo, run_dir, "--data.num_workers=1", "--training.epochs=4", "--logging.wandb_mode=disabled",
                     "--data.in_memory=false", "--data.shuffle_window_mib=2", *extra)


@pytest.fixture(scope="session")
def ddp_reference(demo_betons, tmp_path_factory):
    """An uninterrupted 2-process run of ddp_args (1 node, torchrun): the weights and orders that stopped,
    killed, restarted, requeued and multi-node runs of the same config must end with."""
    return built_once(tmp_path_factory, "ddp_reference", lambda out: torchrun(
        "-m", "rsb_ffcv.train", *ddp_args(demo_betons, out / "run"))) / "run"


def ddp4_args(demo, run_dir, *extra):
    """ddp_args for 4 processes, as a 4-GPU node runs the recipe: repeated augmentation, 2 micro-batches of 2
    images per step and device (accumulation), stochastic depth, one compute thread per process (float sums depend
    on the thread count)."""
    return ddp_args(demo, run_dir, "--training.repeated_aug=2", "--training.max_device_batch=2",
                    "--model.drop_path=0.1", "--training.cpu_threads=1", *extra)


@pytest.fixture(scope="session")
def ddp4_reference(demo_betons, tmp_path_factory):
    """An uninterrupted 4-process run of ddp4_args (1 node, torchrun): at 3 or more ranks the all-reduce's float
    sums depend on the order of its operands, which a resume must not change."""
    return built_once(tmp_path_factory, "ddp4_reference", lambda out: torchrun(
        "-m", "rsb_ffcv.train", *ddp4_args(demo_betons, out / "run"), nproc=4)) / "run"


def step_losses(run_dir):
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def final_weights(run_dir):
    """last.pt's model state (tensors)."""
    import torch
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)["model"]


def same_weights(a, b) -> bool:
    """Bit-identical state dicts."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(run_dir):
    from rsb_ffcv.tracking import read_metrics
    return read_metrics(Path(run_dir) / "metrics.jsonl")[0]


def step_lrs(run_dir):
    return {m["step"]: m["train/lr"] for m in metrics(run_dir) if "train/lr" in m}


def digests(run_dir):
    return {m["epoch"]: m["order_digest"] for m in metrics(run_dir) if "order_digest" in m}


def epoch_losses(run_dir):
    return {m["epoch"]: m["train/epoch_loss"] for m in metrics(run_dir) if "train/epoch_loss" in m}


def wandb_run_ids(run_dir):
    """The W&B run id of each offline run directory (offline-run-DATE-ID) under run_dir/wandb: one id for a run
    that was resumed or requeued (each start adds a directory)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]
