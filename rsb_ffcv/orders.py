"""Training traversal orders: which records each process trains on in an epoch, batch by batch.

One dealing rule, two shuffles:
- The dealing is timm's `RepeatAugSampler` (repeated augmentation) or torch's `DistributedSampler` over
  *virtual ranks*: every gradient-accumulation micro-batch is one, so 1 GPU x 4 accumulation trains on
  exactly the device batches (BatchNorm batches, Mixup partners) that 4 GPUs x 1 would.
- The shuffle is either the samplers' own uniform permutation (`window_pages=0`: the beton sits in RAM,
  data.in_memory=true), or a *page-local* one for betons larger than RAM (`window_pages=W`): the beton's pages
  are grouped into windows of W pages spread over the file (page_local_permutation), and each window's records
  come out in a uniformly random order before the next window's. The samplers deal that stream with
  shuffle=False, so the ranks of every node walk the same window at the same time and the page cache they share
  holds a few windows (memory.PageWindows reads them ahead and drops them): each page is fetched from storage
  about once per epoch per node, and the memory the order needs is a few windows, not the beton.
  FFCV's own answer, QUASI_RANDOM, refuses distributed runs (FFCV issue 92); this keeps the samplers'
  guarantees (copies of an image on different virtual ranks, equal batch counts per rank) with either shuffle.
"""
from __future__ import annotations

import hashlib

import numpy as np
from ffcv.traversal_order.base import TraversalOrder
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler

from .config import ConfigError
from .memory import PageWindows


