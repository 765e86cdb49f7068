import pickle

import pytest
import torch

from diffdistill.autoencoders import IdentityAutoencoder, build_autoencoder, sample_latent
from diffdistill.config import AutoencoderConfig
from diffdistill.errors import StageError
from diffdistill.models.adapters import make_trainable
from diffdistill.models.classifiers import build_classifier
from diffdistill.models.dit import SIZES, build_dit, drop_labels, load_dit, null_class, save_dit


def tiny(classes=3):
    torch.manual_seed(0)
    return build_dit("tiny", in_channels=4, sample_size=8, num_classes=classes)


def test_tiny_dit_shapes_and_null_class():
    model = tiny(classes=3)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([0, 3])).sample
    assert out.shape == (2, 4, 8, 8)
    assert null_class(model) == 3
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in model.transformer_blocks)
    assert all(b.norm1.emb is model.transformer_blocks[0].norm1.emb for b in model.transformer_blocks)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert {"tiny", "DiT-XL/2", "DiT-S/4", "DiT-B/8"} <= set(SIZES)
    with pytest.raises(StageError, match="expected one of tiny"):
        build_dit("huge", 4, 8, 3)
    with pytest.raises(StageError, match="not divisible by the patch size"):
        build_dit("tiny", 4, 7, 3)


def test_train_mode_labels_are_not_dropped_inside_blocks():
    model = tiny().train()
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500), torch.tensor([0, 1, 2, 0])
    a, b = model(x, t, y).sample, model(x, t, y).sample
    assert torch.equal(a, b)  # no random label dropout in the forward pass


def test_drop_labels_once_per_sample():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(10_000, dtype=torch.long)
    dropped = drop_labels(y, null_id=7, p=0.1, generator=g)
    frac = (dropped == 7).float().mean().item()
    assert 0.09 < frac < 0.11 and set(dropped.unique().tolist()) == {0, 7}
    assert torch.equal(drop_labels(y, 7, 0.0), y)


def test_difffit_trainable_set_and_folding_preserves_the_function(tmp_path):
    model = tiny()
    tr = make_trainable(model, "difffit", difffit_blocks=2)
    names = {n for aliases in tr.names for n in aliases}
    assert all(n.endswith(".bias") or "class_embedder" in n for n in names)
    assert not any(n.endswith("attn1.to_q.weight") for n in names)
    assert len(tr.params) == len(tr.names) + 4  # γ for attn + ff of the first 2 blocks
    assert len(tr.folds) == 4
    with torch.no_grad():
        for i, g in enumerate(tr.params[len(tr.names):]):
            g.fill_(0.5 + 0.3 * i)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 200, 900]), torch.tensor([0, 1, 2])
    model.eval()
    want = model(x, t, y).sample
    save_dit(tmp_path / "m", model, tr.folded_state_dict(model))
    loaded = load_dit(str(tmp_path / "m")).eval()
    assert torch.allclose(loaded(x, t, y).sample, want, atol=1e-5)
    full = make_trainable(tiny(), "full")
    assert len(full.params) == len(list(tiny().parameters()))


def test_difffit_xl2_parameter_count():
    from diffdistill.config import load_config

    cfg = load_config("configs/imagewoof.yaml")  # the paper config's architecture, random init, no download
    latent = 4, cfg.data.image_size // 8  # the SD VAE: 4 channels, downsampling 8
    model = build_dit(cfg.model.size, latent[0], latent[1], num_classes=1000, learn_sigma=cfg.model.learn_sigma)
    assert model.config.out_channels == 8 and model.config.sample_size == 32
    total = sum(p.numel() for p in model.parameters())
    tr = make_trainable(model, cfg.finetune.trainable, cfg.finetune.difffit_blocks)
    n = sum(p.numel() for p in tr.params)
    print(f"DiT-XL/2: {total:,} parameters, DiffFit trainable: {n:,}")
    assert 674e6 < total < 676e6  # the DiT paper's 675 M: per-block embedder copies are tied into one
    # one class table (1000 + null) × 1152 = 1.15 M; biases ≈ 0.49 M; 28 γ (attn + ff on 14 blocks)
    table = 1001 * 1152
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
    assert n == table + biases + 28
    assert 1.6e6 < n < 1.7e6


def test_identity_autoencoder_roundtrip():
    ae = IdentityAutoencoder(unshuffle=2)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z = sample_latent(*ae.moments(x), ae.scaling_factor)
    assert z.shape == (2, 4, 8, 8) and ae.latent_shape(1, 16) == (4, 8, 8)
    assert torch.equal(ae.decode(z), x)
    with pytest.raises(StageError, match="not divisible"):
        ae.latent_shape(1, 15)


def test_kl_autoencoder_from_a_hub_layout_folder(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "hub" / "vae")
    ae = build_autoencoder(AutoencoderConfig(kind="kl", pretrained=str(tmp_path / "hub")))
    assert ae.scaling_factor == 0.5 and ae.latent_shape(3, 16) == (4, 8, 8)
    z = sample_latent(*ae.moments(torch.zeros(1, 3, 16, 16)), ae.scaling_factor, torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8) and ae.decode(z).shape == (1, 3, 16, 16)
    override = build_autoencoder(AutoencoderConfig(kind="kl", pretrained=str(tmp_path / "hub"), scaling_factor=0.18215))
    assert override.scaling_factor == 0.18215


