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
    ("finetune.steps=abc", "config key 'finetune.steps': expected int, got 'abc'"),
    ("finetune.steps=1.5", "expected int, got 1.5"),
    ("finetune.lr=fast", "config key 'finetune.lr': expected float, got 'fast'"),
    ("finetune.memory.policy=lru", "expected one of 'adaptive', 'fifo', 'none', got 'lru'"),
    ("data.hflip=1", "expected bool"),
    ("sample.ipc=[1,x]", "config key 'sample.ipc': expected a list of int"),
    ("data.image_size=0", "config key 'data.image_size': expected a positive number, got 0"),
    ("sample.ipc=[]", "expected a non-empty list of positive integers"),
    ("finetune.batch_size=-4", "expected a positive number, got -4"),
    ("data=3", "config 'data': expected a mapping of keys, got 3"),
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
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("finetune:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown config key 'finetune.stpes'"):
        load_config(wrong)


def test_config_is_frozen():
    cfg = build_config()
    with pytest.raises(AttributeError):
        cfg.seed = 3


def test_shipped_configs_load():
    from pathlib import Path

    for path in Path("configs").glob("*.yaml"):
        load_config(path)
    cfg = load_config("configs/evaluate-imagewoof.yaml")
    assert cfg.evaluate.nets == ("convnet6", "resnetap10", "resnet18") and cfg.evaluate.epochs is None
    assert cfg.data.classes == "imagewoof"
