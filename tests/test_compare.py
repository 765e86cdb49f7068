"""`diffdistill compare` on a tiny config: selections, a training-free method and random real images, two
seeds, shared baselines, resumed after one method's result is deleted; the one-line refusals."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import ConfigError
from diffdistill.errors import StageError
from diffdistill.stages.compare import METHODS, parse_methods

TINY = ["pretrain.steps=20", "pretrain.log_every=10", "finetune.steps=4", "finetune.log_every=2", "sample.steps=4",
        "sample.ipc=[1,2]", "evaluate.epochs=2", "evaluate.full_epochs=1", "evaluate.seeds=1", "evaluate.width=8",
        "evaluate.eval_every=1", "threads=1", "evaluate.workers=1"]  # tiny classifiers: one process


@pytest.mark.slow
def test_compare_two_seeds_shares_baselines_and_resumes(tmp_path, capsys):
    args = ["compare", "configs/demo-digits.yaml", f"out_dir={tmp_path}", *TINY, "finetune.latents=cache",
            "--methods", "random,herding,mgd3", "--seeds", "0,1"]
    assert main(args) == 0
    root = tmp_path / "demo-digits-compare"
    rows = list(csv.DictReader((root / "compare.csv").open()))
    assert {(r["method"], r["ipc"], r["seed"]) for r in rows} == {
        (m, i, s) for m in ("random", "herding", "mgd3") for i in ("1", "2") for s in ("0", "1")}
    # mgd3's modes are k-means with k = IPC: one run per IPC; herding's IPC-1 set is its IPC-2 set's prefix
    assert (root / "mgd3-ipc1-s0").is_dir() and (root / "mgd3-ipc2-s0").is_dir() and (root / "herding-s0").is_dir()
    manifest = json.loads((root / "mgd3-ipc2-s0" / "samples" / "manifest.json").read_text())
    assert manifest["sampler"]["mode_guidance"] == {"scale": 0.1, "stop": 0.5}
    assert "k = 2" in manifest["sampler"]["modes"] and "latent cache" in manifest["sampler"]["modes"]
    picked = json.loads((root / "herding-s0" / "samples" / "manifest.json").read_text())
    assert picked["method"] == "herding" and len(picked["images"]) == 2 * 10
    assert picked["space"].startswith("autoencoder latents (latent cache")  # made once, before any method
    # one pretraining; random-real and full-data classifiers trained once per seed, in the shared folder
    assert (root / "shared" / "pretrain" / "ema").is_dir() and not (root / "mgd3-ipc1-s0" / "pretrain").exists()
    shared = sorted(p.name for p in (root / "baselines-s0").glob("*.json"))
    assert shared == ["convnet3_full_ipcNone_seed0.json", "convnet3_random_real_ipc1_seed0.json",
                      "convnet3_random_real_ipc2_seed0.json"]
    assert sorted(p.name for p in (root / "herding-s0" / "evaluate-jobs").glob("*.json")) == [
        "convnet3_distilled_ipc1_seed0.json", "convnet3_distilled_ipc2_seed0.json"]
    by = {(r["method"], r["ipc"], r["seed"]): r for r in rows}
    herd = json.loads((root / "herding-s0" / "results.json").read_text())
    assert float(by[("random", "1", "0")]["accuracy"]) == herd["ipc"]["1"]["random_real"]["mean"]
    table = (root / "compare.md").read_text()
    assert "| herding | convnet3 | 2 |" in table and "gap to random" in table
    with Image.open(root / "compare.png") as img:
        assert img.format == "PNG" and img.width > 100
    # resume: only the deleted result is made again
    shutil.rmtree(root / "herding-s1")
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("== compare:") == 1 and "== compare: herding-s1" in out
    # the random-real (IPC 1, 2) and full-data classifiers of seed 1 are reused; herding's two are trained
    assert f"3 of 5 classifier results are reused from {root / 'baselines-s1'}:" in out
    # other settings into the same folders: refused before any work, never mixed into the table
    capsys.readouterr()
    assert main([*args, "evaluate.epochs=3"]) == 2
    assert "made with other settings; give this comparison another name" in capsys.readouterr().err
    again = list(csv.DictReader((root / "compare.csv").open()))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_unknown_or_lonely_methods_are_refused():
    with pytest.raises(ConfigError, match="unknown method mgd4; expected names from random, herding"):
        parse_methods("herding,mgd4")
    with pytest.raises(ConfigError, match="name at least one more method"):
        parse_methods("random")
    assert parse_methods("dit, adaptive,dit") == ["dit", "adaptive"]
    assert set(METHODS) == {"random", "herding", "kcenter", "kmeans", "dit", "mgd3", "d4m", "none", "minimax",
                            "adaptive"}


def test_ipc_larger_than_a_class_is_refused_before_any_work(tmp_path, capsys):
    args = ["compare", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "sample.ipc=[1,500]",
            "--methods", "kmeans,dit"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "IPC 500 needs at least 500" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_selection_in_feature_space_reads_the_shared_full_data_classifier(tmp_path):
    from safetensors.torch import save_file

    from diffdistill.config import load_config
    from diffdistill.models.classifiers import build_classifier
    from diffdistill.stages.compare import select_stage

    cfg = load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", "name=kc", "select.space=features",
                                                   "sample.ipc=[3]", "evaluate.width=8", "threads=1"])
    baselines = tmp_path / "baselines"
    with pytest.raises(StageError, match="select.space=features needs the full-data convnet3"):
        select_stage(cfg, "kcenter", baselines)
    baselines.mkdir()
    torch.manual_seed(0)
    net = build_classifier("convnet3", 1, 10, 16, 8, None)
    save_file(net.state_dict(), str(baselines / "convnet3_full_ipcNone_seed0.safetensors"))
    out = select_stage(cfg, "kcenter", baselines)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["space"].startswith("penultimate features of the convnet3")
    assert len(manifest["images"]) == 30 and len(list(out.glob("*/*.png"))) == 30
    rows = [r["train_index"] for r in manifest["images"]]
    assert len(set(rows)) == 30  # distinct real images, three per class


def test_feature_space_without_a_generative_method_is_refused_before_any_work(tmp_path, capsys):
    args = ["compare", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "select.space=features",
            "--methods", "random,herding"]
    assert main(args) == 2
    assert "add one (e.g. dit) to --methods" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["evaluate.pool=true", "--methods", "herding,dit"], "compare needs evaluate.pool=false"),
    (["finetune.steps=0", "--methods", "dit,adaptive"], "finetune.steps is 0, but adaptive fine-tune"),
])
def test_settings_that_would_change_a_method_are_refused(tmp_path, capsys, extra, message):
    assert main(["compare", "configs/demo-digits.yaml", f"out_dir={tmp_path}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_methods_time_leaves_out_its_evaluations_share_of_the_shared_baselines(tmp_path):
    """Classifiers train several at a time: the baselines trained during a run take the evaluation's wall time in
    proportion to the classifiers' own times (summed, they can exceed the run's wall time: never below zero)."""
    import json

    from diffdistill.stages.compare import method_seconds

    run, baselines = tmp_path / "herding-s0", tmp_path / "baselines-s0"
    (run / "evaluate-jobs").mkdir(parents=True)
    baselines.mkdir()
    for i, seconds in enumerate((20.0, 30.0)):  # the method's own classifiers: 50 s
        (run / "evaluate-jobs" / f"own{i}.json").write_text(json.dumps({"seconds": seconds}))
    (baselines / "full.json").write_text(json.dumps({"seconds": 150.0, "trained_in": str(run)}))
    (baselines / "other.json").write_text(json.dumps({"seconds": 999.0, "trained_in": str(tmp_path / "x")}))
    assert method_seconds({"seconds": 130.0, "evaluate_seconds": 100.0}, run, baselines) == 55.0  # 130 - 100 · 3/4
    assert method_seconds({"seconds": 130.0}, run, baselines) == 0.0  # an earlier record: 130 - 150, floored
