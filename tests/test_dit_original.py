"""A DiT loaded from a checkpoint in the original DiT layout (facebookresearch/DiT models.py names, train.py's
{"model", "ema"} file) computes what the original DiT code computes.

Independent of the project's converter: the fixture is written in the original key names and the reference
forward below is written from the DiT architecture (Peebles & Xie, models.py), in float64, so any difference
in conventions (timestep frequency spacing, LayerNorm eps, chunk order, GELU flavour, pos-embed layout,
qkv split, unpatchify order) shows up far above round-off.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffdistill.models.dit import load_dit, save_dit

DEPTH, HIDDEN, HEADS, PATCH, IN_CH, OUT_CH, SIZE, CLASSES = 4, 128, 4, 2, 4, 8, 8, 10
FREQ_DIM = 256  # original TimestepEmbedder.frequency_embedding_size
EPS = 1e-6  # every LayerNorm of the original DiT
TIMES = [0, 1, 250, 500, 999]
LABELS = [3, CLASSES, 0, CLASSES, 9]  # CLASSES is the CFG null class (last table row)
REL_TOL = 1e-9  # float64 round-off is ~1e-15; a 1e-5 vs 1e-6 eps alone gives ~1e-6


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Original get_1d_sincos_pos_embed_from_grid: omega = 1/10000^(i/(D/2)), concat(sin, cos)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Original get_2d_sincos_pos_embed: meshgrid(w, h) with w first, emb_h from grid[0], emb_w from grid[1]."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"))  # numpy's default indexing
    return torch.cat([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], dim=1)


@pytest.fixture(scope="module")
def original_state() -> dict[str, torch.Tensor]:
    """Random weights in the original DiT key layout, non-zero everywhere (the original zero-inits adaLN and
    the final layer, which would hide those paths)."""
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    state = {
        "x_embedder.proj.weight": rand(HIDDEN, IN_CH, PATCH, PATCH),
        "x_embedder.proj.bias": rand(HIDDEN),
        # the original keeps the table as a float32 Parameter computed in float64 numpy
        "pos_embed": sincos_2d(HIDDEN, SIZE // PATCH).float()[None],
        "t_embedder.mlp.0.weight": rand(HIDDEN, FREQ_DIM),
        "t_embedder.mlp.0.bias": rand(HIDDEN),
        "t_embedder.mlp.2.weight": rand(HIDDEN, HIDDEN),
        "t_embedder.mlp.2.bias": rand(HIDDEN),
        "y_embedder.embedding_table.weight": rand(CLASSES + 1, HIDDEN),
        "final_layer.adaLN_modulation.1.weight": rand(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": rand(2 * HIDDEN),
        "final_layer.linear.weight": rand(PATCH * PATCH * OUT_CH, HIDDEN),
        "final_layer.linear.bias": rand(PATCH * PATCH * OUT_CH),
    }
    for i in range(DEPTH):
        for name, (rows, cols) in {"adaLN_modulation.1": (6 * HIDDEN, HIDDEN), "attn.qkv": (3 * HIDDEN, HIDDEN),
                                   "attn.proj": (HIDDEN, HIDDEN), "mlp.fc1": (4 * HIDDEN, HIDDEN),
                                   "mlp.fc2": (HIDDEN, 4 * HIDDEN)}.items():
            state[f"blocks.{i}.{name}.weight"] = rand(rows, cols)
            state[f"blocks.{i}.{name}.bias"] = rand(rows)
    return state


@pytest.fixture(scope="module")
def checkpoint(original_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "DiT-tiny-8x8.pt"
    torch.save({"model": {}, "ema": original_state}, path)  # original train.py format
    return path


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(len(TIMES), IN_CH, SIZE, SIZE, generator=gen, dtype=torch.float64)
    return x, torch.tensor(TIMES), torch.tensor(LABELS)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: int = 10000) -> torch.Tensor:
    """Original TimestepEmbedder.timestep_embedding: frequencies exp(-ln(max_period)·i/half), i < half, and
    [cos, sin]. The original computes it in float32 whatever the model dtype, so we do too."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()


def linear(state, name, x):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=EPS)  # elementwise_affine=False in every DiT LayerNorm


