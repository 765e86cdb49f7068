"""The soft-label evaluation protocol (RDED / SRe²L): the KD loss, the teacher seeing the student's batch,
teachers from files (torchvision layout) or the full-data nets, and one-line errors for bad teachers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_set
from safetensors.torch import save_file

from diffdistill.config import EvalConfig, SoftLabelConfig
from diffdistill.errors import StageError
from diffdistill.losses import soft_label_loss, soft_targets
from diffdistill.stages import evaluate
from diffdistill.stages.evaluate import rded_cosine, train_classifier


def test_soft_label_loss_by_hand():
    student, teacher, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 0.0]]), 2.0
    p = [math.exp(v / t) for v in (0.0, 1.0, 0.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / t) for v in (1.0, 2.0, 3.0)]
    q = [v / sum(q) for v in q]
    expected = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))
    assert soft_targets(teacher, t)[0].tolist() == pytest.approx(p)
    assert soft_label_loss(student, soft_targets(teacher, t), t).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_one_and_a_one_hot_teacher_is_the_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=g), torch.tensor([0, 4, 2, 2, 1, 3])
    one_hot = F.one_hot(labels, 5).float()
    assert soft_label_loss(logits, one_hot, 1.0).item() == pytest.approx(F.cross_entropy(logits, labels).item(),
                                                                          rel=1e-6)


def test_rded_schedule_falls_from_one_to_one_half():
    f = rded_cosine(300)
    assert f(0) == 1.0 and f(300) == pytest.approx(0.5) and f(150) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


class Recorder(torch.nn.Module):
    """A teacher that keeps every batch it labels and answers with fixed logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.seen, self.classes = [], classes

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return 5 * torch.arange(self.classes, dtype=torch.float32).expand(len(x), -1)


def test_the_teacher_labels_the_very_batch_the_student_sees(monkeypatch):
    """After crop, flip, jitter and CutMix: the same tensor goes to the student and to the teacher."""
    student_inputs = []
    build = evaluate.build_classifier

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: student_inputs.append(a[0].detach().clone()) if m.training
                                        else None)
        return model

    monkeypatch.setattr(evaluate, "build_classifier", watched)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(12) % 4
    norm = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))
    ecfg = EvalConfig(width=8, batch_size=4, cutmix_prob=1.0, color_jitter=0.4,
                      soft=SoftLabelConfig(temperature=1, lr=0.01))
    teacher = Recorder(4)
    res = train_classifier("convnet3", x, y, x[:4], y[:4], norm, 4, 10, 0, ecfg, True, teacher)
    assert len(teacher.seen) == len(student_inputs) == 10 * 3
    assert all(torch.equal(a, b) for a, b in zip(teacher.seen, student_inputs))
    # the student learned the teacher's (constant) ranking, not the hard labels
    with torch.no_grad():
        out = res.model.eval()((x.float() / 255 - 0.5) / 0.25)
    assert (out.argmax(1) == 3).all()


def test_hard_and_soft_side_by_side_with_the_full_data_teacher(tmp_path):
    from diffdistill.cli import main

    real = digits_set(tmp_path / "set", 2)
    args = ["evaluate", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "evaluate.nets=[convnet3]",
            "evaluate.ipc=[1,2]", "evaluate.epochs=3", "evaluate.full_epochs=1", "evaluate.seeds=1",
            "evaluate.width=16", "evaluate.labels=[soft,hard]", "--distilled", str(real)]
    assert main(args) == 0
    res = json.loads((tmp_path / "set" / "results.json").read_text())
    entry = res["ipc"]["2"]
    assert entry["labels"] == "soft" and set(entry["by_labels"]) == {"hard", "soft"}  # the first one on top
    assert entry["distilled"] == entry["by_labels"]["soft"]["distilled"]
    assert res["metrics"]["ipc"]["2"]["distilled"]["overall"]["coverage"] is not None  # read from soft records
    hard, soft = entry["by_labels"]["hard"], entry["by_labels"]["soft"]
    assert soft["random_real"]["indices"] == hard["random_real"]["indices"]  # the same images under both
    assert soft["distilled"]["runs"] != hard["distilled"]["runs"]
    assert "teacher the full-data classifier" in res["protocol"]["labels"]["soft"]
    report = (tmp_path / "set" / "report.md").read_text()
    assert "soft labels" in report
    jobs = {p.name for p in (tmp_path / "set" / "evaluate-jobs").glob("*.json")}
    assert "convnet3_distilled_soft_ipc2_seed0.json" in jobs and "convnet3_random_real_soft_ipc1_seed0.json" in jobs


