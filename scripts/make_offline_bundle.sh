#!/usr/bin/env bash
# Collect what a CUDA machine without internet needs to run rsb_ffcv's GPU check, given that it already has
# Python >= 3.11 with PyTorch, torchvision, numba, opencv-python(-headless), a C/C++ compiler:
#   wheels/   the missing pure-Python dependencies (fastargs, terminaltables, assertpy, pytorch-pfn-extras, ...)
#   sdist/    ffcv-1.0.2.tar.gz (built on the GPU machine by scripts/gpu_check.sh)
#   sysroot/  OpenCV core+imgproc and libjpeg-turbo (TurboJPEG and libjpeg APIs) headers and stripped shared
#             libraries, unpacked from Debian packages (apt-get download + dpkg -x), plus
#             pkgconfig/{opencv4,libturbojpeg,libjpeg}.pc covering only what ffcv and rsb_ffcv/_jpeg.c
#             link, and a pkg-config stand-in for machines without one.
# Run on a connected Debian/Ubuntu machine (x86-64):
#   scripts/make_offline_bundle.sh [--lean | --have FREEZE.txt] [OUT_DIR] [PY_VERSION]
#   --lean          ship only what the GPU machines of this project lack (they have torch, torchvision,
#                   numba, opencv-python-headless, pillow, matplotlib, pyyaml, tqdm, psutil, safetensors,
#                   huggingface-hub, setuptools, scipy; timm 1.0.29, so timm >= 1.0.31 goes along): no W&B
#                   (the check runs without it), about 33 MB
#   --have FILE     ship the full set minus the packages in FILE (the target's `pip freeze`), except those it
#                   has in too old a version (timm < 1.0.31)
#   (neither)       the full set, W&B included, for a bare Python with torch
# Then copy OUT_DIR and this repository to the GPU machine and run scripts/gpu_check.sh OUT_DIR.
set -euo pipefail
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
LEAN=0 HAVE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --lean) LEAN=1; shift ;;
        --have) HAVE=$(realpath "$2"); shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ -z "$HAVE" ] || [ -f "$HAVE" ] || { echo "error: --have '$HAVE': no such file (give the target's pip freeze)" >&2; exit 2; }
OUT=$(realpath -m "${1:-offline_bundle}")
PY=${2:-3.12}
PIP=${PIP:-python3 -m pip}
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"/{wheels,sdist,debs,sysroot}
cd "$OUT.tmp"

echo "== wheels for Python $PY (manylinux x86-64) =="
# Pure-Python packages published only as sdists: build their (platform-independent) wheels here.
$PIP wheel --quiet --no-deps --wheel-dir wheels fastargs terminaltables assertpy
if [ "$LEAN" = 1 ]; then
    # The one other thing ffcv needs that those machines lack; its own needs (numpy, packaging, torch,
    # typing-extensions) are there. timm >= 1.0.31 for its foreach Lamb (the machines' 1.0.29 updates tensor by
    # tensor: measured on an H200, 2026-12-04); its needs are there too.
    $PIP download --quiet --dest wheels --only-binary=:all: --no-deps pytorch-pfn-extras "timm>=1.0.31"
else
    # The rest as binary wheels for the GPU machine's Python; timm (and matplotlib for the charts) in case it
    # lacks them: pip there installs only what is missing. timm goes without its deps (torch is there).
    $PIP download --quiet --dest wheels --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any \
        pytorch-pfn-extras "wandb>=0.17" tqdm pyyaml psutil matplotlib safetensors huggingface_hub setuptools wheel
    $PIP download --quiet --dest wheels --only-binary=:all: --no-deps "timm>=1.0.31"
    # torch and friends are on the GPU machine already: never ship them.
    rm -f wheels/torch-* wheels/torchvision-* wheels/nvidia_* wheels/triton-* wheels/numpy-* wheels/sympy-* \
          wheels/networkx-* wheels/mpmath-* wheels/jinja2-* wheels/MarkupSafe-* wheels/cuda_* wheels/pillow-*
fi
if [ -n "$HAVE" ]; then  # drop what the target has: wheel names are normalised project names
    python3 - "$HAVE" wheels <<'PYHAVE'
import re, sys
from pathlib import Path
FLOORS = {"timm": (1, 0, 31)}  # what rsb_ffcv needs at least: an older copy on the target does not count
norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()
version = lambda v: tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
have = {}  # name -> the frozen version, or None
for line in map(str.strip, open(sys.argv[1])):
    if line and not line.startswith(("#", "-")):
        pinned = re.search(r"==\s*([^\s;]+)", line)
        have[norm(re.split(r"[=<>@ ;\[]", line, maxsplit=1)[0])] = pinned.group(1) if pinned else None
