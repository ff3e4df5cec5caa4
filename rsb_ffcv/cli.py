"""The one error contract of every entry point (write_datasets.py and python -m rsb_ffcv.<tool>).

Exit 0: success. Exit 1: the run itself failed (NaN loss, a dead loader, a full disk, a CUDA error).
Exit 2: usage, configuration or input error. Every expected failure is one line on stderr that starts
with `error:`, without a traceback; under torchrun only rank 0 prints it, unless the failure is one
rank's own (a dead loader on rank 3 is reported by rank 3). Ctrl-C is exit 130. Anything else is a bug:
its traceback is printed and the exit code is 1.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

from . import startup
from .config import ConfigError


class RunFailure(RuntimeError):
    """The run failed after it started (exit 1). `every_rank`: all ranks raise it together (say it once)."""

    every_rank = False


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def error(message: str, every_rank: bool = True) -> None:
    """Print the one `error:` line (rank 0 only, unless this rank alone has the failure)."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    if rank() == 0:
        print(f"error: {line}", file=sys.stderr, flush=True)
    elif not every_rank:
        print(f"error: rank {rank()}: {line}", file=sys.stderr, flush=True)


def _runtime_message(e: BaseException) -> str | None:
    """A one-line reason for the runtime failures that are not bugs, or None."""
    if isinstance(e, RunFailure):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        return f"{e.strerror}: {e.filename or ''} (free space or fix the disk, then resume)".replace(":  (", " (")
    name = type(e).__name__
    if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return ("the GPU ran out of memory: lower training.max_device_batch (gradient accumulation keeps the "
                "global batch) or the resolution")
    if isinstance(e, RuntimeError) and "CUDA error" in str(e):
        return f"CUDA error: {str(e).split('CUDA error:', 1)[-1].strip().splitlines()[0]}"
    return None


def run(main, argv=None, cleanup=None) -> int:
    """Call main(argv) under the contract; `cleanup()` runs last whatever happened (e.g. leave torchrun's
    process group)."""
    startup.collect_nothing_at_exit()
    try:
        return main(argv) or 0
    except ConfigError as e:
        error(str(e))
        return 2
    except KeyboardInterrupt as e:
        error(f"interrupted{': ' + str(e) if str(e) else ''}", every_rank=False)
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # sorted below into expected failures and bugs
        message = _runtime_message(e)
        if message is None:
            traceback.print_exc()
            message = f"unexpected {type(e).__name__}: {e} (a bug: please report it with the traceback above)"
            error(message, every_rank=False)
        else:
            error(message, every_rank=getattr(e, "every_rank", False))
        return 1
    finally:
        if cleanup is not None:
            cleanup()
