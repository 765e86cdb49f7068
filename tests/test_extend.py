"""pretrain.max_steps: pretraining goes on in rounds of steps / 2 while a generator check on the way is below its
goal, and the model it ends with is the model a run of that many steps makes."""

import json
from dataclasses import fields

import pytest
from safetensors.torch import load_file

from diffdistill.api import _train
from diffdistill.cli import main
from diffdistill.config import ConfigError, EvalConfig, load_config
from diffdistill.models.dit import load_dit
from diffdistill.recipe import resolve_config
from diffdistill.runs import (
    check_classifier_file,
    generator_check_file,
    judge_settings,
    probe_classifier_file,
    stage_dir,
)
from diffdistill.stages import check as check_stage
from diffdistill.stages.check import FidelityProbe
from diffdistill.stages.train import train_stage

TINY = ["pretrain.steps=8", "pretrain.batch_size=8", "pretrain.log_every=2", "pretrain.checkpoint_every=0",
        "pretrain.check_images=1", "finetune.steps=0", "sample.steps=2", "data.classes=[0,1,2]",
        "evaluate.full_epochs=1", "evaluate.width=8", "threads=1"]


class Scripted:
    """A probe that answers from a list (and counts its calls); raises where the list says so. With `inner` it
    first lets a real probe do all its work (sampling, training the classifier) and ignores the answer."""

    def __init__(self, answers: list, inner: FidelityProbe | None = None, lowered: float | None = None) -> None:
        self.answers, self.calls, self.inner, self.goal, self.lowered = list(answers), 0, inner, 97.0, lowered

    def __call__(self, model) -> float:
        self.calls += 1
        if self.lowered is not None:  # as FidelityProbe: the goal is known once its classifier is trained
            self.goal = self.lowered
        if self.inner:
            self.inner(model)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def keep(self, folder) -> None:
        if self.inner:
            self.inner.keep(folder)


def _cfg(tmp_path, name: str, *overrides: str):
    return load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", f"name={name}", *TINY, *overrides])


def _weights(cfg) -> dict:
    folder = stage_dir(cfg.run_dir, "pretrain")
    return {f"{w}:{k}": v for w in ("raw", "ema")
            for k, v in load_file(str(folder / w / "diffusion_pytorch_model.safetensors")).items()}


def _info(cfg) -> dict:
    return json.loads((stage_dir(cfg.run_dir, "pretrain") / "run_info.json").read_text())


def _losses(cfg) -> list[tuple[int, float]]:
    rows = (stage_dir(cfg.run_dir, "pretrain") / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["diffusion"]) for r in map(json.loads, rows)]


