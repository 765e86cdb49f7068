"""What the training loop reads: latents from the images (the autoencoder runs every step) or from the
latent cache, and the order it reads them in.

The latent cache: `diffdistill prepare` (prepare.py) stores, for every train image (and its mirror
image when `data.hflip`), the autoencoder's UNSCALED posterior mean and std ([C, H, W] each) in
safetensors shards. Training then draws z0 = s · (mean + std · ε) from them, exactly as encoding every
step would (same formula, same generator), without running the VAE. A cache lives in
`<prepare.dir>/<key>/`; the key hashes everything that determines its contents (autoencoder id and
revision, image list with byte sizes, classes, image size, channels, flips, storage dtype, shard size),
so runs that share data and VAE share one cache.

Layout: shard-00000.safetensors ... (tensors `mean`, `std`, `mean_flip`, `std_flip`, `labels`; std is
absent for a deterministic autoencoder; metadata: the SHA-256 of the shard's decoded pixels), files.txt
(the image of each row), manifest.json (written last: its presence marks a complete cache; `data_sha256`
hashes the shards' pixel hashes, labels and classes). Shards are written atomically; an interrupted
prepare resumes without re-reading the images of finished shards.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from diffdistill.autoencoders import build_autoencoder, sample_latent
from diffdistill.config import Config, TrainConfig
from diffdistill.data.datasets import BUILTINS, ImageSet, data_classes, file_listing, list_images, load_data
from diffdistill.errors import StageError
from diffdistill.runtime import to_device

CACHE_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cache_root(cfg: Config) -> Path:
    return Path(cfg.prepare.dir) if cfg.prepare.dir else Path(cfg.out_dir) / "latent-cache"


def builtin_train(cfg: Config) -> ImageSet:
    return BUILTINS[cfg.data.builtin](cfg.data)[0]


def cache_key(cfg: Config, listing: tuple[list[Path], list[int]] | None = None) -> str:
    """Hash of everything that determines the cache's contents (lists the image files, reads none).
    `listing`: the train folder's (files, labels) if the caller has listed it already."""
    a, d = cfg.autoencoder, cfg.data
    classes = data_classes(d)
    if d.train is None:
        images: object = {"builtin": d.builtin, "sha256": builtin_train(cfg).sha256()}
    else:
        files, labels = listing or list_images(d.train, classes)
        images = [list(row) for row in file_listing(files, labels, d.train)]
    spec = {
        "version": CACHE_VERSION,
        "autoencoder": {"kind": a.kind, "pretrained": a.pretrained, "subfolder": a.subfolder,
                        "revision": a.revision, "unshuffle": a.unshuffle},
        "classes": classes, "images": images, "image_size": d.image_size, "channels": d.channels,
        "hflip": d.hflip, "dtype": cfg.prepare.dtype, "shard_size": cfg.prepare.shard_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: Config) -> Path:
    return cache_root(cfg) / cache_key(cfg)


class LatentCache:
    """Read access to a complete cache: labels of every row, and the posterior moments of any rows."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"latent cache {self.folder} is incomplete or unreadable ({err.__class__.__name__}); "
                             f"run `diffdistill prepare` again") from None
        self.shard_size = self.manifest["shard_size"]
        self.handles, labels = [], []
        for s in range(self.manifest["shards"]):
            path = self.folder / f"shard-{s:05d}.safetensors"
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for damaged files
                raise StageError(f"latent cache shard {path} cannot be read ({err}); run `diffdistill prepare "
                                 f"--force`") from None
            self.handles.append(handle)
            labels.append(handle.get_tensor("labels"))
        self.labels = torch.cat(labels)  # [N]
        self.classes: list[str] = self.manifest["classes"]
        self.latent_shape = tuple(self.manifest["latent_shape"])

    def __len__(self) -> int:
        return self.labels.shape[0]

    def read(self, index: Tensor, mirrors: bool = False) -> dict[str, Tensor]:
        """float32 [B, C, H, W] "mean" (and "std" for a stochastic autoencoder) of rows `index`, plus "mean_flip"
        ("std_flip") when `mirrors`: host I/O on a host index (the data order), safe to run in a thread."""
        keys = [k + suffix for suffix in ("", "_flip")[: 1 + mirrors]
                for k in ("mean", "std")[: 1 + self.manifest["stochastic"]]]
        parts: dict[str, list[Tensor]] = {k: [] for k in keys}
        for i in index.tolist():
            handle, row = self.handles[i // self.shard_size], i % self.shard_size
            for k in keys:
                parts[k].append(handle.get_slice(k)[row : row + 1])
        return {k: torch.cat(v).float() for k, v in parts.items()}

    def moments(self, index: Tensor, flip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """float32 (mean, std) [B, C, H, W] of rows `index`, mirrored where `flip` [B] is True."""
        return pick_mirrors(self.read(index, flip is not None), flip)


def pick_mirrors(rows: dict[str, Tensor], flip: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(mean, std) from `LatentCache.read`'s rows: the mirrored ones where `flip` [B] is True."""
    def pick(k: str) -> Tensor | None:
        if k not in rows:
            return None
        if flip is None:
            return rows[k]
        return torch.where(flip.view(-1, *[1] * (rows[k].dim() - 1)), rows[k + "_flip"], rows[k])

    return pick("mean"), pick("std")


