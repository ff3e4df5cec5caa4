"""`python -m rsb_ffcv.gpu_check [--budget-s 480] [--out-dir gpu_check]`: prove the GPU-only paths on a GPU.

1. Correctness: a validation batch delivered by FFCV to the GPU equals the same batch delivered to the CPU;
   the CUDA RandAugment equals the CPU one for the same sampled parameters; a few ResNet-50 steps on one
   batch in the chosen precision (bf16 on recent GPUs), channels-last, eager and with torch.compile, give a
   finite, decreasing loss; Mixup/CutMix + BCE run on the device.
2. Benchmarks: augment (160 and 224 px) and train (A3 settings at 160 px, A1 settings at 224 px) on a
   generated ImageNet-shaped corpus: images/s, data-stall fraction, GPU memory.
3. gpu_check.json with every figure, the GPU, driver and library versions; a table printed last.
Stages that would overrun --budget-s are skipped and marked so. Without a GPU (--device cpu, --quick) the same
code runs at toy sizes: a rehearsal, and what the test suite runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import distributed, train_config
from .bench import augment as bench_augment
from .bench import train as bench_train
from .bench.common import machine, pick_device
from .bench.corpus import generate
from .config import load_config
from .datasets.images import available_cpus
from .datasets.sources import image_folder
from .datasets.writer import WriteOptions, write_beton
from .loaders import epoch, val_loader
from .randaugment import RandAugment
from .tracking import save_json
from .train import Trainer


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def check_loader(beton: str, device: torch.device, batches: int = 2) -> dict:
    """The same sequential validation batches through ToDevice(cuda) and ToDevice(cpu)."""
    def first(dev):
        loader = val_loader(beton, 32, 160, 0.95, dev, num_workers=min(4, available_cpus()), rank=0, world=1,
                            os_cache=True, batches_ahead=2)
        out = []
        for i, (x, y) in enumerate(epoch(loader, torch.get_num_threads())):
            out.append((x.cpu().clone(), y.cpu().clone()))
            if i + 1 == batches:
                break
        return out
    on_device, on_cpu = first(device), first(torch.device("cpu"))
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(on_device, on_cpu, strict=True))
    layout = on_device[0][0].is_contiguous(memory_format=torch.channels_last)
    return {"passed": bool(same and layout), "batches": batches, "equal": bool(same), "channels_last": bool(layout)}


def check_randaugment(device: torch.device, batch: int = 64) -> dict:
    """Same sampled parameters on both devices; LUT ops are exact, resampling may round 1 level apart."""
    x = bench_augment.batch_of(160, batch)
    ra = RandAugment("rand-m9-mstd0.5-inc1", interpolation="bicubic")
    params = ra.sample(batch, "cpu", torch.Generator().manual_seed(0))
    cpu = ra(x.clone(), params=params)
    dev = ra(x.to(device), params={k: v.to(device) for k, v in params.items()}).cpu()
    diff = (dev.int() - cpu.int()).abs()
    share = float((diff > 0).float().mean())
    return {"passed": bool(diff.max() <= 1 and share < 1e-3), "max_abs_diff": int(diff.max()),
            "share_of_values_differing": share, "channels_last_kept": dev.is_contiguous(memory_format=torch.channels_last)}


def trainer_for(beton: str, run_dir: str, d, *extra: str) -> Trainer:
    cfg = load_config(train_config.SECTIONS, ["--config", "rsb_configs/a3.yaml", f"--data.train_dataset={beton}",
                                              f"--data.val_dataset={beton}", "--logging.wandb_mode=disabled",
                                              f"--logging.run_dir={run_dir}", *extra], prog="gpu_check")
    return Trainer(cfg, d)


def check_training(beton: str, d, arch: str, compile_model: bool, steps: int) -> dict:
    """Overfit one batch: no augmentation or mixing, so the loss must fall; then one A3 step with
    RandAugment + Mixup/CutMix + BCE on the device."""
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer_for(beton, run_dir, d, f"--model.arch={arch}", f"--model.compile={compile_model}",
                        "--training.batch_size=64", "--lr.warmup_epochs=0", "--lr.lr=0.005",
                        "--augment.rand_augment=", "--augment.mixup_alpha=0", "--augment.cutmix_alpha=0")
        t.train_model.train()
        images, labels = (v.clone() for v in next(epoch(t.train_loader, t.compute_threads)))
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            losses.append(float(t.forward_backward(images, labels)))
            t.optimizer_step()
        seconds = time.perf_counter() - t0
        t.tracker.finish(0)
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer_for(beton, run_dir, d, f"--model.arch={arch}", "--training.batch_size=64")
        t.train_model.train()
        images, labels = next(epoch(t.train_loader, t.compute_threads))
        x, y = t.augment(images, labels)
        mixed = bool(y.dtype.is_floating_point and y.shape == (64, len(t.classes)))
        a3_loss = float(t.forward_backward(images, labels))
        t.optimizer_step()
        t.tracker.finish(0)
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), [*losses, a3_loss]))
    return {"passed": bool(finite and losses[-1] < losses[0] and mixed), "arch": arch, "compile": compile_model,
            "precision": t.precision.name, "losses": [round(v, 4) for v in losses],
            "a3_step_loss_with_randaugment_mixup_cutmix_bce": round(a3_loss, 4), "soft_targets": mixed,
            "seconds": round(seconds, 1)}


def run_stage(results: dict, name: str, fn, deadline: float, needs_s: float):
    """Run fn unless fewer than needs_s seconds remain; record its result or its error."""
    left = deadline - time.perf_counter()
    if left < needs_s:
        results[name] = {"skipped": f"time budget: {left:.0f} s left, about {needs_s:.0f} s needed"}
        print(f"[{name}] skipped ({results[name]['skipped']})", flush=True)
        return
    t0 = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # one broken stage must not hide the others' figures
        traceback.print_exc()
        results[name] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
    results[name]["stage_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {json.dumps(results[name])[:300]}", flush=True)


def summary_table(results: dict) -> str:
    lines = [f"{'stage':28s} result"]
    for name, r in results.items():
        if not isinstance(r, dict) or name in ("machine", "corpus"):
            continue
        if "skipped" in r:
            text = "skipped: " + r["skipped"]
        elif "error" in r:
            text = "FAILED: " + r["error"][:80]
        elif "real_images_per_s" in r:
            text = (f"{r['real_images_per_s']:,.0f} img/s from betons, {r['synthetic_images_per_s']:,.0f} synthetic, "
                    f"stall {100 * r['data_stall_fraction']:.1f}%"
                    + (f", {r['gpu_max_memory_gib']:.1f} GiB" if "gpu_max_memory_gib" in r else ""))
        elif "rows" in r:
            text = ", ".join(f"{x['size']}px {x['ours_images_per_s']:,.0f} img/s" for x in r["rows"])
        else:
            text = "passed" if r.get("passed") else "FAILED"
        lines.append(f"{name:28s} {text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU rehearsal)")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-time budget for all stages")
    ap.add_argument("--out-dir", default="gpu_check")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    a = ap.parse_args(argv)
    deadline = time.perf_counter() + a.budget_s
    device = pick_device(a.device)
    gpu = device.type == "cuda"
    quick = a.quick or not gpu
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    info["driver"] = driver_version() if gpu else None
    results: dict = {"machine": info, "quick": quick}
    print(f"device: {info['gpu'] or info['cpu']}, driver {info['driver']}, torch {info['versions'].get('torch')}",
          flush=True)

    n = 96 if quick else 4096
    corpus = out / "corpus"
    beton = out / f"corpus_{n}.beton"
    t0 = time.perf_counter()
    results["corpus"] = generate(corpus, n)
    if not beton.exists():
        write_beton(image_folder(corpus), beton, WriteOptions(num_workers=info["cores"]))
    results["corpus"]["seconds"] = round(time.perf_counter() - t0, 1)
    d = distributed.init(device.type)
    arch = "resnet18" if quick else "resnet50"
    steps = 4 if quick else 8
    run_stage(results, "loader_gpu_equals_cpu", lambda: check_loader(str(beton), device), deadline, 20)
    run_stage(results, "randaugment_gpu_equals_cpu", lambda: check_randaugment(device), deadline, 10)
    run_stage(results, "train_steps_eager", lambda: check_training(str(beton), d, arch, False, steps), deadline, 30)
    if not a.no_compile:
        run_stage(results, "train_steps_compiled", lambda: check_training(str(beton), d, arch, True, steps),
                  deadline, 120 if gpu else 60)
    sizes, batch = ([64], 16) if quick else ([160, 224], 256)
    run_stage(results, "bench_augment", lambda: {"rows": bench_augment.run("rand-m6-mstd0.5-inc1", sizes, batch,
                                                                            device, 8 if quick else 32)},
              deadline, 30)
    common = ["--n", str(n), "--corpus", str(corpus), "--device", device.type]
    if quick:
        common += ["--arch", "resnet10t", "--batch", "16", "--steps", "2", "--res", "64"]
        plans = {"bench_train_a3": ["--config", "rsb_configs/a3.yaml"]}
    else:
        plans = {"bench_train_a3_160px": ["--config", "rsb_configs/a3.yaml", "--res", "160", "--batch", "256",
                                          "--steps", "40"],
                 "bench_train_a1_224px": ["--config", "rsb_configs/a1.yaml", "--res", "224", "--batch", "256",
                                          "--steps", "30"]}
    for name, args in plans.items():
        run_stage(results, name, lambda args=args, name=name: bench_train.main(
            [*common, *args, "--out", str(out / f"{name}.json")]), deadline, 90 if gpu else 30)
    stages = [r for k, r in results.items() if isinstance(r, dict) and k not in ("machine", "corpus")]
    results["passed"] = all(r.get("passed", True) for r in stages)  # benchmarks pass unless they raise
    save_json(out / "gpu_check.json", results)
    print(f"\nsaved {out / 'gpu_check.json'}\n{summary_table(results)}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
