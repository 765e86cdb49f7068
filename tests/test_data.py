import numpy as np
import pytest
import torch
from helpers import make_shapes
from PIL import Image

from diffdistill.config import DataConfig
from diffdistill.data.classes import PRESETS, condition_ids, imagenet_wnids, resolve_classes
from diffdistill.data.datasets import data_classes, load_data, load_image_folder
from diffdistill.errors import StageError


def test_presets_keep_the_field_class_order_and_imagenet_ids():
    assert len(imagenet_wnids()) == 1000 and imagenet_wnids()[0] == "n01440764"
    woof = list(PRESETS["imagewoof"]())
    assert woof[0] == "n02096294" and len(woof) == 10
    ids, n = condition_ids(woof, "imagenet")
    assert n == 1000 and ids[:3] == [193, 182, 258]
    assert list(PRESETS["imageidc"]()) == list(PRESETS["imagenet100"]())[:10]
    assert PRESETS["imageidc"]()[0] == "n02869837" and len(PRESETS["imagenet100"]()) == 100
    assert condition_ids(["a", "b"], "local") == ([0, 1], 2)
    with pytest.raises(StageError, match="not ImageNet-1K wnids"):
        condition_ids(["cat"], "imagenet")


def test_resolve_classes_errors():
    assert resolve_classes(("b", "a"), ["a", "b", "c"], "X") == ["b", "a"]
    with pytest.raises(StageError, match="unknown preset 'imagewolf'; presets: imagewoof"):
        resolve_classes("imagewolf", ["a"], "X")
    with pytest.raises(StageError, match="data.classes: z not found in X"):
        resolve_classes(("a", "z"), ["a", "b"], "X")
    with pytest.raises(StageError, match="duplicate class names a"):
        resolve_classes(("a", "a"), ["a", "b"], "X")
    with pytest.raises(StageError, match="n02096294, .* not found in X"):
        resolve_classes("imagewoof", ["a", "b"], "X")  # a preset against a folder without those wnids


def test_digits_split_is_seeded_and_stratified():
    cfg = DataConfig(image_size=16)
    train, val = load_data(cfg)
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.uint8
    assert len(train) + len(val) == 1797 and abs(len(val) - 360) <= 1
    assert torch.bincount(val.labels).min() >= 34  # every digit in val
    again, _ = load_data(cfg)
    assert train.sha256() == again.sha256()
    sub, sub_val = load_data(DataConfig(classes=("3", "7")))
    assert sub.classes == ["3", "7"] and set(sub.labels.tolist()) == {0, 1}
    assert data_classes(DataConfig(classes=("3", "7"))) == ["3", "7"]


def test_folder_dataset_rgb_mixed_sizes(tmp_path):
    make_shapes(tmp_path / "train", per_class=4)
    data = load_image_folder(tmp_path / "train", ["square", "circle"], 20, None)
    assert data.images.shape == (8, 3, 20, 20)
    assert data.labels.tolist() == [0] * 4 + [1] * 4
    assert data.files[0].endswith("square/000.jpg")


def test_folder_dataset_grayscale_cmyk_and_16bit(tmp_path):
    gray = tmp_path / "g" / "a"
    gray.mkdir(parents=True)
    Image.fromarray(np.full((10, 14), 200, np.uint8), "L").save(gray / "0.png")
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(gray / "1.png")  # 16-bit
    data = load_image_folder(tmp_path / "g", ["a"], 8, None)
    assert data.channels == 1  # every file grayscale -> one channel
    assert data.images[0].float().mean().item() == pytest.approx(200, abs=1)
    assert data.images[1].float().mean().item() == pytest.approx(40000 / 65535 * 255, abs=1)
    Image.new("CMYK", (9, 9), (0, 255, 255, 0)).save(gray / "2.jpg")  # red in CMYK
    data = load_image_folder(tmp_path / "g", ["a"], 8, None)
    assert data.channels == 3
    red = data.images[2].float().mean((1, 2))
    assert red[0] > 200 and red[1] < 60
    assert load_image_folder(tmp_path / "g", ["a"], 8, 1).channels == 1


def test_cmyk_jpeg_decodes_as_pils_rgb_conversion(tmp_path):
    (tmp_path / "a").mkdir()
    arr = np.random.default_rng(0).integers(0, 256, (12, 12, 4), dtype=np.uint8)  # varied, not one colour
    Image.fromarray(arr, "CMYK").save(tmp_path / "a" / "c.jpg")
    with Image.open(tmp_path / "a" / "c.jpg") as img:
        assert img.mode == "CMYK"
        expected = np.asarray(img.convert("RGB"))
    data = load_image_folder(tmp_path, ["a"], 12, None)  # the file's own size: no resize
    assert data.channels == 3
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("value, expected", [
    (40000, 155),  # 155.6: scaled by 255 / 65535 and rounded down (/ 256 or rounding give 156)
    (1000, 3),  # 3.9
    (65535, 255),
    (200, 200),  # no value above 255: taken as already 8-bit
])
def test_16bit_png_scales_to_8_bits(tmp_path, value, expected):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((10, 10), value, np.uint16)).save(tmp_path / "a" / "d.png")
    with Image.open(tmp_path / "a" / "d.png") as img:
        assert img.mode == "I;16"
    data = load_image_folder(tmp_path, ["a"], 10, 3)
    assert data.images.unique().tolist() == [expected]


@pytest.mark.parametrize("breakage, message", [
    ("missing_root", "data.train: folder .* does not exist"),
    ("no_classes", "has no class subfolders"),
    ("empty_class", "class folder .*circle has no images"),
    ("zero_byte", "cannot read image .*000.jpg"),
    ("garbage", "cannot read image .*bad.png"),
    ("truncated", "cannot read image .*000.jpg"),
    ("missing_val_class", "data.val: class folder .*triangle does not exist"),
])
def test_bad_folders_give_one_clear_line(tmp_path, breakage, message):
    root = tmp_path / "train"
    make_shapes(root, per_class=2)
    make_shapes(tmp_path / "val", per_class=1)
    cfg = DataConfig(train=str(root), val=str(tmp_path / "val"), image_size=16)
    if breakage == "missing_root":
        cfg = DataConfig(train=str(tmp_path / "nope"), val=str(tmp_path / "val"))
    elif breakage == "no_classes":
        cfg = DataConfig(train=str(tmp_path / "empty"), val=str(tmp_path / "val"))
        (tmp_path / "empty").mkdir()
    elif breakage == "empty_class":
        for f in (root / "circle").iterdir():
            f.unlink()
        (root / "circle" / "notes.txt").write_text("not an image")
    elif breakage == "zero_byte":
        (root / "circle" / "000.jpg").write_bytes(b"")
    elif breakage == "garbage":
        (root / "circle" / "bad.png").write_bytes(b"this is not a png")
    elif breakage == "truncated":
        f = root / "circle" / "000.jpg"
        f.write_bytes(f.read_bytes()[:200])
    elif breakage == "missing_val_class":
        for f in (tmp_path / "val" / "triangle").iterdir():
            f.unlink()
        (tmp_path / "val" / "triangle").rmdir()
    with pytest.raises(StageError, match=message) as err:
        load_data(cfg)
    assert "\n" not in str(err.value)


def test_val_is_required_for_folders(tmp_path):
    make_shapes(tmp_path / "train", per_class=1)
    with pytest.raises(StageError, match="data.val is not set"):
        load_data(DataConfig(train=str(tmp_path / "train")))
    train, val = load_data(DataConfig(train=str(tmp_path / "train")), need_val=False)
    assert val is None and train.classes == ["circle", "square", "triangle"]
