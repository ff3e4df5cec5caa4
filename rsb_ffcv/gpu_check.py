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
3. Where the time goes: RandAugment's two batchings side by side (grouped: one host sync; masked: none, also
   compiled and as a CUDA graph; A3 with each), their host syncs (counted, and under CUDA's sync debug mode),
   timm's own A3 input pipeline feeding the same step (the side-by-side ratio), loader images/s with 1, 2, 4,
   ... decode threads (and the threads a 4-GPU node needs), a torch.profiler summary of A3 steps (top
   operators, GPU idle share), and the A3 step compiled and without channels-last.
4. gpu_check.json with every figure, the GPU, driver and library versions; a table printed last.
A stage that would overrun gpu_check.budget_s is skipped and marked so, and a skipped stage fails the
check unless gpu_check.allow_skip=true. Without a GPU (gpu_check.device=cpu, gpu_check.quick=true) the same
code runs at toy sizes: a rehearsal, and what the test suite runs.
"""
from __future__ import annotations

import itertools
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
from .bench.common import HostSyncs, machine, pick_device, sync
from .bench.corpus import corpus_beton, generate
from .config import BoolStr, Choice, ConfigError, load_config
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
    stages=Param(str, "comma-separated names of the stages to run ('' = all; gpu_check.json names them)",
                 default=""),
    plan_only=Param(BoolStr(), "print the stages that would run and the seconds each is allowed, then exit: no "
                               "GPU needed (full size unless quick=true: checks a GPU call's stage names)",
                    default=False),
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


def check_randaugment(device: torch.device, batch: int = 64, compiled: bool = False) -> dict:
    """Same sampled parameters on both devices: both batchings on the device against the CPU's grouped one (LUT ops
    are exact, resampling may round 1 level apart); on the device, masked must equal grouped to the bit, and the
    compiled masked one (if asked) is compared with grouped too (Triton may fuse a multiply and an add)."""
    x = bench_augment.batch_of(160, batch)
    config = "rand-m9-mstd0.5-inc1"
    params = RandAugment(config, interpolation="random").sample(batch, "cpu", torch.Generator().manual_seed(0))
    cpu = RandAugment(config, interpolation="random")(x.clone(), params=params)
    on_device = {k: v.to(device) for k, v in params.items()}
    result, outputs = {"passed": True}, {}
    variants = [("grouped", {}), ("masked", {"batching": "masked"})]
    if compiled:
        variants.append(("masked_compiled", {"batching": "masked", "compile": True}))
    for name, kwargs in variants:
        dev = RandAugment(config, interpolation="random", **kwargs)(x.to(device), params=on_device)
        outputs[name] = dev
        diff = (dev.cpu().int() - cpu.int()).abs()
        share = float((diff > 0).float().mean())
        result[name] = {"max_abs_diff": int(diff.max()), "share_of_values_differing": share,
                        "channels_last_kept": dev.is_contiguous(memory_format=torch.channels_last)}
        result["passed"] &= bool(diff.max() <= 1 and share < 1e-3)
        if name != "grouped":
            result[name]["equals_grouped_on_device"] = bool(torch.equal(dev, outputs["grouped"]))
    result["passed"] &= result["masked"]["equals_grouped_on_device"]
    return result


def check_randaugment_syncs(device: torch.device, batch: int = 256, batching: str = "grouped") -> dict:
    """The host waits for the GPU once per grouped RandAugment forward (the op-group sizes of all layers), never
    in a masked one: counted as the torch calls that synchronise, and on CUDA also by torch's own sync debug
    mode, with the line of each wait."""
    import warnings
    allowed = 1 if batching == "grouped" else 0
    ra = RandAugment("rand-m6-mstd0.5-inc1", interpolation="bicubic", batching=batching)
    x = bench_augment.batch_of(160, batch).to(device)
    ra(x, generator=None)  # constants are made once per device
    with HostSyncs() as counted:
        ra(x)
    result = {"torch_calls_that_sync": len(counted.syncs), "host_to_device_copies": len(counted.copies),
              "layers": ra.num_layers}
    ok = len(counted.syncs) <= allowed and not counted.copies
    if device.type == "cuda":
        sources, package = [], Path(__file__).parent

        def note(message, *args, **kwargs):  # the innermost line of randaugment.py (or else any) that synchronised
            if str(message).startswith("called a synchronizing CUDA operation"):  # not the mode's own notice
                frames = traceback.extract_stack()[:-1]
                ours = [f for f in frames if Path(f.filename) == package / "randaugment.py"]
                f = (ours or frames)[-1]
                sources.append(f"{Path(f.filename).name}:{f.lineno} {f.line}")
        torch.cuda.synchronize(device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ra(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        result["cuda_sync_warnings"], result["cuda_sync_sources"] = len(sources), sources
        ok = ok and len(sources) <= allowed
    return {"passed": ok, **result}


def loader_scaling(beton: str, cores: int, batch: int, res: int = 160) -> dict:
    """The trainer's loader (CPU side) with 1, 2, 4, ... decode threads up to the machine's cores: images/s
    over one epoch after a warm-up epoch, and the efficiency per thread against one thread."""
    from .bench.loader import timed_epochs, trainer_loader
    counts = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores]
    rows = []
    for threads in counts:
        loader = trainer_loader(beton, "fast", res, batch, threads)
        timed_epochs(lambda loader=loader, t=threads: epoch(loader, t), 1)  # numba compilation, page cache
        wall, _ = timed_epochs(lambda loader=loader, t=threads: epoch(loader, t), 1)
        rows.append({"threads": threads, "images_per_s": wall})
    for r in rows:  # images/s per thread, relative to one thread's
        r["per_thread_efficiency"] = r["images_per_s"] / r["threads"] / rows[0]["images_per_s"]
    return {"rows": rows, "resolution": res, "batch": batch}


def profile_step(config: str, beton: str, device: torch.device, batch: int, overrides, steps: int = 6) -> dict:
    """torch.profiler over `steps` training steps on one device-resident batch: the top operators by device
    (or CPU) time, and the share of the wall time the GPU was idle."""
    from torch.profiler import ProfilerActivity, profile
    with bench_train.bench_trainer(config, beton, device.type, batch, overrides) as t:
        t.recipe.train_model.train()
        batches = itertools.repeat(t.data.train.first_batch())
        for step in range(3):  # warm-up (cuDNN autotuning, allocator)
            t.recipe.train_step(batches, step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for step in range(3, 3 + steps):
                t.recipe.train_step(batches, step)
            sync(device)
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    busy = sum(getattr(e, key, 0) for e in events) / 1e6
    top = [{"name": e.key, "ms_per_step": getattr(e, key, 0) / 1e3 / steps, "calls_per_step": e.count / steps}
           for e in events[:12]]
    result = {"steps": steps, "ms_per_step": 1e3 * wall / steps, "top": top}
    if device.type == "cuda":
        result["gpu_idle_share"] = max(0.0, 1 - busy / wall)
    return result


def timm_pipeline(config: str, beton: str, corpus: Path, n: int, device: torch.device, batch: int, cores: int,
                  overrides, steps: int) -> dict:
    """timm's A3 input pipeline (ImageFolder + create_transform(RandAugment, bicubic) in a DataLoader with
    every core, pinned memory) feeding the same model step on the same device: images/s, timed inside the
    epoch after 3 batches. Mixup/CutMix as timm's Mixup on the device, BCE as the recipe."""
    from .bench.loader import timm_loader
    with bench_train.bench_trainer(config, beton, device.type, batch, overrides) as t:
        loader = timm_loader(str(corpus), n, t.cfg["resolution.train"], batch, cores, rand_augment=True,
                             pin_memory=device.type == "cuda")
        r = t.recipe
        mix = r.augment.mixup or (lambda x, y: (x, y))  # timm's transforms normalised already
        taken = []  # images per batch

        def device_batches():
            for x, y in loader:
                taken.append(len(x))
                yield (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                       y.to(device, non_blocking=True))
        batches, t0, start = device_batches(), None, 0
        r.train_model.train()
        for step in range(3 + steps):
            if step == 3:
                sync(device)
                t0, start = time.perf_counter(), len(taken)
            try:
                r.train_step(batches, step, augment=mix)
            except StopIteration:  # the corpus ended
                break
        sync(device)
        if t0 is None or len(taken) == start:
            raise RuntimeError("the corpus holds too few batches for timm's pipeline: raise the corpus size")
        return {"images_per_s": sum(taken[start:]) / (time.perf_counter() - t0), "steps": len(taken) - start,
                "workers": cores}


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
        t.recipe.train_model.train()
        batches = itertools.repeat(t.data.train.first_batch())
        t0 = time.perf_counter()
        losses = [float(t.recipe.train_step(batches, step)) for step in range(steps)]
        seconds = time.perf_counter() - t0
        t.tracker.finish(0)
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer_for(beton, run_dir, d, f"--model.arch={arch}", "--training.batch_size=64")
        t.recipe.train_model.train()
        images, labels = t.data.train.first_batch()
        x, y = t.recipe.augment(images, labels)
        mixed = bool(y.dtype.is_floating_point and y.shape == (64, len(t.data.classes)))
        a3_loss = float(t.recipe.train_step(iter([(images, labels)]), 0))
        t.tracker.finish(0)
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), [*losses, a3_loss]))
    return {"passed": bool(finite and losses[-1] < losses[0] and mixed), "arch": arch, "compile": compile_model,
            "precision": t.recipe.precision.name, "losses": [round(v, 4) for v in losses],
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


def verdict(results: dict, allow_skip: bool) -> str:
    """Sets results' skipped, failed and passed from its stages (a stage skipped for time fails the check unless
    allow_skip); returns the verdict line."""
    stages = {k: r for k, r in results.items() if isinstance(r, dict) and k not in ("machine", "corpus", "derived")}
    skipped = [k for k, r in stages.items() if "skipped" in r]
    failed = [k for k, r in stages.items() if "error" in r or (r.get("passed") is False and "skipped" not in r)]
    results["skipped"], results["failed"] = skipped, failed
    results["passed"] = not failed and (not skipped or allow_skip)
    if results["passed"]:
        return "PASSED"
    why = [f"{len(failed)} failed"] if failed else []
    if skipped and not allow_skip:
        why.append(f"{len(skipped)} skipped: set gpu_check.allow_skip=true to accept that")
    return f"FAILED ({', '.join(why)})"


def summary_table(results: dict) -> str:
    lines = [f"{'stage':32s} result"]
    for name, r in results.items():
        if not isinstance(r, dict) or name in ("machine", "corpus", "derived"):
            continue
        if "skipped" in r:
            text = "skipped: " + r["skipped"]
        elif "error" in r:
            text = "FAILED: " + r["error"][:80]
        elif "real_images_per_s" in r:
            text = (f"{r['real_images_per_s']:,.0f} img/s from betons, {r['synthetic_images_per_s']:,.0f} synthetic, "
                    f"{r['model_step_images_per_s']:,.0f} model step alone, "
                    f"stall {100 * r['data_stall_fraction']:.1f}%, data wait {100 * r['data_wait_fraction']:.1f}%"
                    + (f", {r['gpu_max_memory_gib']:.1f} GiB" if "gpu_max_memory_gib" in r else ""))
        elif name == "bench_augment":
            text = "; ".join(f"{x['size']}px {x['ours_images_per_s']:,.0f} img/s" + "".join(
                f", {name.replace('_', ' ')} {x[f'{name}_images_per_s']:,.0f}" for name in
                ("masked", "masked_compiled", "masked_cuda_graph") if f"{name}_images_per_s" in x) for x in r["rows"])
        elif name == "loader_scaling":
            text = ", ".join(f"{x['threads']} threads {x['images_per_s']:,.0f} img/s "
                             f"({100 * x['per_thread_efficiency']:.0f}%)" for x in r["rows"])
        elif name == "timm_pipeline_a3":
            text = f"{r['images_per_s']:,.0f} img/s ({r['workers']} DataLoader workers)"
        elif name == "profile_a3_step":
            text = f"{r['ms_per_step']:.1f} ms/step" + (f", GPU idle {100 * r['gpu_idle_share']:.1f}%"
                                                         if "gpu_idle_share" in r else "")
        else:
            text = "passed" if r.get("passed") else "FAILED"
        lines.append(f"{name:32s} {text}")
    derived = results.get("derived") or {}
    lines += [f"{k:32s} {v:,.2f}" for k, v in derived.items()]
    return "\n".join(lines)


def derived_figures(results: dict) -> None:
    """Ratios against the goals, from the stages that ran: ours vs timm's pipeline, and the decode threads a
    4-GPU node needs to feed the measured per-GPU training rate."""
    # the fastest A3 of those whose model step is timm's pipeline's (eager, channels-last): only the input differs
    a3s = {k: r for k, r in results.items() if k.startswith("bench_train_a3") and "real_images_per_s" in r
           and not r["settings"]["compile"] and r["settings"]["channels_last"]}
    best = max(a3s, key=lambda k: a3s[k]["real_images_per_s"], default=None)
    a3 = a3s.get(best)
    timm = results.get("timm_pipeline_a3", {})
    scaling = results.get("loader_scaling", {}).get("rows")
    derived = {}
    if a3:
        results["derived_from"] = best
    if a3 and "images_per_s" in timm:
        derived["ours_vs_timm_pipeline"] = a3["real_images_per_s"] / timm["images_per_s"]
    if a3 and scaling:
        per_thread = max(r["images_per_s"] / r["threads"] for r in scaling)
        derived["decode_threads_for_4_gpus"] = 4 * a3["synthetic_images_per_s"] / per_thread
    results["derived"] = derived


def check(argv=None) -> int:
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.gpu_check", description=__doc__)
    deadline = time.perf_counter() + cfg["gpu_check.budget_s"]
    device = pick_device(cfg["gpu_check.device"])
    gpu = device.type == "cuda" or (cfg["gpu_check.plan_only"] and not cfg["gpu_check.quick"])
    quick = cfg["gpu_check.quick"] or not gpu
    out = Path(cfg["gpu_check.out_dir"])
    n = 96 if quick else 12_800  # a GPU epoch of >= 50 batches: the stall is timed inside epochs
    corpus = out / "corpus"
    beton = d = None  # made below, before the first stage runs
    cores = available_cpus()
    plan = []  # (name, fn, seconds it needs), in the order they run

    def stage(name, fn, needs_s):
        plan.append((name, fn, needs_s))
    arch = "resnet18" if quick else "resnet50"
    steps = 4 if quick else 8
    stage("loader_gpu_equals_cpu", lambda: check_loader(beton, device), 20)
    stage("randaugment_gpu_equals_cpu", lambda: check_randaugment(device, compiled=not quick), 10 if quick else 60)
    stage("train_steps_eager", lambda: check_training(beton, d, arch, False, steps), 30)
    if cfg["gpu_check.compile"]:
        stage("train_steps_compiled", lambda: check_training(beton, d, arch, True, steps), 120 if gpu else 60)
    sizes, batch = ([64], 16) if quick else ([160, 224], 256)
    stage("bench_augment", lambda: {"rows": bench_augment.run("rand-m6-mstd0.5-inc1", sizes, batch, device,
                                                               8 if quick else 32, compile_masked=not quick)},
          30 if quick else 150)
    if quick:
        small = ["--model.arch=resnet10t", "--resolution.train=64"]
        a3_name, a3 = "bench_train_a3", ("rsb_configs/a3.yaml", 16, 2, 1, small)
        a1_name, a1 = "bench_train_a1", ("rsb_configs/a1.yaml", 8, 2, 4, small)
    else:  # name, (config, per-device batch, timed micro-batches, accumulation, overrides)
        a3_name, a3 = "bench_train_a3_160px", ("rsb_configs/a3.yaml", 256, 40, 1, ["--resolution.train=160"])
        a1_name, a1 = "bench_train_a1_224px", ("rsb_configs/a1.yaml", 256, 40, 4, ["--resolution.train=224"])

    def bench(config, per_device, timed, accum, overrides):
        return lambda: bench_train.run(config, beton, device.type, per_device, timed, overrides, accum)
    # The goals first (A3 end to end, RandAugment's syncs, timm's pipeline, loader scaling, the profile),
    # so that a short budget skips the extras at the end.
    stage(a3_name, bench(*a3), 90 if gpu else 30)
    a3_config, a3_batch, a3_timed, a3_accum, a3_overrides = a3
    masked = ["--augment.rand_augment_batching=masked"]
    stage(f"{a3_name}_masked", bench(a3_config, a3_batch, a3_timed, a3_accum, [*a3_overrides, *masked]),
          90 if gpu else 30)
    for batching in ("grouped", "masked"):
        stage(f"randaugment_host_syncs{'_masked' if batching == 'masked' else ''}",
              lambda batching=batching: check_randaugment_syncs(device, 32 if quick else 256, batching), 10)
    stage("timm_pipeline_a3", lambda: timm_pipeline(a3_config, beton, corpus, n, device, a3_batch, cores,
                                                    a3_overrides, a3_timed), 60 if gpu else 30)
    stage("loader_scaling", lambda: loader_scaling(beton, cores, 32 if quick else 256, 64 if quick else 160),
          60 if gpu else 30)
    stage("profile_a3_step", lambda: profile_step(a3_config, beton, device, a3_batch, a3_overrides,
                                                  2 if quick else 6), 40 if gpu else 30)
    stage(a1_name, bench(*a1), 90 if gpu else 30)
    if not quick:  # what each GPU switch buys: torch.compile, and the contiguous layout instead of channels-last
        for name, extra in (("bench_train_a3_160px_masked_compiled", [*masked, "--augment.rand_augment_compile=true"]),
                            ("bench_train_a3_160px_contiguous", ["--model.channels_last=false"]),
                            ("bench_train_a3_160px_compiled", ["--model.compile=true"])):
            stage(name, bench(a3_config, a3_batch, a3_timed, a3_accum, [*a3_overrides, *extra]),
                  180 if "compiled" in name else 60)
    chosen = [v.strip() for v in cfg["gpu_check.stages"].split(",") if v.strip()]
    unknown = [v for v in chosen if v not in [name for name, _, _ in plan]]
    if unknown:
        raise ConfigError(f"gpu_check.stages: no stage named {', '.join(unknown)} here (the stages"
                          f"{' at toy sizes' if quick else ''}: {', '.join(name for name, _, _ in plan)})")
    if cfg["gpu_check.plan_only"]:
        for name, _, needs_s in plan:
            if not chosen or name in chosen:
                print(f"{name:40s} {needs_s:5.0f} s allowed")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    info["driver"] = driver_version() if gpu else None
    results: dict = {"machine": info, "quick": quick}
    print(f"device: {info['gpu'] or info['cpu']}, driver {info['driver']}, torch {info['versions'].get('torch')}",
          flush=True)
    t0 = time.perf_counter()
    results["corpus"] = generate(corpus, n)
    beton = corpus_beton(corpus, n, "proportion", cores)  # one beton for every stage
    results["corpus"]["seconds"] = round(time.perf_counter() - t0, 1)
    d = distributed.init(device.type, key="gpu_check.device")
    for name, fn, needs_s in plan:
        if not chosen or name in chosen:
            run_stage(results, name, fn, deadline, needs_s)
            save_json(out / "gpu_check.json", {**results, "unfinished": True})  # a call cut off keeps its figures
    derived_figures(results)
    line = verdict(results, cfg["gpu_check.allow_skip"])
    save_json(out / "gpu_check.json", results)
    print(f"\nsaved {out / 'gpu_check.json'}\n{summary_table(results)}\n{line}")
    return 0 if results["passed"] else 1


def main(argv=None) -> int:
    return cli.run(check, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