def test_untied_embeddings_are_refused(tmp_path):
    model = tiny()
    state = model.state_dict()
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 1
    save_dit(tmp_path / "m", model, state)
    with pytest.raises(StageError, match="block 1 has its own class/timestep embedding"):
        load_dit(str(tmp_path / "m"))


def test_missing_weights_say_what_to_download(tmp_path):
    with pytest.raises(StageError) as err:
        load_dit("facebook/DiT-XL-2-256")
    assert "cannot be downloaded here" in str(err.value) and "--local-dir" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="does not hold diffusers weights"):
        load_dit(str(tmp_path / "empty"))
    with pytest.raises(StageError, match="autoencoder.pretrained"):
        build_autoencoder(AutoencoderConfig(kind="kl", pretrained="stabilityai/sd-vae-ft-ema"))


@pytest.mark.parametrize("net, size", [("convnet3", 16), ("convnet3", 32), ("convnet6", 64)])
def test_convnet_shapes(net, size):
    model = build_classifier(net, in_channels=3, num_classes=7, image_size=size, width=32)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown net"):
        build_classifier("vgg", 3, 7, size)


def test_unreadable_or_foreign_checkpoints_are_one_line_errors(tmp_path):
    # what a checkpoint of the original DiT computes after loading: tests/test_dit_original.py
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match="cannot read the checkpoint"):
        load_dit(str(tmp_path / "bad.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(StageError, match="not a DiT checkpoint"):
        load_dit(str(tmp_path / "other.pt"))


def test_every_model_runs_with_the_conventions_its_folder_records(tmp_path):
    import json

    from diffdistill.models.dit import CONVENTIONS_FILE, ORIGINAL_DIT, conventions_of

    model = tiny()
    assert conventions_of(model) == ORIGINAL_DIT  # built here: the original DiT's numbers, like pretrained ones
    save_dit(tmp_path / "m", model, model.state_dict())
    assert json.loads((tmp_path / "m" / CONVENTIONS_FILE).read_text()) == ORIGINAL_DIT
    assert conventions_of(load_dit(str(tmp_path / "m"))) == ORIGINAL_DIT
    (tmp_path / "m" / CONVENTIONS_FILE).unlink()  # a hub folder records nothing: the original DiT trained it
    assert conventions_of(load_dit(str(tmp_path / "m"))) == ORIGINAL_DIT
    (tmp_path / "run_info.json").write_text("{}")  # a stage output of an earlier version: diffusers' numbers
    assert conventions_of(load_dit(str(tmp_path / "m"))) == {"time_freq_shift": 1, "mlp_norm_eps": 1e-5}
    other = {"time_freq_shift": 1, "mlp_norm_eps": 1e-5}  # diffusers' own numbers, as recorded by a folder
    (tmp_path / "m" / CONVENTIONS_FILE).write_text(json.dumps(other))
    loaded = load_dit(str(tmp_path / "m")).eval()
    assert conventions_of(loaded) == other
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 900]), torch.tensor([0, 1])
    assert not torch.allclose(loaded(x, t, y).sample, model.eval()(x, t, y).sample, atol=1e-4)  # it matters


def test_the_shared_conditioning_is_computed_once_per_forward_with_the_same_outputs():
    """Every block (and the final layer) reads one timestep + label embedding per forward, as in the original
    DiT; outputs equal the per-block computation, gradients up to float reassociation."""
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    from diffdistill.models.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("tiny", 4, 8, 10)
    emb = model.transformer_blocks[0].norm1.emb
    calls = []
    emb.timestep_embedder.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 10])
    results = []
    for once in (True, False):
        if not once:  # the plain diffusers embedder: one computation per block and one for the final layer
            emb.__class__ = CombinedTimestepLabelEmbeddings
        calls.clear()
        model.zero_grad()
        out = model(x, t, y).sample
        out.square().sum().backward()
        results.append((len(calls), out, [p.grad.clone() for p in model.parameters()]))
    (n_once, out_once, g_once), (n_plain, out_plain, g_plain) = results
    assert n_once == 1 and n_plain == len(model.transformer_blocks) + 1
    assert torch.equal(out_once, out_plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(g_once, g_plain))
    fresh = build_dit("tiny", 4, 8, 10)
    counted = []
    fresh.transformer_blocks[0].norm1.emb.timestep_embedder.register_forward_hook(lambda *a: counted.append(1))
    with torch.no_grad():
        fresh(x, t, y)
        fresh(x, t, y)  # the same input tensors again: a new forward still computes anew (no stale cache)
    assert len(counted) == 2
    assert fresh.transformer_blocks[0].norm1.emb.__dict__["_once"] == []  # nothing held between forwards
    plain = build_dit("tiny", 4, 8, 10)
    clone = pickle.loads(pickle.dumps(plain))  # the swapped-in class is importable by name
    with torch.no_grad():
        assert torch.equal(clone(x, t, y).sample, plain(x, t, y).sample)