def record_pages(reader) -> np.ndarray:
    """The beton page (by number) that holds each record's data: FFCV allocates a record's image inside one page."""
    table = reader.alloc_table
    pages = np.zeros(int(reader.num_samples), dtype=np.int64)
    pages[table["sample_id"].astype(np.int64)] = (table["ptr"] // np.uint64(reader.page_size)).astype(np.int64)
    return pages


def page_local_permutation(pages: np.ndarray, window_pages: int, seed: int,
                           epoch: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Positions 0..len(pages)-1 window by window, seeded by (seed, epoch).

    The distinct pages, in file order, are cut into `window_pages` strata of consecutive pages, and every window
    takes one page of each stratum at random: a window spreads over the whole beton, so on a class-sorted beton
    (ImageFolder order) it holds about as many classes as it holds pages, and which pages share a window changes
    every epoch. Windows come in random order; within a window the positions are uniformly shuffled.
    (ImageNet in class order, batches of 512: distinct classes per batch 94% of a uniform shuffle's with an 8 GiB
    window of FFCV's 8 MiB pages, ~25 records each, 80% with 4 GiB; with 2 MiB pages, 97% with 2 GiB. Windows of
    whole random pages instead of strata: 92% with 16 GiB of 8 MiB pages.)
    Returns (permutation, the window of each position, the pages of each window)."""
    rng = np.random.default_rng([seed, epoch])
    distinct, page_index = np.unique(pages, return_inverse=True)
    windows = -(-len(distinct) // max(1, window_pages))
    stratum = np.arange(len(distinct)) // windows
    by_stratum = np.lexsort((rng.random(len(distinct)), stratum))
    page_window = np.empty(len(distinct), dtype=np.int64)
    page_window[by_stratum] = rng.permutation(windows)[np.arange(len(distinct)) - stratum * windows]
    window = page_window[page_index]
    perm = np.lexsort((rng.random(len(pages)), window))
    return perm, window, [distinct[page_window == w] for w in range(windows)]


class TrainOrder(TraversalOrder):
    """This process's records for an epoch: for each optimizer step, the device batches of its `accum`
    virtual ranks in turn (virtual rank = rank x accum + k).

    repeats > 1: timm's RepeatAugSampler over the virtual ranks (each index repeated `repeats` times, copies
    spread across virtual ranks); it needs at least `repeats` virtual ranks, or copies of one image would share
    a device batch. Otherwise torch's DistributedSampler (padded to equal length per virtual rank).
    `pages` + `window_pages` > 0: the page-local shuffle (module docstring); else the samplers' own shuffles.
    `skip_batches` drops the first micro-batches of the next epoch once: a mid-epoch resume.
    `keyed`: decoders with `seed_epoch` (crop_decoder), keyed with each epoch's (seed, rank, epoch, first batch).
    """

    def __init__(self, loader, repeats: int, rank: int, world: int, batch_size: int, accum: int = 1,
                 pages: np.ndarray | None = None, window_pages: int = 0):
        super().__init__(loader)
        self.repeats, self.rank, self.world, self.batch_size, self.accum = repeats, rank, world, batch_size, accum
        self.virtual_world = world * accum
        if repeats > 1 and self.virtual_world < repeats:
            raise ConfigError(
                f"training.repeated_aug={repeats} needs at least {repeats} device batches per optimizer step, or "
                f"copies of an image share a device batch; this run has {world} process(es) x {accum} accumulation "
                f"= {self.virtual_world}: lower training.max_device_batch (e.g. to training.batch_size / "
                f"{repeats * world} or less) or use more processes")
        self.window_pages = window_pages if pages is not None else 0
        self.pages = None if pages is None else np.asarray(pages)[np.asarray(self.indices, dtype=np.int64)]
        self._shuffled: tuple | None = None  # (epoch, page-local permutation, windows of it, pages of each window)
        self.page_cache = None  # memory.PageWindows for the last order: prefetch and release windows as batches go
        self.skip_batches = 0
        self.keyed: list = []
        self.digest = ""  # of the last epoch's full order: lets tests and logs compare data orders

    def shuffle(self, epoch: int) -> np.ndarray:
        """The page-local permutation of positions for `epoch` (computed once per epoch)."""
        if self._shuffled is None or self._shuffled[0] != epoch:
            self._shuffled = (epoch, *page_local_permutation(self.pages, self.window_pages, self.seed, epoch))
        return self._shuffled[1]

    def virtual_positions(self, epoch: int, virtual_rank: int) -> list[int] | np.ndarray:
        """Dataset positions of one virtual rank's epoch, as timm's/torch's sampler deals them."""
        page_local = self.window_pages > 0
        stream = self.shuffle(epoch) if page_local else range(len(self.indices))
        if self.repeats > 1:
            sampler = RepeatAugSampler(stream, num_replicas=self.virtual_world, rank=virtual_rank,
                                       num_repeats=self.repeats, shuffle=not page_local)
            sampler.set_epoch(self.seed + epoch)
        else:
            sampler = DistributedSampler(stream, num_replicas=self.virtual_world, rank=virtual_rank,
                                         shuffle=not page_local, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
        return stream[list(sampler)] if page_local else list(sampler)

    def positions(self, epoch: int) -> np.ndarray:
        """This process's positions: for each step, the batches of its `accum` virtual ranks in turn
        (each virtual rank's partial last batch is dropped, as drop_last does on a GPU)."""
        per_rank = [self.virtual_positions(epoch, self.rank * self.accum + k) for k in range(self.accum)]
        batches = len(per_rank[0]) // self.batch_size
        grid = np.asarray([p[:batches * self.batch_size] for p in per_rank], dtype=np.int64)
        return grid.reshape(self.accum, batches, self.batch_size).transpose(1, 0, 2).reshape(-1)

    def sample_order(self, epoch: int):
        positions = self.positions(epoch)
        order = self.indices[positions]
        self.digest = hashlib.sha1(order.tobytes()).hexdigest()[:12]
        skip = self.skip_batches * self.batch_size
        for decoder in self.keyed:
            decoder.seed_epoch(self.seed, self.rank, epoch, self.skip_batches)
        order, positions, self.skip_batches = order[skip:], positions[skip:], 0
        if self.window_pages:
            self.shuffle(epoch)
            windows = self._shuffled[2][positions].reshape(-1, self.batch_size)
            self.page_cache = PageWindows(self.loader.reader, self._shuffled[3], windows.min(axis=1),
                                          windows.max(axis=1), lead=self.loader.batches_ahead + 2,
                                          behind=2 * self.accum)  # two optimizer steps of this process's batches
        return order
