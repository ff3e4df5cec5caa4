"""Our FFCV crop decoders against torchvision/timm: crop distribution, resize, DCT-scaled decode, loaders."""
import math

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from ffcv.libffcv import imdecode, resize_crop
from numba import njit
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from rsb_ffcv import crop_decoder as cd
from rsb_ffcv.bench.corpus import make_photo
from rsb_ffcv.datasets.sources import image_folder
from rsb_ffcv.datasets.writer import WriteOptions, write_beton
from rsb_ffcv.loaders import epoch, train_loader, val_loader

MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def photo(seed: int) -> np.ndarray:
    """ImageNet-shaped content: textured, objects, sensor grain (high frequencies that expose filters)."""
    return np.array(make_photo(np.random.default_rng(seed)))


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def scratch_for(src, out):
    return np.empty(cd.scratch_size(src.shape[1], out.shape[0]), np.float32)


def torchvision_crop(img: np.ndarray, box, size, mode, flip=False) -> np.ndarray:
    t = TF.resized_crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), *box, list(size), interpolation=MODES[mode],
                        antialias=True)
    if flip:
        t = t.flip(-1)
    return t.permute(1, 2, 0).numpy()


@njit
def _sample_ours(n, height, width, seed):
    np.random.seed(seed)
    out = np.empty((n, 4), np.int64)
    for k in range(n):
        out[k] = cd.random_crop(height, width, 0.08, 1.0, math.log(3 / 4), math.log(4 / 3))
    return out


def _sample_torchvision(n, height, width, scale=(0.08, 1.0)):
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    return np.array([RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n)])


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (64, 640)])  # the last often falls back
def test_crop_parameters_follow_torchvisions_distribution(height, width):
    ours, theirs = _sample_ours(4000, height, width, 1), _sample_torchvision(4000, height, width)
    for col, name in enumerate(("top", "left", "height", "width")):
        p = stats.ks_2samp(ours[:, col], theirs[:, col]).pvalue
        assert p > 1e-3, f"{name}: KS p={p:.2g}"
    fallback = (theirs[:, 2] == theirs[:, 2].max()).mean()
    assert abs((ours[:, 2] == theirs[:, 2].max()).mean() - fallback) < 0.03
    # The same test tells a slightly different sampler apart: it can fail.
    assert stats.ks_2samp(ours[:, 2], _sample_torchvision(4000, height, width, (0.2, 1.0))[:, 2]).pvalue < 1e-6


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("box,size", [((40, 60, 300, 280), (160, 160)),   # shrink < 2x
                                       ((0, 0, 375, 500), (96, 128)),      # shrink ~4x, whole image
                                       ((100, 200, 30, 40), (160, 224)),   # enlarge 5x
                                       ((10, 5, 200, 150), (224, 224))])   # mixed
def test_resize_matches_torchvision_antialias(mode, box, size):
    img = photo(3)[:375, :500]
    for flip in (False, True):
        out = np.empty((*size, 3), np.uint8)
        cd.resize_box(img, *map(float, box), True, mode == "bicubic", flip, out, scratch_for(img, out))
        ref = torchvision_crop(img, box, size, mode, flip)
        # torchvision's uint8 kernel rounds its intermediate to uint8 (as PIL); ours keeps float32.
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 3 and diff.mean() < 0.3 and psnr(out, ref) > 50, (diff.max(), diff.mean())


def test_dct_scaled_decode_stays_close_to_the_full_decode():
    img = photo(5)
    h, w = img.shape[:2]
    data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].reshape(-1)
    full = np.empty((h, w, 3), np.uint8)
    imdecode(data, full, h, w, h, w, 0, 0, 1, 1, False, False)
    box, size = (20, 30, h - 40, w - 60), (96, 96)
    k = cd.dct_eighths(box[2], box[3], *size, np.array(cd.DCT_SCALES))
    assert k in (1, 2, 4)  # a large crop qualifies for a reduced-scale decode
    sh, sw = (h * k + 7) // 8, (w * k + 7) // 8
    small = np.empty((sh, sw, 3), np.uint8)
    imdecode(data, small, h, w, h, w, 0, 0, k, 8, False, False)
    out = np.empty((*size, 3), np.uint8)
    f = k / 8
    cd.resize_box(small, box[0] * f, box[1] * f, box[2] * f, box[3] * f, True, True, False, out, scratch_for(small, out))
    ref = torchvision_crop(full, box, size, "bicubic")
    assert psnr(out, ref) > 40, psnr(out, ref)  # measured 45.8 dB at k=4


