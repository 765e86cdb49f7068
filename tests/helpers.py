"""Tiny image folders made on the fly: a dataset that is not digits (coloured shapes)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    fg = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def make_shapes(root: Path, per_class: int, size: int = 24, seed: int = 0, classes=SHAPES) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = ".png" if i % 2 else ".jpg"
            shape_image(kind, size + int(rng.integers(0, 9)), rng).save(root / kind / f"{i:03d}{ext}")
    return root


def digits_set(root: Path, per_class: int) -> Path:
    """The first `per_class` digits train images of each class as a folder set (a stand-in distilled set)."""
    from diffdistill.config import DataConfig
    from diffdistill.data.datasets import load_data

    train, _ = load_data(DataConfig())
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i, img in enumerate(train.images[train.labels == c][:per_class]):
            Image.fromarray(img[0].numpy()).save(root / str(c) / f"{i}.png")
    return root


# torchvision's ResNets: block kind and blocks per stage (from its published architecture, not its code)
LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3)),
          "resnet101": ("bottleneck", (3, 4, 23, 3))}


def torchvision_state(net: str, classes: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's keys and shapes for `net` (v1.5 bottlenecks: stride on conv2)."""
    kind, blocks = LAYOUT[net]
    state: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(name, c):
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        state[f"{name}.num_batches_tracked"] = torch.tensor(7)

    conv("conv1", 3, 64, 7)
    bn("bn1", 64)
    cin = 64
    for i, n in enumerate(blocks):
        width = 64 * 2**i
        cout = width * (4 if kind == "bottleneck" else 1)
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if kind == "basic":
                conv(f"{p}.conv1", cin, width, 3), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
            else:
                conv(f"{p}.conv1", cin, width, 1), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", width, cout, 1), bn(f"{p}.bn3", cout)
            if j == 0 and (i > 0 or cin != cout):
                conv(f"{p}.downsample.0", cin, cout, 1), bn(f"{p}.downsample.1", cout)
            cin = cout
    state["fc.weight"] = torch.randn(classes, cin, generator=g) * 0.01
    state["fc.bias"] = torch.randn(classes, generator=g) * 0.01
    return state
