"""A beton larger than RAM, for real: `python -m rsb_ffcv.bench memory [--bench_memory.beton=X.beton]`.

Every run reads one epoch of the train beton in 1, 2 or 4 processes (gloo all-reduce after every batch, as
DDP's gradient all-reduce keeps them in step) inside a cgroup-v1 memory limit (needs root and
/sys/fs/cgroup/memory), after the beton was evicted from the page cache (posix_fadvise DONTNEED), and reports:
bytes fetched from storage (the processes' /proc/PID/io read_bytes, summed, as a multiple of the beton),
images/s, each process's private (anonymous) memory growth during the epoch, the cgroup's peak usage, and
whether the kernel killed anything. The limit is "the processes plus half the beton": what the processes
use before reading (measured in a probe run) + beton / 2.
Rows: `data.in_memory` true / false / auto (our loader), stock FFCV's QUASI_RANDOM with os_cache=False (one
process: it refuses distributed runs), the page-local order with the beton in RAM (the same order, no limit,
warm cache: the speed reference), 2 and 4 processes with and without repeated augmentation, and the
proportional set size (Pss) of the mapped beton for 1, 2 and 4 processes that each read all of it in RAM.
Without --bench_memory.beton the corpus (bench.corpus, bench.n) is written as a beton at the writer's defaults.
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastargs import Param, Section

from ..config import ConfigError, load_config
from ..memory import cgroup_dirs, evict, file_residency, read_bytes
from .common import machine, save
from .corpus import corpus_beton, generate

Section("bench_memory", "the beyond-RAM benchmark").params(
    beton=Param(str, "train beton to read ('' = the corpus written at the writer's defaults)", default=""),
    res=Param(int, "RandomResizedCrop output size", default=112),
    batch=Param(int, "per-process batch size", default=32),
    window_mib=Param(int, "page-local window in MiB for the false and in-RAM rows (0 = the one in_memory=auto "
                          "picks under the limit)", default=0),
    rounds=Param(int, "rounds of the in-RAM / auto / false rows (images/s: medians; ratios: median of per-round "
                      "ratios, as these machines' speed drifts)", default=3),
)
SECTIONS = ("bench", "bench_memory")


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict) -> dict:
    """One process of a run (already inside the run's cgroup): build the loader, read one epoch."""
    import torch
    import torch.distributed as dist
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from ..distributed import Dist
    from ..loaders import buffer_bytes, epoch, train_loader
    from ..memory import plan_reads

    rank, world, beton = spec["rank"], spec["world"], spec["beton"]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world)
    d = Dist(rank, world, rank, world, torch.device("cpu"))
    # independent: each process reads the whole beton (two jobs on one node), still in step with the others
    reader_rank, reader_world = (0, 1) if spec.get("independent") else (rank, world)
    io0, anon0 = read_bytes(), _rss_anon()
    if spec["order"] == "quasi":
        loader = Loader(beton, batch_size=spec["batch"], num_workers=spec["threads"], order=OrderOption.QUASI_RANDOM,
                        os_cache=False, drop_last=True,
                        pipelines={"image": [RandomResizedCropRGBImageDecoder((spec["res"], spec["res"]))],
                                   "label": [IntDecoder()]})
        plan = "stock FFCV QUASI_RANDOM, os_cache=False"
    else:
        reads = plan_reads(beton, spec["in_memory"], spec["window_mib"], world,
                           buffer_bytes(spec["batch"], spec["res"], 3), agree_min=d.all_min)
        loader, _ = train_loader(beton, spec["batch"], spec["res"], torch.device("cpu"), num_workers=spec["threads"],
                                 seed=0, repeats=spec["repeats"], rank=reader_rank, world=reader_world, batches_ahead=3,
                                 accum=spec.get("accum", 1), window_pages=reads.window_pages)
        plan = reads.line
    if spec["order"] == "probe":
        return {"rank": rank, "plan": plan}
    images, peak_anon, t0 = 0, _rss_anon(), time.perf_counter()
    for _, labels in epoch(loader, 1):
        images += len(labels)
        if world > 1:
            dist.all_reduce(torch.zeros(1))
        peak_anon = max(peak_anon, _rss_anon())
    seconds = time.perf_counter() - t0
    if world > 1:
        dist.barrier()  # every process still maps the beton while each measures what it holds of it
    held = file_residency(os.getpid(), beton)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"rank": rank, "plan": plan, "images": images, "seconds": seconds, "read_bytes": read_bytes() - io0,
            "anon_growth": peak_anon - anon0, "beton_rss": held["rss"], "beton_pss": held["pss"]}


