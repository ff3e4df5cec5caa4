"""Labels, class order and file order of every source, against torchvision and hand-built fixtures."""
import json

import numpy as np
import pytest
from conftest import make_folder, natural_image
from torchvision.datasets import ImageFolder

from rsb_ffcv.config import ConfigError
from rsb_ffcv.datasets import demo
from rsb_ffcv.datasets.sources import flat_val, image_folder, imagenet_v2, stratified_subset


def test_imagefolder_matches_torchvision(tmp_path):
    root = make_folder(tmp_path / "tr", classes=("n02", "n01", "B", "a"), per_class=2)
    (root / "a" / "nested").mkdir()
    natural_image(7).save(root / "a" / "nested" / "deep.JPEG")  # nested dir, upper-case extension
    (root / "B" / "notes.txt").write_text("not an image")
    src = image_folder(root)
    tv = ImageFolder(str(root))
    assert src.classes == tv.classes
    assert list(zip(src.files, src.labels)) == [(p, y) for p, y in tv.samples]
    assert any(p.endswith("notes.txt") for p, _ in src.ignored)


def test_imagefolder_errors(tmp_path):
    root = make_folder(tmp_path / "tr", classes=("a", "b"), per_class=1)
    (root / "empty1").mkdir()
    with pytest.raises(ConfigError, match="empty1"):
        image_folder(root)
    (root / "empty1").rmdir()
    val = make_folder(tmp_path / "val", classes=("a", "c"), per_class=1)
    with pytest.raises(ConfigError, match=r"missing \['b'\].*unknown \['c'\]"):
        image_folder(val, classes_from=str(root))
    with pytest.raises(ConfigError, match="not a directory"):
        image_folder(tmp_path / "nope")


def _flat(tmp_path, n=6):
    root = tmp_path / "flat"
    root.mkdir()
    synsets = ["n01440764", "n01443537", "n01484850"]
    truth = {}
    for i in range(1, n + 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        natural_image(i).save(root / f"{stem}.JPEG")
        truth[stem] = synsets[(i * 7) % 3]
    return root, synsets, truth


def test_flat_val_loc_csv_maps_to_train_indices(tmp_path):
    root, synsets, truth = _flat(tmp_path)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"{k},{v} 1 2 3 4 {v} 5 6 7 8" for k, v in reversed(list(truth.items()))]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    train = make_folder(tmp_path / "train", classes=tuple(synsets), per_class=1)
    src = flat_val(root, csv, classes_from=str(train))
    assert src.classes == synsets
    assert [p.split("/")[-1] for p in src.files] == sorted(f"{k}.JPEG" for k in truth)
    assert src.labels == [synsets.index(truth[k]) for k in sorted(truth)]


def test_flat_val_devkit_ground_truth(tmp_path):
    root, synsets, truth = _flat(tmp_path)
    # The devkit orders synsets by ILSVRC2012_ID, not alphabetically.
    devkit_order = [synsets[2], synsets[0], synsets[1]]
    (tmp_path / "synsets.txt").write_text("\n".join(devkit_order))
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("\n".join(str(devkit_order.index(truth[k]) + 1) for k in sorted(truth)))
    src = flat_val(root, gt, synsets_file=str(tmp_path / "synsets.txt"))
    assert src.classes == synsets
    assert src.labels == [synsets.index(truth[k]) for k in sorted(truth)]
    with pytest.raises(ConfigError, match="synsets_file"):
        flat_val(root, gt)


def test_flat_val_label_file_mismatches(tmp_path):
    root, synsets, truth = _flat(tmp_path)
    csv = tmp_path / "LOC_val_solution.csv"
    items = list(truth.items())
    csv.write_text("ImageId,PredictionString\n" + "\n".join(f"{k},{v} 0 0 1 1" for k, v in items[1:]) + "\n")
    with pytest.raises(ConfigError, match=f"1 images .* no entry.*{items[0][0]}"):
        flat_val(root, csv)
    csv.write_text("ImageId,PredictionString\n" + "\n".join(f"{k},{v} 0 0 1 1" for k, v in items)
                   + "\nILSVRC2012_val_99999999,n01440764 0 0 1 1\n")
    with pytest.raises(ConfigError, match="names 1 files not in.*ILSVRC2012_val_99999999"):
        flat_val(root, csv)
    train = make_folder(tmp_path / "train", classes=(synsets[0], synsets[1], "n09999999"), per_class=1)
    csv.write_text("ImageId,PredictionString\n" + "\n".join(f"{k},{v} 0 0 1 1" for k, v in items) + "\n")
    with pytest.raises(ConfigError, match="differs"):
        flat_val(root, csv, classes_from=str(train))


def test_imagenet_v2_uses_directory_index_not_string_order(tmp_path):
    root = tmp_path / "v2"
    for d in ("0", "2", "10"):
        (root / d).mkdir(parents=True)
        natural_image(int(d)).save(root / d / "a.jpeg")
    src = imagenet_v2(root, num_classes=12)
    assert src.labels == [0, 2, 10]
    assert [p.split("/")[-2] for p in src.files] == ["0", "2", "10"]
    (root / "1000x").mkdir()
    with pytest.raises(ConfigError, match="1000x"):
        imagenet_v2(root, num_classes=12)


def test_classes_from_sidecar(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"classes": ["b", "a"]}))
    root = make_folder(tmp_path / "v", classes=("a", "b"), per_class=1)
    src = image_folder(root, classes_from=str(tmp_path / "train.json"))
    assert src.classes == ["b", "a"]
    assert {f.split("/")[-2]: y for f, y in zip(src.files, src.labels)} == {"b": 0, "a": 1}


def test_stratified_subset_is_seeded_and_proportional():
    labels = [0] * 600 + [1] * 300 + [2] * 100
    a = stratified_subset(labels, 100, seed=3)
    assert a == stratified_subset(labels, 100, seed=3) != stratified_subset(labels, 100, seed=4)
    assert a == sorted(a) and len(set(a)) == 100
    counts = np.bincount(np.asarray(labels)[a], minlength=3)
    assert abs(counts[0] - 60) <= 1 and abs(counts[1] - 30) <= 1 and abs(counts[2] - 10) <= 1


def test_demo_dataset_is_deterministic(tmp_path):
    a = demo.generate(tmp_path / "a", per_class=2, seed=5)
    b = demo.generate(tmp_path / "b", per_class=2, seed=5)
    c = demo.generate(tmp_path / "c", per_class=2, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 2 * len(demo.CLASSES) >= 20
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    boxes = json.loads((a / demo.BOXES_FILE).read_text())
    assert set(boxes) == {f.as_posix() for f in files}
    for f, (x0, y0, x1, y1) in boxes.items():
        from PIL import Image
        w, h = Image.open(a / f).size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
