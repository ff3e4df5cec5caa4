"""Batched, per-sample RandAugment equal to timm's `rand-mM-mstdS-inc1` (timm `RandAugment` + `AugmentOp`).

Every image draws its own ops (uniformly, with replacement, from the 15 increasing transforms), its own apply
decisions (prob p), magnitudes (N(m, mstd) clipped to [0, mmax]) and signs, like timm's PIL code does image by
image, but the work is vectorised, in one of two ways that give the same images to the bit (eager;
tests/test_randaugment.py): `grouped`, per layer the batch is grouped by op kind (one host sync per forward
reads the group sizes of every layer), then one pass per colour op and one fused affine resample per
resampling filter for all geometric ops; or `masked`, every op over the whole batch, each image keeping its
own result (no host sync, the same launches whatever the draw; compilable as one graph). interpolation=random
draws bilinear or bicubic per image and geometric op, as timm's train.py default did
(`_RANDOM_INTERPOLATION`). Colour ops follow PIL's integer definitions (ImageOps lookup tables, ImageEnhance's
float32 blend with truncation, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, SMOOTH kernel with untouched
borders); geometry follows PIL's affine convention (pixel centres at +0.5, matrices mapping output to input,
fill outside the image). Measured against timm's PIL ops (tests/test_randaugment.py): colour ops and nearest
geometry pixel-exact, bilinear exact but for a few Rotate pixels (±1), bicubic within ±1 (MAE ≤ 0.017).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]  # timm's _RAND_INCREASING_TRANSFORMS, in order
FILL = (124, 116, 104)  # timm: round(255 * IMAGENET_DEFAULT_MEAN)
LEVEL_DENOM = 10.0
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "random")  # random: bilinear or bicubic per image and op

def parse_config(config_str: str) -> dict:
    """timm's `rand-...` keys: m (magnitude), n (layers), p (prob), mstd, mmax, inc."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config '{config_str}' must start with 'rand'")
    cfg = {"m": 10.0, "n": 2, "p": 0.5, "mstd": 0.0, "mmax": LEVEL_DENOM, "inc": False}
    for part in parts[1:]:
        key, val = (re.split(r"(\d.*)", part) + [""])[:2]
        if key == "mstd":
            cfg["mstd"] = float("inf") if float(val) > 100 else float(val)
        elif key in ("m", "mmax"):
            cfg[key] = float(int(val))
        elif key == "n":
            cfg["n"] = int(val)
        elif key == "p":
            cfg["p"] = float(val)
        elif key == "inc":
            cfg["inc"] = bool(int(val))
        else:
            raise ValueError(f"RandAugment config '{config_str}': unknown section '{part}'")
    if not cfg["inc"]:
        raise ValueError(f"RandAugment config '{config_str}': only the increasing op set (inc1) is implemented")
    return cfg


# ---- colour ops: uint8 (b, 3, H, W) in, uint8 out; per-sample arguments as (b,) tensors ------------------

