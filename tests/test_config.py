import re

import pytest

from diffdistill.config import ConfigError, build_config, load_config, to_dict


def test_demo_config_loads_with_overrides():
    cfg = load_config("configs/demo-digits.yaml", ["finetune.memory.policy=fifo", "sample.ipc=[1,5]",
                                                   "data.classes=[0,3]", "finetune.memory.lambda_gen=1"])
    assert cfg.finetune.memory.policy == "fifo"
    assert cfg.sample.ipc == (1, 5)
    assert cfg.data.classes == ("0", "3")  # bare YAML numbers are class names
    assert cfg.finetune.memory.lambda_gen == 1.0 and isinstance(cfg.finetune.memory.lambda_gen, float)
    assert cfg.pretrain.memory.policy == "none"  # per-stage defaults survive partial overrides
    assert to_dict(cfg)["sample"]["ipc"] == [1, 5]


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["finetune.memory.polcy=fifo"])
    msg = str(err.value)
    assert "unknown config key 'finetune.memory.polcy'" in msg
    assert "valid keys in 'finetune.memory': policy, size_real, size_gen" in msg
    with pytest.raises(ConfigError, match="unknown config key 'nmae'; valid keys in the top level: name"):
        build_config({"nmae": "x"})


@pytest.mark.parametrize("override, expected", [
    ("finetune.steps=abc", "config key 'finetune.steps': expected int or 'auto', got 'abc'"),
    ("finetune.steps=1.5", "expected int or 'auto', got 1.5"),
    ("finetune.lr=fast", "config key 'finetune.lr': expected float, got 'fast'"),
    ("finetune.memory.policy=lru", "expected one of 'adaptive', 'fifo', 'none', got 'lru'"),
    ("data.hflip=1", "expected bool"),
    ("sample.ipc=[1,x]", "config key 'sample.ipc': expected a list of int"),
    ("data.image_size=0", "config key 'data.image_size': expected a positive number, got 0"),
    ("sample.ipc=[]", "expected a non-empty list of positive integers"),
    ("finetune.batch_size=-4", "expected a positive number, got -4"),
    ("data=3", "config 'data': expected a mapping of keys, got 3"),
    ("finetune.memory.lambda_gen=-0.1", "config key 'finetune.memory.lambda_gen': expected a number >= 0"),
    ("finetune.grad_clip=0", "config key 'finetune.grad_clip': expected a positive number or null, got 0.0"),
    ("finetune.warmup_steps=-1", "config key 'finetune.warmup_steps': expected a number >= 0"),
    ("evaluate.momentum=1", "config key 'evaluate.momentum': expected a number in [0, 1)"),
    ("diffusion.beta_end=0.00001", "'diffusion.beta_end': expected a number larger than diffusion.beta_start"),
    ("sample.steps=1001", "config key 'sample.steps': expected at most diffusion.train_steps, got 1001"),
    ("finetune", "expected KEY=VALUE"),
])
def test_bad_values_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(line 3, column 1\)"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("finetune:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown config key 'finetune.stpes'"):
        load_config(wrong)
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown config key 'finetune.stpes'"):
        load_config(wrong, ["seed=1"])  # the file's own mistake, whatever the command line adds
    good = tmp_path / "good.yaml"
    good.write_text("finetune:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown config key 'finetune.stpes'"):
        load_config(good, ["finetune.stpes=4"])  # a typo typed on the command line is not the file's


def test_config_is_frozen():
    cfg = build_config()
    with pytest.raises(AttributeError):
        cfg.seed = 3


def test_shipped_configs_load():
    from pathlib import Path

    from diffdistill.stages.sweep import load_sweep

    for path in Path("configs").glob("*.yaml"):
        if "points" in path.read_text():
            assert load_sweep(path, [], [], None).points  # a sweep file: its base config and every point
        elif "builtin: null" in path.read_text():  # own data: the folders must be given
            load_config(path, ["data.train=train", "data.val=val"])
            with pytest.raises(ConfigError, match="data.train"):
                load_config(path)
        else:
            load_config(path)
    cfg = load_config("configs/evaluate-imagewoof.yaml")
    assert cfg.evaluate.nets == ("convnet6", "resnetap10", "resnet18") and cfg.evaluate.epochs is None
    assert cfg.data.classes == "imagewoof"


