"""FFCV image decoders that crop and resize like torchvision, faster than FFCV's own.

FFCV's RandomResizedCrop/CenterCrop decoders decode the full JPEG, then resize with OpenCV's INTER_AREA:
nearly as slow as the decode itself, and nearest-neighbour-like when a small crop is enlarged. These
decoders instead
- sample the crop exactly as torchvision's `RandomResizedCrop.get_params` (10 attempts, then the centre
  fallback), or take timm's eval geometry (resize the shorter side to int(size / crop_pct), centre crop);
- decode the JPEG at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that keeps the crop at least as large
  as the output, so what is left to resize is a shrink below 2x or an enlargement;
- decode only the crop's region (libjpeg-turbo partial decoding, rsb_ffcv/_jpeg.c): rows below it are
  never decoded, rows above it only entropy-decoded, columns outside it skipped; pixel-identical to the
  full decode inside the region;
- resize the crop box with PIL's separable convolution (the algorithm behind torchvision's
  antialias=True and PIL's `resize`): triangle (bilinear) or a=-0.5 cubic (bicubic) filters widened by
  the shrink factor (a float32 intermediate, where PIL rounds to uint8: within 3 levels of torchvision);
- mirror while writing the output (flip probability), so no separate flip stage runs.
Everything is numba code run in parallel over the batch by FFCV's pipeline compiler.

Reproducible crops: each image's draws (box, flip, filter) come from numba's generator seeded with a key of
(seed, rank, epoch, batch number in the epoch, position in the batch) (`seed_epoch`, `image_seed`), not from
whichever decode thread took the image; so a run's crops do not depend on data.num_workers or on scheduling,
and a resumed epoch draws the crops the uninterrupted one would have. (FFCV's stock decoders draw from the
threads' unseeded generators.)
"""
from __future__ import annotations

import ctypes
import hashlib
import math
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from numba import get_num_threads, njit

try:
    from . import _jpeg
except ImportError as e:
    raise ImportError("rsb_ffcv._jpeg, our region JPEG decoder, is not built: reinstall the project "
                      "(`make install`, or `pip install -e .` with libjpeg-dev installed)") from e

_decode_region = ctypes.CDLL(_jpeg.__file__).decode_region
_decode_region.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
_decode_region.restype = ctypes.c_int
_next_batch_key = ctypes.CDLL(_jpeg.__file__).next_batch_key
_next_batch_key.argtypes = [ctypes.c_void_p]
_next_batch_key.restype = ctypes.c_uint64


def decode_region(data, eighths, y0, y1, x0, x1, out, stride, info):
    """Rows [y0, y1), columns [x0, x1) of the JPEG `data` decoded at eighths/8 scale into out (row stride
    `stride` bytes), the rows below y1 never decoded (rsb_ffcv/_jpeg.c). Columns start at the iMCU
    boundary info[0], info[1] wide; info[2:4] is the scaled image size. 0, or -1 if corrupt. (Numba code
    calls _decode_region itself.)"""
    return _decode_region(data.ctypes.data, data.size, eighths, y0, y1, x0, x1, out.ctypes.data, stride,
                          info.ctypes.data)


INTERPOLATIONS = {"bilinear": 0, "bicubic": 1, "random": 2}  # random: per image, as timm's train default
DCT_SCALES = (1, 2, 4, 8)  # eighths; the power-of-two scales have libjpeg-turbo's fastest IDCTs


