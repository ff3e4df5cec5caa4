"""The batched RandAugment against timm's PIL RandAugment: every op, and the sampling distribution."""
import random

import numpy as np
import pytest
import torch
from conftest import natural_image
from PIL import Image
from scipy import stats
from timm.data import auto_augment as aa

from rsb_ffcv.bench.common import HostSyncs
from rsb_ffcv.randaugment import FILL, INTERPOLATIONS, OPS, RandAugment

PIL_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
LUT_OPS = {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}
ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def images():
    """Real-looking images (textured backgrounds, objects, grain), non-square to catch w/h mix-ups."""
    imgs = [natural_image(s, 64, 48) for s in range(8)]
    batch = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).contiguous()
    return imgs, batch


def timm_op(name, img, magnitude, sign, interpolation):
    """timm's AugmentOp applied with prob 1 at a fixed magnitude; `sign` decides timm's random negation."""
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                      hparams={"img_mean": FILL, "interpolation": PIL_INTERP[interpolation]})
    saved = random.random
    random.random = (lambda: 0.0) if sign > 0 else (lambda: 1.0)  # _randomly_negate: negate if random() > 0.5
    try:
        return np.asarray(op(img))
    finally:
        random.random = saved


def ours(name, batch, magnitude, sign, interpolation, device="cpu"):
    ra = RandAugment("rand-m9-n1-mstd0.5-inc1", interpolation=interpolation)
    n = batch.shape[0]
    params = {"op": torch.full((n, 1), OPS.index(name), device=device),
              "applied": torch.ones(n, 1, dtype=torch.bool, device=device),
              "magnitude": torch.full((n, 1), magnitude, dtype=torch.float64, device=device),
              "sign": torch.full((n, 1), sign, dtype=torch.float64, device=device)}
    return ra(batch.clone().to(device), params=params).permute(0, 2, 3, 1).cpu().numpy()


