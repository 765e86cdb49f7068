"""Labelled image sets held in memory as uint8 tensors: the built-in `digits` (scikit-learn) and folders of
class subfolders of images (any size, RGB or grayscale; resized and center-cropped to `image_size`)."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffdistill.config import DataConfig
from diffdistill.data.classes import resolve_classes
from diffdistill.errors import StageError
from diffdistill.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class ImageSet:
    images: Tensor  # [N, C, H, W] uint8
    labels: Tensor  # [N] int64, indices into `classes`
    classes: list[str]
    files: list[str] | None = None  # where each image came from (None for built-in data)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()

    def subset(self, index: Tensor) -> ImageSet:
        files = [self.files[i] for i in index.tolist()] if self.files is not None else None
        return ImageSet(self.images[index], self.labels[index], self.classes, files)

    def select(self, index: Tensor) -> ImageSet:
        """The images at `index` (ImageFiles.select's twin: a set already read stays read)."""
        return self.subset(index)

    def as_float(self) -> Tensor:
        """Images scaled to [-1, 1], float32."""
        return self.images.float() / 127.5 - 1


@dataclass
class ImageFiles:
    """A labelled folder listed but not read: `subset` decodes only the images asked for (random-real
    subsets of ImageNet-scale data without holding the train set in memory)."""

    files: list[Path]
    labels: Tensor  # [N] int64
    classes: list[str]
    root: Path
    image_size: int
    channels: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: Tensor) -> ImageSet:
        idx = index.tolist()
        return read_images([self.files[i] for i in idx], self.labels[index].tolist(), self.classes,
                           self.image_size, self.channels, self.root)

    def select(self, index: Tensor) -> ImageFiles:
        """The images at `index`, still listed, not read."""
        return ImageFiles([self.files[i] for i in index.tolist()], self.labels[index], self.classes, self.root,
                          self.image_size, self.channels)

    def nbytes(self, size: int | None = None) -> int:
        """Bytes of the set's uint8 pixels at `size` px (default: image_size) once read."""
        return len(self) * self.channels * (size or self.image_size) ** 2

    def sha256(self) -> str:
        """Hash of the listing (relative paths, byte sizes, labels), not of the pixels."""
        h = hashlib.sha256()
        for rel, size, y in file_listing(self.files, self.labels.tolist(), self.root):
            h.update(f"{rel}\t{size}\t{y}\n".encode())
        h.update("\n".join(self.classes).encode())
        return "listing:" + h.hexdigest()


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float -> [0, 255] uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """RGB uint8 [size, size, 3] and whether the file was grayscale."""
    try:
        with Image.open(path) as img:
            img.load()
            gray = img.mode in _GRAY_MODES
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit: scale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                hi = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray((arr / hi * 255).clip(0, 255).astype(np.uint8))
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt files
        raise StageError(f"cannot read image {path}: {err}") from None
    return np.asarray(resize_center_crop(rgb, size)), gray


