"""Batched, per-sample RandAugment equal to timm's `rand-mM-mstdS-inc1` (timm `RandAugment` + `AugmentOp`).

Every image draws its own ops (uniformly, with replacement, from the 15 increasing transforms), its own
apply decisions (prob p), magnitudes (N(m, mstd) clipped to [0, mmax]) and signs, like timm's PIL code
does image by image, but the work is vectorised: per layer, one masked pass per op kind for the colour
ops and one fused affine resample for every geometric op. Colour ops follow PIL's integer definitions
(ImageOps lookup tables, ImageEnhance's float32 blend with truncation, L = (19595 R + 38470 G + 7471 B
+ 2^15) >> 16, SMOOTH kernel with untouched borders); geometry follows PIL's affine convention (pixel
centres at +0.5, matrices mapping output to input, fill outside the image).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]  # timm's _RAND_INCREASING_TRANSFORMS, in order
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
FILL = (124, 116, 104)  # timm: round(255 * IMAGENET_DEFAULT_MEAN)
LEVEL_DENOM = 10.0


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


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.autocontrast (cutoff 0), per channel."""
    flat = x.reshape(*x.shape[:2], -1)
    lo, hi = flat.amin(-1).double(), flat.amax(-1).double()
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    # tensor / tensor: `255.0 / t` is computed as 255 * (1 / t) in torch, which rounds differently from PIL
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    lut = torch.trunc(ix * scale[..., None] + (-lo * scale)[..., None]).clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, ix)
    return _apply_lut(x, lut)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize, per channel."""
    h = _histogram(x)
    ix = torch.arange(256, device=x.device)
    last_nonzero = torch.where(h > 0, ix, -1).amax(-1, keepdim=True)
    step = (h.sum(-1, keepdim=True) - h.gather(-1, last_nonzero)) // 255
    before = torch.cumsum(h, -1) - h  # n before adding h[i]
    lut = (step // 2 + before) // step.clamp(min=1)
    lut = torch.where(step > 0, lut.clamp(max=255), ix)
    return _apply_lut(x, lut)


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


def contrast(x, factor):
    mean = torch.floor(grayscale(x).double().mean(dim=(1, 2, 3)) + 0.5)  # int(mean + 0.5)
    return blend(mean.view(-1, 1, 1, 1).expand_as(x), x, factor)


def brightness(x, factor):
    return blend(torch.zeros_like(x), x, factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def sharpness(x, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (rounded, borders untouched)."""
    c = x.shape[1]
    k = _SMOOTH.to(x.device).expand(c, 1, 3, 3)
    smooth = F.conv2d(x.float(), k, groups=c)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp(0, 255).to(torch.uint8)
    return blend(degenerate, x, factor)


# ---- geometry: PIL affine matrices (output pixel → input coordinate) ---------------------------------------

