"""What every benchmark shares: the machine description, timing, and saving JSON + a bar chart."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import platform
import textwrap
import time
from pathlib import Path

import torch
from fastargs import Param, Section

from ..config import Choice
from ..datasets.images import available_cpus
from ..files import save_figure, save_json

Section("bench", "shared by every benchmark").params(
    corpus=Param(str, "the generated ImageNet-shaped JPEG corpus: a folder the benchmarks own (created, reused; a "
                      "non-empty folder they did not create is refused)", default="bench_out/corpus"),
    n=Param(int, "corpus images used", default=2000),
    out_dir=Param(str, "where the JSON results and PNG charts go", default="bench_out"),
    device=Param(Choice(["auto", "cuda", "cpu"]), "auto: cuda when available", default="auto"),
    cores=Param(int, "CPU cores for loading and writing (0 = all available)", default=0),
)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device | None = None) -> dict:
    """Hardware and library versions, so a figure can be traced to what produced it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": available_cpus(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": {}}
    for name in ("torch", "torchvision", "timm", "ffcv", "numba", "numpy", "pillow", "rsb_ffcv"):
        try:
            info["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def describe(info: dict) -> str:
    return info["gpu"] or f"{info['cpu']}, {info['cores']} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_seconds: float = 2.0, warmup: int = 1) -> float:
    """Seconds per call of fn, after warmup calls, repeated for at least min_seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(device)
        if time.perf_counter() - t0 >= min_seconds:
            return (time.perf_counter() - t0) / n


def save(result: dict, out: str | Path, bars: dict[str, float], title: str, unit: str = "images/s",
         log_scale: bool = False) -> Path:
    """Write result as JSON at `out` and `bars` as a horizontal bar chart next to it (.png)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, result)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(bars) + 1.4))
    names, values = list(bars)[::-1], list(bars.values())[::-1]
    ax.barh(names, values, color="#4c72b0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(unit)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)  # wrapped: a long title is not cut off
    ax.margins(x=0.15)
    fig.tight_layout()
    png = save_figure(fig, out.with_suffix(".png"), dpi=120)
    print(f"saved {out} and {png.name}")
    return png


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts, during a forward, the calls that make the host wait for the GPU on CUDA (reading a value:
    item/tolist/cpu/numpy/bool, nonzero, boolean-mask indexing) and the copies of host data to the device
    (torch.tensor(...), .to(device)): on the CPU twin of the GPU path they are calls like any other."""

    # bincount and histc: CUDA reads the input's min and max on the host to size the output
    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "nonzero", "masked_select", "unique", "argwhere",
             "bincount", "histc"}

    def __init__(self):
        super().__init__()
        self.syncs, self.copies = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            self.syncs.append(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool
                for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.syncs.append(f"{name}[bool mask]")
        elif name == "tensor" or (name == "to" and any(isinstance(a, (str, torch.device)) for a in
                                                          (*args[1:], kwargs.get("device")))):
            self.copies.append(name)
        return func(*args, **kwargs)
