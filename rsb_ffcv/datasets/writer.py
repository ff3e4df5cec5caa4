"""Source → `X.beton` + `X.json`, all or nothing.

Every image is decoded once, completely, by FFCV's writer workers (PIL's structural checks included), and
those pixels are what FFCV stores: as fast as FFCV's own writer over a dataset of decoded images (measured
by `bench scale`; validating first and decoding again for the write cost 0.69x). An image that does not
decode is written as a 1-pixel placeholder and flagged; after the pass, any flag stops the write with every
bad file listed (on_error=fail) or starts a second pass over the good files only (on_error=skip). The beton
is written to a temporary name in the output directory, fsynced and renamed; any failure — bad images, an
exception, Ctrl-C, SIGTERM, a full disk, a worker that dies — removes the temporary files and leaves the
output path untouched. FFCV's own writer waits forever when a worker dies; `_SafeWriter` checks worker exit
codes while it waits.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing import Process, Queue, RawArray, Value
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter
from tqdm import tqdm

from ..cli import RunFailure
from ..config import ConfigError
from ..files import atomic_path
from .betons import sidecar_path
from .images import available_cpus, read_checked
from .sources import Source


class WriteError(RunFailure):
    """The write could not be completed (exit 1); nothing was left at the output path."""


class UnreadableImages(ConfigError):
    """The source holds images that do not decode (an input error, exit 2); nothing was written."""

    def __init__(self, message: str, bad: dict[str, str]):
        super().__init__(message)
        self.bad = bad


@dataclass
class WriteOptions:
    max_resolution: int = 500  # longer side; 0 keeps the original size
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # share stored as JPEG with write_mode=proportion
    write_mode: str = "proportion"  # raw | jpg | smart | proportion (FFCV's RGBImageField modes)
    page_mib: int = 0  # 0: FFCV's 8 MiB (see page_size)
    num_workers: int = 0  # 0: all available cores
    chunk_size: int = 100
    on_error: str = "fail"  # fail | skip
    overwrite: bool = False
    verify: bool = False

    def check(self) -> None:
        if self.write_mode not in ("raw", "jpg", "smart", "proportion"):
            raise ConfigError(f"writer.write_mode: got '{self.write_mode}', expected raw, jpg, smart or proportion")
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"writer.on_error: got '{self.on_error}', expected fail or skip")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"writer.jpeg_quality: got {self.jpeg_quality}, expected 1..100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConfigError(f"writer.compress_probability: got {self.compress_probability}, expected 0..1")
        if self.max_resolution < 0 or self.chunk_size < 1:
            raise ConfigError("writer.max_resolution must be >= 0 and writer.chunk_size >= 1")
        if self.page_mib and (self.page_mib < 2 or self.page_mib & (self.page_mib - 1) or self.page_mib >= 4096):
            raise ConfigError(f"writer.page_mib: got {self.page_mib}, expected 0 (FFCV's 8 MiB) or a power of two "
                              f"from 2 to 2048 (FFCV's page sizes)")
        if self.write_mode != "jpg" and self.max_resolution and self.max_resolution ** 2 * 3 > self.page_size:
            raise ConfigError(f"writer.page_mib={self.page_mib or 8}: a raw {self.max_resolution} x "
                              f"{self.max_resolution} record does not fit in a page; use larger pages")

    @property
    def page_size(self) -> int:
        """Bytes per beton page: FFCV's 8 MiB unless writer.page_mib says otherwise. Smaller pages let the page-local
        order (data.in_memory=false) mix as many classes in a quarter of the memory (ImageNet, class-sorted:
        batches of 512 reach 90% of a uniform shuffle's distinct classes with a ~1.5 GiB window of 2 MiB pages,
        ~7 GiB of 8 MiB pages), at the cost of more space left empty at page ends (+8% beton size measured at
        500 px, half raw)."""
        return (self.page_mib or 8) << 20

    @property
    def workers(self) -> int:
        return self.num_workers if self.num_workers > 0 else available_cpus()


class _Records:
    """What FFCV's writer workers index: (RGB array, label), each image decoded once. The workers are forked
    processes: they report bad images and image sizes through shared arrays."""

    PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)

    def __init__(self, files, labels):
        self.files, self.labels = files, labels
        self.bad = RawArray(ctypes.c_uint8, len(files))
        self.sizes = RawArray(ctypes.c_int32, 2 * len(files))  # (width, height) of each image

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # FFCV's 'proportion' mode draws from np.random: seed by index so a beton is reproducible.
        np.random.seed(i)
        pixels, error = read_checked(self.files[i])
        if error is not None:
            self.bad[i] = 1
            return self.PLACEHOLDER, self.labels[i]
        self.sizes[2 * i], self.sizes[2 * i + 1] = pixels.shape[1], pixels.shape[0]
        return pixels, self.labels[i]

    def flagged(self) -> list[str]:
        return [self.files[i] for i in np.flatnonzero(np.frombuffer(self.bad, np.uint8))]

    def size(self, i: int) -> list[int]:
        return [self.sizes[2 * i], self.sizes[2 * i + 1]]


def _worker(work_fn, errors, *args) -> None:
    """FFCV's writer worker, reporting a failure as one line to the parent instead of a traceback."""
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001 - any failure ends the write; the parent says why
        errors.put(f"{type(e).__name__}: {e}")
        sys.exit(1)


