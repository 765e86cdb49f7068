"""Small classifiers of the dataset-distillation evaluation protocol, one registry.

- ConvNet-D (DC/IDC): D × [conv3×3 (width) → norm → ReLU → avg-pool 2] → linear.
- ResNet-18: basic blocks [2, 2, 2, 2], widths 64…512; ResNet-50 / ResNet-101: bottleneck blocks
  [3, 4, 6, 3] / [3, 4, 23, 3] (1×1 → 3×3 with the stride → 1×1 at 4× width, torchvision's "v1.5"). With batch
  norm, 1000 classes and the ImageNet stem they have torchvision's parameter counts, and
  `load_torchvision_resnet` loads torchvision's state dicts (keys renamed, values unchanged).
- ResNetAP-10: basic blocks [1, 1, 1, 1] whose stride-2 convolutions (and shortcuts) are replaced by a
  stride-1 convolution followed by 2×2 average pooling.
ResNets use the ImageNet stem (7×7 conv stride 2, 3×3 max-pool) for inputs of at least 128 px and a 3×3
stride-1 stem below that, so every net takes any size from 28 to 256 px. Instance norm is GroupNorm with
one group per channel (affine), as in the reference code; the norm is a config value.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instance": lambda c: nn.GroupNorm(c, c, affine=True),
    "batch": nn.BatchNorm2d,
    "none": lambda c: nn.Identity(),
}


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, depth: int, width: int = 128,
                 norm: str = "instance") -> None:
        super().__init__()
        if image_size >> depth < 1:
            raise ValueError(f"ConvNet-{depth} needs images of at least {2 ** depth} px, got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), NORMS[norm](width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.Flatten())  # [B, width · (size / 2^depth)^2]
        self.classifier = nn.Linear(width * (image_size >> depth) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, classes]
        return self.classifier(self.features(x))


def _down(conv: nn.Conv2d, avg_pool: bool) -> nn.Module:
    """A stride-2 convolution, or (ResNetAP) the same convolution at stride 1 followed by 2×2 avg-pool."""
    if not avg_pool:
        return conv
    conv.stride = (1, 1)
    return nn.Sequential(conv, nn.AvgPool2d(2))


def _shortcut(cin: int, cout: int, stride: int, norm: str, avg_pool: bool) -> nn.Module:
    """Identity, or (stride or width changes) a 1×1 convolution + norm: torchvision's `downsample`."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
    return nn.Sequential(_down(conv, avg_pool) if stride == 2 else conv, NORMS[norm](cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv1 = _down(conv1, avg_pool) if stride == 2 else conv1
        self.bn1, self.bn2 = NORMS[norm](cout), NORMS[norm](cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(cin, cout, stride, norm, avg_pool)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    EXPANSION = 4

    def __init__(self, cin: int, cout: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        mid = cout // self.EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), NORMS[norm](mid)
        conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.conv2, self.bn2 = _down(conv2, avg_pool) if stride == 2 else conv2, NORMS[norm](mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), NORMS[norm](cout)
        self.shortcut = _shortcut(cin, cout, stride, norm, avg_pool)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    LARGE_INPUT = 128  # from this size on, the ImageNet stem

    def __init__(self, in_channels: int, num_classes: int, image_size: int, blocks: tuple[int, ...],
                 avg_pool: bool, width: int = 64, norm: str = "instance", block: str = "basic") -> None:
        super().__init__()
        if image_size >= self.LARGE_INPUT:
            stem = [_down(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), avg_pool), NORMS[norm](width),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), NORMS[norm](width), nn.ReLU(inplace=True)]
        layers, channels = [], width
        expansion = getattr(BLOCKS[block], "EXPANSION", 1)
        for i, n in enumerate(blocks):
            out = width * 2**i * expansion
            for j in range(n):
                layers.append(BLOCKS[block](channels, out, 2 if i > 0 and j == 0 else 1, norm, avg_pool))
                channels = out
        self.stem_modules = len(stem)  # features = stem, blocks, pool, flatten (torchvision_keys reads this)
        self.blocks = blocks
        # [B, 8 · width · expansion]
        self.features = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, classes]
        return self.classifier(self.features(x))


def _resnet(in_channels: int, num_classes: int, image_size: int, width: int = 64, norm: str = "instance",
            *, blocks: tuple[int, ...], avg_pool: bool, block: str = "basic") -> ResNet:
    # `width` of the evaluation config is the ConvNet width; ResNets keep their standard 64 base width
    return ResNet(in_channels, num_classes, image_size, blocks, avg_pool, 64, norm, block)


# name -> constructor(in_channels, num_classes, image_size, width=..., norm=...)
NETS: dict[str, Callable[..., nn.Module]] = {
    **{f"convnet{d}": partial(ConvNet, depth=d) for d in (3, 4, 5, 6)},
    "resnetap10": partial(_resnet, blocks=(1, 1, 1, 1), avg_pool=True),
    "resnet18": partial(_resnet, blocks=(2, 2, 2, 2), avg_pool=False),
    "resnet50": partial(_resnet, blocks=(3, 4, 6, 3), avg_pool=False, block="bottleneck"),
    "resnet101": partial(_resnet, blocks=(3, 4, 23, 3), avg_pool=False, block="bottleneck"),
}
TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101")  # same layout as torchvision's models of the name


# each net's norm in the protocol (PROTOCOL.md): instance norm for the ConvNets and ResNetAP-10, batch norm for
# the standard ResNets
DEFAULT_NORM = {name: "batch" if name in TORCHVISION_RESNETS else "instance" for name in NETS}


def torchvision_keys(model: ResNet, keys: list[str]) -> dict[str, str]:
    """torchvision ResNet state-dict key -> this ResNet's key (conv1/bn1 -> the stem, layer{i}.{j} -> its
    block in `features`, downsample -> shortcut, fc -> classifier). Keys it does not know map to themselves."""
    prefixes = {"conv1.": "features.0.", "bn1.": "features.1.", "fc.": "classifier."}
    block = model.stem_modules
    for i, n in enumerate(model.blocks):
        for j in range(n):
            prefixes[f"layer{i + 1}.{j}."] = f"features.{block}."
            block += 1
    out = {}
    for key in keys:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        new = key if prefix is None else prefixes[prefix] + key[len(prefix):]
        out[key] = new.replace(".downsample.", ".shortcut.")
    return out


def load_torchvision_resnet(model: ResNet, state: dict[str, Tensor], source: str) -> ResNet:
    """Load a torchvision-layout ResNet state dict into `model` (same architecture, ImageNet stem, batch
    norm). Any missing, extra or mis-shaped tensor: ValueError naming `source` and the first such key."""
    renamed = {torchvision_keys(model, list(state))[k]: v for k, v in state.items()}
    own = model.state_dict()
    for k in own:  # torchvision's model-zoo files predate BatchNorm's step counter: keep the model's
        if k.endswith(".num_batches_tracked") and k not in renamed:
            renamed[k] = own[k]
    missing, extra = sorted(set(own) - set(renamed)), sorted(set(renamed) - set(own))
    if missing or extra:
        first = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"{source}: not the state dict of this ResNet ({len(missing)} missing, {len(extra)} "
                         f"unexpected keys; {first})")
    for k, v in renamed.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(renamed)
    return model


def build_classifier(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                     norm: str | None = None) -> nn.Module:
    """A classifier from NETS; norm None = the net's protocol default (DEFAULT_NORM)."""
    if name not in NETS:
        raise ValueError(f"evaluate.nets: unknown net {name!r}; expected one of {', '.join(NETS)}")
    return NETS[name](in_channels, num_classes, image_size, width=width, norm=norm or DEFAULT_NORM[name])
