"""The latent cache: the train images encoded once by the autoencoder, read back by fine-tuning.

`diffdistill prepare` stores, for every train image (and its mirror image when `data.hflip`), the
autoencoder's UNSCALED posterior mean and std ([C, H, W] each) in safetensors shards. Training then draws
z0 = s · (mean + std · ε) from them, exactly as encoding every step would (same formula, same generator),
without running the VAE. A cache lives in `<prepare.dir>/<key>/`; the key hashes everything that
determines its contents (autoencoder id and revision, image list with byte sizes, classes, image size,
channels, flips, storage dtype, shard size), so runs that share data and VAE share one cache.

Layout: shard-00000.safetensors ... (tensors `mean`, `std`, `mean_flip`, `std_flip`, `labels`; std is
absent for a deterministic autoencoder; metadata: the SHA-256 of the shard's decoded pixels), files.txt
(the image of each row), manifest.json (written last: its presence marks a complete cache; `data_sha256`
hashes the shards' pixel hashes, labels and classes). Shards are written atomically; an interrupted
prepare resumes without re-reading the images of finished shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill.autoencoders import build_autoencoder
from diffdistill.checkpoint import StageError, atomic_write_bytes, atomic_write_json, atomic_write_text
from diffdistill.config import Config
from diffdistill.data.datasets import BUILTINS, ImageSet, data_classes, file_listing, list_images, read_images
from diffdistill.runtime import setup, write_run_info

CACHE_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cache_root(cfg: Config) -> Path:
    return Path(cfg.prepare.dir) if cfg.prepare.dir else Path(cfg.out_dir) / "latent-cache"


def _builtin_train(cfg: Config) -> ImageSet:
    return BUILTINS[cfg.data.builtin](cfg.data)[0]


def cache_key(cfg: Config, listing: tuple[list[Path], list[int]] | None = None) -> str:
    """Hash of everything that determines the cache's contents (lists the image files, reads none).
    `listing`: the train folder's (files, labels) if the caller has listed it already."""
    a, d = cfg.autoencoder, cfg.data
    classes = data_classes(d)
    if d.train is None:
        images: object = {"builtin": d.builtin, "sha256": _builtin_train(cfg).sha256()}
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


def prepare_stage(cfg: Config, force: bool = False) -> Path:
    """Encode the train images into the cache folder for this config; returns that folder."""
    device = setup(cfg)
    d, p = cfg.data, cfg.prepare
    classes = data_classes(d)
    listing = list_images(d.train, classes) if d.train is not None else None
    try:
        folder = cache_root(cfg) / cache_key(cfg, listing)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StageError(f"prepare.dir: cannot write the latent cache under {cache_root(cfg)}: "
                         f"{err.strerror or err}") from None
    if (folder / MANIFEST).is_file() and not force:
        print(f"latent cache {folder} is complete; nothing to do (--force re-encodes it)")
        return folder
    if force:
        (folder / MANIFEST).unlink(missing_ok=True)
        for old in folder.glob("shard-*.safetensors"):
            old.unlink()
    ae = build_autoencoder(cfg.autoencoder).to(device)
    if listing is None:
        memory: ImageSet | None = _builtin_train(cfg)
        files, labels, channels = None, memory.labels.tolist(), memory.channels
    else:
        memory = None
        files, labels = listing
        # the KL autoencoder fixes the channels; the identity map needs to see every image to decide
        channels = d.channels or ae.in_channels
        if channels is None:
            memory = read_images(files, labels, classes, d.image_size, None, d.train)
            channels = memory.channels
    latent = ae.latent_shape(channels, d.image_size)
    n, dtype = len(labels), DTYPES[p.dtype]
    shards = math.ceil(n / p.shard_size)
    data_hash, t0 = hashlib.sha256(), time.perf_counter()
    bar = tqdm(total=n, desc="prepare", unit="img", dynamic_ncols=True)
    for s in range(shards):
        lo, hi = s * p.shard_size, min(n, (s + 1) * p.shard_size)
        path = folder / f"shard-{s:05d}.safetensors"
        if not path.is_file():  # finished shards of an interrupted run are kept, their images not re-read
            chunk = memory.subset(torch.arange(lo, hi)) if memory is not None else read_images(
                files[lo:hi], labels[lo:hi], classes, d.image_size, channels, d.train)
            pixels = hashlib.sha256(chunk.images.numpy().tobytes()).hexdigest()
            tensors = _encode_chunk(ae, chunk, p.batch_size, d.hflip, dtype, device)
            atomic_write_bytes(path, save(tensors, {"images_sha256": pixels}))
        with safe_open(str(path), framework="pt") as handle:
            data_hash.update(handle.metadata()["images_sha256"].encode())
        bar.update(hi - lo)
    bar.close()
    data_hash.update(torch.tensor(labels, dtype=torch.long).numpy().tobytes())
    data_hash.update("\n".join(classes).encode())
    if files is not None:
        atomic_write_text(folder / "files.txt", "\n".join(str(f.relative_to(d.train)) for f in files) + "\n")
    manifest = {
        "version": CACHE_VERSION, "key": folder.name, "num_images": n, "classes": classes,
        "latent_shape": list(latent), "channels": channels, "image_size": d.image_size, "hflip": d.hflip,
        "dtype": p.dtype, "shard_size": p.shard_size, "shards": shards, "stochastic": ae.stochastic,
        "scaling_factor": ae.scaling_factor, "autoencoder": cfg.autoencoder.pretrained or cfg.autoencoder.kind,
        "data_sha256": data_hash.hexdigest(), "train": d.train, "seconds": round(time.perf_counter() - t0, 1),
    }
    write_run_info(folder, cfg, "prepare", {"cache": manifest})
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


@torch.no_grad()
def _encode_chunk(ae, chunk: ImageSet, batch_size: int, hflip: bool, dtype: torch.dtype,
                  device: torch.device) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {}
    for i in range(0, len(chunk), batch_size):
        x = chunk.images[i : i + batch_size].to(device).float().div_(127.5).sub_(1)  # [b, C, H, W] in [-1, 1]
        views = {"": x, "_flip": x.flip(-1)} if hflip else {"": x}
        for suffix, view in views.items():
            mean, std = ae.moments(view)
            out.setdefault("mean" + suffix, []).append(mean.cpu().to(dtype))
            if std is not None:
                out.setdefault("std" + suffix, []).append(std.cpu().to(dtype))
    tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
    tensors["labels"] = chunk.labels.clone()
    return tensors


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

    def moments(self, index: Tensor, flip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """float32 (mean, std) [B, C, H, W] of rows `index`, mirrored where `flip` [B] is True."""
        means, stds = [], []
        for j, i in enumerate(index.tolist()):
            handle, row = self.handles[i // self.shard_size], i % self.shard_size
            suffix = "_flip" if flip is not None and bool(flip[j]) else ""
            means.append(handle.get_slice("mean" + suffix)[row : row + 1])
            if self.manifest["stochastic"]:
                stds.append(handle.get_slice("std" + suffix)[row : row + 1])
        mean = torch.cat(means).float()
        return mean, (torch.cat(stds).float() if stds else None)


def open_cache(cfg: Config) -> LatentCache:
    """The complete cache for this config, or an error saying how to make it."""
    folder = cache_dir(cfg)
    if not (folder / MANIFEST).is_file():
        raise StageError(f"no latent cache for this data and autoencoder at {folder}: run `diffdistill prepare "
                         f"CONFIG` (same config and overrides) first, or set finetune.latents=images")
    return LatentCache(folder)