class _SafeWriter(DatasetWriter):
    """FFCV's DatasetWriter with a progress loop that notices dead workers instead of spinning forever."""

    def __init__(self, *args, desc: str = "writing", **kwargs):
        super().__init__(*args, **kwargs)
        self.desc = desc

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work: Queue = Queue()
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)
        allocations: Queue = Queue()
        done = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                *extra_worker_args)
        errors: Queue = Queue()
        procs = [Process(target=_worker, args=(work_fn, errors, *args), daemon=True) for _ in range(self.num_workers)]
        results = []
        try:
            for p in procs:
                p.start()
            with tqdm(total=num_samples, desc=self.desc, unit="img", dynamic_ncols=True, mininterval=0.5) as bar:
                # Drain allocations while waiting: a worker cannot exit before its queue item is read.
                while len(results) < len(procs):
                    try:
                        results.append(allocations.get(timeout=0.1))
                    except queue.Empty:
                        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                        if dead:
                            try:
                                why = errors.get(timeout=1.0)
                            except queue.Empty:
                                why = f"exit code {dead[0]}"
                            raise WriteError(f"a writer worker failed ({why}); nothing was written")
                    bar.update(done.value - bar.n)
            for p in procs:
                p.join()
            self.finalize([a for r in results for a in r])
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            self.metadata_sm.close()
            self.metadata_sm.unlink()


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into SystemExit in the main thread so `finally` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("ffcv", "numpy", "pillow", "opencv-python-headless", "numba", "rsb_ffcv"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def format_bad(bad: dict[str, str], limit: int = 20) -> str:
    items = sorted(bad.items())
    text = "; ".join(f"{p} ({why})" for p, why in items[:limit])
    return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def write_beton(source: Source, out: str | os.PathLike, opts: WriteOptions, extra: dict | None = None) -> dict:
    """Validate, write `out` and its sidecar atomically; return the summary (also in the sidecar)."""
    opts.check()
    out = Path(out)
    side = sidecar_path(out)
    if out.suffix != ".beton":
        raise ConfigError(f"writer.out '{out}' must end in .beton")
    if (out.exists() or side.exists()) and not opts.overwrite:
        raise ConfigError(f"'{out}' already exists: set writer.overwrite=true to replace it")
    if not source.files:
        raise ConfigError(f"source '{source.root}' holds no images")
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    fields = {
        "image": RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_resolution or None,
                               jpeg_quality=opts.jpeg_quality, compress_probability=opts.compress_probability),
        "label": IntField(),
    }
    bad: dict[str, str] = {}
    # the beton and its sidecar appear together or not at all (the sidecar first: a beton is never without it)
    with _sigterm_raises(), atomic_path(out) as tmp, atomic_path(side) as tmp_side:
        kept = source
        while True:  # once; twice with on_error=skip when some images do not decode
            records = _Records(kept.files, kept.labels)
            desc = f"writing {out.name}" + (" (without the unreadable images)" if bad else "")
            writer = _SafeWriter(str(tmp), fields, num_workers=min(opts.workers, len(kept.files)),
                                 page_size=opts.page_size, desc=desc)
            writer.from_indexed_dataset(records, chunksize=opts.chunk_size)
            flagged = records.flagged()
            if not flagged:
                break
            bad.update((f, read_checked(f)[1] or "changed while being written") for f in flagged)
            if opts.on_error == "fail":
                raise UnreadableImages(
                    f"{len(bad)} unreadable images in '{source.root}'; nothing was written (fix or remove them, "
                    f"or set writer.on_error=skip to write the rest and list them in the sidecar): "
                    f"{format_bad(bad)}", bad)
            kept = source.drop(set(bad))
            if not kept.files:
                raise UnreadableImages(f"every image in '{source.root}' is unreadable: {format_bad(bad)}", bad)
        seconds = time.perf_counter() - t0
        counts = np.bincount(kept.labels, minlength=len(kept.classes)).tolist()
        summary = {
            "images": len(kept.files), "classes": len(kept.classes), "skipped": len(bad),
            "bytes": tmp.stat().st_size, "seconds": round(seconds, 3),
            "images_per_second": round(len(kept.files) / seconds, 1), "workers": opts.workers,
        }
        meta = {
            "beton": out.name,
            "source": {"kind": kept.kind, "root": kept.root},
            "classes": kept.classes,
            "class_counts": counts,
            "options": asdict(opts),
            "skipped": [{"path": p, "reason": r} for p, r in sorted(bad.items())],
            "ignored": [{"path": p, "reason": r} for p, r in kept.ignored],
            "summary": summary,
            "versions": _versions(),
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            # Record order: file i of this list is record i of the beton (used for ReaL labels).
            "files": [os.path.relpath(f, kept.root) for f in kept.files],
            "labels": list(map(int, kept.labels)),
        }
        if kept.boxes is not None:  # [x0, y0, x1, y1] in the source image's pixels, of size [w, h]
            meta["boxes"] = kept.boxes
            meta["box_image_sizes"] = [records.size(i) for i in range(len(kept.files))]
        meta.update(extra or {})
        tmp_side.write_text(json.dumps(meta, indent=1))
    _fsync(out.parent)
    if opts.verify:
        summary["verified"] = verify_beton(out, kept.labels, workers=opts.workers)
    return summary


def verify_beton(path: str | os.PathLike, labels: list[int], workers: int = 1, batch_size: int = 64) -> bool:
    """Read every record back through an FFCV Loader: count, labels in order, every image decodes."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)], "label": [IntDecoder()]})
    got = []
    for images, lab in loader:
        if images.shape[1:] != (32, 32, 3):
            raise WriteError(f"verify '{path}': decoded batch has shape {images.shape}")
        got.extend(np.asarray(lab).reshape(-1).tolist())
    if len(got) != len(labels):
        raise WriteError(f"verify '{path}': read {len(got)} records, expected {len(labels)}")
    if got != list(labels):
        first = next(i for i, (a, b) in enumerate(zip(got, labels)) if a != b)
        raise WriteError(f"verify '{path}': label of record {first} is {got[first]}, expected {labels[first]}")
    return True


def summary_line(name: str, s: dict) -> str:
    mb = s["bytes"] / 2**20
    return (f"{name}: {s['images']} images, {s['classes']} classes, {s['skipped']} skipped, {mb:.1f} MiB, "
            f"{s['seconds']:.1f} s, {s['images_per_second']:.0f} images/s ({s['workers']} workers)")
