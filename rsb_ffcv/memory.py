"""A node's memory for the beton: how much is available, the `data.in_memory` decision, and what a process
holds of a memory-mapped file.

"Available" inside a job is its memory cgroup's room, not /proc/meminfo: Slurm (task/cgroup with --mem),
containers and Kubernetes confine a process with a memory cgroup while /proc/meminfo shows the whole machine.
So the room is the smallest of MemAvailable and, for the process's cgroup and each of its ancestors with a
limit, limit - usage + the file cache it holds (page cache is charged to the cgroup and is reclaimable).
Every process maps the beton through the OS page cache (FFCV's os_cache=True), so the processes of a node
share one copy of it: the beton counts once per node, each process's own growth once per process.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as 2**63 rounded down to a page
PROCESS_SLACK = 512 << 20  # what a process allocates after the decision besides its loader's batch buffers (numba's
#                             compiled code, threads, allocator slack: 54-67 MiB measured on the CPU), with margin
WINDOW_SHARE = 8  # the page-local window: this fraction of the memory left for the page cache (<= 4 resident)


def meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return NO_LIMIT if text == "max" else int(text)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def cgroup_dirs(pid: int | str = "self") -> list[tuple[str, Path]]:
    """The memory cgroup directories of a process, innermost first, with their version ('v1' or 'v2')."""
    entries = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    v1 = [rel for _, controllers, rel in entries if "memory" in controllers.split(",")]
    v2 = [rel for _, controllers, rel in entries if controllers == ""]
    if v1:
        version, base, rel = "v1", Path("/sys/fs/cgroup/memory"), v1[0]
    elif v2:
        version, rel = "v2", v2[0]
        base = next((b for b in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                     if (b / "cgroup.controllers").exists()), None)
        if base is None:
            return []
    else:
        return []
    d, dirs = base / rel.lstrip("/"), []
    while d == base or base in d.parents:
        dirs.append((version, d))
        d = d.parent
    return dirs


def cgroup_room(pid: int | str = "self") -> int | None:
    """The least room left under the memory limits of the process's cgroups (None: no limit)."""
    rooms = []
    for version, d in cgroup_dirs(pid):
        if version == "v1":
            limit, usage = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            stat = _stat(d / "memory.stat")
            cache = stat.get("total_inactive_file", 0) + stat.get("total_active_file", 0)
        else:
            limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            cache = _stat(d / "memory.stat").get("file", 0)
        if limit is not None and usage is not None and limit < NO_LIMIT:
            rooms.append(max(0, limit - usage + cache))
    return min(rooms) if rooms else None


def available_memory() -> tuple[int, str]:
    """(bytes available to this process's node share, where the figure comes from)."""
    avail, where = meminfo_available(), "MemAvailable"
    room = cgroup_room()
    if room is not None and room < avail:
        avail, where = room, "cgroup memory limit"
    return avail, where


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class ReadPlan:
    """How the training beton is read: in_memory (exact random order through the page cache) or the page-local
    order with windows of `window_pages` pages (0 when in memory); `line` says why, for the log."""
    in_memory: bool
    window_pages: int
    line: str