def _checks(cfg) -> list[tuple[int, float]]:
    return [(c["step"], c["fidelity"]) for c in _info(cfg)["extension"]["checks"]]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A plain run of 16 steps: what a run that went on to 16 must match."""
    cfg = _cfg(tmp_path_factory.mktemp("straight"), "straight", "pretrain.steps=16")
    train_stage(cfg, "pretrain")
    return cfg


def test_a_low_check_makes_pretraining_go_on_to_the_model_of_a_longer_run(tmp_path, straight, capsys, monkeypatch):
    cfg = _cfg(tmp_path, "goes-on", "pretrain.max_steps=16")
    # at step 8 and 12 (the last round ends at max_steps unchecked); the real probe's work leaves training as it was
    probe = Scripted([10.0, 50.0], inner=FidelityProbe(cfg))
    train_stage(cfg, "pretrain", probe=probe)
    assert probe.calls == 2
    assert _same(_weights(cfg), _weights(straight))
    assert _losses(cfg) == _losses(straight)  # the log rows too: same steps, same means
    info = _info(cfg)
    assert info["steps"] == 16 and info["extension"]["max_steps"] == 16 and info["extension"]["goal"] == 97.0
    assert _checks(cfg) == [(8, 10.0), (12, 50.0)]
    out = capsys.readouterr().out
    assert "generator check at step 8: 10.0 % below the 97 % goal: pretraining goes on to step 12 (max_steps 16)" \
        in out and "goes on to step 16" in out
    check = ["check", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "name=goes-on", *TINY, "pretrain.max_steps=16"]
    assert main(check) == 0  # the tiny classifier misses real images as often as the samples: its goal is met
    out = capsys.readouterr().out
    assert "below 97 %, but not below the classifier's own " in out and "the check sees no shortfall" in out
    monkeypatch.setattr(check_stage, "fidelity_goal", lambda real: 97.0)  # as a classifier right on real images
    assert main(check) == 0  # a tiny model of 16 steps: below the goal
    assert ("below the 97 % goal: the generator underfits — raise pretrain.steps (now 8) or pretrain.max_steps "
            "(now 16; pretraining went on to 16 steps) or model.size") in capsys.readouterr().out


def test_a_check_that_reaches_the_goal_stops_pretraining_there(tmp_path, capsys):
    cfg = _cfg(tmp_path, "stop", "pretrain.max_steps=16")
    probe = Scripted([97.0])
    train_stage(cfg, "pretrain", probe=probe)
    assert probe.calls == 1 and _info(cfg)["steps"] == 8 and _checks(cfg) == [(8, 97.0)]
    assert [s for s, _ in _losses(cfg)] == [2, 4, 6, 8]
    assert "97.0 % reaches the 97 % goal: pretraining stops here" in capsys.readouterr().out


def test_a_goal_the_classifier_lowered_is_the_one_pretraining_stops_at(tmp_path, capsys):
    """Where the check's classifier scores below 97 % on real val images, its own accuracy is the goal (known
    after the probe's first call); a fidelity equal to it stops pretraining."""
    cfg = _cfg(tmp_path, "lowered", "pretrain.max_steps=16")
    probe = Scripted([90.0, 91.5], lowered=91.5)
    train_stage(cfg, "pretrain", probe=probe)
    assert probe.calls == 2 and _info(cfg)["steps"] == 12
    assert _info(cfg)["extension"]["goal"] == 91.5 and [c["goal"] for c in _info(cfg)["extension"]["checks"]] == \
        [91.5, 91.5]
    out = capsys.readouterr().out
    assert "at step 8: 90.0 % below the 91.5 % goal: pretraining goes on to step 12" in out
    assert "at step 12: 91.5 % reaches the 91.5 % goal: pretraining stops here" in out


def test_an_interrupted_round_resumes_to_the_same_model(tmp_path, straight):
    cfg = _cfg(tmp_path, "resumed", "pretrain.max_steps=16", "pretrain.checkpoint_every=2",
               "pretrain.keep_checkpoints=1")
    with pytest.raises(RuntimeError, match="stopped"):  # the check at step 12 fails: the newest checkpoint is 10
        train_stage(cfg, "pretrain", probe=Scripted([10.0, RuntimeError("stopped")]))
    probe = Scripted([40.0])  # resumed at 10 inside the round that ends at 12: only the check at 12 is left
    train_stage(cfg, "pretrain", resume=True, probe=probe)
    assert probe.calls == 1 and _same(_weights(cfg), _weights(straight))
    assert _losses(cfg) == _losses(straight)
    assert _checks(cfg) == [(8, 10.0), (12, 40.0)]