def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x (b,3,H,W) uint8, lut (b,3,256) → lut[b, c, x[b, c]]."""
    b, c, h, w = x.shape
    return torch.gather(lut.to(torch.uint8), 2, x.reshape(b, c, h * w).long()).reshape(b, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    return hist.reshape(b, c, 256)


def auto_contrast_lut(x: torch.Tensor) -> torch.Tensor:
    """The (b,3,256) table of PIL ImageOps.autocontrast (cutoff 0), per channel."""
    # int32: torch.compile's CPU code returns 0 for uint8 amin over >= 16 values (pytorch/pytorch#191499, torch 2.14)
    flat = x.reshape(*x.shape[:2], -1).int()
    lo, hi = flat.amin(-1).double(), flat.amax(-1).double()
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    # tensor / tensor: `255.0 / t` is computed as 255 * (1 / t) in torch, which rounds differently from PIL
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    lut = torch.trunc(ix * scale[..., None] + (-lo * scale)[..., None]).clamp(0, 255)
    return torch.where((hi > lo)[..., None], lut, ix)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, auto_contrast_lut(x))


def equalize_lut(x: torch.Tensor) -> torch.Tensor:
    """The (b,3,256) table of PIL ImageOps.equalize, per channel."""
    h = _histogram(x)
    ix = torch.arange(256, device=x.device)
    last_nonzero = torch.where(h > 0, ix, -1).amax(-1, keepdim=True)
    step = (h.sum(-1, keepdim=True) - h.gather(-1, last_nonzero)) // 255
    before = torch.cumsum(h, -1) - h  # n before adding h[i]
    lut = (step // 2 + before) // step.clamp(min=1)
    return torch.where(step > 0, lut.clamp(max=255), ix)


def equalize(x: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, equalize_lut(x))


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = (255 - (2 ** (8 - bits) - 1)).to(torch.uint8)  # keep the top `bits` bits
    return x & mask.view(-1, 1, 1, 1)


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    t = thresh.view(-1, 1, 1, 1)
    return torch.where(x.int() < t, x, 255 - x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    xi = x.int()
    return torch.where(xi < thresh, (xi + add.view(-1, 1, 1, 1)).clamp(max=255), xi).to(torch.uint8)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, image, factor): float32 arithmetic, truncated, clipped."""
    a = factor.float().view(-1, 1, 1, 1)
    d = degenerate.float()
    out = d + a * (x.float() - d)
    return torch.trunc(out).clamp(0, 255).to(torch.uint8)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as (b,1,H,W) int."""
    xi = x.int()
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16


def color(x, factor):
    return blend(grayscale(x).expand_as(x), x, factor)


def _grey_mean(x):
    return torch.floor(grayscale(x).double().mean(dim=(1, 2, 3)) + 0.5).view(-1, 1, 1, 1)  # int(mean + 0.5)


def contrast(x, factor):
    return blend(_grey_mean(x).expand_as(x), x, factor)


def contrast_lut(x, factor):
    """Contrast blends every value with one per-image constant: a (b,3,256) table."""
    ramp = _ramp(x)
    return blend(_grey_mean(x).expand_as(ramp), ramp, factor).view(x.shape[0], 3, 256)


def brightness(x, factor):
    return blend(torch.zeros_like(x), x, factor)


_CONSTANTS: dict = {}


def constants(device) -> dict:
    """Constant tensors, made once per device (a copy from the host each call would wait for the GPU)."""
    device = torch.device(device)
    if device not in _CONSTANTS:
        smooth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's SMOOTH
        _CONSTANTS[device] = {"smooth": smooth.to(device), "fill": torch.tensor(FILL, dtype=torch.uint8).to(device),
                              "ramp": torch.arange(256, dtype=torch.uint8).to(device)}
    return _CONSTANTS[device]


def _ramp(x: torch.Tensor) -> torch.Tensor:
    """Every uint8 value once per image and channel, (b,3,1,256): a pointwise op applied to it is its table."""
    return constants(x.device)["ramp"].view(1, 1, 1, 256).expand(x.shape[0], 3, 1, 256)


def pointwise_lut(op):
    """(x, arg) → the (b,3,256) table of a colour op that maps each value on its own (op applied to the ramp)."""
    return lambda x, arg: op(_ramp(x), arg).reshape(x.shape[0], 3, 256)


def sharpness(x, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (rounded, borders untouched)."""
    c = x.shape[1]
    k = constants(x.device)["smooth"].expand(c, 1, 3, 3)
    smooth = F.conv2d(x.float(), k, groups=c)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp(0, 255).to(torch.uint8)
    return blend(degenerate, x, factor)


# ---- geometry: PIL affine matrices (output pixel → input coordinate) ---------------------------------------