def _peeked(files: list[Path], count: int) -> Iterator[tuple[str, tuple[int, int]]]:
    """(mode, (width, height)) of `count` files spread over the list, from their headers (not decoded)."""
    step = max(1, len(files) // count)
    for path in files[::step][:count]:
        try:
            with Image.open(path) as img:
                yield img.mode, img.size
        except Exception as err:  # PIL raises many types for corrupt files
            raise StageError(f"cannot read image {path}: {err}") from None


def peek_channels(files: list[Path], count: int = 64) -> int:
    """1 if `count` files spread over the list are all grayscale, else 3: the channel count without decoding
    the whole set (a set that mixes them is read as RGB when all its images are decoded)."""
    return 3 if any(mode not in _GRAY_MODES for mode, _ in _peeked(files, count)) else 1


def peek_sides(files: list[Path], count: int = 64) -> tuple[int, int]:
    """The smallest and largest shorter side (px) of `count` files spread over the list (their headers)."""
    sides = [min(size) for _, size in _peeked(files, count)]
    return min(sides), max(sides)


def list_class_folders(root: Path, key: str) -> list[str]:
    if not root.is_dir():
        raise StageError(f"{key}: folder {root} does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise StageError(f"{key}: folder {root} has no class subfolders (expected ROOT/CLASS/IMAGE files)")
    return names


def file_listing(files: list[Path], labels: list[int], root: str | Path) -> list[tuple[str, int, int]]:
    """(path relative to root, byte size, label) of each file: identifies a folder's contents without reading
    them (moving the folder keeps it; editing a file changes it in practice)."""
    return [(str(f.relative_to(root)), f.stat().st_size, y) for f, y in zip(files, labels)]


def list_images(root: str | Path, classes: list[str], key: str = "data.train") -> tuple[list[Path], list[int]]:
    """Image files of `classes` (subfolders of `root`) and their labels, in class order then file-name order."""
    root = Path(root)
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            there = f"{root} has {', '.join(found[:8])}{' ...' if len(found) > 8 else ''}" if found else \
                f"{root} has no class subfolders" if root.is_dir() else f"{root} does not exist"
            raise StageError(f"{key}: class folder {folder} does not exist ({there}; expected one subfolder per "
                             f"class: {', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''})")
        entries = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        found = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS)
        skipped += [p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not found:
            raise StageError(
                f"{key}: class folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        files += found
        labels += [label] * len(found)
    if skipped:  # README files, .txt labels, ...: not an error, but said
        print(f"diffdistill: note: {key}: skipped {len(skipped)} files that are not images by their extension "
              f"(e.g. {skipped[0]})", file=sys.stderr)
    return files, labels


def read_images(files: list[Path], labels: list[int], classes: list[str], image_size: int,
                channels: int | None, root: str | Path) -> ImageSet:
    """Decode, resize and center-crop `files` into an ImageSet (channels None: 1 if all are grayscale)."""
    return _stack(_read_images(files, image_size, Path(root)), labels, classes, files, channels)


def load_image_folder(root: str | Path, classes: list[str], image_size: int, channels: int | None,
                      key: str = "data.train") -> ImageSet:
    """All images of `classes` (subfolders of `root`), in class order then file-name order."""
    files, labels = list_images(root, classes, key)
    return read_images(files, labels, classes, image_size, channels, root)


def read_val_labels(path: str | Path) -> dict[str, str]:
    """Image stem -> wnid from "NAME WNID" lines or the CSV "ImageId,PredictionString" (first word = wnid)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"data.val_labels: file {path} does not exist")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0] == "ImageId":
            continue
        if len(parts) < 2 or not parts[1].startswith("n"):
            raise StageError(f"data.val_labels: {path} line {n}: expected 'IMAGE WNID', got {line!r}")
        out[Path(parts[0]).stem] = parts[1]
    return out


def list_flat_folder(root: str | Path, labels_file: str | Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """ImageNet val layout: the images of `classes` in one flat folder and their labels from `labels_file`."""
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"data.val: folder {root} does not exist")
    wnid_of = read_val_labels(labels_file)
    index = {c: i for i, c in enumerate(classes)}
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in wnid_of
                   and wnid_of[p.stem] in index)
    labels = [index[wnid_of[p.stem]] for p in files]
    found = {wnid_of[p.stem] for p in files}
    missing = [c for c in classes if c not in found]
    if missing:
        raise StageError(f"data.val: no image of class {', '.join(missing[:5])} in {root} per {labels_file}")
    return files, labels


def _read_images(files: list[Path], size: int, root: Path) -> list[tuple[np.ndarray, bool]]:
    """Decode in threads (PIL releases the GIL); a progress bar for large folders."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(progress(pool.map(lambda p: _read_image(p, size), files), total=len(files),
                             desc=f"reading {root}", unit="img", disable=len(files) < 2000, leave=False))


def _stack(results: list[tuple[np.ndarray, bool]], labels: list[int], classes: list[str], files: list[Path],
           channels: int | None) -> ImageSet:
    images = torch.from_numpy(np.stack([r[0] for r in results])).permute(0, 3, 1, 2).contiguous()
    if channels is None:
        channels = 1 if all(r[1] for r in results) else 3
    if channels == 1:
        # grayscale decoded to RGB has equal channels; otherwise use ITU-R 601 luma (PIL's "L")
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), list(classes), [str(f) for f in files])


