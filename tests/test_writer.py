"""The beton writer on real FFCV betons: exact round-trips, every bad input, atomic output."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, natural_image
from PIL import Image

from rsb_ffcv.config import ConfigError
from rsb_ffcv.datasets import writer as writer_mod
from rsb_ffcv.datasets.images import load_rgb, to_rgb
from rsb_ffcv.datasets.sources import image_folder
from rsb_ffcv.datasets.writer import UnreadableImages, WriteError, WriteOptions, write_beton


def read_back(path):
    """Every record of a beton, in order, decoded at full size by FFCV."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    return [(img[0].copy(), int(lab[0, 0])) for img, lab in loader]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def opts(**kw):
    kw.setdefault("num_workers", 2)
    return WriteOptions(**kw)


def test_raw_round_trip_is_pixel_exact_and_jpg_keeps_psnr(folder, tmp_path):
    src = image_folder(folder)
    raw = write_beton(src, tmp_path / "raw.beton", opts(write_mode="raw", verify=True))
    assert raw["images"] == 9 and raw["verified"]
    jpg = write_beton(src, tmp_path / "jpg.beton", opts(write_mode="jpg", jpeg_quality=90))
    assert jpg["images"] == 9
    for (r_img, r_lab), (j_img, j_lab), f, y in zip(read_back(tmp_path / "raw.beton"), read_back(tmp_path / "jpg.beton"),
                                                   src.files, src.labels):
        expected = load_rgb(f)
        assert r_lab == j_lab == y
        np.testing.assert_array_equal(r_img, expected)
        assert psnr(j_img, expected) > 30.0  # quality 90 re-encode of a textured image


def test_max_resolution_resizes_longer_side(tmp_path):
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    natural_image(1, 300, 120).save(root / "a" / "x.png")
    natural_image(2, 150, 60).save(root / "a" / "y.png")
    write_beton(image_folder(root), tmp_path / "b.beton", opts(write_mode="raw", max_resolution=100))
    assert [img.shape for img, _ in read_back(tmp_path / "b.beton")] == [(40, 100, 3)] * 2


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "P", "RGBA", "I;16", "1"])
def test_every_pil_mode_becomes_rgb(tmp_path, mode):
    base = natural_image(3, 32, 24)
    if mode == "P":
        img = base.convert("P", palette=Image.ADAPTIVE)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
        assert img.mode in ("I;16", "I")
    else:
        img = base.convert(mode)
    root = tmp_path / "modes"
    (root / "c").mkdir(parents=True)
    path = root / "c" / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = to_rgb(Image.open(path))
    assert arr.dtype == np.uint8 and arr.shape == (24, 32, 3)
    if mode == "I;16":  # 16-bit rescaled to 8-bit, not clipped to white
        np.testing.assert_array_equal(arr[..., 0], np.asarray(base.convert("L")))
    write_beton(image_folder(root), tmp_path / "m.beton", opts(write_mode="raw"))
    (got, _), = read_back(tmp_path / "m.beton")
    np.testing.assert_array_equal(got, arr)


def test_png_data_in_jpeg_file_is_read_by_content(tmp_path):
    root = tmp_path / "p"
    (root / "c").mkdir(parents=True)
    natural_image(4).save(root / "c" / "really_png.JPEG", format="PNG")
    write_beton(image_folder(root), tmp_path / "p.beton", opts(write_mode="raw"))
    (got, _), = read_back(tmp_path / "p.beton")
    np.testing.assert_array_equal(got, np.asarray(natural_image(4)))


