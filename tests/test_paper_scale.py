"""The paper configs' code path at toy size: a tiny random DiT and AutoencoderKL saved in the hub layout,
a fake ImageNet (JPEGs in wnid folders, incl. grayscale and CMYK; flat val folder + LOC_val_solution.csv),
then prepare -> finetune (DiffFit, latent cache, hybrid loss) -> sample -> evaluate from configs/imagewoof.yaml."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import load_config
from diffdistill.data.classes import PRESETS
from diffdistill.latents import LatentCache, cache_dir
from diffdistill.models.dit import build_dit, save_dit

WOOF = PRESETS["imagewoof"]()
EXTRA = "n01440764"  # an ImageNet class outside the subset: present on disk, never read


def _make_hub(root):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    dit = build_dit("tiny", 4, 8, 1000, learn_sigma=True)
    save_dit(root / "transformer", dit, dit.state_dict())  # tied embedders: one copy per block
    for name, seed in (("vae", 1), ("decoder", 2)):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                            sample_size=16, scaling_factor=0.18215)
        vae.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))


def _make_imagenet(root):
    rng = np.random.default_rng(0)
    val_lines = ["ImageId,PredictionString"]
    for c, wnid in enumerate([*WOOF, EXTRA]):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            size = (20 + 4 * i, 24)
            arr = (rng.integers(0, 60, (*size[::-1], 3)) + c * 18).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if c == 1 and i == 0:
                img = img.convert("L")  # grayscale JPEG
            if c == 2 and i == 0:
                img = img.convert("CMYK")  # CMYK JPEG, as a few ImageNet files are
            img.save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
        for i in range(2):
            name = f"ILSVRC2012_val_{c * 2 + i:08d}"
            arr = (rng.integers(0, 60, (24, 24, 3)) + c * 18).clip(0, 255).astype(np.uint8)
            (root / "val").mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / "val" / f"{name}.JPEG")
            val_lines.append(f"{name},{wnid} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(val_lines) + "\n")


@pytest.fixture(scope="module")
def paper_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    _make_hub(root / "hub")
    _make_imagenet(root / "imagenet")
    overrides = [
        f"out_dir={root / 'runs'}", f"data.train={root / 'imagenet' / 'train'}",
        f"data.val={root / 'imagenet' / 'val'}", f"data.val_labels={root / 'imagenet' / 'LOC_val_solution.csv'}",
        "data.image_size=16", f"autoencoder.pretrained={root / 'hub'}", "autoencoder.subfolder=vae",
        f"autoencoder.decoder={root / 'hub' / 'decoder'}", f"finetune.init={root / 'hub'}", "finetune.revision=null",
        "finetune.steps=4", "finetune.batch_size=4", "finetune.difffit_blocks=2", "finetune.log_every=2",
        "prepare.shard_size=16", "prepare.batch_size=8", "sample.ipc=[1,2]", "sample.steps=3", "sample.batch_size=8",
        "evaluate.nets=[convnet3]", "evaluate.width=8", "evaluate.image_size=16", "evaluate.epochs=2",
        "evaluate.seeds=1", "evaluate.eval_every=1", "threads=2",
    ]
    assert main(["run", "configs/imagewoof.yaml", *overrides]) == 0
    return root, overrides


@pytest.mark.slow
def test_paper_config_runs_end_to_end_on_a_fake_imagenet(paper_setup):
    root, overrides = paper_setup
    cfg = load_config("configs/imagewoof.yaml", overrides)
    cache = LatentCache(cache_dir(cfg))
    assert cache.manifest["num_images"] == 40 and cache.manifest["shards"] == 3  # 16 + 16 + 8
    assert cache.classes == list(WOOF) and cache.latent_shape == (4, 8, 8) and cache.manifest["stochastic"]
    files = (cache.folder / "files.txt").read_text().split()
    assert len(files) == 40 and not any(EXTRA in f for f in files)
    mean, std = cache.moments(torch.tensor([5, 17]), torch.tensor([False, False]))
    mirror, _ = cache.moments(torch.tensor([5, 17]), torch.tensor([True, True]))
    assert mean.shape == (2, 4, 8, 8) and (std > 0).all() and not torch.equal(mean, mirror)

    run = root / "runs" / "imagewoof"
    info = json.loads((run / "finetune" / "run_info.json").read_text())
    assert info["latents"].startswith("cache ") and info["learned_sigma"] and info["condition_ids"][0] == 193
    assert info["data_sha256"] == cache.manifest["data_sha256"]
    log = [json.loads(line) for line in (run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert {"diffusion", "vb", "representativeness", "diversity"} <= set(log[-1])
    manifest = json.loads((run / "samples" / "manifest.json").read_text())
    assert len(manifest["images"]) == 20 and manifest["sampler"]["learned_sigma"]
    assert manifest["sampler"]["timestep_spacing"] == "linspace"
    with Image.open(run / "samples" / WOOF[0] / "00001.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    results = json.loads((run / "evaluate" / "results.json").read_text())
    assert set(results["by_net"]["convnet3"]["ipc"]) == {"1", "2"}
    assert results["data"]["num_val"] == 20 and results["data"]["num_train"] == 40
    # no full-data baseline: the train set was listed, not read; normalization from a seeded sample
    assert results["data"]["train_sha256"].startswith("listing:")
    assert "40 train images (4 per class, seeded draw)" in results["data"]["normalization"]
    assert len(results["by_net"]["convnet3"]["ipc"]["2"]["random_real"]["indices"][0]) == 20


@pytest.mark.slow
def test_cache_gives_the_same_training_as_encoding_every_step(paper_setup):
    root, overrides = paper_setup
    common = [*overrides, "prepare.dtype=float32", "finetune.steps=3"]
    assert main(["prepare", "configs/imagewoof.yaml", *common]) == 0
    weights = {}
    for mode in ("cache", "images"):
        assert main(["finetune", "configs/imagewoof.yaml", *common, f"finetune.latents={mode}",
                     f"name=same-{mode}"]) == 0
        from safetensors.torch import load_file

        weights[mode] = load_file(str(root / "runs" / f"same-{mode}" / "finetune" / "raw" /
                                      "diffusion_pytorch_model.safetensors"))
    assert weights["cache"].keys() == weights["images"].keys()
    diffs = {k: float((weights["cache"][k] - weights["images"][k]).abs().max()) for k in weights["cache"]}
    # same latents, same draws; only the VAE's batch size differs. Key biases are left out: softmax ignores
    # them, so their true gradient is 0 and AdamW turns the rounding noise of that 0 into lr-sized steps
    noisy = [k for k in diffs if k.endswith("attn1.to_k.bias")]
    assert noisy and all(diffs[k] < 1e-3 for k in noisy)  # at most one lr of drift
    worst = max((k for k in diffs if k not in noisy), key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])


@pytest.mark.slow
def test_prepare_resumes_and_finetune_needs_the_cache(paper_setup, capsys):
    root, overrides = paper_setup
    cfg = load_config("configs/imagewoof.yaml", overrides)
    folder = cache_dir(cfg)
    shard = folder / "shard-00001.safetensors"
    before = shard.read_bytes()
    shard.unlink()
    (folder / "manifest.json").unlink()  # as if killed before the end
    assert main(["prepare", "configs/imagewoof.yaml", *overrides]) == 0
    assert shard.read_bytes() == before  # re-encoded identically; shards 0 and 2 were kept
    capsys.readouterr()
    assert main(["finetune", "configs/imagewoof.yaml", *overrides, "data.image_size=32", "name=other"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no latent cache" in err and "diffdistill prepare" in err


@pytest.mark.slow
def test_bf16_autocast_tracks_fp32_on_cpu(paper_setup):
    root, overrides = paper_setup
    losses = {}
    for precision in ("fp32", "bf16"):
        assert main(["finetune", "configs/imagewoof.yaml", *overrides, f"precision={precision}",
                     f"name={precision}", "finetune.memory.dtype=float16", "finetune.log_every=1"]) == 0
        log = (root / "runs" / precision / "finetune" / "log.jsonl").read_text().splitlines()
        losses[precision] = np.array([[json.loads(line)[k] for k in ("diffusion", "vb")] for line in log])
    assert losses["bf16"].shape == (4, 2) and np.isfinite(losses["bf16"]).all()
    assert not np.array_equal(losses["bf16"], losses["fp32"])  # autocast really ran in bfloat16
    # the same batches, noise and steps: bfloat16's ~3 significant digits stay close to the fp32 losses
    assert np.allclose(losses["bf16"], losses["fp32"], rtol=0.01), losses  # measured: within 6e-4


def test_missing_hub_weights_say_what_to_download(tmp_path, capsys):
    code = main(["finetune", "configs/imagewoof.yaml", f"out_dir={tmp_path}", "data.train=null", "data.val=null",
                 "data.classes=null", "data.image_size=16", "data.channels=null", "autoencoder.kind=identity",
                 "autoencoder.unshuffle=2", "finetune.latents=images"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "hf download facebook/DiT-XL-2-256 --revision refs/pr/1 --local-dir DIR" in err
    assert "finetune.init=DIR" in err