def _digits(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw = (bunch.images / 16.0 * 255).round().astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
    resized = np.stack([
        np.asarray(Image.fromarray(im).resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR))
        for im in raw
    ])
    images = torch.from_numpy(resized).unsqueeze(1)  # [N, 1, S, S]
    if cfg.channels == 3:
        images = images.repeat(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=cfg.val_fraction, random_state=cfg.split_seed,
                                          stratify=bunch.target)
    full = ImageSet(images, labels, list(BUILTIN_CLASSES["digits"]))
    train, val = full.subset(torch.from_numpy(np.sort(train_idx))), full.subset(torch.from_numpy(np.sort(val_idx)))
    names = resolve_classes(cfg.classes, full.classes, "the digits dataset")
    return select_classes(train, names), select_classes(val, names)


def select_classes(data: ImageSet, names: list[str]) -> ImageSet:
    """Keep only `names` and relabel them 0..len(names)-1 in that order."""
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    for new, name in enumerate(names):
        remap[data.classes.index(name)] = new
    keep = (remap[data.labels] >= 0).nonzero().squeeze(1)
    out = data.subset(keep)
    return ImageSet(out.images, remap[out.labels], list(names), out.files)


BUILTINS = {"digits": _digits}
BUILTIN_CLASSES = {"digits": tuple(str(d) for d in range(10))}


def load_data(cfg: DataConfig, need_val: bool = True) -> tuple[ImageSet, ImageSet | None]:
    """(train, val) for the config: the built-in dataset, or `data.train` / `data.val` folders."""
    if cfg.train is None:
        if cfg.val is not None:
            raise StageError("data.val is set but data.train is not; set both to use your own folders")
        return BUILTINS[cfg.builtin](cfg)
    names = data_classes(cfg)
    if need_val and cfg.val is None:
        raise StageError("data.val is not set: evaluation needs a folder of real validation images")
    train = load_image_folder(cfg.train, names, cfg.image_size, cfg.channels, "data.train")
    if not need_val:
        return train, None
    return train, load_val(cfg, names, train.channels)


def load_val(cfg: DataConfig, names: list[str], channels: int | None) -> ImageSet:
    """`data.val`: class subfolders, or the ImageNet flat layout with `data.val_labels`."""
    files, labels = _val_files(cfg, names)
    return read_images(files, labels, names, cfg.image_size, channels, cfg.val)


def list_val(cfg: DataConfig, names: list[str], channels: int) -> ImageFiles:
    """`data.val` listed, not read (see ImageFiles)."""
    files, labels = _val_files(cfg, names)
    return ImageFiles(files, torch.tensor(labels, dtype=torch.long), names, Path(cfg.val), cfg.image_size, channels)


def _val_files(cfg: DataConfig, names: list[str]) -> tuple[list[Path], list[int]]:
    if cfg.val is None:
        raise StageError("data.val is not set: evaluation needs a folder of real validation images")
    if cfg.val_labels:
        return list_flat_folder(cfg.val, cfg.val_labels, names)
    list_class_folders(Path(cfg.val), "data.val")
    return list_images(cfg.val, names, "data.val")


def list_train(cfg: DataConfig, channels: int) -> ImageFiles:
    """`data.train` listed, not read (see ImageFiles)."""
    names = data_classes(cfg)
    files, labels = list_images(cfg.train, names)
    return ImageFiles(files, torch.tensor(labels, dtype=torch.long), names, Path(cfg.train), cfg.image_size, channels)


def train_counts(cfg: DataConfig) -> tuple[dict[str, int], int]:
    """Images per class of the train set, in class order, and its channel count (`data.channels`, else a peek
    at a few files): listed, not decoded (the small built-in set is read)."""
    counts, channels, _ = train_listing(cfg)
    return counts, channels


def train_listing(cfg: DataConfig) -> tuple[dict[str, int], int, list[Path] | None]:
    """`train_counts` and the train files it listed (None for a built-in set)."""
    names = data_classes(cfg)
    files = None
    if cfg.train is None:
        train, _ = load_data(cfg, need_val=False)
        labels, channels = train.labels.tolist(), train.channels
    else:
        files, labels = list_images(cfg.train, names, "data.train")
        channels = cfg.channels or peek_channels(files)
    per = Counter(labels)
    return {name: per[c] for c, name in enumerate(names)}, channels, files


def data_classes(cfg: DataConfig) -> list[str]:
    """The run's class names in order, without reading any image."""
    if cfg.train is None:
        return resolve_classes(cfg.classes, list(BUILTIN_CLASSES[cfg.builtin]), f"the {cfg.builtin} dataset")
    return resolve_classes(cfg.classes, list_class_folders(Path(cfg.train), "data.train"), cfg.train)