def test_base_config_is_read_first_and_overridden_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nfinetune:\n  steps: 7\n  memory:\n    lambda_gen: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nfinetune:\n  memory:\n    size_gen: 3\n")
    cfg = load_config(tmp_path / "b.yaml", ["finetune.lr=0.1"])
    assert (cfg.name, cfg.finetune.steps, cfg.finetune.lr) == ("b", 7, 0.1)
    assert (cfg.finetune.memory.lambda_gen, cfg.finetune.memory.size_gen) == (0.5, 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_paper_configs_hold_the_paper_defaults():
    for name in ("imagewoof", "imagenette", "imageidc"):
        cfg = load_config(f"configs/{name}.yaml")
        f, m, s = cfg.finetune, cfg.finetune.memory, cfg.sample
        assert (cfg.name, cfg.data.classes, cfg.data.image_size, cfg.model.class_ids) == (name, name, 256, "imagenet")
        assert (f.init, f.trainable, f.difffit_blocks, f.lr, f.weight_decay, f.batch_size, f.steps, f.ema) == (
            "facebook/DiT-XL-2-256", "difffit", 14, 1e-3, 0.0, 8, 12_000, 0.9999)
        assert (m.policy, m.size_real, m.size_gen, m.lambda_real, m.lambda_gen) == ("adaptive", 64, 64, 0.002, 0.008)
        assert (s.scheduler, s.steps, s.guidance, s.ipc) == ("ddpm", 50, 4.0, (10, 20, 50, 100))
    big = load_config("configs/imagenet1k.yaml")
    assert big.data.classes == "imagenet1k" and big.finetune.memory.dtype == "float16"


def test_exponent_without_a_dot_is_a_float():
    cfg = build_config({"finetune": {"lr": "1e-4"}}, ["pretrain.lr=5E-4", "finetune.memory.lambda_gen=2e-3"])
    assert (cfg.finetune.lr, cfg.pretrain.lr, cfg.finetune.memory.lambda_gen) == (1e-4, 5e-4, 2e-3)
    with pytest.raises(ConfigError, match="expected float"):
        build_config({}, ["finetune.lr=1e"])


def _numeric_keys(cls, prefix=""):
    """(dotted key, field) of every field whose type involves int or float, through nested configs."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
            continue

        def leaves(t):
            args = typing.get_args(t)
            return [x for a in args for x in leaves(a)] if args else [t]

        if typing.get_origin(tp) is not typing.Literal and {int, float} & set(leaves(tp)):
            yield prefix + f.name, f


def test_every_numeric_key_has_a_range_check_next_to_it():
    from diffdistill.config import Config

    keys = dict(_numeric_keys(Config))
    assert {"diffusion.beta_end", "finetune.warmup_steps", "finetune.grad_clip", "finetune.memory.lambda_real",
            "evaluate.crop_scale", "seed"} <= set(keys)
    missing = [k for k, f in keys.items() if "check" not in f.metadata]
    assert not missing, f"numeric config keys without a range check: {missing}"
    defaults = Config()  # every default passes its own check
    for key, f in keys.items():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert f.metadata["check"][0](value), key


def test_run_order_checks_the_generator_only_after_pretraining_with_full_evaluation():
    from diffdistill.runs import run_order

    demo = load_config("configs/demo-digits.yaml")
    assert run_order(demo) == ["pretrain", "check", "finetune", "sample", "evaluate"]
    assert "check" not in run_order(load_config("configs/demo-digits.yaml", ["evaluate.full=false"]))
    assert "check" not in run_order(load_config("configs/demo-digits.yaml", ["pretrain.check_images=0"]))
    assert run_order(load_config("configs/demo-digits.yaml", ["pretrain.steps=0", "finetune.init=x"])) == \
        ["finetune", "sample", "evaluate"]


NEEDS_CLIP = "'sample.clip_denoised': expected true (or sample.timestep_spacing=leading)"


@pytest.mark.parametrize("overrides, expected", [
    (["diffusion.schedule=cosine", "sample.scheduler=ddpm"], NEEDS_CLIP),  # DiT's spacing ends at t = 999
    (["diffusion.schedule=cosine", "sample.scheduler=ddim", "sample.timestep_spacing=trailing"], NEEDS_CLIP),
    (["diffusion.schedule=cosine", "sample.scheduler=dpm"], NEEDS_CLIP),
    (["sample.clip_denoised=true", "autoencoder.kind=kl"], "expected false with a VAE's latents"),
    (["sample.clip_denoised=true", "sample.scheduler=dpm"], "or the dpm sampler"),
    (["diffusion.schedule=cosine", "sample.scheduler=ddpm", "sample.clip_denoised=true"], None),
    (["diffusion.schedule=cosine", "sample.scheduler=ddpm", "sample.timestep_spacing=leading"], None),
    (["diffusion.schedule=cosine", "sample.scheduler=ddim"], None),  # diffusers' DDIM starts at 980
    (["sample.scheduler=ddpm"], None),  # linear: ᾱ at t = 999 is 4e-5, as DiT samples it
])
def test_samplers_that_would_return_noise_are_refused(overrides, expected):
    if expected is None:
        build_config({}, overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_config({}, overrides)


def test_no_builtin_set_needs_a_train_folder():
    with pytest.raises(ConfigError, match="'data.train': expected a folder of class subfolders when data.builtin"):
        build_config({}, ["data.builtin=null"])
    assert build_config({}, ["data.builtin=null", "data.train=/some/folder"]).data.builtin is None
