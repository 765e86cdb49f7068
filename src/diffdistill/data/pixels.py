"""Image sets as the classifiers read them: uint8 pixels at the classifier size, a batch at a time, on the device.

Where a set lives is decided by its size at the classifier resolution against `evaluate.resident_gb`
(`resident_budget`): a set within the budget is held whole on the device (read from its files in shards of
SHARD_IMAGES, so host memory holds one shard at a time); a larger one is streamed (`Streamed`): each batch is
decoded from its files when it is asked for, the next batches read ahead in threads. Either way a batch holds the
same pixels, so the same seeds train the same classifier (tests/test_streaming.py).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdistill.data.datasets import ImageFiles, ImageSet, _read_image, _stack, to_uint8

SHARD_IMAGES = 1024  # images decoded at once when a listed set is hashed, measured or moved to the device
READ_AHEAD = 2  # batches of a streamed set being decoded while the current one trains
READ_THREADS = 8  # PIL decodes outside the GIL
# auto budget per set: a share of the GPU's memory (uint8 sets beside a ResNet-50 in training), or host memory
RESIDENT_GPU_SHARE = 0.2
RESIDENT_CPU_GB = 1.0
# a set is read whole into host memory (before it moves to the device) only up to this many bytes at the larger
# of its file and classifier sizes; a larger one stays listed, whatever the device's budget
HOST_READ_BYTES = 2**30
# channel statistics in one float32 pass up to this many bytes of float pixels (every set the tool was measured
# with); beyond it, summed in float64 over shards of STATS_SHARD images, so no float copy of the sample is made
STATS_ONE_PASS_BYTES = 2**28
STATS_SHARD = 256
# evaluation batches (accuracy, features): 512 images of 64 px or fewer, fewer of larger ones (same pixel count)
EVAL_BATCH_PIXELS = 512 * 64 * 64


def resident_budget(setting: float | None, device: torch.device) -> int:
    """Bytes a set may take on the device (`evaluate.resident_gb`; None: auto, see the constants above)."""
    if setting is not None:
        return int(setting * 2**30)
    if device.type == "cuda":
        return int(RESIDENT_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return int(RESIDENT_CPU_GB * 2**30)


def eval_batch(size: int) -> int:
    """Images per batch when a trained net scores a set at `size` px (see EVAL_BATCH_PIXELS)."""
    return max(1, min(512, EVAL_BATCH_PIXELS // (size * size)))


def read_whole(files: ImageFiles, size: int, budget: int) -> bool:
    """Whether a listed set is read whole: its pixels at the larger of its file and classifier (`size`) sizes fit
    both `budget` and HOST_READ_BYTES (every set of the subsets and the demo)."""
    return files.nbytes(max(size, files.image_size)) <= min(budget, HOST_READ_BYTES)


def read_or_list(files: ImageFiles, size: int, budget: int) -> ImageSet | ImageFiles:
    """The set read whole if `read_whole`, else left listed, to be streamed or moved to the device shard by
    shard."""
    return files.subset(torch.arange(len(files))) if read_whole(files, size, budget) else files


def to_unit(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [0, 1] (via [-1, 1], the arithmetic every stage uses for pixels)."""
    return (x.float() / 127.5 - 1) / 2 + 0.5


def resize_uint8(x: Tensor, size: int) -> Tensor:
    """uint8 images [N, C, H, W] at `size` px (bilinear, antialiased, in the [-1, 1] arithmetic of every stage)."""
    if x.shape[-1] == size:
        return x
    return to_uint8(F.interpolate(x.float() / 127.5 - 1, size=(size, size), mode="bilinear", antialias=True))


def shards(s: ImageSet | ImageFiles, shard: int = SHARD_IMAGES) -> Iterator[ImageSet]:
    """The set in order, `shard` images at a time (decoded from its files for a listed set)."""
    for lo in range(0, len(s), shard):
        yield s.subset(torch.arange(lo, min(lo + shard, len(s))))


def pixel_sha256(s: ImageSet | ImageFiles) -> str:
    """ImageSet.sha256 of the set's pixels, read shard by shard: a listed set hashes as if it were read whole."""
    if isinstance(s, ImageSet):
        return s.sha256()
    h = hashlib.sha256()
    for part in shards(s):
        h.update(part.images.numpy().tobytes())
    h.update(s.labels.numpy().tobytes())
    h.update("\n".join(s.classes).encode())
    return h.hexdigest()