def plan_reads(beton: str, setting: str, window_mib: int, local_world: int, process_bytes: int = 0,
               agree_min=None) -> ReadPlan:
    """Decide `data.in_memory` (auto | true | false) for the training beton. Each of the node's `local_world`
    processes will still allocate `process_bytes` (its loader's buffers: loaders.buffer_bytes) + PROCESS_SLACK; what
    is left of the available memory is the page cache's: the beton fits if it fits there, else the page-local
    window is an eighth of it (WINDOW_SHARE). `agree_min` (Dist.all_min) makes every rank take the same decision:
    it fits only if it fits on every node, and the smallest window wins."""
    import numpy as np
    from ffcv.types import HeaderType
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"data.in_memory: got '{setting}', expected auto, true or false")
    size = os.path.getsize(beton)
    page_size = int(np.fromfile(beton, dtype=HeaderType, count=1)[0]["page_size"])  # the header alone
    avail, where = available_memory()
    reserve = process_bytes + PROCESS_SLACK
    share = max(0, avail - local_world * reserve)
    fits = size <= share
    window_bytes = window_mib * 2**20 if window_mib > 0 else share // WINDOW_SHARE
    if agree_min is not None:
        fits, window_bytes = agree_min([float(fits), float(window_bytes)])
        fits, window_bytes = bool(fits), int(window_bytes)
    pages = -(-size // page_size)
    window_pages = int(min(pages, max(1, window_bytes // page_size)))
    in_memory = fits if setting == "auto" else setting == "true"
    facts = (f"'{Path(beton).name}' is {gib(size)}; {gib(avail)} available ({where}), {gib(share)} after "
             f"{gib(reserve)} for each of {local_world} local process(es)")
    if in_memory:
        line = f"data.in_memory={setting}: {facts} -> memory-mapped, exact random order"
        if not fits:
            line += " (it does not fit: pages will be read from storage more than once per epoch)"
        return ReadPlan(True, 0, line)
    line = (f"data.in_memory={setting}: {facts} -> page-local order, windows of {window_pages} "
            f"page{'s' if window_pages > 1 else ''} x "
            f"{page_size // 2**20} MiB ({gib(window_pages * page_size)}) read in turn through the shared page cache")
    return ReadPlan(False, window_pages, line)


class PageWindows:
    """The page-local order's windows in the page cache, driven by the batches this process consumes.

    Ahead: the windows FFCV's loader thread will reach (it prepares up to `lead` batches beyond the one consumed)
    are read with posix_fadvise(WILLNEED) before the thread needs them: whole pages read in one go instead of
    128 KiB page faults during decoding. Behind: a window is released once every batch that holds its records is
    `behind` batches in the past (the other ranks of the node may be that far behind: one or two optimizer steps):
    unmapped from this process (madvise DONTNEED), then dropped from the page cache (fadvise DONTNEED drops the
    pages no process maps any more). Without the release a memory cgroup under pressure evicts read-ahead pages of
    the current window before the finished windows' (pages mapped and used once look active to the kernel) and the
    beton was fetched 1.65x per epoch instead of once; releasing by window instead of by batch dropped pages that
    another rank still had to read when windows are smaller than a step (2.4x).
    """

    def __init__(self, reader, window_pages: list, first_windows, last_windows, lead: int, behind: int):
        """first_windows/last_windows: the first and last window of each batch of this process's epoch."""
        self.page_size, self.pages = int(reader.page_size), window_pages
        self.first_windows, self.last_windows, self.lead, self.behind = first_windows, last_windows, lead, behind
        self.size = os.path.getsize(reader.file_name)
        self.fd = os.open(reader.file_name, os.O_RDONLY)
        self.mapping: mmap.mmap | None = None
        self.batch, self.read_ahead, self.released = 0, -1, 0

    def attach(self, mapping) -> None:
        """Start of the epoch: the loader's memory map (FFCV's np.memmap), and the first windows read ahead."""
        self.mapping = getattr(mapping, "_mmap", None)
        self._step(0)

    def on_batch(self) -> None:
        """The consumer took the next batch."""
        self.batch += 1
        self._step(self.batch)

    def _step(self, batch: int) -> None:
        n = len(self.last_windows)
        if batch >= n:
            return
        ahead = int(self.last_windows[min(batch + self.lead, n - 1)]) + 1
        while self.read_ahead < ahead:
            self.read_ahead += 1
            self._advise(self.read_ahead, os.POSIX_FADV_WILLNEED)
        if batch >= self.behind:
            while self.released < int(self.first_windows[batch - self.behind]):
                self._advise(self.released, os.POSIX_FADV_DONTNEED)
                self.released += 1

    def _advise(self, window: int, advice: int) -> None:
        if window >= len(self.pages):
            return
        for page in self.pages[window]:
            start = int(page) * self.page_size
            length = min(self.page_size, self.size - start)
            if length <= 0:
                continue
            if advice == os.POSIX_FADV_DONTNEED and self.mapping is not None:
                self.mapping.madvise(mmap.MADV_DONTNEED, start, length)
            os.posix_fadvise(self.fd, start, length, advice)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def file_residency(pid: int | str, path: str) -> dict[str, int]:
    """What a process holds of a memory-mapped file, from /proc/PID/smaps: Rss (every page it has mapped, shared
    or not) and Pss (each shared page divided by the processes mapping it), in bytes."""
    target = os.path.realpath(path)
    out = {"rss": 0, "pss": 0}
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
            current = fields[5]
        elif current == target and fields[0] in ("Rss:", "Pss:"):
            out[fields[0][:-1].lower()] += int(fields[1]) * 1024
    return out


def read_bytes(pid: int | str = "self") -> int:
    """Bytes this process (all its threads) made the kernel fetch from storage (/proc/PID/io read_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise OSError(f"/proc/{pid}/io has no read_bytes")


def evict(path: str) -> None:
    """Drop a file's clean pages from the page cache (the next read comes from storage)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