def test_bad_teachers_fail_in_one_line_before_training(tmp_path, monkeypatch):
    from helpers import torchvision_state

    from diffdistill.models.classifiers import build_classifier

    real = digits_set(tmp_path / "set", 2)
    ran = []
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: ran.append(a))

    def run(teacher, *extra):
        from diffdistill.config import load_config

        cfg = load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", "evaluate.labels=[soft]",
                                                       "evaluate.ipc=[2]", f"evaluate.soft.teacher={teacher}", *extra])
        evaluate.plan_evaluation(cfg, real, torch.device("cpu"))

    with pytest.raises(StageError, match=r"^evaluate.soft.teacher: .*missing.pth does not exist; download "
                                         r"torchvision's resnet18 .*resnet18-f37072fd.pth"):
        run(tmp_path / "missing.pth")
    save_file(torchvision_state("resnet18", 7, torch.Generator().manual_seed(0)), str(tmp_path / "seven.safetensors"))
    with pytest.raises(StageError, match="classifies 7 classes; the data has 10"):
        run(tmp_path / "seven.safetensors", "data.channels=3")
    torch.save(torchvision_state("resnet18", 10, torch.Generator().manual_seed(0)), tmp_path / "r18.pth")
    with pytest.raises(StageError, match="RGB images; the data has 1 channel"):
        run(tmp_path / "r18.pth")  # the digits are grayscale
    with pytest.raises(StageError, match=r"not the state dict of this ResNet .*teacher_net=resnet50"):
        run(tmp_path / "r18.pth", "evaluate.soft.teacher_net=resnet50", "data.channels=3")
    assert ran == []
    model, columns, digest = evaluate.load_teacher(str(tmp_path / "r18.pth"), "resnet18", [str(c) for c in range(10)],
                                                   3)
    assert columns is None and len(digest) == 64
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build_classifier("resnet18", 3, 10, 224).parameters())


def test_a_missing_teacher_stops_run_before_the_first_stage(tmp_path, capsys):
    from diffdistill.cli import main

    code = main(["run", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "evaluate.labels=[hard,soft]",
                 f"evaluate.soft.teacher={tmp_path / 'resnet18.pth'}", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "download torchvision's resnet18" in err
    assert not (tmp_path / "demo-digits").exists()
    assert main(["run", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "evaluate.labels=[hard,soft]",
                 "--dry-run"]) == 0
    assert "27 classifier trainings (convnet3 × 3 seeds × IPC 1, 10 × distilled / random real × hard / soft " \
           "labels + full data)" in capsys.readouterr().out


def test_a_teacher_named_by_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    from diffdistill.teachers import weights_file

    # no such repository in any cache, and nothing is downloaded
    with pytest.raises(StageError, match=r"^evaluate.soft.teacher: someone/resnet18-teacher is not a file or folder "
                                         r"here and not in the local Hugging Face cache; .*hf download"):
        weights_file("someone/resnet18-teacher", "resnet18")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").write_bytes(b"")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or snapshot)
    assert weights_file("someone/resnet18-teacher", "resnet18") == snapshot / "model.safetensors"
    assert asked == [("someone/resnet18-teacher", {"local_files_only": True})]
    with pytest.raises(StageError, match=r"weights/r18.pth does not exist; download torchvision's resnet18"):
        weights_file("weights/r18.pth", "resnet18")  # a missing file path is not taken for a hub id
