#!/usr/bin/env bash
# One-command GPU validation on a CUDA machine without internet (see README, "Offline GPU clusters").
#   scripts/gpu_check.sh BUNDLE_DIR [python -m rsb_ffcv.gpu_check options, e.g. --gpu_check.budget_s=420]
# Run from the repository root. Needs: python3 (>= 3.11) with torch, torchvision, numba, opencv-python;
# a C++ compiler and Python's headers (to build ffcv). Installs the bundle's packages into a temporary venv
# that sees the system's site-packages (nothing is installed system-wide; no network is used), builds
# ffcv there against the bundle's OpenCV/libjpeg-turbo and rsb_ffcv/_jpeg.c in place (the repository's
# rsb_ffcv/ then holds _jpeg*.so), then runs the checks and benchmarks.
# INSTALL_INTO_CURRENT=1: install into the current Python environment instead (a writable venv/conda env).
# Results: $OUT_DIR (default gpu_check_out)/gpu_check.json plus the benchmark JSON/PNG files.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh BUNDLE_DIR [gpu_check options]" >&2; exit 2; }
BUNDLE=$(realpath "$1"); shift
[ -d "$BUNDLE/wheels" ] && [ -d "$BUNDLE/sysroot" ] || { echo "error: '$BUNDLE' is not an offline bundle (make it with scripts/make_offline_bundle.sh)" >&2; exit 2; }
[ -f rsb_ffcv/gpu_check.py ] || { echo "error: run from the rsb_ffcv repository root" >&2; exit 2; }
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_check_out}
t0=$(date +%s)

"$PY" - <<'PYCHECK'
import os, sys, sysconfig, shutil
missing = [m for m in ("torch", "torchvision", "numba", "cv2") if __import__("importlib").util.find_spec(m) is None]
if missing:
    sys.exit(f"error: this Python lacks {', '.join(missing)}; the bundle expects them on the GPU machine")
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    sys.exit("error: Python.h not found (install the python3-dev package): ffcv compiles a C++ extension")
if not (shutil.which("c++") or shutil.which("g++")):
    sys.exit("error: no C++ compiler (c++/g++) on PATH: ffcv compiles a C++ extension")
if not (shutil.which("cc") or shutil.which("gcc")):
    sys.exit("error: no C compiler (cc/gcc) on PATH: rsb_ffcv compiles rsb_ffcv/_jpeg.c")
PYCHECK

if [ "${INSTALL_INTO_CURRENT:-0}" = 1 ]; then
    VPY=$PY
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rsb_ffcv_gpu.XXXXXX")
    "$PY" -m venv --system-site-packages "$WORK/venv"
    VPY="$WORK/venv/bin/python"
    # A venv made from a venv's Python (e.g. /opt/torch/.venv) sees the base interpreter's packages, not that
    # venv's torch: a .pth file adds $PY's own site-packages after the new venv's.
    "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_rsb_ffcv_parent_site.pth"
fi
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$BUNDLE/wheels" PIP_DISABLE_PIP_VERSION_CHECK=1
export PKG_CONFIG_PATH="$BUNDLE/sysroot/pkgconfig" PATH="$BUNDLE/sysroot/bin:$PATH"
export LDFLAGS="-Wl,-rpath,$BUNDLE/sysroot/lib ${LDFLAGS:-}"  # libffcv finds the bundle's libraries at run time
# ...but a RUNPATH serves only libffcv's own needs, not those of the libraries it loads (OpenCV needs libGLX,
# libtbb, ...; seen on an H200 node, 2026-12-04): the loader searches the bundle for every process started here.
export LD_LIBRARY_PATH="$BUNDLE/sysroot/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== installing from $BUNDLE (offline) =="
# What the check needs; pip takes what is installed already and the rest from the bundle. W&B only if the
# bundle has it: the check runs with W&B disabled (rsb_ffcv imports wandb only when logging to it).
NEEDS="fastargs terminaltables assertpy pytorch-pfn-extras tqdm pyyaml psutil matplotlib timm>=1.0.31 safetensors setuptools wheel"
ls "$BUNDLE"/wheels/wandb-* >/dev/null 2>&1 && NEEDS="$NEEDS wandb>=0.17"
"$VPY" -m pip install --quiet $NEEDS
echo "== building ffcv 1.0.2 against the bundle's OpenCV core/imgproc and libjpeg-turbo =="
# --no-deps: ffcv asks for opencv-python, which opencv-python-headless satisfies in fact (cv2), not for pip
"$VPY" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps "$BUNDLE"/sdist/ffcv-1.0.2.tar.gz
"$VPY" -c "import ffcv.libffcv, ffcv.loader; print('ffcv', ffcv.__version__ if hasattr(ffcv, '__version__') else '1.0.2', 'imports')"
echo "== building rsb_ffcv's region JPEG decoder (rsb_ffcv/_jpeg.c) against the bundle's libjpeg =="
"$VPY" setup.py --quiet build_ext --inplace
"$VPY" -c "import rsb_ffcv.crop_decoder; print('rsb_ffcv._jpeg imports')"
echo "== setup took $(( $(date +%s) - t0 )) s =="
if [ "${INSTALL_INTO_CURRENT:-0}" = 1 ]; then
    echo "(other rsb_ffcv runs in this environment need: export LD_LIBRARY_PATH=$BUNDLE/sysroot/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH})"
fi
export WANDB_MODE=disabled WANDB_SILENT=true
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" "$VPY" -m rsb_ffcv.gpu_check --gpu_check.out_dir="$OUT_DIR" "$@"
