"""`auto` values: the rules on hand-computed cases, the data facts they read, and what a run records."""

import json

import pytest
import yaml
from helpers import make_shapes
from PIL import Image

from diffdistill import recipe
from diffdistill.cli import main
from diffdistill.config import ConfigError, build_config, to_dict


@pytest.mark.parametrize("images, batch, steps", [
    (1437, 64, 4500),  # the demo's digits: 200 epochs = 4490.6 steps, rounded up to hundreds
    (2500, 64, 7900),  # 200 × 2500 / 64 = 7812.5
    (7500, 64, 20000),  # 23437.5: the ceiling
    (120, 64, 2000),  # 375: the floor
    (2500, 32, 15700),  # half the batch, twice the steps
])
def test_pretrain_steps_follow_the_images(images, batch, steps):
    assert recipe.pretrain_steps(images, batch)[0] == steps


@pytest.mark.parametrize("steps, classes, most", [
    (7900, 10, 15800),  # glyphs: 480 × 10 = 4800 < 7900: twice the steps
    (12500, 100, 40000),  # scenes100 (40 images per class): 48,000 by its classes, the ceiling, twice
    (2000, 30, 28800),  # 14,400 by 30 classes, twice
    (2000, None, 4000),  # steps set by hand: twice themselves, whatever the classes
])
def test_max_steps_give_many_small_classes_room_by_their_classes(steps, classes, most):
    assert recipe.max_pretrain_steps(steps, classes)[0] == most


def test_a_many_class_set_is_checked_at_200_epochs_with_room_by_its_classes():
    facts = recipe.DataFacts(images=4000, classes=100, image_size=16, channels=3)
    cfg = build_config({"pretrain": {"steps": "auto", "max_steps": "auto", "check_images": 10}})
    out = recipe.resolve(cfg, facts)
    assert (out.pretrain.steps, out.pretrain.max_steps) == (12500, 40000)
    assert dict(out.auto)["pretrain.max_steps"].startswith(
        "40000: 2 x max(pretrain.steps, min(20000, 480 x 100 classes) = 20000), reached only while")
    by_hand = recipe.resolve(build_config({"pretrain": {"steps": 300, "max_steps": "auto", "check_images": 10}}),
                             facts)
    assert by_hand.pretrain.max_steps == 600  # a short trial stays short: no room by the classes


@pytest.mark.parametrize("size, factor", [(16, 2), (32, 4), (28, 2), (64, 4), (48, 4), (8, 1), (256, 4)])
def test_unshuffle_keeps_an_even_latent_of_at_least_a_quarter_of_the_side(size, factor):
    assert recipe.unshuffle_factor(size)[0] == factor


def test_unshuffle_says_what_to_do_when_no_factor_fits():
    with pytest.raises(ConfigError, match=r"data.image_size 6 .*multiple of 16"):
        recipe.unshuffle_factor(6)


@pytest.mark.parametrize("latent_channels, size", [(4, "tiny"), (12, "tiny"), (16, "tiny"), (48, "small")])
def test_model_size_by_values_per_token(latent_channels, size):
    # × 2×2 patch: 16, 48 and 64 values per token fit the tiny DiT; RGB 32 px at 4× (192) gets the wider one
    assert recipe.model_size(latent_channels)[0] == size


def test_both_sizes_share_the_patch_the_rules_assume():
    from diffdistill.models.dit import SIZES

    assert SIZES[recipe.SIZE_NARROW]["patch_size"] == SIZES[recipe.SIZE_WIDE]["patch_size"] == recipe.PATCH


def test_resolve_replaces_only_auto_keys_and_says_why():
    facts = recipe.DataFacts(images=2500, classes=10, image_size=32, channels=1)
    cfg = build_config({"pretrain": {"steps": "auto"}, "model": {"size": "auto"},
                        "autoencoder": {"unshuffle": "auto"}, "data": {"image_size": 32}})
    out = recipe.resolve(cfg, facts)
    assert (out.pretrain.steps, out.model.size, out.autoencoder.unshuffle) == (7900, "tiny", 4)
    assert [key for key, _ in out.auto] == ["autoencoder.unshuffle", "model.size", "pretrain.steps"]
    assert dict(out.auto)["pretrain.steps"].startswith("7900: 200 epochs of 2500 images")
    assert "auto" not in to_dict(out)  # config.yaml holds the values, run_info.json the reasons
    fixed = build_config({"pretrain": {"steps": 300}})
    assert recipe.resolve(fixed, facts) == fixed and not recipe.has_auto(fixed)


@pytest.mark.parametrize("raw, key", [
    ({"finetune": {"steps": "auto"}}, "finetune.steps"),
    ({"autoencoder": {"kind": "kl", "unshuffle": "auto"}}, "autoencoder.unshuffle"),
    ({"autoencoder": {"kind": "kl"}, "model": {"size": "auto"}}, "model.size"),
])
def test_auto_where_no_rule_exists_is_refused(raw, key):
    with pytest.raises(ConfigError, match=key):
        recipe.resolve(build_config(raw), recipe.DataFacts(100, 2, 32, 3))


def test_auto_is_not_a_number_anywhere_else():
    with pytest.raises(ConfigError, match="finetune.lr"):
        build_config({"finetune": {"lr": "auto"}})
    with pytest.raises(ConfigError, match="unknown config key 'auto'"):
        build_config({"auto": []})  # the record is written by the recipe, never read from a file


def test_data_facts_list_a_folder_and_peek_at_channels(tmp_path):
    make_shapes(tmp_path / "rgb", 3)
    gray = tmp_path / "gray"
    for c in ("a", "b"):
        (gray / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (20, 20), 40 * i).save(gray / c / f"{i}.png")
    rgb = recipe.data_facts(build_config({"data": {"train": str(tmp_path / "rgb"), "image_size": 24}}))
    assert rgb == recipe.DataFacts(images=9, classes=3, image_size=24, channels=3)
    one = recipe.data_facts(build_config({"data": {"train": str(gray), "classes": ["b"]}}))
    assert one == recipe.DataFacts(images=4, classes=1, image_size=16, channels=1)
    forced = recipe.data_facts(build_config({"data": {"train": str(gray), "channels": 3}}))
    assert forced.channels == 3
    digits = recipe.data_facts(build_config({}))
    assert digits == recipe.DataFacts(images=1437, classes=10, image_size=16, channels=1)


@pytest.mark.slow
def test_a_stage_prints_and_records_the_chosen_values(tmp_path, capsys):
    make_shapes(tmp_path / "train", 4, size=16)
    code = main(["pretrain", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "name=r",
                 f"data.train={tmp_path / 'train'}", "data.image_size=32", "pretrain.steps=2",
                 "autoencoder.unshuffle=auto", "model.size=auto"])
    assert code == 0
    out = capsys.readouterr().out
    assert "auto: autoencoder.unshuffle = 4: 32 px -> 8x8 latent (16 tokens)" in out
    assert "auto: model.size = small: 48 latent channels x 2x2 patch = 192 values per token" in out
    info = json.loads((tmp_path / "r" / "pretrain" / "run_info.json").read_text())
    assert set(info["auto"]) == {"autoencoder.unshuffle", "model.size"}
    saved = yaml.safe_load((tmp_path / "r" / "pretrain" / "config.yaml").read_text())
    assert (saved["model"]["size"], saved["autoencoder"]["unshuffle"]) == ("small", 4)  # numbers, not auto
