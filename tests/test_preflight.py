"""Mistakes that would stop a run after its training are found before the first step; --dry-run plans only."""

import time

import pytest
import torch
from helpers import make_shapes
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import build_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_shapes(root / "train", 6)
    make_shapes(root / "val", 2)
    make_shapes(root / "val-misnamed", 2, classes=("circle", "square", "triangl"))
    return root


def _fails_fast(args, message, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main([*args, f"out_dir={tmp_path / 'runs'}"]) == 2
    assert time.perf_counter() - t0 < 5  # before any training
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffdistill: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "runs").exists()  # no stage folder, no run folder


@pytest.mark.parametrize("extra, message", [
    ([], "data.val is not set"),  # found by evaluation, after all the training, before this check
    (["data.val={root}/val"], "class circle has 6 images, IPC 10 needs at least 10"),
    (["data.val={root}/val-misnamed", "sample.ipc=[1,5]"],
     "data.val: class folder {root}/val-misnamed/triangle does not exist ({root}/val-misnamed has circle, "
     "square, triangl; expected one subfolder per class: circle, square, triangle)"),
    (["data.val={root}/val", "sample.ipc=[1,5]", "evaluate.ipc=[1,6]"],
     "evaluate.ipc 6 is larger than the 5 images per class that sample makes"),
    (["data.val={root}/val", "sample.ipc=[1,5]", "finetune.init=./no-such-model"],
     "finetune.init: ./no-such-model does not exist"),
    (["data.val={root}/val", "sample.ipc=[1,5]", "pretrain.steps=0"],
     "finetune.init is pretrain, but"),
])
def test_run_checks_its_whole_plan_before_training(folders, tmp_path, capsys, extra, message):
    args = ["run", "configs/demo-digits.yaml", f"data.train={folders}/train",
            *(e.format(root=folders) for e in extra)]
    _fails_fast(args, message.format(root=folders), tmp_path, capsys)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "configs/demo-digits.yaml", "--distilled", "/no/such/set"],
     "--distilled /no/such/set: no such folder"),
    (["evaluate", "configs/demo-digits.yaml"], "run `diffdistill sample` with this config first, or score"),
    (["sample", "configs/demo-digits.yaml"], "run `diffdistill finetune` with this config first"),
    (["report", "runs/no-such-run"], "report: runs/no-such-run is neither a run folder nor a config file"),
])
def test_a_single_stage_checks_what_it_needs(tmp_path, capsys, args, message):
    _fails_fast(args, message, tmp_path, capsys)


