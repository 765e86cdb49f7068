"""Small classifiers of the dataset-distillation evaluation protocol, one registry.

ConvNet-D (DC/IDC): D × [conv3×3 (width) → norm → ReLU → avg-pool 2] → linear. Instance norm is
GroupNorm with one group per channel (affine), as in the reference code.
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
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), NORMS[norm](width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())  # [B, width · (size / 2^depth)^2]
        self.classifier = nn.Linear(width * (image_size >> depth) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, classes]
        return self.classifier(self.features(x))


# name -> constructor(in_channels, num_classes, image_size, width=..., norm=...)
NETS: dict[str, Callable[..., nn.Module]] = {f"convnet{d}": partial(ConvNet, depth=d) for d in (3, 4, 5, 6)}


def build_classifier(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                     norm: str = "instance") -> nn.Module:
    if name not in NETS:
        raise ValueError(f"evaluate.nets: unknown net {name!r}; expected one of {', '.join(NETS)}")
    return NETS[name](in_channels, num_classes, image_size, width=width, norm=norm)
