"""FFCV pipelines for training and evaluation, and the training traversal order.

Contract of both loaders: (images uint8 N×3×H×W in channels-last memory on `device`, labels int64 N on
`device`). Every numba stage comes before the first torch stage: FFCV 1.0.2's Loader constructor loops
forever on JIT → non-JIT → JIT pipelines.
"""
from __future__ import annotations

import hashlib
import json
import queue
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler

from .config import ConfigError
from .crop_decoder import CenterCropDecoder, RandomResizedCropDecoder


class TrainOrder(TraversalOrder):
    """Which records each rank trains on in an epoch.

    repeats > 1: timm's RepeatAugSampler (shuffle seeded by seed + epoch, each index repeated `repeats`
    times, copies spread across ranks, equal per-rank length). Otherwise torch's DistributedSampler
    (seeded shuffle, padded to equal per-rank length; a plain permutation with one process).
    `skip_batches` drops the first batches of the next epoch once: a mid-epoch resume.
    """

    def __init__(self, loader, repeats: int, rank: int, world: int, batch_size: int):
        super().__init__(loader)
        self.repeats, self.rank, self.world, self.batch_size = repeats, rank, world, batch_size
        self.skip_batches = 0
        self.digest = ""  # of the last epoch's full order: lets tests and logs compare data orders

    def positions(self, epoch: int) -> list[int]:
        n = len(self.indices)
        if self.repeats > 1:
            sampler = RepeatAugSampler(range(n), num_replicas=self.world, rank=self.rank,
                                       num_repeats=self.repeats)
            sampler.set_epoch(self.seed + epoch)
        else:
            sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                         seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
        return list(sampler)

    def sample_order(self, epoch: int):
        order = self.indices[np.asarray(self.positions(epoch), dtype=np.int64)]
        self.digest = hashlib.sha1(order.tobytes()).hexdigest()[:12]
        if self.skip_batches:
            order, self.skip_batches = order[self.skip_batches * self.batch_size:], 0
        return order


class LoaderDied(RuntimeError):
    pass


class _WatchedQueue:
    """An EpochIterator's output queue whose get() notices a dead loader thread: FFCV 1.0.2 prints the
    thread's exception and then blocks the consumer forever."""

    def __init__(self, q: queue.Queue, thread):
        self._q, self._thread = q, thread

    def get(self, *args, **kwargs):
        while True:
            try:
                return self._q.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise LoaderDied("the FFCV loader thread died; its error is printed above") from None

    def __getattr__(self, name):  # put(), qsize() ... from the loader thread
        return getattr(self._q, name)


def epoch(loader: Loader, torch_threads: int):
    """Start an epoch of `loader`: an iterator that raises instead of hanging if FFCV's thread dies.

    FFCV sets torch's global thread count to its own worker count on every iter(); the compute thread
    count is restored here.
    """
    it = iter(loader)
    it.output_queue = _WatchedQueue(it.output_queue, it)
    torch.set_num_threads(torch_threads)
    return it


def read_sidecar(beton: str) -> dict:
    side = Path(beton).with_suffix(".json")
    if not Path(beton).is_file():
        raise ConfigError(f"dataset '{beton}' not found (write it with write_datasets.py)")
    if not side.is_file():
        raise ConfigError(f"dataset '{beton}' has no sidecar '{side.name}' (rewrite it with write_datasets.py)")
    return json.loads(side.read_text())


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
                 seed: int, repeats: int, rank: int, world: int, os_cache: bool, batches_ahead: int,
                 decoder: str = "fast", interpolation: str = "bicubic", region_decode: bool = True):
    stages = train_decoder(decoder, resolution, interpolation, region_decode)
    image = [*stages, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                    os_cache=os_cache, drop_last=True, seed=seed, batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    # FFCV 1.0.2 takes no custom order class in the constructor: install ours, then refresh the
    # first order, from which len(loader) is computed.
    loader.traversal_order = TrainOrder(loader, repeats, rank, world, batch_size)
    loader.first_traversal_order = loader.next_traversal_order()
    if len(loader) == 0:
        raise ConfigError(f"'{path}': {len(loader.first_traversal_order)} samples per rank are fewer than the "
                          f"per-device batch {batch_size}; lower training.batch_size")
    return loader, stages[0]


def set_train_resolution(decoder, resolution: int) -> None:
    """Progressive resizing: FFCV reallocates from output_size at the next epoch, no recompilation."""
    decoder.output_size = (resolution, resolution)


def val_loader(path: str, batch_size: int, resolution: int, crop_ratio: float, device: torch.device, *,
               num_workers: int, rank: int, world: int, os_cache: bool, batches_ahead: int,
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