def attention(state, name, x):
    n, tokens, _ = x.shape
    # timm Attention: qkv output dim laid out as [3, heads, head_dim]
    q, k, v = linear(state, f"{name}.qkv", x).reshape(n, tokens, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HIDDEN // HEADS), dim=-1)
    return linear(state, f"{name}.proj", (weights @ v).transpose(1, 2).reshape(n, tokens, HIDDEN))


def original_forward(state: dict[str, torch.Tensor], x, t, y) -> torch.Tensor:
    """DiT.forward of the original models.py, from the equations."""
    s = {k: v.double() for k, v in state.items()}
    n = x.shape[0]
    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + s["pos_embed"]  # tokens row-major over the patch grid
    t_emb = linear(s, "t_embedder.mlp.2", F.silu(linear(s, "t_embedder.mlp.0", timestep_embedding(t))))
    c = t_emb + s["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            s, f"{b}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + gate_msa[:, None] * attention(s, f"{b}.attn", modulate(layer_norm(h), shift_msa, scale_msa))
        mlp_in = modulate(layer_norm(h), shift_mlp, scale_mlp)
        mlp_out = linear(s, f"{b}.mlp.fc2", F.gelu(linear(s, f"{b}.mlp.fc1", mlp_in), approximate="tanh"))
        h = h + gate_mlp[:, None] * mlp_out
    shift, scale = linear(s, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = linear(s, "final_layer.linear", modulate(layer_norm(h), shift, scale))
    grid = SIZE // PATCH
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(n, grid, grid, PATCH, PATCH, OUT_CH))
    return h.reshape(n, OUT_CH, SIZE, SIZE)


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per sample (one t each): max |out - ref| / max |ref|."""
    return [((o - r).abs().max() / r.abs().max()).item() for o, r in zip(out, ref)]


def test_reference_matches_original_sincos_table():
    # spot values of the original table: token (row 0, col 1) has w = 1 in the first half, h = 0 in the second
    table = sincos_2d(HIDDEN, 4)
    assert table.shape == (16, HIDDEN)
    assert table[1, 0].item() == pytest.approx(math.sin(1.0))
    assert table[1, HIDDEN // 4].item() == pytest.approx(math.cos(1.0))
    assert table[1, HIDDEN // 2].item() == 0.0 and table[4, HIDDEN // 2].item() == pytest.approx(math.sin(1.0))


def test_loaded_original_checkpoint_computes_the_original_dit(checkpoint, original_state, inputs):
    x, t, y = inputs
    model = load_dit(str(checkpoint))
    assert model.config.out_channels == OUT_CH and model.config.num_embeds_ada_norm == CLASSES
    with torch.no_grad():
        out = model.double()(x, t, y).sample
    ref = original_forward(original_state, x, t, y)
    assert out.shape == ref.shape == (len(TIMES), OUT_CH, SIZE, SIZE)
    errors = relative_errors(out, ref)
    assert max(errors) <= REL_TOL, dict(zip(TIMES, errors))


def test_original_tensors_land_where_the_original_uses_them(checkpoint, original_state):
    model = load_dit(str(checkpoint))
    block = model.transformer_blocks[2]
    qkv_w, qkv_b = original_state["blocks.2.attn.qkv.weight"], original_state["blocks.2.attn.qkv.bias"]
    for part, proj in enumerate((block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)):
        rows = slice(part * HIDDEN, (part + 1) * HIDDEN)  # qkv output dim is [q; k; v]
        assert torch.equal(proj.weight, qkv_w[rows]) and torch.equal(proj.bias, qkv_b[rows])
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert torch.equal(table[CLASSES], original_state["y_embedder.embedding_table.weight"][CLASSES])
    assert torch.equal(model.proj_out_2.weight, original_state["final_layer.linear.weight"])
    # the project computes its own pos table (the checkpoint's is not loaded): it must be the original one
    assert torch.equal(model.pos_embed.pos_embed, original_state["pos_embed"])


def test_saved_folder_reloads_to_the_same_model(checkpoint, original_state, inputs, tmp_path):
    x, t, y = inputs
    model = load_dit(str(checkpoint))
    save_dit(tmp_path / "dit", model, model.state_dict())  # float32, as trained: no precision lost
    assert (tmp_path / "dit" / "diffdistill.json").is_file()
    recorded = json.loads((tmp_path / "dit" / "diffdistill.json").read_text())
    reloaded = load_dit(str(tmp_path / "dit"))
    with torch.no_grad():
        first, second = model.double()(x, t, y).sample, reloaded.double()(x, t, y).sample
    assert torch.equal(first, second), recorded
    assert max(relative_errors(second, original_forward(original_state, x, t, y))) <= REL_TOL
