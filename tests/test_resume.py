"""Kill -9 in the middle of fine-tuning or sampling, resume, and get exactly what an uninterrupted run makes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffdistill.cli import main

TINY_FT = ["finetune.init=null", "finetune.steps=60", "finetune.batch_size=16", "finetune.log_every=5",
           "finetune.checkpoint_every=2", "finetune.keep_checkpoints=2", "threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffdistill", *args]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as ready() holds, after a random extra delay (a random step)."""
    start = time.time()
    while not ready():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() - start < timeout
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def outputs(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("raw/diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors",
                 "memory.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(folder / name)).items()})
    return out


@pytest.mark.slow
def test_killed_finetune_resumes_bit_identically(tmp_path):
    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", *TINY_FT]
    subprocess.run(cli("finetune", *common, "name=ref"), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(cli("finetune", *common, "name=killed"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints" / "finetune"
    kill_when(proc, lambda: any((p / "state.json").is_file() for p in ckpts.glob("step-*")))
    assert not (tmp_path / "killed" / "finetune").exists()  # no half-written output
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    assert 1 <= len(kept) <= 3  # keep_checkpoints = 2 (+ one being renamed at the kill)
    # without --resume the user is told what to do
    assert main(["finetune", *common, "name=killed"]) == 2
    assert main(["finetune", *common, "name=killed", "--resume"]) == 0
    ref, resumed = outputs(tmp_path / "ref" / "finetune"), outputs(tmp_path / "killed" / "finetune")
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)  # weights, EMA and memory banks, bit for bit
    def log(run: str) -> list[dict]:  # the rows without their wall-clock speed
        rows = [json.loads(line) for line in (tmp_path / run / "finetune" / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("ms_per_step", "images_per_s")} for r in rows]

    assert log("ref") == log("killed") and len(log("ref")) > 1
    assert not (tmp_path / "killed" / "checkpoints").exists()  # removed once the stage finished
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # the killed run's temp folder went with it


def test_resume_refuses_a_different_config_or_world_size(tmp_path, capsys):
    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=4",
              "finetune.batch_size=8", "finetune.checkpoint_every=2", "threads=1"]
    from diffdistill.stages.train import TrainLoop

    original = TrainLoop.save
    calls = []

    def save_then_stop(self, root):  # a crash right after the first checkpoint
        original(self, root)
        calls.append(self.step)
        raise KeyboardInterrupt

    TrainLoop.save = save_then_stop
    try:
        assert main(["finetune", *common]) == 130
    finally:
        TrainLoop.save = original
    assert calls == [2]
    capsys.readouterr()
    assert main(["finetune", *common, "finetune.lr=0.5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different config (finetune.lr differ)" in err
    state_file = next((tmp_path / "demo-digits" / "checkpoints" / "finetune").glob("step-*")) / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    assert main(["finetune", *common, "--resume"]) == 2
    assert "written by 2 processes, this run has 1" in capsys.readouterr().err
    state_file.write_text(json.dumps({**state, "config": {k: v for k, v in state["config"].items()
                                                          if k != "format"}}))
    assert main(["finetune", *common, "--resume"]) == 2  # a checkpoint of an earlier version
    assert "written by an earlier version of diffdistill" in capsys.readouterr().err
    state_file.write_text(json.dumps(state))
    (state_file.parent / "optimizer.pt").write_bytes(b"garbage")
    assert main(["finetune", *common, "--resume"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["finetune", *common, "--force"]) == 0  # start over


@pytest.mark.slow
def test_killed_sampling_resumes_without_duplicates_or_gaps(tmp_path):
    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=3",
              "sample.checkpoint=finetune", "sample.ipc=[6]", "sample.steps=40", "sample.batch_size=2",
              "threads=1"]
    assert main(["finetune", *common]) == 0
    model = str(tmp_path / "demo-digits" / "finetune")
    args = [*common, f"sample.checkpoint={model}/ema"]
    subprocess.run(cli("sample", *args, "name=ref"), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(cli("sample", *args, "name=killed"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed" / ".samples.partial"
    kill_when(proc, lambda: len(list(partial.glob("*/*.png"))) >= 4)
    assert not (tmp_path / "killed" / "samples").exists()
    assert main(["sample", *args, "name=killed"]) == 0  # picks up the partial folder
    ref, got = tmp_path / "ref" / "samples", tmp_path / "killed" / "samples"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.png"))
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file() and p.suffix == ".png")
    assert len(files) == 60 and all((ref / f).read_bytes() == (got / f).read_bytes() for f in files)
    assert not list(got.rglob(".*"))  # no temp files left
    manifest = json.loads((got / "manifest.json").read_text())
    assert len({r["file"] for r in manifest["images"]}) == 60


def test_a_diverging_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    args = ["finetune", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=30",
            "finetune.batch_size=8", "finetune.checkpoint_every=1", "finetune.lr=1e30", "finetune.grad_clip=null",
            "threads=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss is not finite at step" in err and "the last good checkpoint is" in err and "--resume" in err
    step = int(err.split("at step ")[1].split()[0])
    newest = sorted((tmp_path / "demo-digits" / "checkpoints" / "finetune").glob("step-*"))[-1]
    assert newest.name == f"step-{step - 1:08d}" and (newest / "state.json").is_file()
    assert not (tmp_path / "demo-digits" / "finetune").exists()


def test_run_resume_makes_again_the_stages_whose_settings_changed_and_those_that_read_them(tmp_path, capsys,
                                                                                           monkeypatch):
    """`run --resume` with other settings: a finished stage whose settings changed runs again, and so does every
    stage that reads its output; settings that change no result (threads, log_every, sample.batch_size) and
    unchanged ones keep what is done. The generator check's classifier settings redo the check and the
    evaluation, not the sampling (without sample.redraw nothing reads the check); the distilled sets' training
    settings redo the evaluation only. Each output records the tokens of those it read, so what a stage that ran
    again makes out of date stays so after an interruption."""
    out = [f"out_dir={tmp_path}", "pretrain.steps=4", "pretrain.batch_size=8", "pretrain.check_images=1",
           "finetune.steps=0", "sample.checkpoint=pretrain", "sample.steps=2", "sample.ipc=[1]", "data.classes=[0,1]",
           "evaluate.nets=[convnet3]", "evaluate.width=8", "evaluate.epochs=2", "evaluate.full_epochs=1",
           "evaluate.labels=[hard]", "evaluate.workers=1", "evaluate.seeds=1", "threads=1"]
    assert main(["run", "configs/demo-digits.yaml", *out]) == 0
    run = tmp_path / "demo-digits"

    last: list[str] = []  # the last line a resume printed

    def stamp(folder: str) -> int:
        return (run / folder / "config.yaml").stat().st_mtime_ns

    def resume(*extra: str) -> dict[str, str]:
        capsys.readouterr()
        assert main(["run", "configs/demo-digits.yaml", *out, *extra, "--resume"]) == 0
        printed = capsys.readouterr().out.splitlines()
        last[:] = printed[-1:]
        return {line.split()[1]: line for line in printed if line.startswith("== ")}

    pretrained = stamp("pretrain")
    with monkeypatch.context() as patched:
        patched.setattr("diffdistill.stages.report.verdicts", lambda results: ["IPC 1: a line"])
        said = resume("threads=2", "pretrain.log_every=1", "sample.batch_size=7")
    assert list(said) == ["pretrain", "check", "sample", "evaluate"]
    assert all("done before:" in line for line in said.values()), said
    assert last == ["below random real (convnet3): IPC 1: a line"]  # all done before: still said, last
    said = resume("sample.guidance=1.5")  # the check samples with the run's sampler too
    assert "done before:" in said["pretrain"]
    assert "done before with other settings (sample.guidance: 2.0 -> 1.5)" in said["check"]
    assert "done before with other settings (sample.guidance: 2.0 -> 1.5)" in said["sample"]
    assert "done before sample and check were made again: running it again" in said["evaluate"]
    assert yaml.safe_load((run / "samples" / "config.yaml").read_text())["sample"]["guidance"] == 1.5
    sampled = stamp("samples")
    said = resume("sample.guidance=1.5", "evaluate.full_epochs=2")  # the check's classifier
    assert "done before:" in said["pretrain"] and "done before:" in said["sample"]
    assert "(evaluate.full_epochs: 1 -> 2)" in said["check"] and "(evaluate.full_epochs: 1 -> 2)" in said["evaluate"]
    said = resume("sample.guidance=1.5", "evaluate.full_epochs=2", "evaluate.epochs=3")
    assert [k for k, line in said.items() if "done before:" in line] == ["pretrain", "check", "sample"]
    assert "done before with other settings (evaluate.epochs: 2 -> 3)" in said["evaluate"]
    assert stamp("pretrain") == pretrained and stamp("samples") == sampled
    # pretraining made again, then the run stops while sampling: the next --resume still makes the samples again
    now = ("sample.guidance=1.5", "evaluate.full_epochs=2", "evaluate.epochs=3", "pretrain.lr=0.002")
    with monkeypatch.context() as patched:
        patched.setattr("diffdistill.stages.sample.sample_stage", lambda *a: (_ for _ in ()).throw(OSError("cut")))
        with pytest.raises(OSError, match="cut"):
            main(["run", "configs/demo-digits.yaml", *out, *now, "--resume"])
    said = resume(*now)
    assert "done before:" in said["pretrain"] and "done before:" in said["check"]
    assert "done before pretrain was made again: running it again" in said["sample"]
    assert "done before sample was made again: running it again" in said["evaluate"]
    assert stamp("samples") != sampled


def test_a_setting_an_older_version_did_not_write_counts_with_its_default(tmp_path):
    from diffdistill.config import load_config, to_dict
    from diffdistill.runs import changed_settings

    cfg = load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", "sample.redraw=3"])
    saved = to_dict(cfg)
    del saved["sample"]["redraw"]  # written before the setting existed: it ran as the default (0) does
    (cfg.run_dir / "samples").mkdir(parents=True)
    (cfg.run_dir / "samples" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_settings(cfg, "sample") == ["sample.redraw: 0 -> 3"]
    assert changed_settings(cfg, "check") == [] and changed_settings(cfg, "evaluate") == []  # nothing written


def test_a_pretraining_that_goes_on_by_the_check_depends_on_the_checks_settings(tmp_path):
    """A pretraining that checked itself on the way (pretrain.max_steps) let the check's verdict decide how long
    it ran: it is made again when a setting the check reads changes (the val folders too: the classifier's accuracy
    on them can lower the goal), not when only sampling's own keys or the later evaluation nets do; one that made
    no check depends on its own keys only."""
    from diffdistill.config import load_config, to_dict
    from diffdistill.runs import changed_settings

    def changes(then: list[str], now: list[str], checks: list) -> list[str]:
        saved = to_dict(load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", *then]))
        folder = tmp_path / "demo-digits" / "pretrain"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(saved))
        (folder / "run_info.json").write_text(json.dumps({"extension": {"checks": checks}}))
        return changed_settings(load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", *now]), "pretrain")

    going_on = ["pretrain.max_steps=8000"]
    checked = [{"step": 4000, "fidelity": 80.0}]
    later = [*going_on, "pretrain.check_images=5", "sample.guidance=3", "sample.ipc=[1]",
             "evaluate.nets=[convnet3,resnet18]", "data.val=/elsewhere"]
    assert changes(going_on, later, checked) == ["data.val: None -> /elsewhere", "pretrain.check_images: 10 -> 5",
                                                 "sample.guidance: 2.0 -> 3.0"]
    assert changes(going_on, later, []) == []  # it stopped at pretrain.steps without a check
    assert changes([], going_on, []) == ["pretrain.max_steps: 0 -> 8000"]


def test_the_builtin_data_settings_count_only_without_data_folders(tmp_path):
    """data.builtin, val_fraction and split_seed choose nothing while data.train is set: a config that changes
    them (own-data.yaml setting data.builtin to null) does not make a finished stage run again."""
    from diffdistill.config import load_config, to_dict
    from diffdistill.runs import changed_settings

    def changes(then: list[str], now: list[str]) -> list[str]:
        saved = to_dict(load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", *then]))
        (tmp_path / "demo-digits" / "samples").mkdir(parents=True, exist_ok=True)
        (tmp_path / "demo-digits" / "samples" / "config.yaml").write_text(yaml.safe_dump(saved))
        return changed_settings(load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", *now]), "sample")

    folders = ["data.train=/data/train", "data.val=/data/val"]
    assert changes([*folders], [*folders, "data.builtin=null", "data.split_seed=3"]) == []
    assert changes([], ["data.split_seed=3"]) == ["data.split_seed: 0 -> 3"]
    assert changes([], [*folders])[:1] == ["data.train: None -> /data/train"]


def test_a_checkpoint_resumes_under_changes_to_data_keys_training_does_not_read(tmp_path):
    """The val folders, and the built-in set's keys while data.train is set, are not part of what a training
    checkpoint must match (own-data.yaml setting data.builtin to null leaves its checkpoints resumable)."""
    from diffdistill.checkpoint import load_checkpoint, resume_spec
    from diffdistill.config import load_config
    from diffdistill.errors import StageError

    def spec(*overrides: str) -> dict:
        return resume_spec(load_config("configs/demo-digits.yaml", list(overrides)), "pretrain")

    def resume(then: dict, now: dict) -> str:
        (tmp_path / "state.json").write_text(json.dumps({"world_size": 1, "step": 2, "config": then}))
        with pytest.raises(StageError) as refused:
            load_checkpoint(tmp_path, now)
        return str(refused.value)

    folders = ["data.train=/d/train", "data.val=/d/val"]
    passes = "cannot be read"  # past the config check: this folder holds no tensors
    assert passes in resume(spec(*folders), spec(*folders, "data.builtin=null", "data.split_seed=4"))
    assert passes in resume(spec(*folders), spec("data.train=/d/train", "data.val=/e/val"))
    assert "different config (data.split_seed differ)" in resume(spec(), spec("data.split_seed=4"))
    assert "different config (data.train differ)" in resume(spec(*folders), spec("data.train=/e/train"))
