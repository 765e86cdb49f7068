"""Class-conditional DiT (diffusers' DiTTransformer2DModel) built from a named size, loaded from disk/hub,
or saved as a diffusers model folder.

diffusers gives every transformer block its own timestep + label embedder (the original DiT has one,
shared; converted checkpoints hold 28 identical copies), each drawing its own 10 % label dropout in train
mode. We tie the copies back into one module, switch its dropout off and drop labels ourselves, once per
sample (`drop_labels`), so every block sees the same label and DiffFit trains one class table, as in DiT.

diffusers' DiT also differs from the original DiT code — which trained every public DiT checkpoint, the hub
folders included — in two numbers: its timestep embedding spaces the sinusoid frequencies by half − 1
instead of half (`downscale_freq_shift` 1, not 0: 34 % off at t = 250, ~100 % at t = 999), and the
LayerNorm before each MLP uses eps 1e-5 instead of 1e-6. One rule for every model here, pretrained or
trained from scratch: the original DiT's numbers (ORIGINAL_DIT). Each saved model folder records the numbers
it was trained with in CONVENTIONS_FILE, and loading applies what the folder records. A folder that records
nothing is a hub folder (the original DiT's numbers), or a model that an earlier version of this tool
trained with diffusers' numbers (DIFFUSERS_DIT; recognized by the run_info.json of its stage folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffdistill.errors import StageError, load_pretrained

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' file name: folders load with from_pretrained
CONVENTIONS_FILE = "diffdistill.json"
# time_freq_shift: frequencies exp(−ln(10⁴)·i / (half − shift)); mlp_norm_eps: eps of the LayerNorm before the MLP
ORIGINAL_DIT = {"time_freq_shift": 0, "mlp_norm_eps": 1e-6}
DIFFUSERS_DIT = {"time_freq_shift": 1, "mlp_norm_eps": 1e-5}

# DiT paper sizes: name -> (num_layers, num_attention_heads, attention_head_dim); hidden = heads × head_dim
_BODIES = {"DiT-S": (12, 6, 64), "DiT-B": (12, 12, 64), "DiT-L": (24, 16, 64), "DiT-XL": (28, 16, 72)}
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=2),  # demo, 1.4 M params
    # own data: wide enough for RGB tokens of 32 px images pixel-unshuffled 4× (192 values per token)
    "small": dict(num_layers=6, num_attention_heads=6, attention_head_dim=32, patch_size=2),
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
        norm_eps=ORIGINAL_DIT["mlp_norm_eps"],
    )
    return use_conventions(share_block_embeddings(model), ORIGINAL_DIT)


def load_dit(source: str, revision: str | None = None, key: str = "finetune.init"):
    """DiT from a diffusers folder (model_index layout with transformer/, or the model folder), a hub id,
    or a checkpoint file of the original DiT code (`DiT-XL-2-256x256.pt`; converted on load)."""
    from diffusers import DiTTransformer2DModel

    if Path(source).is_file():
        return load_original_dit(source, key)
    subfolder = "transformer"
    if Path(source).is_dir() and not (Path(source) / subfolder).is_dir():
        subfolder = None
    model = load_pretrained(
        lambda: DiTTransformer2DModel.from_pretrained(source, subfolder=subfolder, revision=revision,
                                                      low_cpu_mem_usage=False),
        source, key, revision,
    )
    return use_conventions(share_block_embeddings(model, source), _recorded_conventions(Path(source, subfolder or "")))


def _recorded_conventions(folder: Path) -> dict:
    """The numbers a model folder was trained with (see the module doc)."""
    record = folder / CONVENTIONS_FILE
    if record.is_file():
        return {**ORIGINAL_DIT, **json.loads(record.read_text())}
    if (folder.parent / "run_info.json").is_file():  # a pretrain/finetune output of an earlier version
        print(f"diffdistill: note: {folder} was trained by an earlier version of diffdistill with diffusers' "
              f"timestep spacing; it runs with that spacing (retrain it to use the original DiT's)", file=sys.stderr)
        return DIFFUSERS_DIT
    return ORIGINAL_DIT


def save_dit(folder: Path, model, state: dict[str, Tensor]) -> None:
    """A diffusers model folder (config.json + safetensors) holding `state` for `model`'s architecture, and
    the conventions the model runs with (CONVENTIONS_FILE)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    # clone: tied parameters share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONVENTIONS_FILE).write_text(json.dumps(conventions_of(model)) + "\n")


def use_conventions(model, conventions: dict):
    """Run `model` with the given timestep spacing and MLP-norm eps (see the module doc)."""
    model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift = conventions["time_freq_shift"]
    for block in model.transformer_blocks:
        block.norm3.eps = conventions["mlp_norm_eps"]
    return model


def conventions_of(model) -> dict:
    return {"time_freq_shift": model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift,
            "mlp_norm_eps": model.transformer_blocks[0].norm3.eps}