def affine_matrices(op: str, level: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(b, 2, 3) float64 matrices [[a, b, c], [d, e, f]] as timm passes to PIL's Image.transform/rotate."""
    n = level.shape[0]
    m = torch.zeros(n, 2, 3, dtype=torch.float64, device=level.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    v = level.double()
    if op == "ShearX":
        m[:, 0, 1] = v
    elif op == "ShearY":
        m[:, 1, 0] = v
    elif op == "TranslateXRel":
        m[:, 0, 2] = v * width
    elif op == "TranslateYRel":
        m[:, 1, 2] = v * height
    elif op == "Rotate":  # PIL's Image.rotate about (w/2, h/2), expand=False
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


def warp(x: torch.Tensor, mats: torch.Tensor, mode: str, fill=FILL) -> torch.Tensor:
    """Resample uint8 images exactly as PIL's Image.transform(AFFINE) does: output pixel (i, j) reads the
    input at M · (j + 0.5, i + 0.5, 1); sample points outside the input get `fill`; bilinear/bicubic clamp
    neighbours to the edge and truncate (bilinear in float64 as PIL: exact; bicubic as float32 weights:
    within one level of PIL and several times faster)."""
    b, c, h, w = x.shape
    sx, sy = _source_coords(mats, h, w, mode)
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # whole RGB pixels: one index per neighbour
    base = (torch.arange(b, device=x.device) * (h * w)).view(b, 1)

    def pick(row_start, col):  # (b, h*w, c) values of one neighbour
        return pixels.index_select(0, (row_start + col).flatten()).view(b, h * w, c).float()

    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(-1)
    if mode == "nearest":
        out = pixels.index_select(0, (base + sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).flatten())
        out = out.view(b, h * w, c)
    else:
        xin, yin = sx - 0.5, sy - 0.5
        x0, y0 = torch.floor(xin), torch.floor(yin)
        dx, dy = (xin - x0).unsqueeze(-1), (yin - y0).unsqueeze(-1)
        x0, y0 = x0.long(), y0.long()
        if mode == "bilinear":  # PIL's form, in float64: exact
            cols = [x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)]
            rows = []
            for r in (0, 1):
                row_start = base + (y0 + r).clamp(0, h - 1) * w
                v1, v2 = (pick(row_start, col).double() for col in cols)
                rows.append(v1 + (v2 - v1) * dx)
            v = rows[0] + (rows[1] - rows[0]) * dy
        else:  # PIL's cubic as weights, in float32: within one level of PIL, several times faster
            wx, wy = _cubic_weights(dx.float()), _cubic_weights(dy.float())
            cols = [(x0 + k).clamp(0, w - 1) for k in (-1, 0, 1, 2)]  # neighbours clamped to the edge
            v = 0
            for r, wr in zip((-1, 0, 1, 2), wy):
                row_start = base + (y0 + r).clamp(0, h - 1) * w
                v = v + wr * sum(wk * pick(row_start, col) for wk, col in zip(wx, cols))
        out = torch.trunc(v.clamp(0, 255)).to(torch.uint8)  # PIL truncates
    fill_t = torch.tensor(fill, dtype=torch.uint8, device=x.device).view(1, 1, c)
    out = torch.where(inside, out, fill_t)  # (b, h*w, c)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


# ---- the module --------------------------------------------------------------------------------------------

class RandAugment(torch.nn.Module):
    """RandAugment from a timm config string, on uint8 N×3×H×W batches (contiguous or channels-last), any
    device. Returns the same layout and dtype. Randomness from `generator` (or torch's default)."""

    def __init__(self, config_str: str, interpolation: str = "bicubic", fill=FILL, translate_pct: float = 0.45):
        super().__init__()
        cfg = parse_config(config_str)
        self.config_str = config_str
        self.magnitude, self.num_layers, self.prob = cfg["m"], cfg["n"], cfg["p"]
        self.magnitude_std, self.magnitude_max = cfg["mstd"], cfg["mmax"]
        if interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"interpolation '{interpolation}': expected nearest, bilinear or bicubic")
        self.interpolation, self.fill, self.translate_pct = interpolation, tuple(fill), translate_pct

    def sample(self, batch: int, device, generator=None) -> dict:
        """Per image and layer: op index, applied?, magnitude in [0, mmax], sign (+1/−1)."""
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
        return {"op": op, "applied": applied, "magnitude": mag, "sign": sign}

    def level_args(self, name: str, mag: torch.Tensor, sign: torch.Tensor, width: int, height: int):
        """timm's level → argument maps."""
        lv = mag / LEVEL_DENOM
        if name == "Rotate":
            return lv * 30.0 * sign
        if name == "PosterizeIncreasing":
            return 4 - torch.trunc(lv * 4).long()
        if name == "SolarizeIncreasing":
            return 256 - torch.trunc(lv * 256).clamp(max=256).long()
        if name == "SolarizeAdd":
            return torch.trunc(lv * 110).clamp(max=128).long()
        if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
            return (1.0 + sign * lv * 0.9).clamp(min=0.1)
        if name in ("ShearX", "ShearY"):
            return lv * 0.3 * sign
        if name in ("TranslateXRel", "TranslateYRel"):
            return lv * self.translate_pct * sign
        return None

    def apply_op(self, name: str, x: torch.Tensor, arg) -> torch.Tensor:
        if name == "AutoContrast":
            return auto_contrast(x)
        if name == "Equalize":
            return equalize(x)
        if name == "Invert":
            return 255 - x
        if name == "PosterizeIncreasing":
            return posterize(x, arg)
        if name == "SolarizeIncreasing":
            return solarize(x, arg)
        if name == "SolarizeAdd":
            return solarize_add(x, arg)
        return {"ColorIncreasing": color, "ContrastIncreasing": contrast, "BrightnessIncreasing": brightness,
                "SharpnessIncreasing": sharpness}[name](x, arg)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, params: dict | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 N×3×H×W, got {images.dtype} {tuple(images.shape)}")
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        x = images.contiguous()
        b, _, h, w = x.shape
        p = params or self.sample(b, x.device, generator)
        for layer in range(self.num_layers):
            op, applied = p["op"][:, layer], p["applied"][:, layer]
            mag, sign = p["magnitude"][:, layer], p["sign"][:, layer]
            mats = torch.eye(2, 3, dtype=torch.float64, device=x.device).repeat(b, 1, 1)
            geometric = torch.zeros(b, dtype=torch.bool, device=x.device)
            for k, name in enumerate(OPS):
                sel = torch.nonzero(applied & (op == k)).flatten()
                if sel.numel() == 0:
                    continue
                arg = self.level_args(name, mag[sel], sign[sel], w, h)
                if name in GEOMETRIC:
                    mats[sel] = affine_matrices(name, arg, w, h)
                    geometric[sel] = True
                else:
                    x[sel] = self.apply_op(name, x[sel], arg)
            sel = torch.nonzero(geometric).flatten()
            if sel.numel():  # one fused resample for every geometric op of this layer
                x[sel] = warp(x[sel], mats[sel], self.interpolation, self.fill)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