CASES = [(name, "nearest") for name in OPS] + [(name, interp) for name in OPS if name not in LUT_OPS | ENHANCE
                                                 for interp in ("bilinear", "bicubic")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,interpolation", CASES)
def test_op_equals_timm_pil(images, name, interpolation, device):
    imgs, batch = images
    for magnitude in (0.0, 2.5, 5.0, 7.3, 9.99):
        for sign in (1.0, -1.0):
            want = np.stack([timm_op(name, im, magnitude, sign, interpolation) for im in imgs])
            got = ours(name, batch, magnitude, sign, interpolation, device)
            diff = np.abs(got.astype(int) - want.astype(int))
            where = f"{name} m={magnitude} sign={sign} {interpolation}"
            if name in LUT_OPS or interpolation == "nearest":
                assert diff.max() == 0, where  # exact (geometry: exact coordinates)
            elif name in ENHANCE:
                assert diff.max() <= 1, where  # measured: exact
            else:
                # Measured on these images: bilinear exact but a few Rotate pixels (MAE <= 0.0001); bicubic,
                # computed as float32 weights, within one level (MAE <= 0.017).
                bound = 0.001 if interpolation == "bilinear" else 0.025
                assert diff.max() <= 1 and diff.mean() <= bound, (where, diff.max(), diff.mean())


def test_posterize_at_full_magnitude_keeps_no_bits(images):
    # timm asks for 0 bits at magnitude 10, which Pillow >= 10 refuses; older Pillow returned black.
    _, batch = images
    assert ours("PosterizeIncreasing", batch, 10.0, 1.0, "nearest").max() == 0
    assert (ours("PosterizeIncreasing", batch, 7.5, 1.0, "nearest") & 0x7F).max() == 0  # 1 bit kept


def test_layouts_generator_and_validation(images):
    _, batch = images
    ra = RandAugment("rand-m7-mstd0.5-inc1")
    a = ra(batch.clone(), generator=torch.Generator().manual_seed(1))
    b = ra(batch.clone().contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(1))
    assert b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.uint8
    assert torch.equal(a, b)
    c = ra(batch.clone(), generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="uint8"):
        ra(batch.float())
    no_layer = RandAugment("rand-n0-m9-mstd0.5-inc1")(batch)  # timm accepts n0: the images unchanged, a new batch
    assert torch.equal(no_layer, batch) and no_layer.data_ptr() != batch.data_ptr()
    with pytest.raises(ValueError, match="unknown section"):
        RandAugment("rand-m7-q3")
    with pytest.raises(ValueError, match="inc1"):
        RandAugment("rand-m7-mstd0.5")


def test_config_keys_like_timm():
    ra = RandAugment("rand-m6-n3-p0.7-mstd101-mmax15-inc1")
    assert (ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_std, ra.magnitude_max) == (6, 3, 0.7, float("inf"), 15)
    timm = aa.rand_augment_transform("rand-m7-mstd0.5-inc1", {})
    ra = RandAugment("rand-m7-mstd0.5-inc1")
    assert [op.name for op in timm.ops] == OPS
    assert (ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_std) == \
        (timm.ops[0].magnitude, timm.num_layers, timm.ops[0].prob, timm.ops[0].magnitude_std)


def record_timm(config, n_images, seed=0):
    """Run timm's RandAugment on tiny images, recording each chosen op, whether it applied, its magnitude."""
    ra = aa.rand_augment_transform(config, {"img_mean": FILL})
    log = []

    class Recorder:
        def __init__(self, op):
            self.op = op
            op.aug_fn = self.wrap_aug(op.aug_fn)
            if op.level_fn is not None:
                op.level_fn = self.wrap_level(op.level_fn)

        def wrap_aug(self, fn):
            def aug(img, *args, **kwargs):
                log[-1]["applied"] = True
                return fn(img, *args, **kwargs)
            return aug

        def wrap_level(self, fn):
            def level(magnitude, hparams):
                log[-1]["magnitude"] = magnitude
                return fn(magnitude, hparams)
            return level

        def __call__(self, img):
            log.append({"op": OPS.index(self.op.name), "applied": False})
            return self.op(img)

    ra.ops = [Recorder(op) for op in ra.ops]
    random.seed(seed)
    np.random.seed(seed)
    img = Image.new("RGB", (8, 8), (100, 120, 140))
    for _ in range(n_images):
        ra(img)
    return log


def test_sampling_distribution_matches_timm():
    config, n = "rand-m7-mstd0.5-inc1", 6000
    log = record_timm(config, n)
    p = RandAugment(config).sample(n, "cpu", torch.Generator().manual_seed(0))
    our_ops = p["op"].flatten().numpy()
    timm_ops = np.array([r["op"] for r in log])
    table = np.stack([np.bincount(our_ops, minlength=15), np.bincount(timm_ops, minlength=15)])
    assert stats.chi2_contingency(table).pvalue > 1e-3  # op choice: same (uniform, with replacement)
    assert stats.chisquare(table[0]).pvalue > 1e-3
    ours_applied = p["applied"].flatten().numpy()
    timm_applied = np.array([r["applied"] for r in log])
    assert stats.chi2_contingency([[ours_applied.sum(), (~ours_applied).sum()],
                                   [timm_applied.sum(), (~timm_applied).sum()]]).pvalue > 1e-3
    ours_mag = p["magnitude"].flatten().numpy()[ours_applied]
    timm_mag = np.array([r["magnitude"] for r in log if "magnitude" in r])
    assert stats.ks_2samp(ours_mag, timm_mag).pvalue > 1e-3  # N(7, 0.5) clipped to [0, 10]
    signs = p["sign"].flatten().numpy()
    assert stats.binomtest(int((signs > 0).sum()), len(signs)).pvalue > 1e-3


def test_images_of_a_batch_draw_independently():
    p = RandAugment("rand-m7-mstd0.5-inc1").sample(8192, "cpu", torch.Generator().manual_seed(3))
    first, second = p["op"][0::2, 0].numpy(), p["op"][1::2, 0].numpy()
    table = np.zeros((15, 15))
    np.add.at(table, (first, second), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert len(np.unique(p["op"][:64, 0])) >= 10  # not one choice for the whole batch
    mags = p["magnitude"][:, 0].numpy()
    assert abs(np.corrcoef(mags[0::2], mags[1::2])[0, 1]) < 0.05


@pytest.mark.parametrize("batching,waits", [("grouped", ["tolist"]), ("masked", [])])
@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_a_forward_waits_for_the_device_at_most_once_and_never_writes_its_input(images, interpolation, batching,
                                                                               waits):
    _, batch = images
    batch = batch.repeat(8, 1, 1, 1)  # 64 images: every op kind is drawn
    ra = RandAugment("rand-m9-mstd0.5-inc1", interpolation=interpolation, batching=batching)
    ra(batch.clone(), generator=torch.Generator().manual_seed(0))  # constants are made once per device
    for layout in (torch.contiguous_format, torch.channels_last):
        x = batch.clone().contiguous(memory_format=layout)
        before = x.clone()
        with HostSyncs() as counted:
            out = ra(x, generator=torch.Generator().manual_seed(1))
        assert counted.syncs == waits and ra.num_layers == 2, counted.syncs  # grouped: one read for both layers
        assert counted.copies == [], counted.copies
        assert out.is_contiguous(memory_format=layout)
        assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()  # the caller's batch is untouched
        assert not torch.equal(out, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_masked_batching_equals_grouped_to_the_bit(images, interpolation, device):
    """Every op and filter over the whole batch, each image keeping its own: the same images as sorting by op,
    for draws of every kind (all ops applied with p1.0, magnitudes spread by mstd101, three layers, rand-n0)."""
    _, batch = images
    batch = batch.repeat(6, 1, 1, 1).to(device)  # 48 images
    drawn = set()
    for config in ("rand-m9-mstd0.5-inc1", "rand-m9-p1.0-inc1", "rand-m10-n3-p1.0-mstd101-inc1", "rand-n0-m9-inc1"):
        grouped = RandAugment(config, interpolation)
        masked = RandAugment(config, interpolation, batching="masked")
        for seed in range(2):
            p = grouped.sample(batch.shape[0], device, torch.Generator(device=device).manual_seed(seed))
            want, got = grouped(batch, params=p), masked(batch, params=p)
            assert torch.equal(got, want), (config, seed, (got != want).sum())
            if config != "rand-n0-m9-inc1":
                drawn |= set((p["op"] + 100 * p["applied"]).flatten().tolist())  # op index + 100 if applied
                assert (got != batch).flatten(1).any(1).float().mean() > 0.5  # most images changed
    assert drawn >= {100 + i for i in range(len(OPS))}  # every op applied (m9: magnitude 9 exactly, in p1.0)
    if interpolation == "random":  # params without the draw of filters: bicubic in both
        p = {k: v for k, v in p.items() if k != "bicubic"}
        assert torch.equal(masked(batch, params=p), grouped(batch, params=p))
    with pytest.raises(ValueError, match="batching 'sorted': expected one of grouped, masked"):
        RandAugment("rand-m9-inc1", batching="sorted")


@pytest.mark.slow  # one torch.compile (~30 s on 2 cores)
def test_masked_batching_compiles_as_one_graph_and_keeps_the_images(images):
    """fullgraph=True: no graph break, so no host sync; the draw stays eager, so the images are the same."""
    _, batch = images
    batch = batch.repeat(6, 1, 1, 1)
    grouped = RandAugment("rand-m9-n1-p1.0-mstd0.5-inc1", "random")  # one layer: half the graph to compile
    compiled = RandAugment("rand-m9-n1-p1.0-mstd0.5-inc1", "random", batching="masked", compile=True)
    fixed = RandAugment("rand-m9-n1-p1.0-inc1", "random")  # magnitude 9 exactly: draws on rounding ties
    drawn = set()
    for seed, sampler in ((0, grouped), (1, grouped), (2, fixed)):  # the magnitudes are data: one graph for both
        p = sampler.sample(batch.shape[0], "cpu", torch.Generator().manual_seed(seed))
        drawn |= set(zip(p["op"].flatten().tolist(), p["bicubic"].flatten().tolist()))
        assert torch.equal(compiled(batch, params=p), grouped(batch, params=p)), seed
    geometric = [OPS.index(n) for n in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")]
    assert {op for op, _ in drawn} == set(range(len(OPS)))  # every op
    assert drawn >= {(op, bicubic) for op in geometric for bicubic in (False, True)}  # each geometric op, each filter
    with pytest.raises(ValueError, match="compile needs batching='masked'"):
        RandAugment("rand-m9-inc1", compile=True)


def _geometric_params(n, bicubic):
    return {"op": torch.full((n, 1), OPS.index("Rotate")), "applied": torch.ones(n, 1, dtype=torch.bool),
            "magnitude": torch.full((n, 1), 7.0, dtype=torch.float64), "sign": torch.ones(n, 1, dtype=torch.float64),
            "bicubic": bicubic.view(n, 1)}


def test_random_interpolation_resamples_each_image_with_its_draw(images):
    _, batch = images
    n = batch.shape[0]
    pick = torch.arange(n) % 3 == 0
    got = RandAugment("rand-m9-n1-inc1", interpolation="random")(batch.clone(), params=_geometric_params(n, pick))
    for interpolation, where in (("bicubic", pick), ("bilinear", ~pick)):
        want = ours("Rotate", batch, 7.0, 1.0, interpolation)
        assert np.array_equal(got.permute(0, 2, 3, 1).numpy()[where.numpy()], want[where.numpy()]), interpolation


def test_random_interpolation_draws_like_timm():
    """timm (train.py's default `random`): each geometric op call picks bilinear or bicubic at random."""
    from unittest import mock
    calls = []
    transform = Image.Image.transform

    def recording(img, size, method, data=None, *args, **kwargs):  # PIL's rotate calls transform too
        calls.append(kwargs["resample"] if "resample" in kwargs else args[0])
        return transform(img, size, method, data, *args, **kwargs)
    tf = aa.rand_augment_transform("rand-m7-mstd0.5-inc1", {"img_mean": FILL})  # no interpolation: random
    random.seed(0)
    img = Image.new("RGB", (8, 8), (100, 120, 140))
    with mock.patch.object(Image.Image, "transform", recording):
        for _ in range(3000):
            tf(img)
    timm_bicubic = sum(c == Image.BICUBIC for c in calls)
    assert set(calls) == {Image.BILINEAR, Image.BICUBIC}
    ra = RandAugment("rand-m7-mstd0.5-inc1", interpolation="random")
    p = ra.sample(3000, "cpu", torch.Generator().manual_seed(0))
    geometric = torch.isin(p["op"], torch.tensor([OPS.index(n) for n in
                                                  ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")]))
    drawn = p["bicubic"][geometric & p["applied"]]
    table = [[int(drawn.sum()), int((~drawn).sum())], [timm_bicubic, len(calls) - timm_bicubic]]
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
    assert stats.binomtest(table[0][0], sum(table[0])).pvalue > 1e-3