def test_dry_run_prints_the_plan_and_makes_nothing(folders, tmp_path, capsys):
    assert main(["run", "configs/own-data.yaml", "--dry-run", f"data.train={folders}/train",
                 f"data.val={folders}/val", "sample.ipc=[1,5]", f"out_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "auto: pretrain.steps = 2000" in out
    assert f"data: {folders}/train: 18 train images in 3 classes (6 per class), 16 px (the images: " in out
    sides = sorted(min(Image.open(f).size) for f in (folders / "train").rglob("*.*"))
    assert f"(the images: {sides[0]}–{sides[-1]} px, a peek at up to 64 files)" in out
    assert "keeps more of their detail" not in out  # 24-32 px read at 16: not said
    assert "auto: pretrain.max_steps = 4000: 2 x max(pretrain.steps, min(20000, 480 x 3 classes) = 1440)" in out
    # a batch larger than the set takes it all
    assert "pretrain: 2000 steps of batch 64 (2000 epochs); up to 4000 while the generator checks on the way" in out
    assert "sample: 15 images (5 per class), ddpm 50 steps, guidance 2.0" in out
    assert "evaluate: 15 classifier trainings (convnet3 × 3 seeds × IPC 1, 5" in out
    stages = [line.split(":")[0] for line in out.splitlines()
              if not line.startswith(("auto", "plan", " ", "time", "disk"))]
    assert any(line.startswith("disk: about ") and line.endswith(" GB free") for line in out.splitlines())
    assert stages == ["data", "pretrain", "check", "finetune", "sample", "evaluate"]  # in the order they run
    (timed,) = [line for line in out.splitlines() if line.startswith("time (from a few timed steps on cpu")]
    minutes = dict(part.strip().split(" ~") for part in timed.split(": ", 1)[1].split(";")[0].split(","))
    assert list(minutes) == ["pretrain", "check", "finetune", "sample", "evaluate"]
    assert float(minutes["pretrain"]) > 0 and all(float(m) >= 0 for m in minutes.values())
    assert float(minutes["check"]) == 0  # its classifier is trained by the check on the way, in pretrain's time
    total, most = (float(timed.split(word, 1)[1].split()[0].rstrip(",")) for word in ("total ~", "up to ~"))
    assert most >= total + float(minutes["pretrain"]) - 1 and "if pretraining goes on to pretrain.max_steps" in timed
    assert not (tmp_path / "runs").exists()


def test_dry_run_says_when_large_images_are_read_small(folders, tmp_path, capsys):
    assert main(["run", "configs/own-data.yaml", "--dry-run", f"data.train={folders}/train",
                 f"data.val={folders}/val", "sample.ipc=[1,5]", "data.image_size=8",
                 f"out_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    least = min(min(Image.open(f).size) for f in (folders / "train").rglob("*.*"))  # 24-32 (make_shapes)
    assert (f"every peeked image is at least {least} px and is read at data.image_size 8 px, and so is the "
            "distilled set; data.image_size=16 keeps more of their detail") in out


def test_a_plan_larger_than_the_free_disk_stops_before_training(tmp_path, capsys, monkeypatch):
    import shutil

    from diffdistill import preflight

    free = shutil.disk_usage(tmp_path)._replace(free=10_000_000)  # 10 MB
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: free)
    _fails_fast(["run", "configs/demo-digits.yaml"], "not enough disk space under", tmp_path, capsys)
    # the demo's tiny DiT: 18 × 4 blocks × 128² ≈ 1.2 M parameters, × 4 bytes × (raw + EMA + 2 checkpoints × 4)
    need = preflight.planned_bytes(build_config({}), ["pretrain"], 10, 1)
    assert need == 4 * 18 * 4 * 128 * 128 * (2 + 4 * 2)
    assert preflight.planned_bytes(build_config({"finetune": {"init": "facebook/DiT-XL-2-256"}}),
                                   ["finetune"], 10, 3) is None  # a loaded model's size is not known here


def test_the_time_estimate_counts_one_evaluation_per_kind_of_label(monkeypatch):
    """Hard and soft labels each train every IPC's classifiers, the full-data classifier trains once either way:
    adding soft labels adds exactly the IPC part of the estimate once more."""
    from diffdistill import preflight

    monkeypatch.setattr(preflight, "_classifier_seconds", lambda *a: 1.0)  # large minutes: rounding is negligible

    def evaluate_minutes(labels: str, full: bool) -> float:
        cfg = build_config({}, [f"evaluate.full={full}", f"evaluate.labels={labels}", "evaluate.epochs=100"])
        line = preflight.estimate(cfg, ["evaluate"], {"a": 5, "b": 5}, 1)
        return float(line.split("evaluate ~")[1].split(";")[0])

    ipc_part = evaluate_minutes("[hard]", False)
    assert ipc_part > 100
    assert evaluate_minutes("[hard,soft]", True) - evaluate_minutes("[hard]", True) == pytest.approx(ipc_part, abs=0.2)
    assert evaluate_minutes("[hard]", True) > ipc_part + 1  # the full-data classifier counts, once


def test_the_time_estimate_counts_every_candidate_draw(monkeypatch):
    """sample.candidates = K draws each image K times, in batches of whole classes: the sampling minutes count
    the forwards those batches take (batches of 64 on a CPU, 4 classes, 10 steps at 1 s each)."""
    from diffdistill import preflight

    monkeypatch.setattr(preflight, "_seconds_per_call", lambda fn: 1.0)

    def sample_minutes(ipc: int, candidates: int) -> float:
        cfg = build_config({}, [f"sample.ipc=[{ipc}]", "sample.steps=10", f"sample.candidates={candidates}"])
        return preflight._dit_minutes(cfg, ["sample"], 4, 1, torch.device("cpu"))["sample"]

    assert sample_minutes(16, 1) == pytest.approx(10 / 60)  # 64 images: one forward per step
    assert sample_minutes(16, 4) == pytest.approx(4 * 10 / 60)  # a class's 64 draws per batch
    assert sample_minutes(10, 8) == pytest.approx(8 * 10 / 60)  # a class's 80 draws: forwards of 64 and 16
