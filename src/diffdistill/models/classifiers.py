"""Small classifiers of the dataset-distillation evaluation protocol, one registry.

- ConvNet-D (DC/IDC): D × [conv3×3 (width) → norm → ReLU → avg-pool 2] → linear.
- ResNet-18: basic blocks [2, 2, 2, 2], widths 64…512.
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


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv1 = _down(conv1, avg_pool) if stride == 2 else conv1
        self.bn1, self.bn2 = NORMS[norm](cout), NORMS[norm](cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut = nn.Sequential(_down(conv, avg_pool) if stride == 2 else conv, NORMS[norm](cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    LARGE_INPUT = 128  # from this size on, the ImageNet stem

    def __init__(self, in_channels: int, num_classes: int, image_size: int, blocks: tuple[int, ...],
                 avg_pool: bool, width: int = 64, norm: str = "instance") -> None:
        super().__init__()
        if image_size >= self.LARGE_INPUT:
            stem = [_down(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), avg_pool), NORMS[norm](width),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), NORMS[norm](width), nn.ReLU(inplace=True)]
        layers, channels = [], width
        for i, n in enumerate(blocks):
            out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(channels, out, 2 if i > 0 and j == 0 else 1, norm, avg_pool))
                channels = out
        self.features = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [B, 8 · width]
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, classes]
        return self.classifier(self.features(x))


def _resnet(in_channels: int, num_classes: int, image_size: int, width: int = 64, norm: str = "instance",
            *, blocks: tuple[int, ...], avg_pool: bool) -> ResNet:
    # `width` of the evaluation config is the ConvNet width; ResNets keep their standard 64 base width
    return ResNet(in_channels, num_classes, image_size, blocks, avg_pool, 64, norm)


# name -> constructor(in_channels, num_classes, image_size, width=..., norm=...)
NETS: dict[str, Callable[..., nn.Module]] = {
    **{f"convnet{d}": partial(ConvNet, depth=d) for d in (3, 4, 5, 6)},
    "resnetap10": partial(_resnet, blocks=(1, 1, 1, 1), avg_pool=True),
    "resnet18": partial(_resnet, blocks=(2, 2, 2, 2), avg_pool=False),
}


# each net's norm in the protocol (PROTOCOL.md): instance everywhere except the standard ResNet-18
DEFAULT_NORM = {name: "batch" if name == "resnet18" else "instance" for name in NETS}


def build_classifier(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                     norm: str | None = None) -> nn.Module:
    """A classifier from NETS; norm None = the net's protocol default (DEFAULT_NORM)."""
    if name not in NETS:
        raise ValueError(f"evaluate.nets: unknown net {name!r}; expected one of {', '.join(NETS)}")
    return NETS[name](in_channels, num_classes, image_size, width=width, norm=norm or DEFAULT_NORM[name])
