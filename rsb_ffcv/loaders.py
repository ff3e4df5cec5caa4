"""FFCV pipelines for training and evaluation, and the training traversal order.

Contract of both loaders: (images uint8 N×3×H×W in channels-last memory on `device`, labels int64 N on
`device`). Every numba stage comes before the first torch stage: FFCV 1.0.2's Loader constructor loops
forever on JIT → non-JIT → JIT pipelines.
"""
from __future__ import annotations

import hashlib
import queue

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler

from .cli import RunFailure
from .config import ConfigError
from .crop_decoder import CenterCropDecoder, RandomResizedCropDecoder


class TrainOrder(TraversalOrder):
    """Which records this process trains on in an epoch, batch by batch.

    Every gradient-accumulation micro-batch is a virtual rank: with `world` processes and `accum`
    micro-batches per step there are world x accum virtual ranks, and this process's micro-batch k of a
    step is the device batch that virtual rank (rank x accum + k) gets. So 1 GPU x 4 accumulation trains on
    exactly the device batches (BatchNorm batches, Mixup partners) that 4 GPUs x 1 would.
    repeats > 1: timm's RepeatAugSampler over the virtual ranks (shuffle seeded by seed + epoch, each index
    repeated `repeats` times, copies spread across virtual ranks); it needs at least `repeats` virtual ranks,
    or copies of one image would share a device batch. Otherwise torch's DistributedSampler (seeded
    shuffle, padded to equal length per virtual rank; a plain permutation when there is one).
    `skip_batches` drops the first micro-batches of the next epoch once: a mid-epoch resume.
    """

    def __init__(self, loader, repeats: int, rank: int, world: int, batch_size: int, accum: int = 1):
        super().__init__(loader)
        self.repeats, self.rank, self.world, self.batch_size, self.accum = repeats, rank, world, batch_size, accum
        self.virtual_world = world * accum
        if repeats > 1 and self.virtual_world < repeats:
            raise ConfigError(
                f"training.repeated_aug={repeats} needs at least {repeats} device batches per optimizer step, or "
                f"copies of an image share a device batch; this run has {world} process(es) x {accum} accumulation "
                f"= {self.virtual_world}: lower training.max_device_batch (e.g. to training.batch_size / "
                f"{repeats * world} or less) or use more processes")
        self.skip_batches = 0
        self.digest = ""  # of the last epoch's full order: lets tests and logs compare data orders

    def virtual_positions(self, epoch: int, virtual_rank: int) -> list[int]:
        """Dataset positions of one virtual rank's epoch, as timm's/torch's sampler gives them."""
        n = len(self.indices)
        if self.repeats > 1:
            sampler = RepeatAugSampler(range(n), num_replicas=self.virtual_world, rank=virtual_rank,
                                       num_repeats=self.repeats)
            sampler.set_epoch(self.seed + epoch)
        else:
            sampler = DistributedSampler(range(n), num_replicas=self.virtual_world, rank=virtual_rank,
                                         shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
        return list(sampler)

    def positions(self, epoch: int) -> np.ndarray:
        """This process's positions: for each step, the batches of its `accum` virtual ranks in turn
        (each virtual rank's partial last batch is dropped, as drop_last does on a GPU)."""
        per_rank = [self.virtual_positions(epoch, self.rank * self.accum + k) for k in range(self.accum)]
        batches = len(per_rank[0]) // self.batch_size
        grid = np.asarray([p[:batches * self.batch_size] for p in per_rank], dtype=np.int64)
        return grid.reshape(self.accum, batches, self.batch_size).transpose(1, 0, 2).reshape(-1)

    def sample_order(self, epoch: int):
        order = self.indices[self.positions(epoch)]
        self.digest = hashlib.sha1(order.tobytes()).hexdigest()[:12]
        if self.skip_batches:
            order, self.skip_batches = order[self.skip_batches * self.batch_size:], 0
        return order


class LoaderDied(RunFailure):
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
                 accum: int = 1, decoder: str = "fast", interpolation: str = "bicubic", region_decode: bool = True):
    stages = train_decoder(decoder, resolution, interpolation, region_decode)
    image = [*stages, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                    os_cache=os_cache, drop_last=True, seed=seed, batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    # FFCV 1.0.2 takes no custom order class in the constructor: install ours, then refresh the
    # first order, from which len(loader) is computed.
    loader.traversal_order = TrainOrder(loader, repeats, rank, world, batch_size, accum)
    loader.first_traversal_order = loader.next_traversal_order()
    if len(loader) == 0:
        per_rank = len(loader.traversal_order.virtual_positions(0, 0))
        raise ConfigError(f"'{path}': {per_rank} samples per device batch stream are fewer than the per-device "
                          f"batch {batch_size}; lower training.batch_size")
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