def _add_bad_files(root):
    good = io.BytesIO()
    natural_image(5, 200, 150).save(good, format="JPEG", quality=90)
    (root / "cat" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("this is not an image")
    png = io.BytesIO()
    natural_image(6).save(png, format="PNG")
    data = bytearray(png.getvalue())
    data[60:70] = b"\x00" * 10  # corrupt IDAT data: CRC mismatch
    (root / "fish" / "corrupt.png").write_bytes(bytes(data))
    return {"truncated.jpg", "empty.jpg", "text.jpg", "corrupt.png"}


def test_bad_files_fail_listing_all_and_write_nothing(folder, tmp_path):
    names = _add_bad_files(folder)
    out = tmp_path / "t.beton"
    with pytest.raises(UnreadableImages) as e:  # an input error: exit code 2 from the CLI
        write_beton(image_folder(folder), out, opts())
    msg = str(e.value)
    assert "\n" not in msg and len(e.value.bad) == 4
    assert "4 unreadable images" in msg and all(n in msg for n in names)
    assert "empty file" in msg
    assert list(tmp_path.glob("t.*")) == [] and not any(p.name.startswith(".t.") for p in tmp_path.iterdir())


def test_bad_files_skipped_and_listed(folder, tmp_path):
    names = _add_bad_files(folder)
    out = tmp_path / "s.beton"
    s = write_beton(image_folder(folder), out, opts(on_error="skip", verify=True))
    assert s["images"] == 9 and s["skipped"] == 4 and s["verified"]
    side = json.loads(out.with_suffix(".json").read_text())
    assert {os.path.basename(x["path"]) for x in side["skipped"]} == names
    assert all(x["reason"] for x in side["skipped"])
    assert len(read_back(out)) == 9


def test_sidecar_content(folder, tmp_path):
    out = tmp_path / "d.beton"
    write_beton(image_folder(folder), out, opts(max_resolution=256, jpeg_quality=85))
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["classes"] == ["cat", "dog", "fish"] and side["class_counts"] == [3, 3, 3]
    assert side["source"] == {"kind": "imagefolder", "root": str(folder)}
    assert side["options"]["max_resolution"] == 256 and side["options"]["jpeg_quality"] == 85
    assert side["files"][0] == "cat/img0.jpg" and side["labels"] == [0] * 3 + [1] * 3 + [2] * 3
    assert side["versions"]["ffcv"] == "1.0.2" and side["written_at"] and side["skipped"] == []
    assert side["summary"]["images"] == 9 and side["summary"]["bytes"] == out.stat().st_size


def test_refuses_existing_output_unless_overwrite(folder, tmp_path):
    out = tmp_path / "o.beton"
    write_beton(image_folder(folder), out, opts())
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        write_beton(image_folder(folder), out, opts())
    assert out.read_bytes() == before
    write_beton(image_folder(folder), out, opts(overwrite=True, write_mode="raw"))
    assert out.read_bytes() != before


def test_same_input_gives_identical_beton(folder, tmp_path):
    write_beton(image_folder(folder), tmp_path / "a.beton", opts())
    write_beton(image_folder(folder), tmp_path / "b.beton", opts())
    assert (tmp_path / "a.beton").read_bytes() == (tmp_path / "b.beton").read_bytes()
    # several workers on several work items: pages may be placed in another order, every record is the same
    write_beton(image_folder(folder), tmp_path / "c.beton", opts(chunk_size=2))
    assert [(img.tobytes(), y) for img, y in read_back(tmp_path / "a.beton")] == \
        [(img.tobytes(), y) for img, y in read_back(tmp_path / "c.beton")]


def test_dying_worker_fails_fast_and_leaves_nothing(folder, tmp_path, monkeypatch):
    def die(self, i):
        os._exit(7)  # a worker killed mid-write (OOM killer, segfault in a codec)
    monkeypatch.setattr(writer_mod._Records, "__getitem__", die)
    out = tmp_path / "w.beton"

    def hang(signum, frame):  # FFCV's own writer would wait forever: turn a hang into a failure
        raise AssertionError("the writer hung after its worker died")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        with pytest.raises(WriteError, match="exit code 7"):
            write_beton(image_folder(folder), out, opts())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert list(tmp_path.iterdir()) == [tmp_path / "train"]


def test_sigterm_mid_write_leaves_nothing(folder, tmp_path):
    # The worker stops at record 3 and says so, so the signal surely lands mid-write (no race with a fast disk).
    out = tmp_path / "out" / "x.beton"
    out.parent.mkdir()
    marker = tmp_path / "worker-blocked"
    child = (
        "import sys, time\n"
        "from rsb_ffcv.datasets import writer, cli\n"
        "get = writer._Records.__getitem__\n"
        "def slow(self, i):\n"
        "    if i == 3:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        time.sleep(3600)\n"
        "    return get(self, i)\n"
        "writer._Records.__getitem__ = slow\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, "--source.kind=imagefolder", f"--source.root={folder}",
                             f"--writer.out={out}", "--writer.num_workers=1", "--writer.chunk_size=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(12_000):  # bounded poll for the worker to reach record 3
            if marker.exists():
                break
            assert proc.poll() is None, f"writer ended early: {proc.communicate()[1].decode()[-2000:]}"
            time.sleep(0.01)
        else:
            pytest.fail("the writer worker never reached record 3")
        assert [p.name.startswith(".x.tmp-") and p.suffix == ".beton" for p in out.parent.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


def test_disk_full_leaves_nothing(folder, small_disk):
    with pytest.raises((WriteError, OSError)):
        write_beton(image_folder(folder), small_disk / "f.beton", opts(write_mode="raw"))
    assert list(small_disk.iterdir()) == []


def test_cli_errors_are_one_line(tmp_path, folder, capsys):
    from rsb_ffcv.datasets.cli import main

    def run(*argv):
        capsys.readouterr()
        rc = main(list(argv))
        return rc, *capsys.readouterr()
    rc, _, err = run("--source.kind=imagefolder", f"--source.root={tmp_path}/nope", f"--writer.out={tmp_path}/x.beton")
    assert rc == 2 and err.strip().count("\n") == 0 and "source.root" in err
    rc, _, err = run("--writer.bogus=1")
    assert rc == 2 and "unknown key 'writer.bogus'" in err
    rc, _, err = run("--writer.verify=maybe")
    assert rc == 2 and "writer.verify" in err
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"source:\n  kind: imagefolder\n  root: {folder}\n  subset: 6\nwriter:\n  out: {tmp_path}/s.beton\n"
                   f"  num_workers: 1\n")
    rc, out, _ = run("--config", str(cfg), "--writer.verify=true")
    assert rc == 0 and "6 images, 3 classes, 0 skipped" in out and "verified" in out
    assert json.loads((tmp_path / "s.json").read_text())["class_counts"] == [2, 2, 2]


def test_each_tool_accepts_only_its_own_keys(capsys):
    import rsb_ffcv.train  # noqa: F401  registers the trainer's sections in fastargs' global registry
    from rsb_ffcv.datasets.cli import main
    assert main(["--training.epochs=3"]) == 2
    assert "unknown key 'training.epochs'" in capsys.readouterr().err


def test_each_image_is_opened_once_and_png_checks_are_kept(tmp_path, monkeypatch):
    """The writer decodes every image once (validating first and decoding again for the write would run at 0.69x
    stock FFCV's writer); PNG, whose PIL plugin checks more than decoding does (CRCs), is opened twice."""
    from rsb_ffcv.datasets import images
    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    natural_image(1, 40, 30).save(jpg, quality=90)
    natural_image(2, 40, 30).save(png)
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    for path in (jpg, png):
        pixels, error = images.read_checked(path)
        assert error is None and pixels.shape == (30, 40, 3)
    assert opened == [str(jpg), str(png), str(png)]
    damaged = bytearray(png.read_bytes())
    damaged[-20] ^= 0xFF  # damaged PNG data is still refused
    bad = tmp_path / "c.png"
    bad.write_bytes(bytes(damaged))
    assert images.read_checked(bad)[0] is None


@pytest.mark.parametrize("kw,page_mib", [({}, 8), ({"page_mib": 2}, 2), ({"page_mib": 4, "max_resolution": 0}, 4)])
def test_page_size_can_be_chosen(folder, tmp_path, kw, page_mib):
    """writer.page_mib=2 (FFCV's smallest page) for betons read beyond RAM: the page-local order then mixes 4x more
    pages, hence classes, in the same memory."""
    from ffcv.reader import Reader
    write_beton(image_folder(folder), tmp_path / "p.beton", opts(**kw))
    assert Reader(str(tmp_path / "p.beton")).page_size == page_mib << 20


@pytest.mark.parametrize("kw,why", [({"page_mib": 3}, "a power of two"), ({"page_mib": 1}, "a power of two"),
                                    ({"page_mib": 2, "max_resolution": 1000}, "does not fit")])
def test_bad_page_sizes_are_refused_in_one_line(folder, tmp_path, kw, why):
    with pytest.raises(ConfigError, match=why):
        write_beton(image_folder(folder), tmp_path / "p.beton", opts(**kw))
