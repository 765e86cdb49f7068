"""`diffdistill prepare`: encode the train images once into the latent cache (see latents.py for its
layout and key), resumable shard by shard."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from diffdistill.autoencoders import build_autoencoder
from diffdistill.config import Config
from diffdistill.data.datasets import ImageSet, data_classes, list_images, read_images
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffdistill.latents import CACHE_VERSION, DTYPES, MANIFEST, builtin_train, cache_key, cache_root
from diffdistill.progress import progress
from diffdistill.runtime import setup, write_run_info


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
        memory: ImageSet | None = builtin_train(cfg)
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
    bar = progress(total=n, desc="prepare", unit="img")
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