@njit(cache=True)
def random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    for _ in range(10):
        target_area = area * np.random.uniform(scale_lo, scale_hi)
        aspect = math.exp(np.random.uniform(log_ratio_lo, log_ratio_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return np.random.randint(0, height - h + 1), np.random.randint(0, width - w + 1), h, w
    in_ratio = width / height
    ratio_lo, ratio_hi = math.exp(log_ratio_lo), math.exp(log_ratio_hi)
    if in_ratio < ratio_lo:
        w = width
        h = int(round(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = height
        w = int(round(h * ratio_hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def image_seed(batch_key, ix):
    """A 32-bit seed for image `ix` of the batch whose key is `batch_key` (numba's np.random.seed takes 32 bits)."""
    x = (batch_key + np.uint64(ix) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
    return np.uint32((x ^ (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF))


@njit(cache=True)
def center_box(height, width, size, crop_ratio):
    """timm's eval transform as a box in image coordinates: Resize(int(size / crop_ratio)) of the
    shorter side (torchvision rounds the longer side down), then CenterCrop(size)."""
    short = int(math.floor(size / crop_ratio))
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rh, rw = short, int(short * width / height)
    top = int(round((rh - size) / 2.0))
    left = int(round((rw - size) / 2.0))
    sy, sx = height / rh, width / rw
    return top * sy, left * sx, size * sy, size * sx


@njit(cache=True)
def dct_eighths(box_h, box_w, out_h, out_w, scales):
    """Smallest k/8 (k from `scales`, ascending) with the scaled box still >= the output in both sides."""
    for k in scales:
        if box_h * k >= 8 * out_h and box_w * k >= 8 * out_w:
            return k
    return 8


@njit(fastmath=True, cache=True)
def _filter(x, cubic):
    x = abs(x)
    if cubic:
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0
    return 1.0 - x if x < 1.0 else 0.0


@njit(fastmath=True, cache=True)
def coefficients(start, length, out_size, lo, hi, cubic):
    """PIL's precompute_coeffs for the box [start, start + length) resampled to out_size pixels, taps
    limited to [lo, hi). Returns (first tap index per output pixel, taps per pixel, weights)."""
    scale = length / out_size
    filterscale = max(scale, 1.0)
    support = (2.0 if cubic else 1.0) * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int32)
    count = np.zeros(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.float32)
    for i in range(out_size):
        center = start + (i + 0.5) * scale
        x0 = max(int(center - support + 0.5), lo)
        x1 = min(int(center + support + 0.5), hi)
        total = 0.0
        n = 0
        for x in range(x0, x1):
            if n == ksize:
                break
            w = _filter((x - center + 0.5) / filterscale, cubic)
            weights[i, n] = w
            total += w
            n += 1
        if total != 0.0:
            for t in range(n):
                weights[i, t] /= total
        first[i] = x0
        count[i] = n
    return first, count, weights


@njit(cache=True)
def scratch_size(width, out_h):
    return (width + 8) * (out_h * 3 + 3)


@njit(fastmath=True, cache=True)
def resize_box(src, y0, x0, bh, bw, clamp_to_box, cubic, flip, dst, scratch):
    """Resample the box (y0, x0, bh, bw) of src (H x W x 3 uint8, float box) into dst (h x w x 3),
    mirrored if flip. Taps stay inside the box (torchvision's resized_crop) or the image (PIL resize
    of the whole image, then crop: timm's eval). scratch: float32, at least scratch_size(W, h) values
    (reused across calls: allocating it per image halves the speed of parallel decoding)."""
    resize_rows(src.reshape(src.shape[0], src.shape[1] * 3), src.shape[1], y0, x0, bh, bw, clamp_to_box, cubic,
                flip, dst, scratch)


@njit(fastmath=True, cache=True)
def resize_rows(rows, width, y0, x0, bh, bw, clamp_to_box, cubic, flip, dst, scratch):
    """resize_box on an image given as rows (H x stride uint8, stride >= 3 * width): a decoded region.

    Vertical pass first, stored transposed, so both passes run over contiguous memory (SIMD).
    """
    height = rows.shape[0]
    out_h, out_w = dst.shape[0], dst.shape[1]
    if clamp_to_box:
        ylo, yhi = int(math.floor(y0 + 1e-6)), min(int(math.ceil(y0 + bh - 1e-6)), height)
        xlo, xhi = int(math.floor(x0 + 1e-6)), min(int(math.ceil(x0 + bw - 1e-6)), width)
    else:
        ylo, yhi, xlo, xhi = 0, height, 0, width
    xf, xn, xw = coefficients(x0, bw, out_w, xlo, xhi, cubic)
    yf, yn, yw = coefficients(y0, bh, out_h, ylo, yhi, cubic)
    c0 = xf[0]
    n = (xf[out_w - 1] + xn[out_w - 1] - c0) * 3  # floats per row of the columns the taps read
    m = out_h * 3
    cols = scratch[:(n // 3) * m].reshape(n // 3, m)  # vertical pass output, transposed
    line = scratch[(n // 3) * m:(n // 3) * m + n]
    # (Inner loops run over slices: that lets LLVM vectorise them, ~10x faster than offset indexing.)
    for j in range(out_h):
        for q in range(n):
            line[q] = 0
        for t in range(yn[j]):
            w = yw[j, t]
            r = rows[yf[j] + t, c0 * 3:c0 * 3 + n]
            for q in range(n):
                line[q] += w * np.float32(r[q])
        for x in range(n // 3):
            cols[x, 3 * j] = line[3 * x]
            cols[x, 3 * j + 1] = line[3 * x + 1]
            cols[x, 3 * j + 2] = line[3 * x + 2]
    acc = np.empty(m, np.float32)
    for i in range(out_w):
        for q in range(m):
            acc[q] = 0
        for t in range(xn[i]):
            w = xw[i, t]
            col = cols[xf[i] + t - c0]
            for q in range(m):
                acc[q] += w * col[q]
        for q in range(m):
            acc[q] = min(max(acc[q] + np.float32(0.5), np.float32(0)), np.float32(255))
        o = out_w - 1 - i if flip else i
        for j in range(out_h):
            dst[j, o, 0] = np.uint8(acc[3 * j])
            dst[j, o, 1] = np.uint8(acc[3 * j + 1])
            dst[j, o, 2] = np.uint8(acc[3 * j + 2])


@njit
def decode_resize(data, height, width, y0, x0, bh, bw, clamp_to_box, cubic, flip, scales, whole, buf, info, dst,
                  scratch):
    """resize_box of the JPEG `data` (height x width): decoded at the smallest DCT scale in `scales` that
    keeps the box at least dst's size, and only the region the resize reads (whole: the whole image, the
    reference). buf: at least height * width * 3 bytes; info: 4 int32. Returns 0, or -1 if corrupt."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    k = dct_eighths(bh, bw, out_h, out_w, scales)
    f = k / 8.0
    y0, x0, bh, bw = y0 * f, x0 * f, bh * f, bw * f
    sh, sw = (height * k + 7) // 8, (width * k + 7) // 8
    # The region: the box, plus the filter's reach where taps may leave it (a resize of the whole image,
    # as timm's eval), plus a pixel, as chroma upsampling at a region's edge differs from a full decode.
    py = px = 1
    if not clamp_to_box:
        py = int(2.0 * max(bh / out_h, 1.0)) + 3
        px = int(2.0 * max(bw / out_w, 1.0)) + 3
    ry0, ry1 = max(int(math.floor(y0)) - py, 0), min(int(math.ceil(y0 + bh)) + py, sh)
    rx0, rx1 = max(int(math.floor(x0)) - px, 0), min(int(math.ceil(x0 + bw)) + px, sw)
    if whole:
        ry0, ry1, rx0, rx1 = 0, sh, 0, sw
    if _decode_region(data.ctypes.data, data.size, k, ry0, ry1, rx0, rx1, buf.ctypes.data, sw * 3,
                      info.ctypes.data) != 0:
        return -1
    rows = buf[:(ry1 - ry0) * sw * 3].reshape(ry1 - ry0, sw * 3)
    resize_rows(rows, info[1], y0 - ry0, x0 - info[0], bh, bw, clamp_to_box, cubic, flip, dst, scratch)
    return 0


class _CropResizeDecoder(SimpleRGBImageDecoder):
    """Shared plumbing: the output and decode buffers, the decode loop; subclasses pick the box.
    (A SimpleRGBImageDecoder subclass because FFCV only accepts those as an RGB field's decoder.)"""

    random_crop = True

    def __init__(self, output_size, interpolation: str, dct_scales=DCT_SCALES, region_decode: bool = True):
        super().__init__()
        self.region_decode = region_decode
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {interpolation!r}")
        self.output_size = tuple(output_size)
        self.interpolation = interpolation
        self.dct_scales = np.array(sorted(dct_scales), dtype=np.int64)
        self.random_key = np.zeros(2, np.uint64)  # [key of (seed, rank, epoch), next batch]: read by the compiled code

    def seed_epoch(self, seed: int, rank: int, epoch: int, first_batch: int = 0) -> None:
        """Key the next epoch's crops (call before it starts; first_batch > 0: a resumed epoch's first batch)."""
        self.random_key[:] = [int.from_bytes(hashlib.blake2b(f"{seed}/{rank}/{epoch}".encode(), digest_size=8)
                                             .digest(), "little"), first_batch]

    def declare_state_and_memory(self, previous_state: State):
        self.max_height = int(self.metadata["height"].max())
        self.max_width = int(self.metadata["width"].max())
        out = (*self.output_size, 3)
        u8 = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=out, dtype=u8), AllocationQuery(out, u8)

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        is_random = self.random_crop
        params = self.box_params()
        interp = INTERPOLATIONS[self.interpolation]
        scales = self.dct_scales
        whole = not self.region_decode
        key_address = np.uint64(self.random_key.ctypes.data)  # the array lives as long as this decoder
        # A dispatcher per decoder: one shared by two FFCV loaders failed in numba 0.68 with a KeyError from
        # its overload table when the second compiled it (the bug behind the finalizer KeyError at exit).
        decode_resize_c = njit(decode_resize.py_func)

        max_height, max_width = self.max_height, self.max_width

        def decode(batch_indices, destination, metadata, storage_state):
            out_h = destination.shape[1]
            n = len(batch_indices)
            # Decode and resize buffers per worker, not per image: reused, they stay in the core's cache
            # (a decode buffer per image measured 1.25x slower; allocating buffers per image, 2x).
            # Worker w takes images w, w + workers, ...
            workers = max(1, min(get_num_threads(), n))
            decoded = np.empty((workers, max_height * max_width * 3), np.uint8)
            scratch = np.empty((workers, scratch_size(max_width, out_h)), np.float32)
            info = np.empty((workers, 4), np.int32)
            batch_key = _next_batch_key(key_address) if is_random else np.uint64(0)
            for worker in my_range(workers):
                for ix in range(worker, n, workers):
                    field = metadata[batch_indices[ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.int64(field["height"]), np.int64(field["width"])
                    if is_random:
                        np.random.seed(image_seed(batch_key, ix))  # this thread's generator, for this image
                        top, left, h, w = random_crop(height, width, params[0], params[1], params[2], params[3])
                        y0, x0, bh, bw = float(top), float(left), float(h), float(w)
                        flip = np.random.random() < params[4]
                        cubic = interp == 1 or (interp == 2 and np.random.random() < 0.5)
                    else:
                        y0, x0, bh, bw = center_box(height, width, out_h, params[0])
                        flip = False
                        cubic = interp == 1
                    if field["mode"] == jpg:
                        if decode_resize_c(data, height, width, y0, x0, bh, bw, is_random, cubic, flip, scales, whole,
                                         decoded[worker], info[worker], destination[ix], scratch[worker]) != 0:
                            destination[ix] = 0  # a corrupt JPEG (the writer checked it: a damaged file)
                    else:
                        resize_rows(data.reshape(height, width * 3), width, y0, x0, bh, bw, is_random, cubic, flip,
                                    destination[ix], scratch[worker])
            return destination[:n]

        decode.is_parallel = True
        return decode


class RandomResizedCropDecoder(_CropResizeDecoder):
    """torchvision's RandomResizedCrop(output_size, scale, ratio, interpolation, antialias=True) plus a
    horizontal flip with probability flip_prob, decoded at reduced DCT scale where the crop allows, and
    only the crop's region (region_decode=False: the whole image, pixel-identical, for comparisons)."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                 flip_prob: float = 0.5, dct_scales=DCT_SCALES, region_decode: bool = True):
        super().__init__(output_size, interpolation, dct_scales, region_decode)
        self.scale, self.ratio, self.flip_prob = scale, ratio, flip_prob

    def box_params(self):
        return np.array([self.scale[0], self.scale[1], math.log(self.ratio[0]), math.log(self.ratio[1]),
                         self.flip_prob], dtype=np.float64)


class CenterCropDecoder(_CropResizeDecoder):
    """timm's eval transform: Resize(int(size / crop_ratio), interpolation) then CenterCrop(size)."""

    random_crop = False

    def __init__(self, output_size, crop_ratio: float = 0.95, interpolation="bicubic", dct_scales=DCT_SCALES,
                 region_decode: bool = True):
        if output_size[0] != output_size[1]:
            raise ValueError("CenterCropDecoder makes square crops")
        if interpolation == "random":
            raise ValueError("evaluation needs a fixed interpolation: bilinear or bicubic")
        super().__init__(output_size, interpolation, dct_scales, region_decode)
        self.crop_ratio = crop_ratio

    def box_params(self):
        return np.array([self.crop_ratio], dtype=np.float64)