def channel_stats(s: ImageSet | ImageFiles, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) [1, C, 1, 1] of a set's pixels in [0, 1] at the classifier size: one float32 pass
    for a sample of up to STATS_ONE_PASS_BYTES (read whole if listed), else float64 sums over shards. The path
    depends on the sample's size only, so a listed and a read sample give the same statistics."""
    stored = s.image_size if isinstance(s, ImageFiles) else s.images.shape[-1]
    if len(s) * s.channels * max(size, stored) ** 2 * 4 <= STATS_ONE_PASS_BYTES:
        s = s.subset(torch.arange(len(s))) if isinstance(s, ImageFiles) else s
        x01 = s.as_float() / 2 + 0.5
        if x01.shape[-1] != size:
            x01 = F.interpolate(x01, size=(size, size), mode="bilinear", antialias=True)
        return x01.mean((0, 2, 3), keepdim=True).to(device), \
            x01.std((0, 2, 3), keepdim=True).clamp_min(1e-3).to(device)
    total = total_sq = None
    count = 0
    for part in shards(s, STATS_SHARD):
        x = part.as_float() / 2 + 0.5
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        sums, sq = x.sum((0, 2, 3), dtype=torch.float64), x.square().sum((0, 2, 3), dtype=torch.float64)
        total, total_sq = (sums, sq) if total is None else (total + sums, total_sq + sq)
        count += x.shape[0] * size * size
    mean = total / count
    std = ((total_sq - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.float().view(1, -1, 1, 1).to(device), std.float().view(1, -1, 1, 1).to(device)


class Streamed:
    """A listed set read batch by batch from its files, at the classifier size, onto the device: indexing
    (`x[idx]`, `x[lo:hi]`) decodes those images; `batches` reads the next ones ahead in threads."""

    def __init__(self, files: ImageFiles, size: int, device: torch.device):
        self.files, self.size, self.device = files, size, device
        self.shape = (len(files), files.channels, size, size)
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS)

    def __len__(self) -> int:
        return self.shape[0]

    def _submit(self, idx: Tensor) -> list[Future]:
        return [self._pool.submit(_read_image, self.files.files[i], self.files.image_size) for i in idx.tolist()]

    def _assemble(self, idx: Tensor, reads: list[Future]) -> Tensor:
        decoded = _stack([r.result() for r in reads], self.files.labels[idx].tolist(), self.files.classes,
                         [], self.files.channels)
        return resize_uint8(decoded.images, self.size).to(self.device)

    def __getitem__(self, key: Tensor | slice) -> Tensor:
        idx = torch.arange(len(self))[key] if isinstance(key, slice) else key.cpu()
        return self._assemble(idx, self._submit(idx))

    def batches(self, order: Iterable[Tensor]) -> Iterator[Tensor]:
        """x[idx] for each idx of `order`, READ_AHEAD batches decoded ahead of the one being used."""
        pending: deque[tuple[Tensor, list[Future]]] = deque()
        order = iter(order)
        for idx in order:
            pending.append((idx, self._submit(idx)))
            if len(pending) > READ_AHEAD:
                yield self._assemble(*pending.popleft())
        while pending:
            yield self._assemble(*pending.popleft())


Pixels = Tensor | Streamed  # what the classifier code indexes: x[idx], x[lo:hi], x.shape, len(x), x.device


def batches(x: Pixels, order: Iterable[Tensor]) -> Iterator[Tensor]:
    """x[idx] for each idx of `order` (read ahead when x is streamed)."""
    return x.batches(order) if isinstance(x, Streamed) else (x[idx] for idx in order)


def place(s: ImageSet | ImageFiles, size: int, device: torch.device, budget: int) -> Pixels:
    """The set's pixels at the classifier size as training reads them: a uint8 tensor on the device when they
    fit `budget` bytes (a listed set filled in shard by shard), else streamed from its files. A set already read
    (small enough for read_or_list, or read whole by `evaluate.full`) is resized shard by shard and moved."""
    shape = (len(s), s.channels, size, size)
    if isinstance(s, ImageSet) and s.images.shape[-1] == size:
        return s.images.to(device)
    if isinstance(s, ImageFiles) and shape[0] * s.channels * size * size > budget:
        return Streamed(s, size, device)
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    lo = 0
    for part in shards(s):  # resized a shard at a time: the float copies of a shard, not of the set
        out[lo : lo + len(part)] = resize_uint8(part.images, size).to(device)
        lo += len(part)
    return out