class Cgroup:
    """A child of this process's cgroup-v1 memory cgroup with a limit (or none), removed on exit."""

    def __init__(self, limit: int | None):
        dirs = [d for version, d in cgroup_dirs() if version == "v1"]
        if os.geteuid() != 0 or not dirs:
            raise ConfigError("bench memory needs root and the cgroup-v1 memory controller at /sys/fs/cgroup/memory")
        self.path = dirs[0] / f"rsb_bench_{os.getpid()}_{time.monotonic_ns()}"
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def stat(self) -> dict:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"peak_bytes": int((self.path / "memory.max_usage_in_bytes").read_text()),
                "failcnt": int((self.path / "memory.failcnt").read_text()), "oom_kills": int(oom.get("oom_kill", 0))}

    def close(self):
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # processes still leaving
                time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, beton: str, *, procs: int = 1, limit: int | None = None, warm: bool = False, timeout: int = 900,
        **spec) -> dict:
    """One row: `procs` worker processes in a fresh cgroup; the beton evicted first unless warm (then read once)."""
    if warm:
        with open(beton, "rb") as f:
            while f.read(64 << 20):
                pass
    else:
        evict(beton)
    cg = Cgroup(limit)
    port, outs, ps = _free_port(), [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rank in range(procs):
                out = Path(tmp) / f"rank{rank}.json"
                env = {**os.environ, "RSB_BENCH_MEMORY": json.dumps({**spec, "beton": beton, "rank": rank,
                                                                      "world": procs, "port": port})}
                # the worker enters the cgroup before it starts Python, so everything it allocates is charged there
                cmd = f'echo $$ > {cg.path}/cgroup.procs && exec "$0" -m rsb_ffcv.bench.memory "$1"'
                ps.append(subprocess.Popen(["sh", "-c", cmd, sys.executable, str(out)], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                outs.append(out)
            logs = [p.communicate(timeout=timeout)[0] for p in ps]
            results = [json.loads(o.read_text()) if o.exists() else None for o in outs]
        stat = cg.stat()
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
        cg.close()
    row = {"name": name, "processes": procs, "limit_bytes": limit, "exit_codes": [p.returncode for p in ps], **stat}
    row["killed"] = stat["oom_kills"] > 0 or any(r is None for r in results)
    row["plan"] = results[0]["plan"] if results[0] else None
    if row["killed"]:
        row["log_tail"] = logs[0][-600:]
        print(f"{name}: killed (oom kills {stat['oom_kills']}, exit codes {row['exit_codes']})", flush=True)
    if row["killed"] or spec["order"] == "probe":
        return row
    size = os.path.getsize(beton)
    seconds = max(r["seconds"] for r in results)
    row.update(images=sum(r["images"] for r in results), seconds=round(seconds, 2),
               images_per_s=round(sum(r["images"] for r in results) / seconds, 1),
               fetched_x_beton=round(sum(r["read_bytes"] for r in results) / size, 3),
               anon_growth_mib=[round(r["anon_growth"] / 2**20, 1) for r in results],
               beton_rss_x_beton=round(sum(r["beton_rss"] for r in results) / size, 3),
               beton_pss_x_beton=round(sum(r["beton_pss"] for r in results) / size, 3),
               peak_gib=round(stat["peak_bytes"] / 2**30, 3))
    print(f"{name}: {row['images_per_s']:.0f} images/s, fetched {row['fetched_x_beton']:.2f}x the beton, "
          f"private growth {row['anon_growth_mib']} MiB, peak {row['peak_gib']} GiB, "
          f"beton Rss {row['beton_rss_x_beton']:.2f}x / Pss {row['beton_pss_x_beton']:.2f}x", flush=True)
    return row


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench memory", description=__doc__)
    beton = cfg["bench_memory.beton"]
    if not beton:
        print(f"corpus: {generate(cfg['bench.corpus'], cfg['bench.n'])}", flush=True)
        beton = corpus_beton(cfg["bench.corpus"], cfg["bench.n"])
    size = os.path.getsize(beton)
    cores = cfg["bench.cores"] or os.cpu_count()
    common = dict(res=cfg["bench_memory.res"], batch=cfg["bench_memory.batch"], repeats=0)

    probe = run("probe", beton, threads=cores, order="probe", in_memory="false", window_mib=0, **common)
    base = probe["peak_bytes"]  # one process with its loader built, before reading the epoch
    limit = base + size // 2
    print(f"beton {size / 2**30:.2f} GiB; a process uses {base / 2**30:.2f} GiB before reading; limit "
          f"{limit / 2**30:.2f} GiB", flush=True)
    # the speed comparison, in rounds: the page-local order in RAM, then inside the limit with auto and with false
    # (both at the window auto chose, found from its plan line)
    rounds = []
    for _ in range(max(1, cfg["bench_memory.rounds"])):
        auto = run("in_memory=auto", beton, limit=limit, threads=cores, order="rsb", in_memory="auto",
                   window_mib=0, **common)
        found = re.search(r"windows of (\d+) pages? x (\d+) MiB", auto.get("plan") or "")
        window_mib = cfg["bench_memory.window_mib"] or (int(found[1]) * int(found[2]) if found else size // 8 // 2**20)
        rounds.append({
            "page-local order in RAM (warm, no limit)": run(
                "page-local order in RAM (warm, no limit)", beton, warm=True, threads=cores, order="rsb",
                in_memory="false", window_mib=window_mib, **common),
            "in_memory=auto": auto,
            "in_memory=false": run("in_memory=false", beton, limit=limit, threads=cores, order="rsb",
                                   in_memory="false", window_mib=window_mib, **common)})
    common["window_mib"] = window_mib
    rows = []
    for name, first in rounds[0].items():
        row = dict(first)
        if not any(r[name]["killed"] for r in rounds):
            row["images_per_s"] = statistics.median(r[name]["images_per_s"] for r in rounds)
            row["fetched_x_beton"] = max(r[name]["fetched_x_beton"] for r in rounds)  # the worst round
            if name != "page-local order in RAM (warm, no limit)":
                ram = "page-local order in RAM (warm, no limit)"
                row["images_per_s_vs_ram"] = round(statistics.median(
                    r[name]["images_per_s"] / r[ram]["images_per_s"] for r in rounds), 3)
        row["rounds"] = len(rounds)
        rows.append(row)
    rows += [
        run("in_memory=true (exact random order)", beton, limit=limit, threads=cores, order="rsb", in_memory="true",
            **common),
        run("stock FFCV QUASI_RANDOM, os_cache=False", beton, limit=limit, threads=cores, order="quasi", **common),
    ]
    for procs in (2, 4):
        for repeats in (0, 3):
            if repeats > procs:
                continue
            rows.append(run(f"in_memory=auto, {procs} processes" + (f", repeats {repeats}" if repeats else ""),
                            beton, procs=procs, limit=base * procs + size // 2, threads=1, order="rsb",
                            in_memory="auto", **{**common, "repeats": repeats, "window_mib": 0}))
    for procs in (1, 2, 4):  # each reads the whole beton (as two jobs on a node would), in step with the others
        rows.append(run(f"in_memory=true in RAM, {procs} process(es): beton Pss", beton, procs=procs, warm=True,
                        threads=1 if procs > 1 else cores, order="rsb", in_memory="true", independent=True,
                        **common))
    result = {"benchmark": "memory", "machine": machine(), "beton": beton, "beton_bytes": size,
              "process_bytes": base, "limit_bytes": limit, "window_mib": window_mib, "settings": common,
              "rows": rows}
    bars = {r["name"]: (0.0 if r["killed"] else r["fetched_x_beton"]) for r in rows}
    save(result, Path(cfg["bench.out_dir"]) / "memory.json", bars,
         f"bytes fetched from storage per epoch (x the {size / 2**30:.2f} GiB beton; 0 = killed); limit "
         f"{limit / 2**30:.2f} GiB; {machine()['cores']} cores", unit="x beton")
    return result


if __name__ == "__main__":  # a worker process started by run(): python -m rsb_ffcv.bench.memory RESULT.json
    from ..files import save_json
    save_json(sys.argv[1], worker(json.loads(os.environ["RSB_BENCH_MEMORY"])))