def _identity(level: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(level.shape[0], 2, 3, dtype=torch.float64, device=level.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    return m


def shear_x(v, width, height):
    m = _identity(v)
    m[:, 0, 1] = v
    return m


def shear_y(v, width, height):
    m = _identity(v)
    m[:, 1, 0] = v
    return m


def translate_x_rel(v, width, height):
    m = _identity(v)
    m[:, 0, 2] = v * width
    return m


def translate_y_rel(v, width, height):
    m = _identity(v)
    m[:, 1, 2] = v * height
    return m


def rotate(v, width, height):
    """PIL's Image.rotate about (w/2, h/2), expand=False."""
    m = _identity(v)
    angle = -torch.deg2rad(v)
    cos = torch.round(torch.cos(angle) * 1e15) / 1e15
    sin = torch.round(torch.sin(angle) * 1e15) / 1e15
    cx, cy = width / 2.0, height / 2.0
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
    m[:, 0, 2] = cos * -cx + sin * -cy + cx
    m[:, 1, 2] = -sin * -cx + cos * -cy + cy
    return m


def _source_coords(mats: torch.Tensor, h: int, w: int, mode: str):
    """Input coordinates (x, y) of every output pixel, as PIL's affine engines compute them: 16.16 fixed
    point for nearest with rotation/shear, floating point (pixel centres at +0.5) otherwise."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=mats.device),
                            torch.arange(w, dtype=torch.float64, device=mats.device), indexing="ij")
    xs, ys = xs.reshape(1, -1), ys.reshape(1, -1)
    a = [mats[:, i // 3, i % 3].view(-1, 1) for i in range(6)]
    if mode == "nearest":
        fixed = lambda v: torch.floor(v * 65536.0 + 0.5).long()  # noqa: E731  (PIL's FIX)
        rot = (a[1] != 0) | (a[3] != 0)
        x_fix = (fixed(a[2] + a[0] * 0.5 + a[1] * 0.5) + ys.long() * fixed(a[1]) + xs.long() * fixed(a[0])) >> 16
        y_fix = (fixed(a[5] + a[3] * 0.5 + a[4] * 0.5) + ys.long() * fixed(a[4]) + xs.long() * fixed(a[3])) >> 16
        x_flt = torch.floor(a[2] + a[0] * (xs + 0.5)).long()  # PIL's scale/translate path
        y_flt = torch.floor(a[5] + a[4] * (ys + 0.5)).long()
        return torch.where(rot, x_fix, x_flt), torch.where(rot, y_fix, y_flt)
    xin, yin = xs + 0.5, ys + 0.5
    return a[0] * xin + a[1] * yin + a[2], a[3] * xin + a[4] * yin + a[5]


def _cubic_weights(d: torch.Tensor) -> list[torch.Tensor]:
    """Weights of PIL's BICUBIC polynomial (Geometry.c: v = p1 + d(p2 + d(p3 + d p4)), a = -1) for the
    neighbours at offsets -1, 0, 1, 2."""
    d2, d3 = d * d, d * d * d
    return [-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3]


def warp(x: torch.Tensor, mats: torch.Tensor, mode: str, fill=FILL, bicubic: torch.Tensor | None = None):
    """Resample uint8 images exactly as PIL's Image.transform(AFFINE) does: output pixel (i, j) reads the
    input at M · (j + 0.5, i + 0.5, 1); sample points outside the input get `fill`; bilinear/bicubic clamp
    neighbours to the edge and truncate (bilinear in float64 as PIL: exact; bicubic as float32 weights:
    within one level of PIL and several times faster). mode "random": bicubic where the (b,) mask `bicubic`
    is set, else bilinear."""
    b, c, h, w = x.shape
    sx, sy = _source_coords(mats, h, w, mode)
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # whole RGB pixels: one index per neighbour
    base = (torch.arange(b, device=x.device) * (h * w)).view(b, 1)
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(-1)
    if mode == "nearest":
        out = pixels.index_select(0, (base + sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).flatten())
        out = out.view(b, h * w, c)
    else:
        xin, yin = sx - 0.5, sy - 0.5
        x0, y0 = torch.floor(xin), torch.floor(yin)
        dx, dy = (xin - x0).unsqueeze(-1), (yin - y0).unsqueeze(-1)
        x0, y0 = x0.long(), y0.long()
        offsets = (-1, 0, 1, 2)  # neighbours clamped to the edge
        rows = {r: base + (y0 + r).clamp(0, h - 1) * w for r in offsets}
        cols = {k: (x0 + k).clamp(0, w - 1) for k in offsets}

        def near(r, k):  # (b, h*w, c) values of one neighbour
            return pixels.index_select(0, (rows[r] + cols[k]).flatten()).view(b, h * w, c).float()
        if mode in ("bilinear", "random"):  # PIL's form, in float64: exact
            lines = []
            for r in (0, 1):
                v1, v2 = near(r, 0).double(), near(r, 1).double()
                lines.append(v1 + (v2 - v1) * dx)
            v = lines[0] + (lines[1] - lines[0]) * dy
        if mode in ("bicubic", "random"):  # PIL's cubic as weights, in float32
            wx, wy = _cubic_weights(dx.float()), _cubic_weights(dy.float())
            cubic = 0
            for r, wr in zip(offsets, wy):
                cubic = cubic + wr * sum(wk * near(r, k) for wk, k in zip(wx, offsets))
            v = cubic if mode == "bicubic" else torch.where(bicubic.view(b, 1, 1), cubic.double(), v)
        out = torch.trunc(v.clamp(0, 255)).to(torch.uint8)  # PIL truncates
    fill_t = constants(x.device)["fill"] if tuple(fill) == FILL else \
        torch.tensor(fill, dtype=torch.uint8).to(x.device)
    out = torch.where(inside, out, fill_t.view(1, 1, c))  # (b, h*w, c)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


# ---- one table per concept, as timm's NAME_TO_OP / LEVEL_TO_ARG ---------------------------------------------

def _enhance_increasing(lv, sign, hp):
    return (1.0 + sign * lv * 0.9).clamp(min=0.1)


LEVEL_TO_ARG = {  # timm's level → argument maps, on (b,) tensors: lv = magnitude / 10, sign = ±1
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda lv, sign, hp: lv * 30.0 * sign,
    "PosterizeIncreasing": lambda lv, sign, hp: 4 - torch.trunc(lv * 4).long(),
    "SolarizeIncreasing": lambda lv, sign, hp: 256 - torch.trunc(lv * 256).clamp(max=256).long(),
    "SolarizeAdd": lambda lv, sign, hp: torch.trunc(lv * 110).clamp(max=128).long(),
    "ColorIncreasing": _enhance_increasing, "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing, "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda lv, sign, hp: lv * 0.3 * sign, "ShearY": lambda lv, sign, hp: lv * 0.3 * sign,
    "TranslateXRel": lambda lv, sign, hp: lv * hp["translate_pct"] * sign,
    "TranslateYRel": lambda lv, sign, hp: lv * hp["translate_pct"] * sign,
}
NAME_TO_OP = {  # colour ops: uint8 (b,3,H,W) and (b,) arguments → uint8
    "AutoContrast": lambda x, arg: auto_contrast(x), "Equalize": lambda x, arg: equalize(x),
    "Invert": lambda x, arg: 255 - x, "PosterizeIncreasing": posterize, "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add, "ColorIncreasing": color, "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness, "SharpnessIncreasing": sharpness,
}
NAME_TO_AFFINE = {  # geometric ops: (b,) arguments → (b,2,3) PIL affine matrices, resampled together
    "Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y, "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}
def affine_matrices(op: torch.Tensor, lv: torch.Tensor, sign: torch.Tensor, width: int, height: int,
                    hparams: dict) -> torch.Tensor:
    """(b,2,3) PIL matrices of each image's geometric op (`op`: indices into OPS); the identity for the others."""
    mats = _identity(lv)
    for name, affine in NAME_TO_AFFINE.items():
        m = affine(LEVEL_TO_ARG[name](lv, sign, hparams), width, height)
        mats = torch.where((op == OPS.index(name)).view(-1, 1, 1), m, mats)
    return mats


NAME_TO_LUT = {  # the colour ops that map values through a per-image table: (x, arg) → (b,3,256)
    "AutoContrast": lambda x, arg: auto_contrast_lut(x), "Equalize": lambda x, arg: equalize_lut(x),
    "Invert": pointwise_lut(NAME_TO_OP["Invert"]), "PosterizeIncreasing": pointwise_lut(posterize),
    "SolarizeIncreasing": pointwise_lut(solarize), "SolarizeAdd": pointwise_lut(solarize_add),
    "BrightnessIncreasing": pointwise_lut(brightness), "ContrastIncreasing": contrast_lut,
}
assert set(NAME_TO_OP) | set(NAME_TO_AFFINE) == set(OPS) == set(LEVEL_TO_ARG) and set(NAME_TO_LUT) <= set(NAME_TO_OP)
BATCHINGS = ("grouped", "masked")


# ---- the module --------------------------------------------------------------------------------------------

class RandAugment(torch.nn.Module):
    """RandAugment from a timm config string, on uint8 N×3×H×W batches (contiguous or channels-last), any
    device. Returns a new batch in the same layout and dtype (the input is never written). Randomness from
    `generator` (or torch's default). Two ways to batch the work, equal to the bit for the same draw:

    - grouped: per layer the images are sorted by what happens to them (a colour op, a geometric op with
      bilinear or bicubic resampling, nothing), so each kind is one contiguous slice; the least arithmetic,
      but the one host sync of a forward reads the slice sizes of all layers, and the launches depend on them.
    - masked: per layer every kind runs over the whole batch and each image keeps its own result: one table
      lookup for the eight table ops, Color, Sharpness, one resample (identity for the images that draw no
      geometric op). More arithmetic, no host sync and the same launches whatever the draw, so that the host
      runs ahead of the GPU and the forward can be captured in a CUDA graph or compiled."""

    def __init__(self, config_str: str, interpolation: str = "bicubic", fill=FILL, translate_pct: float = 0.45,
                 batching: str = "grouped", compile: bool = False):
        super().__init__()
        if batching not in BATCHINGS:
            raise ValueError(f"batching '{batching}': expected one of {', '.join(BATCHINGS)}")
        if compile and batching != "masked":
            raise ValueError("compile needs batching='masked' (grouped reads its group sizes on the host)")
        self.batching = batching
        # compile: torch.compile the masked work (one graph, fixed shapes); the draw stays eager. The same images on
        # the CPU (tested); Triton may fuse a multiply and an add, so on a GPU a value may round one level apart
        self.apply_masked = torch.compile(self._apply_masked, fullgraph=True, dynamic=False) if compile \
            else self._apply_masked
        cfg = parse_config(config_str)
        self.config_str = config_str
        self.magnitude, self.num_layers, self.prob = cfg["m"], cfg["n"], cfg["p"]
        self.magnitude_std, self.magnitude_max = cfg["mstd"], cfg["mmax"]
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation '{interpolation}': expected one of {', '.join(INTERPOLATIONS)}")
        self.interpolation, self.fill = interpolation, tuple(fill)
        self.hparams = {"translate_pct": translate_pct}
        self.colour_ops = [name for name in OPS if name in NAME_TO_OP]
        # sort keys: colour ops 0..9, then geometric by resampling filter, then "not applied"
        self.resample_modes = ["nearest", "bilinear", "bicubic"]
        self.key_geometric = len(self.colour_ops)
        self.key_skip = self.key_geometric + len(self.resample_modes)
        op_key = [self.colour_ops.index(n) if n in NAME_TO_OP else -1 for n in OPS]
        self.op_key = torch.tensor(op_key)  # -1: geometric
        self._op_key_on = {}

    def sample(self, batch: int, device, generator=None) -> dict:
        """Per image and layer: op index, applied?, magnitude in [0, mmax], sign (+1/−1), and with
        interpolation=random whether a geometric op resamples bicubic (else bilinear)."""
        shape = (batch, self.num_layers)
        kw = {"generator": generator, "device": device}
        op = torch.randint(len(OPS), shape, **kw)
        applied = torch.rand(shape, **kw) <= self.prob
        if self.magnitude_std == float("inf"):
            mag = torch.rand(shape, **kw, dtype=torch.float64) * self.magnitude
        elif self.magnitude_std > 0:
            mag = self.magnitude + self.magnitude_std * torch.randn(shape, **kw, dtype=torch.float64)
        else:
            mag = torch.full(shape, self.magnitude, dtype=torch.float64, device=device)
        mag = mag.clamp(0.0, self.magnitude_max)
        sign = torch.where(torch.rand(shape, **kw) > 0.5, -1.0, 1.0).double()
        p = {"op": op, "applied": applied, "magnitude": mag, "sign": sign}
        if self.interpolation == "random":
            p["bicubic"] = torch.rand(shape, **kw) < 0.5  # timm: random.choice((BILINEAR, BICUBIC))
        return p

    def _sort_keys(self, p: dict, layer: int) -> torch.Tensor:
        device = p["op"].device
        if device not in self._op_key_on:
            self._op_key_on[device] = self.op_key.to(device)
        op = p["op"][:, layer]
        key = self._op_key_on[device][op]
        if "bicubic" in p:
            resample = torch.where(p["bicubic"][:, layer], 2, 1)
        else:
            resample = torch.full_like(op, self.resample_modes.index(
                "bicubic" if self.interpolation == "random" else self.interpolation))
        key = torch.where(key < 0, self.key_geometric + resample, key)
        return torch.where(p["applied"][:, layer], key, self.key_skip)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, params: dict | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 N×3×H×W, got {images.dtype} {tuple(images.shape)}")
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        x = images.contiguous()
        b, _, h, w = x.shape
        p = params or self.sample(b, x.device, generator)
        if not self.num_layers:  # rand-n0: nothing to do, but a new batch as always
            return images.clone()
        if self.batching == "masked":
            constants(x.device)  # made here, eagerly: not inside a compiled graph
            x = self.apply_masked(x, p)
            return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        keys = [self._sort_keys(p, layer) for layer in range(self.num_layers)]
        # The slice sizes of every layer, read in one go: the forward's one host sync. Counted by comparison,
        # not torch.bincount, which on CUDA reads the keys' min and max on the host first (two more syncs).
        kinds = torch.arange(self.key_skip + 1, device=keys[0].device).view(1, -1, 1)
        all_counts = (torch.stack(keys).unsqueeze(1) == kinds).sum(-1).tolist()
        for layer, (key, counts) in enumerate(zip(keys, all_counts, strict=True)):
            order = torch.argsort(key, stable=True)
            xs = x.index_select(0, order)  # a new tensor, grouped by what happens to each image
            op, mag, sign = (p[k][:, layer].index_select(0, order) for k in ("op", "magnitude", "sign"))
            lv = mag / LEVEL_DENOM
            start = 0
            for k, n in enumerate(counts[:self.key_skip]):
                sl = slice(start, start + n)
                start += n
                if n == 0:
                    continue
                if k < self.key_geometric:
                    name = self.colour_ops[k]
                    level_fn = LEVEL_TO_ARG[name]
                    arg = level_fn(lv[sl], sign[sl], self.hparams) if level_fn else None
                    xs[sl] = NAME_TO_OP[name](xs[sl], arg)
                else:  # every geometric op of this resampling filter: one fused resample
                    mats = affine_matrices(op[sl], lv[sl], sign[sl], w, h, self.hparams)
                    xs[sl] = warp(xs[sl], mats, self.resample_modes[k - self.key_geometric], self.fill)
            x = torch.empty_like(xs).index_copy_(0, order, xs)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _apply_masked(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        for layer in range(self.num_layers):
            x = self._masked_layer(x, p, layer)
        return x

    def _masked_layer(self, x: torch.Tensor, p: dict, layer: int) -> torch.Tensor:
        """One layer over the whole batch, each image selecting its own op's result (see the class docstring)."""
        b, _, h, w = x.shape
        op, applied = p["op"][:, layer], p["applied"][:, layer]
        lv, sign = p["magnitude"][:, layer] / LEVEL_DENOM, p["sign"][:, layer]

        def drew(name):  # (b,) images whose op in this layer is `name`, applied
            return applied & (op == OPS.index(name))

        def arg(name):
            return LEVEL_TO_ARG[name](lv, sign, self.hparams) if LEVEL_TO_ARG[name] else None
        lut = pointwise_lut(lambda v, _: v)(x, None)  # identity
        for name, table in NAME_TO_LUT.items():
            lut = torch.where(drew(name).view(b, 1, 1), table(x, arg(name)), lut)
        x = _apply_lut(x, lut)
        for name in [n for n in NAME_TO_OP if n not in NAME_TO_LUT]:  # Color, Sharpness: each pixel's neighbours
            x = torch.where(drew(name).view(b, 1, 1, 1), NAME_TO_OP[name](x, arg(name)), x)
        geometric = torch.zeros_like(applied)
        for name in NAME_TO_AFFINE:
            geometric = geometric | drew(name)
        mats = affine_matrices(op, lv, sign, w, h, self.hparams)
        if self.interpolation == "random" and "bicubic" in p:
            warped = warp(x, mats, "random", self.fill, bicubic=p["bicubic"][:, layer])
        else:  # params without the draw of filters: bicubic, as in grouped
            warped = warp(x, mats, "bicubic" if self.interpolation == "random" else self.interpolation, self.fill)
        return torch.where(geometric.view(b, 1, 1, 1), warped, x)
