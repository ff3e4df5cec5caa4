"""FFCV pipelines for training and evaluation (the traversal order is `orders.TrainOrder`), and the trainer's
data side (`build_data`): the device batch and accumulation, the per-process thread share, the read plan, both
loaders and the steps per epoch.

This module (with `orders`) is the only one that touches FFCV's loader internals: `TrainStream` is the facade the
trainer, the benchmarks and the GPU check use for the train loader, `epoch` starts an epoch of any loader.

Contract of both loaders: (images uint8 N×3×H×W in channels-last memory on `device`, labels int64 N on
`device`). Every numba stage comes before the first torch stage: FFCV 1.0.2's Loader constructor loops
forever on JIT → non-JIT → JIT pipelines.
"""
from __future__ import annotations

import contextlib
import functools
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from .cli import RunFailure
from .config import ConfigError
from .crop_decoder import CenterCropDecoder, RandomResizedCropDecoder
from .datasets.betons import open_dataset
from .distributed import cores_per_process
from .memory import plan_reads
from .orders import TrainOrder, record_pages


class LoaderDied(RunFailure):
    pass


class _WatchedQueue:
    """An EpochIterator's output queue whose get() notices a dead loader thread (FFCV 1.0.2 prints the
    thread's exception and then blocks the consumer forever) and tells `on_batch` that a batch was taken."""

    def __init__(self, q: queue.Queue, thread, on_batch=None):
        self._q, self._thread, self._on_batch = q, thread, on_batch

    def get(self, *args, **kwargs):
        while True:
            try:
                item = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise LoaderDied("the FFCV loader thread died; its error is printed above") from None
        if self._on_batch is not None:
            self._on_batch()
        return item

    def __getattr__(self, name):  # put(), qsize() ... from the loader thread
        return getattr(self._q, name)


def epoch(loader: Loader, torch_threads: int):
    """Start an epoch of `loader`: an iterator that raises instead of hanging if FFCV's thread dies, and that
    moves the page-local order's windows through the page cache as batches are taken. Close it (`close()`, or
    `contextlib.closing`) when leaving the epoch early, an error included, or FFCV's thread keeps running.

    FFCV sets torch's global thread count to its own worker count on every iter(); the compute thread
    count is restored here.
    """
    it = iter(loader)
    windows = getattr(loader.traversal_order, "page_cache", None)
    if windows is not None:
        windows.attach(it.memory_context.mmap)
    it.output_queue = _WatchedQueue(it.output_queue, it, windows.on_batch if windows is not None else None)
    it.close = functools.partial(_close, it, it.close)
    torch.set_num_threads(torch_threads)
    return it


def _close(it, ffcv_close) -> None:
    """An EpochIterator's close() that returns once its thread has stopped. FFCV 1.0.2's only flags the thread, which
    goes on decoding batches until its queue is full and then waits up to 0.5 s, running the loader's decoder
    meanwhile: our crop decoder's per-batch key (crop_decoder's batch counter, set for the next epoch when it
    starts) would be advanced by the old thread while the next epoch's thread uses it (nondeterministic crops after
    an epoch left early: a step cap, a stop, a resumed epoch). Here the thread is given no more batches and its
    queue is drained, so it ends after the batch it is decoding; a thread still alive after 120 s raises."""
    if it is not threading.current_thread() and it.is_alive():
        it.iter_ixes = iter(())  # its next batch: none (it then queues None and ends)
        it.terminate_event.set()
        q = it.output_queue._q if isinstance(it.output_queue, _WatchedQueue) else it.output_queue
        deadline = time.monotonic() + 120
        while it.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)  # room for the thread's pending put
        it.join(timeout=1)
        if it.is_alive():
            raise LoaderDied("the FFCV loader thread did not stop within 120 s of closing its epoch")
    ffcv_close()


def _label_pipeline(device):
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]


def train_decoder(kind: str, resolution: int, interpolation: str = "bicubic", region_decode: bool = True):
    """RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip, as FFCV stages. region_decode=False
    (benchmarks): our decoder decodes whole JPEGs."""
    if kind == "fast":
        return [RandomResizedCropDecoder((resolution, resolution), interpolation=interpolation,
                                         region_decode=region_decode)]
    return [RandomResizedCropRGBImageDecoder((resolution, resolution), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            RandomHorizontalFlip()]


def val_decoder(kind: str, resolution: int, crop_ratio: float, interpolation: str = "bicubic"):
    if kind == "fast":
        return CenterCropDecoder((resolution, resolution), crop_ratio, interpolation)
    return CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio)