def test_round_ends_off_the_log_steps_write_the_log_of_a_longer_run(tmp_path):
    """steps 5, log_every 2, going on to 10 in rounds of 2 (ends 5, 7, 9, 10): rows at 2, 4, 6, 8, 10, each the
    mean of its own 2 steps, as a run of 10 steps writes them; a run of 5 steps ends with a row at 5."""
    common = ["pretrain.steps=5", "pretrain.log_every=2"]
    straight = _cfg(tmp_path, "ten", *common, "pretrain.steps=10")
    train_stage(straight, "pretrain")
    cfg = _cfg(tmp_path, "rounds", *common, "pretrain.max_steps=10")
    train_stage(cfg, "pretrain", probe=Scripted([1.0, 2.0, 3.0]))
    assert _checks(cfg) == [(5, 1.0), (7, 2.0), (9, 3.0)]
    assert _losses(cfg) == _losses(straight) and [s for s, _ in _losses(cfg)] == [2, 4, 6, 8, 10]
    assert _same(_weights(cfg), _weights(straight))
    short = _cfg(tmp_path, "five", *common, "pretrain.max_steps=10")
    train_stage(short, "pretrain", probe=Scripted([99.0]))
    assert [s for s, _ in _losses(short)] == [2, 4, 5]


def test_a_lower_max_steps_on_resume_ends_the_round_sooner(tmp_path):
    cfg = _cfg(tmp_path, "lower", "pretrain.max_steps=16", "pretrain.checkpoint_every=2")
    with pytest.raises(RuntimeError, match="stopped"):  # went on at 8 (to 12), stopped at 12: checkpoint 10
        train_stage(cfg, "pretrain", probe=Scripted([10.0, RuntimeError("stopped")]))
    lower = _cfg(tmp_path, "lower", "pretrain.max_steps=11", "pretrain.checkpoint_every=2")
    probe = Scripted([])
    train_stage(lower, "pretrain", resume=True, probe=probe)
    assert _info(lower)["steps"] == 11 and probe.calls == 0  # max_steps reached: no check, stopped there


def test_the_check_on_the_way_scores_what_the_generator_check_finds(tmp_path):
    """`run` hands the real probe to pretraining where max_steps is set: it trains the check's classifier and
    samples the check's seeds, so on the final model it gives check.json's fidelity."""
    cfg = resolve_config(_cfg(tmp_path, "probe", "pretrain.max_steps=12"))
    _train(cfg, "pretrain", force=False, resume=False)
    # a tiny model of 8 steps is below 97 %, but the tiny classifier misses more real val images: it stopped there
    (check,) = _info(cfg)["extension"]["checks"]
    assert check["step"] == 8 and check["goal"] <= check["fidelity"] < 97 and _info(cfg)["steps"] == 8
    assert main(["check", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "name=probe", *TINY,
                 "pretrain.max_steps=12"]) == 0
    check = json.loads(generator_check_file(cfg.run_dir).read_text())
    model = load_dit(str(stage_dir(cfg.run_dir, "pretrain") / "ema"), key="pretrain")
    probe = FidelityProbe(cfg)
    assert probe.goal == 97.0  # until its classifier is trained
    assert probe(model) == check["fidelity"] and probe(model) == check["fidelity"]  # trained once, then kept
    # a tiny classifier misses real images: its own accuracy on them is the goal, on the way and in the check
    assert check["classifier_val_accuracy"] < 97 and probe.goal == check["goal"] == check["classifier_val_accuracy"]
    assert check["goal"] == _info(cfg)["extension"]["checks"][0]["goal"] == _info(cfg)["extension"]["goal"]


def _check(tmp_path, name: str, *overrides: str) -> tuple[dict, dict]:
    """`diffdistill check` on the run `name`: (check.json, the classifier it saved)."""
    assert main(["check", "configs/demo-digits.yaml", f"out_dir={tmp_path}", f"name={name}", *TINY,
                 "pretrain.max_steps=12", *overrides]) == 0
    cfg = _cfg(tmp_path, name)
    return json.loads(generator_check_file(cfg.run_dir).read_text()), load_file(str(check_classifier_file(cfg.run_dir)))