for wheel in Path(sys.argv[2]).glob("*.whl"):
    name = norm(wheel.name.split("-")[0])
    too_old = name in FLOORS and have.get(name) is not None and version(have[name]) < FLOORS[name]
    if name in have and not too_old:
        wheel.unlink()
PYHAVE
fi

echo "== ffcv sdist =="
$PIP download --quiet --dest sdist --no-deps --no-binary :all: ffcv==1.0.2

echo "== OpenCV core/imgproc + libjpeg-turbo from Debian packages =="
PKGS="libopencv-core-dev libopencv-imgproc-dev libopencv-core406 libopencv-imgproc406 libturbojpeg0
      libturbojpeg0-dev libjpeg62-turbo libjpeg62-turbo-dev libtbb12 libblas3 liblapack3 libgfortran5
      libquadmath0 libglx0 libglvnd0 libx11-6 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0"
(cd debs && apt-get download $PKGS >/dev/null)
for deb in debs/*.deb; do dpkg -x "$deb" sysroot/full; done
ML=usr/lib/x86_64-linux-gnu
mkdir -p sysroot/include/opencv4/opencv2 sysroot/lib sysroot/pkgconfig sysroot/bin
cp -a sysroot/full/usr/include/{turbojpeg,jpeglib,jmorecfg,jerror}.h sysroot/full/usr/include/x86_64-linux-gnu/jconfig.h \
      sysroot/include/
cp -a sysroot/full/usr/include/opencv4/opencv2/{core,imgproc,core.hpp,imgproc.hpp,opencv.hpp} \
      sysroot/include/opencv4/opencv2/
# opencv.hpp includes every module listed here: list only the two we ship.
printf '#ifndef OPENCV_MODULES_HPP\n#define OPENCV_MODULES_HPP\n#define HAVE_OPENCV_CORE\n#define HAVE_OPENCV_IMGPROC\n#endif\n' \
    > sysroot/include/opencv4/opencv2/opencv_modules.hpp
# (only -I/-L/-l tokens: ffcv's setup.py maps nothing else; gpu_check.sh sets the rpath via LDFLAGS.)
# Shared libraries that are not part of a typical CUDA image (glibc, libstdc++, libgcc, zlib are).
for lib in libopencv_core libopencv_imgproc libturbojpeg libjpeg libtbb libblas liblapack libgfortran libquadmath \
           libGLX libGLdispatch libX11 libxcb libXau libXdmcp libbsd libmd; do
    cp -a sysroot/full/$ML/$lib.so* sysroot/lib/ 2>/dev/null || cp -a sysroot/full/$ML/*/$lib.so* sysroot/lib/ 2>/dev/null || true
done
# Debian routes BLAS/LAPACK through alternatives directories: bring the real files up.
find sysroot/full -name 'libblas.so.3*' -o -name 'liblapack.so.3*' | xargs -r -I{} cp -L {} sysroot/lib/
for lib in libopencv_core libopencv_imgproc libturbojpeg libjpeg; do
    ls sysroot/lib/$lib.so* >/dev/null || { echo "missing $lib in the Debian packages" >&2; exit 1; }
done
rm -rf sysroot/full
# Debug symbols are most of these libraries' size; the loader does not need them.
if command -v strip >/dev/null; then
    find sysroot/lib -name '*.so*' -type f -exec strip --strip-unneeded {} +
fi
cat > sysroot/pkgconfig/opencv4.pc <<'PC'
prefix=${pcfiledir}/..
includedir=${prefix}/include/opencv4
libdir=${prefix}/lib
Name: OpenCV (core + imgproc only)
Description: the OpenCV modules ffcv links
Version: 4.6.0
Cflags: -I${includedir}
Libs: -L${libdir} -lopencv_imgproc -lopencv_core
PC
cat > sysroot/pkgconfig/libturbojpeg.pc <<'PC'
prefix=${pcfiledir}/..
includedir=${prefix}/include
libdir=${prefix}/lib
Name: libturbojpeg
Description: TurboJPEG API of libjpeg-turbo
Version: 2.1.5
Cflags: -I${includedir}
Libs: -L${libdir} -lturbojpeg
PC
cat > sysroot/pkgconfig/libjpeg.pc <<'PC'
prefix=${pcfiledir}/..
includedir=${prefix}/include
libdir=${prefix}/lib
Name: libjpeg
Description: libjpeg API of libjpeg-turbo (rsb_ffcv/_jpeg.c)
Version: 2.1.5
Cflags: -I${includedir}
Libs: -L${libdir} -ljpeg
PC
cp "$SCRIPTS/pkg_config_standin.py" sysroot/bin/pkg-config
chmod +x sysroot/bin/pkg-config
rm -rf debs
cd /
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "== bundle $OUT: $(du -sh "$OUT" | cut -f1) =="
du -sh "$OUT"/* | sed 's/^/  /'