def _open_once(path: str) -> tuple[str, object]:
    """The beton opened once, as a name for FFCV and the file that must live as long as the loader. FFCV reads a
    beton by its name more than once: the index when the loader is built, the data when an epoch first starts (a
    memory map; without os_cache, an open per epoch). A beton replaced in between (write_datasets.py
    --writer.overwrite renames a new file over it) would be read with the old file's index. Through this
    process's descriptor (/proc/self/fd/N) every read is of the file that was opened."""
    f = open(path, "rb")
    return f"/proc/self/fd/{f.fileno()}", f


def train_loader(path: str, batch_size: int, resolution: int, device: torch.device, *, num_workers: int,
                 seed: int, repeats: int, rank: int, world: int, batches_ahead: int, window_pages: int = 0,
                 accum: int = 1, decoder: str = "fast", interpolation: str = "bicubic", region_decode: bool = True):
    """The beton is memory-mapped (one copy in the page cache for all processes of a node); window_pages > 0
    reads it in the page-local order (`orders`, for betons larger than RAM: see memory.plan_reads)."""
    stages = train_decoder(decoder, resolution, interpolation, region_decode)
    image = [*stages, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    name, beton = _open_once(path)
    loader = Loader(name, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                    os_cache=True, drop_last=True, seed=seed, batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    loader.beton_file = beton
    # FFCV 1.0.2 takes no custom order class in the constructor: install ours, then refresh the
    # first order, from which len(loader) is computed.
    pages = record_pages(loader.reader) if window_pages > 0 else None
    loader.traversal_order = TrainOrder(loader, repeats, rank, world, batch_size, accum, pages, window_pages)
    if hasattr(stages[0], "seed_epoch"):  # our decoder: crops keyed by (seed, rank, epoch, batch), not by thread
        loader.traversal_order.keyed.append(stages[0])
    loader.first_traversal_order = loader.next_traversal_order()
    if len(loader) == 0:
        per_rank = len(loader.traversal_order.virtual_positions(0, 0))
        raise ConfigError(f"'{path}': {per_rank} samples per device batch stream are fewer than the per-device "
                          f"batch {batch_size}; lower training.batch_size")
    return loader, stages[0]


def buffer_bytes(batch_size: int, resolution: int, batches_ahead: int) -> int:
    """Host memory one process's loaders allocate for batches: FFCV's ring of batches_ahead + 2 slots, for the
    decoder's output and for ToTensor/ToDevice's (pinned on GPUs), of uint8 RGB images."""
    return 2 * (batches_ahead + 2) * batch_size * resolution * resolution * 3


def val_loader(path: str, batch_size: int, resolution: int, crop_ratio: float, device: torch.device, *,
               num_workers: int, rank: int, world: int, batches_ahead: int, os_cache: bool = True,
               decoder: str = "fast", interpolation: str = "bicubic", indices=None):
    """Sequential, every record once across ranks: rank r reads records r, r+world, ... (no padding), or
    only the given record `indices`, in that order."""
    from ffcv.reader import Reader
    name, beton = _open_once(path)
    n = Reader(name).num_samples
    indices = np.arange(rank, n, world) if indices is None else np.asarray(indices)
    image = [val_decoder(decoder, resolution, crop_ratio, interpolation), ToTensor(),
             ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    loader = Loader(name, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    os_cache=os_cache, drop_last=False, indices=indices.astype(np.uint64),
                    batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    loader.beton_file = beton
    return loader


def progressive_resolution(epoch: int, start: int, end: int, start_epoch: int, end_epoch: int, default: int) -> int:
    """ffcv-imagenet's linear ramp from `start` px at start_epoch to `end` px at end_epoch, rounded to a multiple
    of 32 (`default` when start is 0: off)."""
    if start <= 0:
        return default
    if epoch <= start_epoch:
        return start
    if epoch >= end_epoch:
        return end
    interp = np.interp([epoch], [start_epoch, end_epoch], [start, end])
    return int(np.round(interp[0] / 32)) * 32


class TrainStream:
    """The train loader as the trainer sees it: an epoch of micro-batches from a given step on, at the epoch's
    resolution (progressive resizing: `resolution_at(epoch)`), its order's digest. FFCV's loader, our
    `TrainOrder` and the crop decoder stay inside."""

    def __init__(self, loader: Loader, decoder, compute_threads: int, resolution_at=None):
        self.loader, self.decoder, self.compute_threads = loader, decoder, compute_threads
        self.resolution_at = resolution_at

    @property
    def order(self) -> TrainOrder:
        return self.loader.traversal_order

    def __len__(self) -> int:
        """Micro-batches per epoch of this process."""
        return len(self.loader)

    def epoch(self, number: int, skip_batches: int = 0):
        """An iterator over epoch `number`'s micro-batches after the first `skip_batches` (a resumed epoch). Close
        it when leaving early (`contextlib.closing`)."""
        if self.resolution_at is not None:  # FFCV reallocates from output_size at the next epoch, no recompilation
            res = self.resolution_at(number)
            self.decoder.output_size = (res, res)
        self.order.skip_batches = skip_batches
        self.loader.next_epoch = number
        return epoch(self.loader, self.compute_threads)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of epoch 0's first micro-batch (FFCV reuses its buffers); the loader's thread is stopped."""
        with contextlib.closing(self.epoch(0)) as it:
            return tuple(t.clone() for t in next(it))


def device_batch(global_batch: int, world: int, max_device_batch: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro × world × accum = global batch."""
    if global_batch % world:
        raise ConfigError(f"training.batch_size={global_batch} does not divide over {world} processes")
    per_rank = global_batch // world
    accum = 1
    if max_device_batch and per_rank > max_device_batch:
        accum = math.ceil(per_rank / max_device_batch)
        while per_rank % accum:
            accum += 1
    return per_rank // accum, accum


@dataclass
class Data:
    classes: list[str]
    micro_batch: int  # per device
    accum: int  # micro-batches per optimizer step
    train: TrainStream
    val: Loader
    steps_per_epoch: int
    decode_threads: int  # FFCV's workers of each loader
    in_memory: bool  # the exact random order (False: page-local)

    @property
    def data_order(self) -> str:
        return "exact random" if self.in_memory else "page-local"


def build_data(cfg: dict, d) -> Data:
    """Both loaders of this process (rank d.rank of d.world) from the trainer's config: ConfigError (one line)
    for betons whose classes differ, a batch that does not divide, an odd batch with Mixup, an epoch shorter
    than a step."""
    train_meta, val_meta = open_dataset(cfg["data.train_dataset"]), open_dataset(cfg["data.val_dataset"])
    classes = train_meta["classes"]
    if val_meta["classes"] != classes:
        raise ConfigError(
            f"'{cfg['data.train_dataset']}' has {len(classes)} classes ({', '.join(classes[:3])}, ...) "
            f"but '{cfg['data.val_dataset']}' has {len(val_meta['classes'])} "
            f"({', '.join(val_meta['classes'][:3])}, ...): write the val beton with "
            f"--source.classes_from=<the train beton's .json> so that label i means the same class")
    micro, accum = device_batch(cfg["training.batch_size"], d.world, cfg["training.max_device_batch"])
    if (cfg["augment.mixup_alpha"] > 0 or cfg["augment.cutmix_alpha"] > 0) and micro % 2:
        raise ConfigError(f"Mixup/CutMix need an even per-device batch; got {micro}")
    share = cores_per_process(d.local_world)
    threads, workers = cfg["training.cpu_threads"] or share, cfg["data.num_workers"] or share
    print(f"rank {d.rank}/{d.world} (node-local {d.local_rank}/{d.local_world}) on {socket.gethostname()}: "
          f"{d.device}, {threads} compute threads, {workers} decode threads", flush=True)
    common = dict(num_workers=workers, batches_ahead=cfg["data.batches_ahead"], decoder=cfg["data.decoder"])
    largest = max(cfg["resolution.train"], cfg["resolution.progressive_end"])
    buffers = sum(buffer_bytes(micro, res, cfg["data.batches_ahead"]) for res in (largest, cfg["resolution.test"]))
    reads = plan_reads(cfg["data.train_dataset"], cfg["data.in_memory"], cfg["data.shuffle_window_mib"],
                       d.local_world, buffers, agree_min=d.all_min)
    if d.is_main:
        print(reads.line, flush=True)
    loader, decoder = train_loader(
        cfg["data.train_dataset"], micro, cfg["resolution.train"], d.device, seed=cfg["training.seed"],
        repeats=cfg["training.repeated_aug"], rank=d.rank, world=d.world, accum=accum,
        window_pages=reads.window_pages, interpolation=cfg["data.train_interpolation"], **common)
    schedule = None
    if cfg["resolution.progressive_start"] > 0:
        schedule = functools.partial(
            progressive_resolution, start=cfg["resolution.progressive_start"], end=cfg["resolution.progressive_end"],
            start_epoch=cfg["resolution.progressive_start_epoch"], end_epoch=cfg["resolution.progressive_end_epoch"],
            default=cfg["resolution.train"])
    val = val_loader(cfg["data.val_dataset"], micro, cfg["resolution.test"], cfg["resolution.test_crop_ratio"],
                     d.device, rank=d.rank, world=d.world, os_cache=True, interpolation=cfg["data.test_interpolation"],
                     **common)
    steps = len(loader) // accum  # the order holds whole steps
    if cfg["training.steps_per_epoch"]:
        steps = min(steps, cfg["training.steps_per_epoch"])
    if steps == 0:
        raise ConfigError(f"training.batch_size={cfg['training.batch_size']} is larger than an epoch of "
                          f"'{cfg['data.train_dataset']}': lower it")
    return Data(classes, micro, accum, TrainStream(loader, decoder, threads, schedule), val, steps, workers,
                reads.in_memory)
