"""FFCV pipelines for training and evaluation (the traversal order is `orders.TrainOrder`).

Contract of both loaders: (images uint8 N×3×H×W in channels-last memory on `device`, labels int64 N on
`device`). Every numba stage comes before the first torch stage: FFCV 1.0.2's Loader constructor loops
forever on JIT → non-JIT → JIT pipelines.
"""
from __future__ import annotations

import queue

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from .cli import RunFailure
from .config import ConfigError
from .crop_decoder import CenterCropDecoder, RandomResizedCropDecoder
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
    moves the page-local order's windows through the page cache as batches are taken.

    FFCV sets torch's global thread count to its own worker count on every iter(); the compute thread
    count is restored here.
    """
    it = iter(loader)
    windows = getattr(loader.traversal_order, "page_cache", None)
    if windows is not None:
        windows.attach(it.memory_context.mmap)
    it.output_queue = _WatchedQueue(it.output_queue, it, windows.on_batch if windows is not None else None)
    torch.set_num_threads(torch_threads)
    return it


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


def train_loader(path: str, batch_size: int, resolution: int, device: torch.device, *, num_workers: int,
                 seed: int, repeats: int, rank: int, world: int, batches_ahead: int, window_pages: int = 0,
                 accum: int = 1, decoder: str = "fast", interpolation: str = "bicubic", region_decode: bool = True):
    """The beton is memory-mapped (one copy in the page cache for all processes of a node); window_pages > 0
    reads it in the page-local order (`orders`, for betons larger than RAM: see memory.plan_reads)."""
    stages = train_decoder(decoder, resolution, interpolation, region_decode)
    image = [*stages, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                    os_cache=True, drop_last=True, seed=seed, batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
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


def set_train_resolution(decoder, resolution: int) -> None:
    """Progressive resizing: FFCV reallocates from output_size at the next epoch, no recompilation."""
    decoder.output_size = (resolution, resolution)


def val_loader(path: str, batch_size: int, resolution: int, crop_ratio: float, device: torch.device, *,
               num_workers: int, rank: int, world: int, batches_ahead: int, os_cache: bool = True,
               decoder: str = "fast", interpolation: str = "bicubic", indices=None):
    """Sequential, every record once across ranks: rank r reads records r, r+world, ... (no padding), or
    only the given record `indices`, in that order."""
    from ffcv.reader import Reader
    n = Reader(path).num_samples
    indices = np.arange(rank, n, world) if indices is None else np.asarray(indices)
    image = [val_decoder(decoder, resolution, crop_ratio, interpolation), ToTensor(),
             ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    return Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                  os_cache=os_cache, drop_last=False, indices=indices.astype(np.uint64),
                  batches_ahead=batches_ahead,
                  pipelines={"image": image, "label": _label_pipeline(device)})


def progressive_resolution(epoch: int, start: int, end: int, start_epoch: int, end_epoch: int, default: int) -> int:
    """ffcv-imagenet's linear ramp, rounded down to a multiple of 32."""
    if start <= 0:
        return default
    if epoch <= start_epoch:
        return start
    if epoch >= end_epoch:
        return end
    interp = np.interp([epoch], [start_epoch, end_epoch], [start, end])
    return int(np.round(interp[0] / 32)) * 32
