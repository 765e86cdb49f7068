"""The generator check's classifier choosing samples: sample.redraw draws again the images it assigns to another
class; sample.candidates draws each image several times and keeps one by herding in its features."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffdistill.cli import main
from diffdistill.config import SampleConfig
from diffdistill.models.classifiers import build_classifier
from diffdistill.runs import CLASS_MEANS, check_classifier_file
from diffdistill.runtime import derive_seed
from diffdistill.stages import sample as S
from diffdistill.stages.evaluate import class_means

TINY = ["pretrain.steps=4", "pretrain.batch_size=8", "pretrain.check_images=1", "finetune.steps=0",
        "sample.checkpoint=pretrain", "sample.steps=2", "sample.ipc=[2]", "data.classes=[0,1,2]",
        "evaluate.full_epochs=1", "evaluate.width=8", "threads=1"]


def test_the_judge_reads_back_the_classifier_it_saved(tmp_path):
    torch.manual_seed(0)
    net = build_classifier("convnet3", 1, 3, 16, width=8).eval()
    norm = (torch.full((1, 1, 1, 1), 0.4), torch.full((1, 1, 1, 1), 0.3))
    means = torch.randn(3, 8 * 2 * 2, dtype=torch.float64)
    S.Judge.save(tmp_path / "judge.safetensors", net, "convnet3", 8, None, 16, norm, ["a", "b", "c"], means)
    judge = S.Judge(tmp_path / "judge.safetensors", SampleConfig(candidates=2), ["a", "b", "c"],
                    torch.device("cpu"))
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        x = (images.float() / 255 - 0.4) / 0.3
        probs, feats = net(x).softmax(1), net.features(x)
    assigned, own = judge(images, labels)
    assert torch.equal(assigned, probs.argmax(1) == labels)
    assert torch.allclose(own, probs[torch.arange(5), labels])
    assert torch.allclose(judge.score(images, labels)[2], feats.double(), atol=1e-6)
    assert torch.equal(judge.class_means, means)


def test_class_means_are_each_class_mean_feature():
    torch.manual_seed(0)
    net = build_classifier("convnet3", 1, 3, 16, width=8).eval()
    images = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 2, 0, 2, 2, 0, 0])  # class 1 has no image: a zero row, not NaN
    norm = (torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25))
    with torch.no_grad():
        feats = net.features((images.float() / 255 - 0.5) / 0.25).double()
    means = class_means(net, images, labels, norm, 3)
    assert means.shape == (3, 32) and means.dtype == torch.float64
    assert torch.allclose(means[0], feats[labels == 0].mean(0)) and torch.allclose(means[2], feats[labels == 2].mean(0))
    assert torch.equal(means[1], torch.zeros(32, dtype=torch.float64))


def test_rejected_images_are_drawn_again_and_recorded(tmp_path, monkeypatch, capsys):
    """A judge that rejects the first draws of one class: those images are their second draws, with that draw's
    seed in the manifest, the others stay as drawn; a judge that never agrees keeps each image's most probable
    draw; an interrupted sampling resumes with the records of the batches it had; without the check's
    classifier the command stops before sampling with one line saying what to run."""
    out = [f"out_dir={tmp_path}", *TINY]
    assert main(["run", "configs/demo-digits.yaml", *out, "evaluate.nets=[convnet3]"]) == 0  # up to evaluate
    assert check_classifier_file(tmp_path / "demo-digits").is_file()
    samples = tmp_path / "demo-digits" / "samples"
    first = {p.relative_to(samples).as_posix(): p.read_bytes() for p in samples.rglob("*.png")}
    assert len(first) == 6
    calls = []

    def judge(self, images, labels):  # rejects the first draws of class 1 only
        calls.append(labels.tolist())
        ok = labels != 1 if len(calls) == 1 else torch.ones(len(labels), dtype=torch.bool)
        return ok, ok.float()

    monkeypatch.setattr(S.Judge, "__call__", judge)
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.redraw=2", "--force"]) == 0
    assert calls == [[0, 0, 1, 1, 2, 2], [1, 1]]  # one batch, then class 1's two images again; no third draw
    manifest = json.loads((samples / "manifest.json").read_text())
    assert len(manifest["images"]) == 6
    for rec in manifest["images"]:
        again = rec["class"] == "1"
        assert rec["redraw"] == {"kept": int(again), "draws": 1 + again, "assigned": True}
        assert rec["seed"] == (derive_seed(0, "sample", "1", rec["index"], "redraw", 1) if again else
                               derive_seed(0, "sample", rec["class"], rec["index"]))
        # class 1 holds its second draws; the others are the images of the run without redraw, byte for byte
        assert ((samples / rec["file"]).read_bytes() == first[rec["file"]]) != again
    info = json.loads((samples / "run_info.json").read_text())
    assert info["redraw"] == {"redrawn": 2, "replaced": 2, "assigned": 6, "of": 6}
    assert main(["evaluate", "configs/demo-digits.yaml", *out, "evaluate.nets=[convnet3]", "--force"]) == 0
    assert main(["report", str(tmp_path / "demo-digits")]) == 0
    assert "**Redrawn**: 2 of 6 distilled images" in (tmp_path / "demo-digits" / "report.md").read_text()
    # never assigned: every image gets all three draws, and the one with the highest own-class probability
    # (the second) stays
    scores = iter([0.2, 0.5, 0.3])

    def doubtful(self, images, labels):
        return torch.zeros(len(labels), dtype=torch.bool), torch.full((len(labels),), next(scores))

    monkeypatch.setattr(S.Judge, "__call__", doubtful)
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.redraw=2", "--force"]) == 0
    manifest = json.loads((samples / "manifest.json").read_text())
    assert all(r["redraw"] == {"kept": 1, "draws": 3, "assigned": False} for r in manifest["images"])
    # interrupted after its first batch of two, then resumed: the first batch keeps its records and images
    def stop_second(self, images, labels, seen=[]):  # noqa: B006 - counts the calls of this one run
        seen.append(1)
        if len(seen) == 2:
            raise S.StageError("stopped")
        return torch.ones(len(labels), dtype=torch.bool), torch.ones(len(labels))

    monkeypatch.setattr(S.Judge, "__call__", stop_second)
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.redraw=1", "sample.batch_size=2",
                 "--force"]) == 2
    monkeypatch.setattr(S.Judge, "__call__", judge)
    calls.clear()
    capsys.readouterr()
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.redraw=1", "sample.batch_size=2",
                 "--force"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert calls == [[1, 1], [1, 1], [2, 2]]  # the class-0 batch was not sampled again; class 1 drawn twice
    manifest = json.loads((samples / "manifest.json").read_text())
    assert [r["redraw"] for r in manifest["images"]] == [{"kept": 0, "draws": 1, "assigned": True}] * 2 + \
        [{"kept": 1, "draws": 2, "assigned": True}] * 2 + [{"kept": 0, "draws": 1, "assigned": True}] * 2
    check_classifier_file(tmp_path / "demo-digits").unlink()
    capsys.readouterr()
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.redraw=1", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "diffdistill check" in err and "sample.redraw=0" in err
    # `run --resume` in a folder whose check predates the classifier runs the check again
    monkeypatch.setattr(S.Judge, "__call__", judge)
    assert main(["run", "configs/demo-digits.yaml", *out, "sample.redraw=1", "evaluate.nets=[convnet3]",
                 "--resume"]) == 0
    check_line = [line for line in capsys.readouterr().out.splitlines() if "== check" in line][0]
    assert "does not exist: running it again" in check_line
    assert check_classifier_file(tmp_path / "demo-digits").is_file()


def test_compare_and_sweep_sample_as_drawn_and_refuse_to_vary_redraw(tmp_path, capsys, monkeypatch):
    """compare and sweep run no generator check: a config's sample.redraw or sample.candidates is switched off
    there (said on the terminal), and a sweep that varies either stops before any work."""
    from diffdistill.stages import compare

    seen = []
    monkeypatch.setattr(compare, "describe", lambda cfg: seen.append(cfg.sample.redraw) or [])
    monkeypatch.setattr(compare, "check_plan", lambda *a, **k: (_ for _ in ()).throw(S.StageError("stop here")))
    assert main(["compare", "configs/demo-digits.yaml", "--methods", "random,dit", f"out_dir={tmp_path}",
                 "sample.redraw=2"]) == 2
    assert seen == [0] and "sample.redraw=2 is off here" in capsys.readouterr().out
    monkeypatch.setattr(compare, "describe", lambda cfg: seen.append(cfg.sample.candidates) or [])
    assert main(["compare", "configs/demo-digits.yaml", "--methods", "random,dit", f"out_dir={tmp_path}",
                 "sample.candidates=4"]) == 2
    assert seen == [0, 1] and "sample.candidates=4 is off here" in capsys.readouterr().out
    # pretraining that goes on by the check stops at pretrain.steps there too
    monkeypatch.setattr(compare, "describe", lambda cfg: seen.append(cfg.pretrain.max_steps) or [])
    assert main(["compare", "configs/demo-digits.yaml", "--methods", "random,dit", f"out_dir={tmp_path}",
                 "pretrain.max_steps=auto"]) == 2
    assert seen[-1] == 0 and "pretrain.max_steps=8000 is off here" in capsys.readouterr().out
    seen.clear()
    for key in ("sample.redraw=0,1", "sample.candidates=1,4", "pretrain.max_steps=0,8000"):
        assert main(["sweep", "configs/demo-digits.yaml", "--vary", key, f"out_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and key.split("=")[0] in err and "runs no check" in err
    from diffdistill.stages import train

    def pretrain(cfg, stage, **kw):
        seen.append(cfg.sample.redraw)
        raise S.StageError("stop here")

    monkeypatch.setattr(train, "train_stage", pretrain)  # the sweep's shared pretraining: its first work
    assert main(["sweep", "configs/demo-digits.yaml", "--vary", "sample.guidance=1,2", f"out_dir={tmp_path}",
                 "sample.redraw=1"]) == 2
    assert seen == [0] and "sample.redraw=1 is off here" in capsys.readouterr().out
    monkeypatch.setattr(train, "train_stage", lambda cfg, stage, **kw: seen.append(cfg.pretrain.max_steps) or
                        (_ for _ in ()).throw(S.StageError("stop here")))
    assert main(["sweep", "configs/demo-digits.yaml", "--vary", "sample.guidance=1,2", f"out_dir={tmp_path}",
                 "pretrain.max_steps=auto"]) == 2
    assert seen[-1] == 0 and "pretrain.max_steps=8000 is off here" in capsys.readouterr().out
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_candidates_keep_one_draw_per_image_by_herding_in_the_judges_features(tmp_path, monkeypatch, capsys):
    """sample.candidates=3 with the real judge runs; with a judge whose features put draw k at the class mean
    plus (3, 1, -1.5)[k] on one axis, each image keeps the draw herding picks (hand-computed: slot 0 the nearest,
    slot 1 the one that brings the two kept images' mean closest), among the draws assigned their class; draw 0
    is the image sampling makes without candidates, byte for byte; the manifest, run_info.json and report say
    what was kept. A check classifier without class means is refused in one line and made again by
    `run --resume`; redraw and candidates together are a config error."""
    out = [f"out_dir={tmp_path}", *TINY]
    assert main(["run", "configs/demo-digits.yaml", *out, "evaluate.nets=[convnet3]"]) == 0
    samples = tmp_path / "demo-digits" / "samples"
    first = {p.relative_to(samples).as_posix(): p.read_bytes() for p in samples.rglob("*.png")}
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.candidates=3", "--force"]) == 0  # real judge
    calls = []

    def score(self, images, labels):
        calls.append(labels.tolist())
        k = torch.arange(len(labels)) % 3  # the draws of each image come in turn
        ok = ~(((labels == 1) & (k == 1)) | ((labels == 2) & (k != 0)))
        feats = self.class_means[labels].clone()
        feats[:, 0] += torch.tensor([3.0, 1.0, -1.5], dtype=torch.float64)[k]
        return ok, ok.double(), feats

    monkeypatch.setattr(S.Judge, "score", score)
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.candidates=3", "--force"]) == 0
    assert calls == [[0] * 6 + [1] * 6 + [2] * 6]  # one batch of whole classes: 3 classes x 2 images x 3 draws
    manifest = json.loads((samples / "manifest.json").read_text())
    kept = {"0": [1, 2], "1": [2, 0], "2": [0, 0]}  # class 1: draw 1 not assigned; class 2: only draw 0
    for rec in manifest["images"]:
        k = kept[rec["class"]][rec["index"]]
        assert rec["candidates"] == {"kept": k, "draws": 3, "assigned": True,
                                     "assigned_draws": {"0": 3, "1": 2, "2": 1}[rec["class"]]}
        assert rec["seed"] == (derive_seed(0, "sample", rec["class"], rec["index"], "redraw", k) if k else
                               derive_seed(0, "sample", rec["class"], rec["index"]))
        assert ((samples / rec["file"]).read_bytes() == first[rec["file"]]) == (k == 0)
    info = json.loads((samples / "run_info.json").read_text())
    assert info["candidates"] == {"draws": 3, "first_kept": 3, "assigned": 6, "assigned_draws": 12, "of": 6}
    assert main(["evaluate", "configs/demo-digits.yaml", *out, "evaluate.nets=[convnet3]", "--force"]) == 0
    assert "**Chosen from 3 draws**" in (tmp_path / "demo-digits" / "report.md").read_text()
    # the real judge with prototype starts (each draw from its image's mode) makes the same set in one batch
    # and in three (one class each), also when interrupted in the second and resumed
    monkeypatch.undo()
    proto = ["sample.candidates=2", "sample.start=prototype", "--force"]
    assert main(["sample", "configs/demo-digits.yaml", *out, *proto]) == 0
    whole = {p.relative_to(samples).as_posix(): p.read_bytes() for p in samples.rglob("*.png")}
    real_score = S.Judge.score

    def stop_second(self, images, labels, seen=[]):  # noqa: B006 - counts the calls of this one run
        seen.append(1)
        if len(seen) == 2:
            raise S.StageError("stopped")
        return real_score(self, images, labels)

    monkeypatch.setattr(S.Judge, "score", stop_second)
    assert main(["sample", "configs/demo-digits.yaml", *out, *proto, "sample.batch_size=4"]) == 2
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["sample", "configs/demo-digits.yaml", *out, *proto, "sample.batch_size=4"]) == 0
    assert "(2 images already there)" in capsys.readouterr().out  # the first batch: class 0's two images
    assert {p.relative_to(samples).as_posix(): p.read_bytes() for p in samples.rglob("*.png")} == whole
    # a classifier file from before the class means: refused before sampling, made again by run --resume
    judge_file = check_classifier_file(tmp_path / "demo-digits")
    tensors = load_file(judge_file)
    with safe_open(judge_file, "pt") as f:
        meta = f.metadata()
    del tensors[CLASS_MEANS]
    save_file(tensors, judge_file, metadata=meta)
    capsys.readouterr()
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.candidates=3", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "class feature means" in err and "sample.candidates=1" in err
    assert main(["run", "configs/demo-digits.yaml", *out, "sample.candidates=3", "evaluate.nets=[convnet3]",
                 "--resume"]) == 0
    check_line = [line for line in capsys.readouterr().out.splitlines() if "== check" in line][0]
    assert "class feature means" in check_line and "running it again" in check_line
    with safe_open(judge_file, "pt") as f:
        assert CLASS_MEANS in f.keys()
    assert main(["sample", "configs/demo-digits.yaml", *out, "sample.candidates=3", "sample.redraw=1"]) == 2
    assert "sample.candidates" in capsys.readouterr().err
