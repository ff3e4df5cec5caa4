"""Atomic writes for every file others read (checkpoints, JSON results, charts): write to a temporary name
beside the target, flush it to disk, rename. A failure, a full disk or a signal leaves the previous file
(or none), never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def _temporary(path: Path, pid: str) -> Path:
    """atomic_path's temporary name for `path` written by process `pid` ('*': any process)."""
    return path.with_name(f".{path.stem}.tmp-{pid}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path to write (a file, or a folder the caller makes and fills with files); on success it
    is flushed to disk (a folder's files too) and becomes `path` (a folder replaces only an empty one). The suffix
    is kept (matplotlib and PIL choose the format from it). On any failure, the rename's included, the temporary
    is removed."""
    path = Path(path)
    tmp = _temporary(path, str(os.getpid()))
    try:
        yield tmp
        for f in [*(tmp.iterdir() if tmp.is_dir() else []), tmp]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files of atomic_path(path) that writes killed before they finished left behind."""
    path = Path(path)
    return sorted(path.parent.glob(_temporary(path, "*").name))


def save_json(path: str | os.PathLike, obj) -> Path:
    """JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    return Path(path)


def load_json(path: str | os.PathLike, default=None):
    """A JSON file, or `default` when there is none."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