def test_enlarging_has_no_nearest_neighbour_blocks():
    img = photo(7)
    box, size = (100, 100, 20, 20), (160, 160)
    ours = np.empty((*size, 3), np.uint8)
    cd.resize_box(img, *map(float, box), True, True, False, ours, scratch_for(img, ours))
    stock = np.empty((*size, 3), np.uint8)
    resize_crop(np.ascontiguousarray(img), 100, 120, 100, 120, stock)  # FFCV 1.0.2's INTER_AREA
    def repeated(a):  # share of horizontally adjacent pixels that are identical
        return (a[:, 1:] == a[:, :-1]).all(-1).mean()
    assert repeated(stock) > 0.7  # blocks of 8x8 copies: what the trainer used to see
    assert repeated(ours) < 0.1
    assert psnr(ours, torchvision_crop(img, box, size, "bicubic")) > 40


def test_center_box_is_timms_eval_geometry():
    # timm: Resize(int(224 / 0.95) = 235) of the shorter side, then CenterCrop(224).
    y0, x0, bh, bw = cd.center_box(375, 500, 224, 0.95)
    assert (bh, bw) == pytest.approx((224 * 375 / 235, 224 * 500 / 313))
    assert (y0, x0) == pytest.approx((6 * 375 / 235, round((313 - 224) / 2) * 500 / 313))


@pytest.fixture(scope="module")
def photo_betons(tmp_path_factory):
    """Square photos (so a full-image RandomResizedCrop is deterministic) in raw and jpg betons."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(6):
        (root / "c").mkdir(exist_ok=True)
        Image.fromarray(photo(i)[:300, :300]).resize((150, 150), Image.BICUBIC).save(root / "c" / f"{i}.png")
    out = {}
    for mode in ("raw", "jpg"):
        out[mode] = root / f"{mode}.beton"
        write_beton(image_folder(root), out[mode], WriteOptions(write_mode=mode, num_workers=1))
    return root, out


def _images(loader):
    return np.concatenate([x.permute(0, 2, 3, 1).numpy() for x, _ in epoch(loader, 1)])


@pytest.mark.parametrize("mode,bound", [("raw", 40), ("jpg", 30)])
def test_val_loader_matches_timm_eval_transform(photo_betons, mode, bound):
    from timm.data import create_transform
    root, betons = photo_betons
    loader = val_loader(str(betons[mode]), 4, 64, 0.875, torch.device("cpu"), num_workers=2, rank=0, world=1,
                        os_cache=False, batches_ahead=1)
    got = _images(loader)
    tf = create_transform(64, is_training=False, crop_pct=0.875, interpolation="bicubic")
    tf.transforms = [t for t in tf.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    files = sorted((root / "c").iterdir())
    for out, f in zip(got, files, strict=True):
        ref = np.asarray(tf(Image.open(f).convert("RGB")))
        assert psnr(out, ref) > bound, (f.name, psnr(out, ref))


def test_train_decoder_in_a_loader_equals_torchvision(photo_betons):
    """Full-image crop (scale 1, ratio 1, square images) and flip_prob 1: deterministic, so the whole
    FFCV path (buffers, parallel batch loop, flip on write) is compared with torchvision."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    root, betons = photo_betons
    dec = cd.RandomResizedCropDecoder((96, 96), scale=(1, 1), ratio=(1, 1), flip_prob=1.0)
    loader = Loader(str(betons["raw"]), batch_size=4, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [dec], "label": [IntDecoder()]})
    got = np.concatenate([x for x, _ in epoch(loader, 1)])  # epoch(): raises, not hangs, if the loader dies
    for out, f in zip(got, sorted((root / "c").iterdir()), strict=True):
        img = np.asarray(Image.open(f).convert("RGB"))
        ref = torchvision_crop(img, (0, 0, 150, 150), (96, 96), "bicubic", flip=True)
        assert np.abs(out.astype(int) - ref).max() <= 3


def test_random_train_interpolation_draws_per_image_like_timm(photo_betons):
    """data.train_interpolation=random: every crop resizes bilinear or bicubic at random, as timm's
    RandomResizedCropAndInterpolation('random') does (train.py's 2021 default). A full-image crop is
    deterministic, so each output equals one of the two fixed-filter outputs; the draws are counted."""
    import random
    from unittest import mock

    import timm.data.transforms as timm_transforms
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    _, betons = photo_betons

    def outputs(interpolation, epochs):
        dec = cd.RandomResizedCropDecoder((64, 64), scale=(1, 1), ratio=(1, 1), flip_prob=0.0,
                                          interpolation=interpolation)
        loader = Loader(str(betons["raw"]), batch_size=6, num_workers=1, order=OrderOption.SEQUENTIAL,
                        drop_last=False, pipelines={"image": [dec], "label": [IntDecoder()]})
        return [np.concatenate([x.copy() for x, _ in epoch(loader, 1)]) for _ in range(epochs)]
    bilinear, bicubic = outputs("bilinear", 1)[0], outputs("bicubic", 1)[0]
    ours = []
    for out in outputs("random", 40):
        for k in range(len(out)):
            is_cubic = np.array_equal(out[k], bicubic[k])
            assert is_cubic or np.array_equal(out[k], bilinear[k])
            ours.append(is_cubic)
    drawn, resized = [], timm_transforms.F.resized_crop
    rrc = timm_transforms.RandomResizedCropAndInterpolation(64, interpolation="random")
    random.seed(0)
    with mock.patch.object(timm_transforms.F, "resized_crop",
                           lambda img, *a: drawn.append(a[-1]) or resized(img, *a)):
        for _ in range(len(ours)):
            rrc(Image.new("RGB", (150, 150)))
    timm_cubic = sum(str(d).endswith("BICUBIC") for d in drawn)
    table = [[sum(ours), len(ours) - sum(ours)], [timm_cubic, len(drawn) - timm_cubic]]
    assert stats.chi2_contingency(table).pvalue > 1e-3 and stats.binomtest(sum(ours), len(ours)).pvalue > 1e-3, table