def open_cache(cfg: Config) -> LatentCache:
    """The complete cache for this config, or an error saying how to make it."""
    folder = cache_dir(cfg)
    if not (folder / MANIFEST).is_file():
        raise StageError(f"no latent cache for this data and autoencoder at {folder}: run `diffdistill prepare "
                         f"CONFIG` (same config and overrides) first, or set finetune.latents=images")
    return LatentCache(folder)


class ImageLatents:
    """Train latents made by encoding each batch with the autoencoder (the VAE runs every step)."""

    def __init__(self, data: ImageSet, ae, hflip: bool) -> None:
        self.data, self.ae, self.hflip = data, ae, hflip
        self.labels, self.classes = data.labels, data.classes

    def __len__(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        return {"latents": "encoded every step", "data_sha256": self.data.sha256()}

    def sample(self, idx: Tensor, generator: torch.Generator, device: torch.device,
               noise_generator: torch.Generator | None = None, upcoming: Tensor | None = None) -> Tensor:
        """z0 [B, C', H', W'] of rows `idx`: mirror draws from `generator`, the posterior's ε from
        `noise_generator` (default `generator`) on its device."""
        x = to_device(self.data.images[idx], device).float().div_(127.5).sub_(1)  # [B, C, H, W] in [-1, 1]
        if self.hflip:
            flip = to_device(torch.rand(len(idx), generator=generator) < 0.5, device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return sample_latent(*self.ae.moments(x), self.ae.scaling_factor, noise_generator or generator)

    def close(self) -> None:
        pass


class CachedLatents:
    """Train latents drawn from the posterior moments that `diffdistill prepare` stored (no VAE here).

    The rows of the next step are read from the shards in a background thread while this step runs, when the
    data order already knows them (`upcoming`); the draws stay on the main thread, in their order."""

    def __init__(self, cache: LatentCache, scaling_factor: float | None, hflip: bool) -> None:
        self.cache, self.hflip = cache, hflip
        self.scaling_factor = scaling_factor or cache.manifest["scaling_factor"]
        self.labels, self.classes = cache.labels, cache.classes
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: tuple[Tensor, Future] | None = None  # (indices, their rows being read)

    def __len__(self) -> int:
        return len(self.cache)

    def describe(self) -> dict:
        return {"latents": f"cache {self.cache.folder}", "data_sha256": self.cache.manifest["data_sha256"]}

    def sample(self, idx: Tensor, generator: torch.Generator, device: torch.device,
               noise_generator: torch.Generator | None = None, upcoming: Tensor | None = None) -> Tensor:
        """z0 [B, C, H, W] of rows `idx` (see ImageLatents.sample); `upcoming`: the next call's rows, if known."""
        flip = torch.rand(len(idx), generator=generator) < 0.5 if self.hflip else None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and torch.equal(ahead[0], idx):
            rows = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # one reader of the shards at a time
            rows = self.cache.read(idx, self.hflip)
        if upcoming is not None:
            self._reader = self._reader or ThreadPoolExecutor(1, thread_name_prefix="latent-cache")
            self._ahead = (upcoming, self._reader.submit(self.cache.read, upcoming, self.hflip))
        mean, std = pick_mirrors(rows, flip)
        return sample_latent(to_device(mean, device), None if std is None else to_device(std, device),
                             self.scaling_factor, noise_generator or generator)

    def close(self) -> None:
        """Stop the reader thread (waiting for a read in flight)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader, self._ahead = None, None


def latent_source(cfg: Config, tcfg: TrainConfig,
                  device: torch.device) -> tuple[ImageLatents | CachedLatents, tuple[int, int, int]]:
    """(source, latent shape (C, H, W)) for `tcfg.latents`: the autoencoder on the images, or the cache."""
    if tcfg.latents == "cache":
        cache = open_cache(cfg)
        return CachedLatents(cache, cfg.autoencoder.scaling_factor, cfg.data.hflip), cache.latent_shape
    data, _ = load_data(cfg.data, need_val=False)
    ae = build_autoencoder(cfg.autoencoder).to(device)
    return ImageLatents(data, ae, cfg.data.hflip), ae.latent_shape(data.channels, cfg.data.image_size)


class RealLatents:
    """The scaled posterior means [n_c, C, H, W] of one class's train images (no mirrors), for coreset
    selection and the modes of mode guidance: read from the latent cache when a complete one exists for
    this config, else encoded here (the autoencoder on the images, batch by batch)."""

    def __init__(self, cfg: Config, device: torch.device, data: ImageSet | None = None) -> None:
        self.device = device  # data: the train set, if the caller has read it already
        folder = cache_dir(cfg)
        if (folder / MANIFEST).is_file():
            self.cache: LatentCache | None = LatentCache(folder)
            self.scale = cfg.autoencoder.scaling_factor or self.cache.manifest["scaling_factor"]
            self.labels, self.source = self.cache.labels, f"latent cache {folder}"
        else:
            self.cache = None
            self.data = data if data is not None else load_data(cfg.data, need_val=False)[0]
            self.ae = build_autoencoder(cfg.autoencoder).to(device)
            self.labels, self.source = self.data.labels, "the train images, encoded"

    def indices(self, c: int) -> Tensor:
        """Rows of class `c` in the train set's order (the order of its images in data.train)."""
        return (self.labels == c).nonzero().squeeze(1)

    @torch.no_grad()
    def of_class(self, c: int, batch: int = 64) -> Tensor:
        idx = self.indices(c)
        if self.cache is not None:
            return self.cache.moments(idx)[0].to(self.device) * self.scale
        parts = []
        for k in range(0, len(idx), batch):
            x = self.data.images[idx[k : k + batch]].to(self.device).float().div_(127.5).sub_(1)  # [b, C, H, W]
            parts.append(self.ae.moments(x)[0].float() * self.ae.scaling_factor)
        return torch.cat(parts)


class BatchOrder:
    """Endless shuffled epochs of indices; the last partial batch of an epoch is dropped if n > batch.

    With `world` processes the global batch of `batch_size` is split: every rank draws the same
    permutation (from `generator`, seeded alike on all ranks) and takes its own slice of each global batch,
    so the ranks partition every epoch, as torch's DistributedSampler does. Its position (this epoch's
    permutation, the offset in it, and the generator when the order has its own) is part of a checkpoint.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                 owns_generator: bool = False) -> None:
        if world > 1 and n < batch_size:
            raise StageError(f"{n} training images are fewer than the global batch of {batch_size}: "
                             f"lower the batch size or use fewer processes")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.local = rank, batch_size // world
        self.owns_generator = owns_generator
        self.perm: Tensor | None = None
        self.pos = 0

    def _epoch_done(self) -> bool:
        stop = self.n - self.n % self.batch_size if self.n >= self.batch_size else self.n
        return self.perm is None or self.pos >= max(stop, 1)

    def __next__(self) -> Tensor:
        if self._epoch_done():
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.peek()
        self.pos += self.batch_size
        return idx

    def peek(self) -> Tensor | None:
        """The indices the next call returns, if this epoch's permutation already holds them (else None: the
        next call draws a new permutation). Draws nothing."""
        if self._epoch_done():
            return None
        lo = self.pos + self.rank * self.local
        return self.perm[lo : lo + self.local]

    def state_dict(self) -> dict:
        state = {"perm": self.perm if self.perm is not None else torch.empty(0, dtype=torch.long), "pos": self.pos}
        if self.owns_generator:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"] if state["perm"].numel() else None
        self.pos = int(state["pos"])
        if self.owns_generator:
            self.generator.set_state(state["generator"])
