"""`python -m rsb_ffcv.gpu_check [--gpu_check.budget_s=480] [--gpu_check.out_dir=gpu_check]`: prove the GPU-only
paths on a GPU.

1. Correctness: a validation batch delivered by FFCV to the GPU equals the same batch delivered to the CPU;
   the CUDA RandAugment equals the CPU one for the same sampled parameters; a few ResNet-50 steps on one
   batch in the chosen precision (bf16 on recent GPUs), channels-last, eager and with torch.compile, give a
   finite, decreasing loss; Mixup/CutMix + BCE run on the device.
2. Benchmarks: augment (160 and 224 px) and train (A3 settings at 160 px; A1 settings at 224 px with 4
   micro-batches per step, the virtual-rank order that repeated augmentation needs on one GPU) on a
   generated ImageNet-shaped corpus of 12,800 images (timed inside epochs): images/s, data stall, main-thread
   data wait, GPU memory.
3. gpu_check.json with every figure, the GPU, driver and library versions; a table printed last.
A stage that would overrun gpu_check.budget_s is skipped and marked so, and a skipped stage fails the
check unless gpu_check.allow_skip=true. Without a GPU (gpu_check.device=cpu, gpu_check.quick=true) the same
code runs at toy sizes: a rehearsal, and what the test suite runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from fastargs import Param, Section

from . import cli, distributed, train_config
from .bench import augment as bench_augment
from .bench import train as bench_train
from .bench.common import machine, pick_device
from .bench.corpus import corpus_beton, generate
from .config import BoolStr, Choice, load_config
from .datasets.images import available_cpus
from .files import save_json
from .loaders import epoch, val_loader
from .randaugment import RandAugment
from .train import Trainer

Section("gpu_check", "the GPU check").params(
    device=Param(Choice(["auto", "cuda", "cpu"]), "auto: cuda when available", default="auto"),
    quick=Param(BoolStr(), "toy sizes (the CPU rehearsal; implied without a GPU)", default=False),
    budget_s=Param(float, "wall-time budget for all stages, in seconds", default=480),
    out_dir=Param(str, "gpu_check.json, the corpus and the benchmark JSON/PNG files go here", default="gpu_check"),
    compile=Param(BoolStr(), "also check training under torch.compile", default=True),
    allow_skip=Param(BoolStr(), "pass even if stages were skipped for time", default=False),
)
SECTIONS = ("gpu_check",)


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
        out, it = [], epoch(loader, torch.get_num_threads())
        try:
            for x, y in it:
                out.append((x.cpu().clone(), y.cpu().clone()))
                if len(out) == batches:
                    break
        finally:
            it.close()
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


def first_batch(t: Trainer):
    """A copy of the first training batch; the loader's threads are stopped."""
    it = epoch(t.train_loader, t.compute_threads)
    try:
        return tuple(v.clone() for v in next(it))
    finally:
        it.close()


def check_training(beton: str, d, arch: str, compile_model: bool, steps: int) -> dict:
    """Overfit one batch: no augmentation or mixing, so the loss must fall; then one A3 step with
    RandAugment + Mixup/CutMix + BCE on the device."""
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer_for(beton, run_dir, d, f"--model.arch={arch}", f"--model.compile={compile_model}",
                        "--training.batch_size=64", "--lr.warmup_epochs=0", "--lr.lr=0.005",
                        "--augment.rand_augment=", "--augment.mixup_alpha=0", "--augment.cutmix_alpha=0")
        t.train_model.train()
        images, labels = first_batch(t)
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
        images, labels = first_batch(t)
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
        results[name] = {"skipped": f"time budget: {left:.0f} s left, about {needs_s:.0f} s needed", "passed": False}
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
                    f"stall {100 * r['data_stall_fraction']:.1f}%, data wait {100 * r['data_wait_fraction']:.1f}%"
                    + (f", {r['gpu_max_memory_gib']:.1f} GiB" if "gpu_max_memory_gib" in r else ""))
        elif "rows" in r:
            text = ", ".join(f"{x['size']}px {x['ours_images_per_s']:,.0f} img/s" for x in r["rows"])
        else:
            text = "passed" if r.get("passed") else "FAILED"
        lines.append(f"{name:28s} {text}")
    return "\n".join(lines)


