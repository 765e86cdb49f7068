"""Class-conditional DiT (diffusers' DiTTransformer2DModel) built from a named size or loaded from disk/hub.

diffusers gives every transformer block its own timestep + label embedder (the original DiT has one,
shared; converted checkpoints hold 28 identical copies), each drawing its own 10 % label dropout in train
mode. We tie the copies back into one module, switch its dropout off and drop labels ourselves, once per
sample (`drop_labels`), so every block sees the same label and DiffFit trains one class table, as in DiT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffdistill.checkpoint import StageError, load_pretrained

# DiT paper sizes: name -> (num_layers, num_attention_heads, attention_head_dim); hidden = heads × head_dim
_BODIES = {"DiT-S": (12, 6, 64), "DiT-B": (12, 12, 64), "DiT-L": (24, 16, 64), "DiT-XL": (28, 16, 72)}
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=2),  # demo, 1.4 M params
    **{f"{name}/{patch}": dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=dim, patch_size=patch)
       for name, (layers, heads, dim) in _BODIES.items() for patch in (2, 4, 8)},
}


def build_dit(size: str, in_channels: int, sample_size: int, num_classes: int, learn_sigma: bool = False):
    """A randomly initialised DiT of a named size for latents [in_channels, sample_size, sample_size]."""
    from diffusers import DiTTransformer2DModel

    if size not in SIZES:
        raise StageError(f"model.size {size!r}: expected one of {', '.join(SIZES)}")
    spec = SIZES[size]
    if sample_size % spec["patch_size"]:
        raise StageError(
            f"latent size {sample_size} is not divisible by the patch size {spec['patch_size']} of {size}"
        )
    model = DiTTransformer2DModel(
        **spec,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        sample_size=sample_size,
        num_embeds_ada_norm=num_classes,
        attention_bias=True,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return share_block_embeddings(model)


def load_dit(source: str, revision: str | None = None):
    """DiT from a diffusers folder (model_index layout with transformer/, or the model folder) or a hub id."""
    from diffusers import DiTTransformer2DModel

    subfolder = "transformer"
    if Path(source).is_dir() and not (Path(source) / subfolder).is_dir():
        subfolder = None
    model = load_pretrained(
        lambda: DiTTransformer2DModel.from_pretrained(source, subfolder=subfolder, revision=revision,
                                                      low_cpu_mem_usage=False),
        source, "finetune.init",
    )
    return share_block_embeddings(model, source)


def share_block_embeddings(model, source: str | None = None):
    """Make every block use block 0's timestep/label embedder (one module) with label dropout off."""
    first = model.transformer_blocks[0].norm1.emb
    first.class_embedder.dropout_prob = 0.0
    ref = first.state_dict()
    for i, block in enumerate(model.transformer_blocks[1:], start=1):
        emb = block.norm1.emb
        if emb is first:
            continue
        if source is not None and any(not torch.equal(v, ref[k]) for k, v in emb.state_dict().items()):
            raise StageError(f"model {source}: block {i} has its own class/timestep embedding weights; "
                             f"diffdistill expects them shared by all blocks, as in the original DiT")
        block.norm1.emb = first
    return model


def null_class(model) -> int:
    """The label of the unconditional (CFG) embedding."""
    return int(model.config.num_embeds_ada_norm)


def learns_sigma(model) -> bool:
    return model.config.out_channels == 2 * model.config.in_channels


def drop_labels(labels: Tensor, null_id: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability p (one draw per sample)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def check_compatible(model, latent_shape: tuple[int, int, int], num_embeds: int, source: str) -> None:
    c, h, _ = latent_shape
    cfg = model.config
    problems = []
    if cfg.in_channels != c:
        problems.append(f"{cfg.in_channels} input channels, the autoencoder gives {c}")
    if cfg.sample_size != h:
        problems.append(f"sample size {cfg.sample_size}, the latents are {h}×{h}")
    if cfg.num_embeds_ada_norm < num_embeds:
        problems.append(f"{cfg.num_embeds_ada_norm} class embeddings, the run needs {num_embeds}")
    if problems:
        raise StageError(f"model {source} does not fit this run: " + "; ".join(problems))


def eps_prediction(model_out: Tensor, latent_channels: int) -> Tensor:
    """The ε̂ channels of a model output (learned-sigma models append variance channels)."""
    return model_out[:, :latent_channels]