@pytest.mark.parametrize("decoder", ["fast", "ffcv"])
def test_train_loader_delivers_channels_last_uint8(photo_betons, decoder):
    _, betons = photo_betons
    loader, dec = train_loader(str(betons["jpg"]), 3, 64, torch.device("cpu"), num_workers=1, seed=0, repeats=0,
                               rank=0, world=1, batches_ahead=1, decoder=decoder)
    x, y = next(epoch(loader, 1))
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.float().std() > 10  # real content, not an empty buffer
    assert dec.output_size == (64, 64)


def test_bad_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation"):
        cd.RandomResizedCropDecoder((64, 64), interpolation="nearest")
    with pytest.raises(ValueError, match="fixed interpolation"):
        cd.CenterCropDecoder((64, 64), 0.95, interpolation="random")


def _jpeg(img, subsampling, progressive=False):
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return np.frombuffer(buf.getvalue(), np.uint8)


# 4:4:4, 4:2:2, 4:2:0 (FFCV's writer: baseline 4:2:0), and a progressive JPEG
@pytest.mark.parametrize("subsampling,progressive", [(0, False), (1, False), (2, False), (2, True)])
def test_region_decode_is_pixel_identical_to_the_full_decode(subsampling, progressive):
    """decode_resize decodes only the region its resize reads: the output must equal the one from the
    whole decoded image bit for bit, for train boxes (taps inside the box) and eval boxes (taps beyond)."""
    rng = np.random.default_rng(subsampling)
    img = photo(11)[:333, :500]
    h, w = img.shape[:2]
    data = _jpeg(img, subsampling, progressive)
    buf, info = np.empty(h * w * 3, np.uint8), np.zeros(4, np.int32)
    scales = np.array(cd.DCT_SCALES)
    for trial in range(40):
        size = (int(rng.integers(16, 200)),) * 2
        bh, bw = rng.uniform(8, h), rng.uniform(8, w)
        y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
        clamp, cubic, flip = bool(trial % 2), bool(trial % 3), bool(trial % 5)
        outs = []
        for whole in (True, False):
            out = np.empty((*size, 3), np.uint8)
            assert cd.decode_resize(data, h, w, y0, x0, bh, bw, clamp, cubic, flip, scales, whole, buf, info, out,
                                    np.empty(cd.scratch_size(w, size[0]), np.float32)) == 0
            outs.append(out)
        assert np.array_equal(*outs), (trial, size, (y0, x0, bh, bw), clamp)
    # and the whole-image path is FFCV's decode: the same pixels as imdecode at that DCT scale
    full, ours = np.empty(h * w * 3, np.uint8), np.empty(h * w * 3, np.uint8)
    imdecode(data, full, h, w, h, w, 0, 0, 4, 8, False, False)
    sh, sw = (h + 1) // 2, (w + 1) // 2
    assert cd.decode_region(data, 4, 0, sh, 0, sw, ours, sw * 3, info) == 0 and list(info) == [0, sw, sh, sw]
    assert np.array_equal(ours[:sh * sw * 3], full[:sh * sw * 3])


def test_region_decode_refuses_corrupt_data_and_bad_regions():
    data = _jpeg(photo(2)[:100, :120], 2)
    buf, info = np.empty(100 * 120 * 3, np.uint8), np.zeros(4, np.int32)
    assert cd.decode_region(data, 8, 10, 20, 10, 20, buf, 360, info) == 0
    assert cd.decode_region(data[:200].copy(), 8, 10, 20, 10, 20, buf, 360, info) == -1  # truncated header
    assert cd.decode_region(np.zeros(500, np.uint8), 8, 10, 20, 10, 20, buf, 360, info) == -1  # not a JPEG
    assert cd.decode_region(data, 8, 10, 101, 10, 20, buf, 360, info) == -1  # below the image
    assert cd.decode_region(data, 8, 10, 20, 30, 20, buf, 360, info) == -1  # empty