def check(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.gpu_check", description=__doc__)
    deadline = time.perf_counter() + cfg["gpu_check.budget_s"]
    device = pick_device(cfg["gpu_check.device"])
    gpu = device.type == "cuda"
    quick = cfg["gpu_check.quick"] or not gpu
    out = Path(cfg["gpu_check.out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    info["driver"] = driver_version() if gpu else None
    results: dict = {"machine": info, "quick": quick}
    print(f"device: {info['gpu'] or info['cpu']}, driver {info['driver']}, torch {info['versions'].get('torch')}",
          flush=True)

    n = 96 if quick else 12_800  # a GPU epoch of >= 50 batches: the stall is timed inside epochs
    corpus = out / "corpus"
    t0 = time.perf_counter()
    results["corpus"] = generate(corpus, n)
    beton = corpus_beton(corpus, n, "proportion", info["cores"])  # one beton for every stage
    results["corpus"]["seconds"] = round(time.perf_counter() - t0, 1)
    d = distributed.init(device.type, key="gpu_check.device")
    arch = "resnet18" if quick else "resnet50"
    steps = 4 if quick else 8
    run_stage(results, "loader_gpu_equals_cpu", lambda: check_loader(beton, device), deadline, 20)
    run_stage(results, "randaugment_gpu_equals_cpu", lambda: check_randaugment(device), deadline, 10)
    run_stage(results, "train_steps_eager", lambda: check_training(beton, d, arch, False, steps), deadline, 30)
    if cfg["gpu_check.compile"]:
        run_stage(results, "train_steps_compiled", lambda: check_training(beton, d, arch, True, steps),
                  deadline, 120 if gpu else 60)
    sizes, batch = ([64], 16) if quick else ([160, 224], 256)
    run_stage(results, "bench_augment", lambda: {"rows": bench_augment.run("rand-m6-mstd0.5-inc1", sizes, batch,
                                                                            device, 8 if quick else 32)},
              deadline, 30)
    if quick:
        small = ["--model.arch=resnet10t", "--resolution.train=64"]
        plans = {"bench_train_a3": ("rsb_configs/a3.yaml", 16, 2, 1, small),
                 "bench_train_a1": ("rsb_configs/a1.yaml", 8, 2, 4, small)}
    else:  # name: (config, per-device batch, timed micro-batches, accumulation, overrides)
        plans = {"bench_train_a3_160px": ("rsb_configs/a3.yaml", 256, 40, 1, ["--resolution.train=160"]),
                 "bench_train_a1_224px": ("rsb_configs/a1.yaml", 256, 40, 4, ["--resolution.train=224"])}
    for name, (config, per_device, timed, accum, overrides) in plans.items():
        def bench(name=name, config=config, per_device=per_device, timed=timed, accum=accum, overrides=overrides):
            return bench_train.run(config, beton, device.type, per_device, timed, overrides, accum)
        run_stage(results, name, bench, deadline, 90 if gpu else 30)
    stages = {k: r for k, r in results.items() if isinstance(r, dict) and k not in ("machine", "corpus")}
    skipped = [k for k, r in stages.items() if "skipped" in r]
    failed = [k for k, r in stages.items() if "error" in r or (r.get("passed") is False and "skipped" not in r)]
    results["skipped"], results["failed"] = skipped, failed
    results["passed"] = not failed and (not skipped or cfg["gpu_check.allow_skip"])
    save_json(out / "gpu_check.json", results)
    verdict = "PASSED" if results["passed"] else "FAILED" + (f" ({len(failed)} failed" if failed else " (") + \
        (f", {len(skipped)} skipped: set gpu_check.allow_skip=true to accept that)" if skipped else ")")
    print(f"\nsaved {out / 'gpu_check.json'}\n{summary_table(results)}\n{verdict}")
    return 0 if results["passed"] else 1


def main(argv=None) -> int:
    return cli.run(check, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
