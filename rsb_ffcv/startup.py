"""What every rsb_ffcv process does to start and end sooner: a training rank, and each tool run from the command
line. A run starts one process per GPU, and again after every restart or requeue; the tests start about a hundred.

- `cache_ffcv_import_compile` (run by the package's __init__, before anything imports FFCV): importing FFCV 1.0.2
  builds a numba typed Dict (`ffcv.fields.rgb_image.IMAGE_MODES`), which compiles numba's dict functions in every
  process, and numba compiles them without its on-disk cache. Giving them the cache that `@njit(cache=True)`
  gives a function (numba's own `Dispatcher.enable_caching`) makes that step 3.75 s → 0.30 s from the second
  process on (2 vCPUs, numba 0.68.1); the cache lives where numba keeps any (beside numba's sources if writable,
  else NUMBA_CACHE_DIR or the user's cache directory).
- `collect_nothing_at_exit` (run by `cli.run`): at exit, Python's last garbage collections walk every object
  that torch, timm and FFCV created at import, 1.8 s per process here; `gc.freeze()` at exit skips them (0.3 s).
  Nothing is lost: files are closed, and W&B and the process group ended, before a tool returns.
"""
from __future__ import annotations

import atexit
import gc
import sys

# numba's typed-dict functions that building and filling a Dict[str, int] compiles (what FFCV does at import)
TYPED_DICT_FUNCTIONS = ("_make_dict", "_setitem", "_getitem", "_length", "_contains")


def cache_ffcv_import_compile() -> None:
    if "ffcv.fields.rgb_image" in sys.modules:  # too late: FFCV has compiled them already
        return
    try:
        from numba.typed import typeddict
        for name in TYPED_DICT_FUNCTIONS:
            getattr(typeddict, name).enable_caching()
    except (ImportError, AttributeError):  # another numba: its import compiles as before
        pass


_exit_registered = False


def collect_nothing_at_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        atexit.register(gc.freeze)
        _exit_registered = True
