"""Class lists: ImageNet-1K wnids (line index = ImageNet class id) and the subset presets, in the class
order the field's class-list files use, so that class ids match theirs."""

from __future__ import annotations

from functools import cache
from importlib import resources

from diffdistill.errors import StageError


@cache
def _read_list(name: str) -> tuple[str, ...]:
    text = resources.files("diffdistill.data").joinpath("lists", name).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_wnids() -> tuple[str, ...]:
    return _read_list("imagenet1k_wnids.txt")


PRESETS = {
    "imagewoof": lambda: ("n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
                          "n02089973", "n02087394", "n02115641", "n02099601", "n02105641"),
    "imagenette": lambda: ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                           "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"),
    "imageidc": lambda: _read_list("imagenet100_wnids.txt")[:10],  # first 10 of IDC's ImageNet-100
    "imagenet100": lambda: _read_list("imagenet100_wnids.txt"),
    "imagenet1k": imagenet_wnids,
}


def imagenet_ids(wnids: list[str]) -> list[int]:
    """ImageNet-1K class id of each wnid (what an ImageNet-pretrained DiT is conditioned on)."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise StageError(f"model.class_ids=imagenet: {', '.join(unknown[:5])} are not ImageNet-1K wnids")
    return [index[w] for w in wnids]


def resolve_classes(spec: str | tuple[str, ...] | None, available: list[str], where: str) -> list[str]:
    """The run's classes, in order: all `available` (spec None), a preset, or an explicit list."""
    if spec is None:
        return list(available)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise StageError(
                f"data.classes: unknown preset {spec!r}; presets: {', '.join(PRESETS)} "
                f"(or give a list of class names, e.g. data.classes=[a,b])"
            )
        names = list(PRESETS[spec]())
    else:
        names = list(spec)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StageError(f"data.classes: duplicate class names {', '.join(dupes)}")
    missing = [n for n in names if n not in available]
    if missing:
        shown = ", ".join(available[:8]) + (" ..." if len(available) > 8 else "")
        raise StageError(
            f"data.classes: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} not found in {where} "
            f"(it has {len(available)} classes: {shown})"
        )
    return names


def condition_ids(names: list[str], mode: str) -> tuple[list[int], int]:
    """The DiT label of each class and the number of class embeddings the model needs."""
    if mode == "imagenet":
        return imagenet_ids(names), len(imagenet_wnids())
    return list(range(len(names))), len(names)
