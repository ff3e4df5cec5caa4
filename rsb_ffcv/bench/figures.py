"""`python -m rsb_ffcv.bench figures`: the README's figures, rendered from the benchmark JSON files.

Every number in the README's Performance section comes from a JSON file in bench.out_dir (default here:
results/, committed with the repository) that a benchmark wrote; this renders them and rewrites the README
between its `figures` markers. tests/test_cli.py checks that the README equals the rendering, so the two
cannot drift. To refresh a figure: rerun its command (shown in the table), then this.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastargs import Param, Section

from ..config import BoolStr, ConfigError, load_config
from . import common  # noqa: F401  (declares the shared `bench` section)

BEGIN, END = "<!-- figures:begin (python -m rsb_ffcv.bench figures) -->", "<!-- figures:end -->"
Section("bench_figures", "the README's figures").params(
    readme=Param(str, "the README to rewrite", default="README.md"),
    check=Param(BoolStr(), "only check that the README is current (exit 2 if not)", default=False),
)
SECTIONS = ("bench", "bench_figures")


def _load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"'{path}' not found: run the {name} benchmark with --bench.out_dir={results} first")
    return json.loads(path.read_text())


def _machine(m: dict) -> str:
    where = m.get("gpu") or f"{m['cores']} cores of {m['cpu']}"
    return f"{where}, {m['date'][:10]}"


def render(results: str | Path) -> str:
    """The Markdown of the figures, from loader/augment/train/writer/demo/memory/scale JSON files in `results`."""
    results = Path(results)
    loader, augment, train, writer, demo = (_load(results, n) for n in ("loader", "augment", "train", "writer", "demo"))
    s = loader["settings"]
    lines = [f"**Training input pipeline** (`python -m rsb_ffcv.bench loader`; {s['corpus']['images']:,} "
             f"ImageNet-shaped JPEGs, {s['corpus']['mean_kb']} KB average; A3 settings: {s['resolution']} px, batch "
             f"{s['batch']}; every pipeline on {loader['cores_used']} cores; median of {s['rounds']} rounds; "
             f"{_machine(loader['machine'])}):", "",
             "| pipeline | images/s | images per CPU-s |", "|---|---|---|"]
    for name, rate in loader["images_per_s_median"].items():
        lines.append(f"| {name} | {rate:,.0f} | {loader['images_per_cpu_s_median'][name]:,.0f} |")
    lines += ["", "| ratio (median of per-round ratios) | wall | CPU |", "|---|---|---|"]
    for name, r in loader["ratios_median"].items():
        lines.append(f"| {name} | {r:.2f}× | {loader['ratios_cpu_median'][name]:.2f}× |")
    lines += ["", "| other benchmark | figures | machine | command |", "|---|---|---|---|"]
    def batchings(r):  # the other batchings, timed on the same draws as the grouped one
        names = [n for n in ("masked", "masked_compiled", "masked_cuda_graph") if f"{n}_images_per_s" in r]
        return "".join(f"; {n.replace('_', ' ')} {r[f'{n}_images_per_s']:,.0f} ({r[f'ratio_{n}_vs_grouped']:.2f}×"
                       f"{'' if r[f'{n}_equals_grouped'] else ', NOT equal'})" for n in names)
    rows = "; ".join(f"{r['size']} px: {r['ours_images_per_s']:,.0f} img/s (with normalise + Mixup/CutMix "
                     f"{r['ours_full_device_transform_images_per_s']:,.0f}), timm PIL on one core "
                     f"{r['timm_pil_one_core_images_per_s']:,.0f}{batchings(r)}" for r in augment["results"])
    compiled = any("masked_compiled_images_per_s" in r for r in augment["results"])
    lines.append(f"| RandAugment {augment['config']}, batch {augment['results'][0]['batch']}, grouped; its other "
                 f"batchings on the same draws (× grouped; equal images unless said) | {rows} | "
                 f"{_machine(augment['machine'])} | `python -m rsb_ffcv.bench augment"
                 f"{' --bench_augment.compile=true' if compiled else ''}` |")
    t = train["settings"]
    lines.append(f"| end-to-end training step, {t['arch']} at {t['resolution']} px, batch {t['batch']}, timed inside "
                 f"epochs | {train['real_images_per_s']:,.1f} img/s from betons vs {train['synthetic_images_per_s']:,.1f} "
                 f"on synthetic batches: data stall {100 * train['data_stall_fraction']:.1f}%, main-thread data wait "
                 f"{100 * train['data_wait_fraction']:.1f}% | {_machine(train['machine'])} | "
                 f"`python -m rsb_ffcv.bench train` |")
    lines.append(f"| beton writer (each image decoded once with validation, 500 px, 50% JPEG q90, {writer['workers']} "
                 f"workers) | "
                 f"{writer['images_per_second']:,.0f} images/s | {_machine(writer['machine'])} | "
                 f"`python -m rsb_ffcv.bench writer` |")
    lines.append(f"| the demo (resnet10t, 48 px, {demo['epochs']} epochs, batch 32, chance 10%) | {demo['val_top1']:.1f}% "
                 f"val top-1 in {demo['seconds']:.0f} s (writing the betons included) | {_machine(demo['machine'])} | "
                 f"`make demo` (writes runs/demo-*/demo.json) |")
    return "\n".join(lines + render_full_size(results))


def render_full_size(results: str | Path) -> list[str]:
    """The beyond-RAM (memory.json) and record-count (scale.json) tables."""
    results = Path(results)
    mem, scale = _load(results, "memory"), _load(results, "scale")
    size, gb = mem["beton_bytes"], 2**30
    lines = ["", f"**A beton larger than RAM** (`python -m rsb_ffcv.bench memory`; a {size / gb:.2f} GiB beton of "
                 f"ImageNet-shaped JPEGs at the writer's defaults; one epoch at {mem['settings']['res']} px, batch "
                 f"{mem['settings']['batch']} per process, each process in step with the others as DDP keeps them; "
                 f"inside a cgroup memory limit of the processes + half the beton ({mem['limit_bytes'] / gb:.2f} GiB "
                 f"for one), the beton evicted from the page cache first; page-local window {mem['window_mib']} MiB "
                 f"(what auto chose); the first three rows: medians of {mem['rows'][0].get('rounds', 1)} rounds, "
                 f"ratios the median of per-round ratios; {_machine(mem['machine'])}):", "",
             "| run | fetched from storage per epoch | images/s | private growth per process | peak memory |",
             "|---|---|---|---|---|"]
    for r in mem["rows"]:
        if "Pss" in r["name"]:
            continue
        if r["killed"]:
            lines.append(f"| {r['name']} | killed for memory | | | |")
            continue
        vs = f" ({r['images_per_s_vs_ram']:.2f}× in RAM)" if "images_per_s_vs_ram" in r else ""
        lines.append(f"| {r['name']} | {r['fetched_x_beton']:.2f}× the beton | {r['images_per_s']:,.0f}{vs} | "
                     f"{', '.join(f'{g:,.0f}' for g in r['anon_growth_mib'])} MiB | {r['peak_gib']:.2f} GiB |")
    lines += ["", "| processes each reading the whole beton in RAM (in_memory=true) | Σ Rss of the mapped beton | "
                  "Σ Pss | private growth per process |", "|---|---|---|---|"]
    for r in mem["rows"]:
        if "Pss" in r["name"]:
            growth = ", ".join(f"{g:,.0f}" for g in r["anon_growth_mib"])
            lines.append(f"| {r['processes']} | {r['beton_rss_x_beton']:.2f}× the beton | "
                         f"{r['beton_pss_x_beton']:.2f}× | {growth} MiB |")
    lines += ["", f"**ImageNet's record count** (`python -m rsb_ffcv.bench scale`; tiny JPEGs over "
                  f"{scale['classes']:,} classes, both writers at 500 px, half raw, JPEG quality 90, on the same file "
                  f"list with {scale['workers']} workers, ours with {scale['settings'].get('ours_page_mib', 8)} MiB "
                  f"pages, stock FFCV's 8 MiB; {_machine(scale['machine'])}):", "",
              "| records | stock FFCV writer | ours | ours / stock | peak Pss, stock / ours | train loader: built, "
              "first batch | an epoch's order: 4 proc. × repeats 3, 1 proc. × accum. 4, page-local | val loader "
              "over the first ≤ 50,000: built, one pass |", "|---|---|---|---|---|---|---|---|"]
    for r in scale["rows"]:
        ld = r["loader"]
        lines.append(f"| {r['records']:,} | {r['stock']['images_per_s']:,.0f} img/s | {r['ours']['images_per_s']:,.0f} "
                     f"img/s | {r['ours_vs_stock']:.2f}× | {r['stock']['peak_pss_mib']:,.0f} / "
                     f"{r['ours']['peak_pss_mib']:,.0f} MiB | {ld['construct_s']:.1f} s, {ld['first_batch_s']:.1f} s | "
                     f"{ld['order_4proc_repeats3_s']:.2f} s, {ld['order_1proc_accum4_s']:.2f} s, "
                     f"{ld['order_page_local_4proc_repeats3_s']:.2f} s | {ld['val_records']:,}: "
                     f"{ld['val_construct_s']:.1f} s, {ld['val_pass_s']:.1f} s |")
    return lines


def rewrite(readme: str, figures: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ConfigError(f"the README has no '{BEGIN}' ... '{END}' block")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{figures}\n{END}{tail}"


def main(argv=None):
    cfg = load_config(SECTIONS, argv, prog="python -m rsb_ffcv.bench figures", description=__doc__)
    path = Path(cfg["bench_figures.readme"])
    text = path.read_text()
    new = rewrite(text, render(cfg["bench.out_dir"]))
    if cfg["bench_figures.check"]:
        if new != text:
            raise ConfigError(f"'{path}' is not current: run python -m rsb_ffcv.bench figures")
        print(f"{path}: figures current")
        return {}
    path.write_text(new)
    print(f"rewrote the figures of {path} from {cfg['bench.out_dir']}/*.json")
    return {}