def load_original_dit(path: str | Path, key: str = "finetune.init"):
    """A checkpoint of the original DiT code (facebookresearch/DiT: a state dict, or {"model": ..., "ema":
    ...} from its train.py, whose EMA weights are used) as a diffusers DiT. Depth, width, patch size, class
    count, sample size and learned sigma are read from the tensors; the head count from SIZES. The model runs
    with the original DiT's timestep spacing and norm eps (see the module doc), so it computes what the
    original code computes."""
    state = _read_state(Path(path), key)
    if "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        hidden, in_ch, patch, _ = state["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # + the CFG null row
        out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        sample_size = round(state["pos_embed"].shape[1] ** 0.5) * patch
    except KeyError as err:
        raise StageError(f"{key}: {path} is not a DiT checkpoint (no tensor {err.args[0]})") from None
    size = next((name for name, spec in SIZES.items() if spec["num_layers"] == depth and spec["patch_size"] == patch
                 and spec["num_attention_heads"] * spec["attention_head_dim"] == hidden), None)
    if size is None:
        raise StageError(f"{key}: {path} is a DiT of depth {depth}, width {hidden}, patch {patch}: not a size "
                         f"diffdistill knows ({', '.join(SIZES)})")
    model = build_dit(size, in_ch, sample_size, num_classes, learn_sigma=out_ch == 2 * in_ch)
    model.load_state_dict(_diffusers_state(state, depth))
    return model


def _read_state(path: Path, key: str) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for damaged files
        raise StageError(f"{key}: cannot read the checkpoint {path} ({str(err).splitlines()[0]})") from None


def _diffusers_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Original DiT tensor names -> diffusers DiTTransformer2DModel names (qkv split into q, k, v)."""
    renames = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
               "proj_out_2": "final_layer.linear"}
    out = {f"{ours}.{part}": state[f"{theirs}.{part}"]
           for ours, theirs in renames.items() for part in ("weight", "bias")}
    shared = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
              "class_embedder.embedding_table": "y_embedder.embedding_table"}
    per_block = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
                 "ff.net.2": "mlp.fc2"}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for ours, theirs in shared.items():  # one embedder in DiT; every diffusers block names it
            for part in ("weight", "bias"):
                if f"{theirs}.{part}" in state:
                    out[f"{b}norm1.emb.{ours}.{part}"] = state[f"{theirs}.{part}"]
        for ours, theirs in per_block.items():
            for part in ("weight", "bias"):
                out[f"{b}{ours}.{part}"] = state[f"blocks.{i}.{theirs}.{part}"]
        for part in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)
            out.update({f"{b}attn1.to_q.{part}": q, f"{b}attn1.to_k.{part}": k, f"{b}attn1.to_v.{part}": v})
    return out


def _conditioning_once(emb_class: type) -> type:
    """`emb_class` computing its output once per DiT forward: every block (and the final layer) asks it with
    the same timestep and label tensors, so later asks return the first result. The DiT's forward hooks
    (`_clear_conditioning`) empty the cache before and after each forward; the state dict and the math are
    unchanged. The class is made once per base class and named in this module, so models still pickle."""
    name = f"{emb_class.__name__}Once"
    if name in globals():
        return globals()[name]

    def forward(self, timestep, class_labels, hidden_dtype=None):
        cache = self.__dict__.setdefault("_once", [])  # [(timestep, labels, dtype, output)] of this forward
        for t, y, dtype, out in cache:
            if t is timestep and y is class_labels and dtype == hidden_dtype:
                return out
        out = emb_class.forward(self, timestep, class_labels, hidden_dtype=hidden_dtype)
        cache.append((timestep, class_labels, hidden_dtype, out))
        return out

    cls = type(name, (emb_class,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


def _clear_conditioning(model, *args) -> None:
    model.transformer_blocks[0].norm1.emb.__dict__.get("_once", []).clear()


def share_block_embeddings(model, source: str | None = None):
    """Make every block use block 0's timestep/label embedder (one module) with label dropout off, computed
    once per forward (as the original DiT's t_embedder / y_embedder)."""
    first = model.transformer_blocks[0].norm1.emb
    first.class_embedder.dropout_prob = 0.0
    if not type(first).__name__.endswith("Once"):
        first.__class__ = _conditioning_once(type(first))
        model.register_forward_pre_hook(_clear_conditioning)
        model.register_forward_hook(_clear_conditioning)
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
    channels, h, _ = latent_shape
    cfg = model.config
    problems = []
    if cfg.in_channels != channels:
        problems.append(f"{cfg.in_channels} input channels, the autoencoder gives {channels}")
    if cfg.sample_size != h:
        problems.append(f"sample size {cfg.sample_size}, the latents are {h}×{h}")
    if cfg.num_embeds_ada_norm < num_embeds:
        problems.append(f"{cfg.num_embeds_ada_norm} class embeddings, the run needs {num_embeds}")
    if problems:
        raise StageError(f"model {source} does not fit this run: " + "; ".join(problems))


def eps_prediction(model_out: Tensor, latent_channels: int) -> Tensor:
    """The ε̂ channels of a model output (learned-sigma models append variance channels)."""
    return model_out[:, :latent_channels]