def test_the_check_takes_the_classifier_the_checks_on_the_way_trained(tmp_path, monkeypatch):
    """The probe keeps its classifier in pretraining's folder; the check after pretraining takes it instead of
    training the same one again, with the same result, and trains its own when a setting of it or the train
    pixels differ."""
    cfg = resolve_config(_cfg(tmp_path, "kept", "pretrain.max_steps=12"))
    _train(cfg, "pretrain", force=False, resume=False)
    assert probe_classifier_file(cfg.run_dir).is_file()
    reused, reused_judge = _check(tmp_path, "kept")
    assert reused["classifier_from"] == "the checks on the way (probe-classifier.safetensors)"
    kept = probe_classifier_file(cfg.run_dir).read_bytes()
    probe_classifier_file(cfg.run_dir).unlink()
    trained, trained_judge = _check(tmp_path, "kept")  # no kept classifier: it trains one, the same one
    assert trained["classifier_from"] == "trained here"
    assert (reused["fidelity"], reused["classifier_val_accuracy"]) == (trained["fidelity"],
                                                                       trained["classifier_val_accuracy"])
    assert _same(reused_judge, trained_judge)
    probe_classifier_file(cfg.run_dir).write_bytes(kept)
    other, _ = _check(tmp_path, "kept", "evaluate.full_epochs=2")  # another classifier: trained here
    assert other["classifier_from"] == "trained here"
    monkeypatch.setattr(check_stage, "pixel_sha256", lambda s: "other train images")
    other, _ = _check(tmp_path, "kept")  # the same settings, other pixels
    assert other["classifier_from"] == "trained here"


# the EvalConfig fields that do not change the check's classifier (hard labels, the final epoch's weights)
NOT_THE_JUDGES = {"seeds", "ipc", "pool", "epochs", "full", "metrics", "knn", "eval_every", "resident_gb", "workers",
                  "labels", "soft"}


def test_every_setting_that_trains_the_checks_classifier_is_in_its_key():
    """A field added to EvalConfig is either in the key a kept classifier is matched by, or said not to matter."""
    settings = judge_settings(load_config("configs/demo-digits.yaml"))
    judged = {key.split(".", 1)[1] for key in settings if key.startswith("evaluate.")}
    assert judged == {f.name for f in fields(EvalConfig)} - NOT_THE_JUDGES
    assert {"seed", "data.train", "data.image_size", "data.hflip", "data.classes"} <= settings.keys()


def test_max_steps_is_checked_and_auto_doubles_the_steps_set_by_hand():
    def load(*overrides):
        return resolve_config(load_config("configs/demo-digits.yaml", ["pretrain.check_images=1", *overrides]))

    auto = load("pretrain.steps=3000", "pretrain.max_steps=auto")  # not by the classes: the steps are a number
    assert auto.pretrain.max_steps == 6000
    assert any(k == "pretrain.max_steps" and v.startswith("6000: 2 x pretrain.steps") for k, v in auto.auto)
    # 200 epochs of the 1,437 digits at batch 64: 4,500 steps
    both = load("pretrain.steps=auto", "pretrain.max_steps=auto", "pretrain.batch_size=64")
    assert (both.pretrain.steps, both.pretrain.max_steps) == (4500, 9600)  # room by 480 × 10 classes
    with pytest.raises(ConfigError, match=r"'pretrain.max_steps': expected 0, auto or at least pretrain.steps"):
        load("pretrain.steps=3000", "pretrain.max_steps=2000")
    with pytest.raises(ConfigError, match=r"'pretrain.max_steps': expected 0 or auto while pretrain.check_images "
                                          r"is 0"):
        load("pretrain.check_images=0", "pretrain.max_steps=4000")
    unchecked = load("pretrain.check_images=0", "pretrain.max_steps=auto")  # own-data.yaml without its check
    assert unchecked.pretrain.max_steps == 0
    assert ("pretrain.max_steps", "0: no generator check to go on by (pretrain.check_images is 0)") in unchecked.auto
    with pytest.raises(ConfigError, match=r"'finetune.max_steps': expected 0 \(only pretraining goes on"):
        load("finetune.max_steps=100")
