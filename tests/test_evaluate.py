import json

import numpy as np
import pytest
import torch
from helpers import digits_set
from PIL import Image

from diffdistill.augment import color_jitter, cutmix, lighting, random_resized_crop
from diffdistill.config import DataConfig, EvalConfig, epochs_for_ipc
from diffdistill.data.datasets import load_data
from diffdistill.errors import StageError
from diffdistill.models.classifiers import build_classifier
from diffdistill.stages.evaluate import lr_milestones, per_class_indices, train_classifier


# Expected parameter counts, from the architecture descriptions (not from the modules).
def conv_params(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def convnet_params(depth, width, in_ch, classes, size):
    """D × [conv3×3 with bias → instance norm (2 per channel) → ReLU → avg-pool 2] → linear."""
    chans = [in_ch] + [width] * depth
    layers = sum(conv_params(a, b, 3, bias=True) + 2 * b for a, b in zip(chans, chans[1:]))
    return layers + width * (size // 2**depth) ** 2 * classes + classes


def resnet_params(blocks, in_ch, classes, size):
    """Basic blocks, widths 64…512, bias-free convs, 2 norm params per channel (batch or affine instance norm);
    1×1 conv + norm shortcut when stride ≠ 1 or channels change; 7×7 stem from 128 px, else 3×3; linear(512)."""
    n = conv_params(in_ch, 64, 7 if size >= 128 else 3) + 2 * 64  # stem (pools have no parameters)
    c = 64
    for i, count in enumerate(blocks):
        out = 64 * 2**i
        for j in range(count):
            n += conv_params(c, out, 3) + conv_params(out, out, 3) + 2 * (2 * out)
            if (i > 0 and j == 0) or c != out:  # stride 2 (or, for ResNetAP, stride 1 + avg-pool)
                n += conv_params(c, out, 1) + 2 * out
            c = out
    return n + 512 * classes + classes


def expected_params(net, in_ch, classes, size):
    if net.startswith("convnet"):
        return convnet_params(int(net[len("convnet"):]), 128, in_ch, classes, size)  # width 128
    return resnet_params({"resnet18": (2, 2, 2, 2), "resnetap10": (1, 1, 1, 1)}[net], in_ch, classes, size)


def test_resnet18_formula_matches_torchvision():
    assert resnet_params((2, 2, 2, 2), 3, 10, 224) == 11_181_642  # torchvision resnet18, 10-class head


@pytest.mark.parametrize("net, sizes", [("convnet3", (32, 64, 224)), ("convnet6", (64, 224)),
                                       ("resnetap10", (32, 64, 224)), ("resnet18", (32, 64, 224))])
def test_nets_any_size_shapes_and_parameter_counts(net, sizes):
    norm = "batch" if net == "resnet18" else "instance"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for size in sizes:
        model = build_classifier(net, 3, 10, size, 128, norm).eval()
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
        assert count(model) == expected_params(net, 3, 10, size), f"{net} @ {size} px"
    small = 64 if net == "convnet6" else 28  # grayscale, another class count, the smallest size each takes
    model = build_classifier(net, 1, 7, small)
    assert model(torch.randn(1, 1, small, small)).shape == (1, 7)
    assert count(model) == expected_params(net, 1, 7, small), f"{net} @ {small} px, 1 channel, 7 classes"


def test_resnetap_has_no_strided_convolutions():
    model = build_classifier("resnetap10", 3, 10, 224)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.modules()) == 7  # stem + 3 × (conv, shortcut)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_recipe_rules():
    assert [epochs_for_ipc(i) for i in (1, 2, 10, 11, 50, 51, 200, 201, 500, 501)] == \
        [3000, 2000, 2000, 1500, 1500, 1000, 1000, 500, 500, 300]
    assert lr_milestones(300) == [200, 250] and lr_milestones(3000) == [2000, 2500]


def test_cutmix_mixes_labels_by_the_exact_pasted_area():
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 10, 10).contiguous()  # image 0 all 0, image 1 all 1
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(20):
        mixed, perm, lam = cutmix(x, 1.0, gen, rng)
        for i in range(2):
            own = (mixed[i] == x[i]).float().mean().item()
            assert own == pytest.approx(lam if perm[i] != i else 1.0)
        assert 0 <= lam <= 1


def test_augmentations_keep_shape_and_range_and_are_seeded():
    x = torch.rand(4, 3, 16, 16)
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return lighting(color_jitter(random_resized_crop(x, (0.5, 1), True, g), 0.4, g), 0.1, g)
    a, b = run(1), run(1)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, run(2))
    gray = color_jitter(torch.rand(2, 1, 8, 8), 0.4, torch.Generator().manual_seed(0))
    assert gray.shape == (2, 1, 8, 8) and 0 <= gray.min() and gray.max() <= 1
    assert torch.equal(lighting(gray, 0.1, torch.Generator()), gray)  # PCA lighting is RGB only


def test_identical_seeds_give_identical_results():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(20) % 4
    xv, yv = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(8) % 4
    norm = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))
    ecfg = EvalConfig(width=8, eval_every=1, batch_size=8)
    runs = [train_classifier("convnet3", x, y, xv, yv, norm, 4, 3, seed, ecfg, True) for seed in (5, 5, 6)]
    assert runs[0].curve == runs[1].curve
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                  runs[1].model.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                      runs[2].model.state_dict().values()))


def test_per_class_selection_first_or_seeded_pool():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert per_class_indices(labels, ["a", "b"], 2, None, "X").tolist() == [0, 1, 3, 4]
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    drawn = per_class_indices(labels, ["a", "b"], 2, g(), "X")
    assert torch.equal(drawn, per_class_indices(labels, ["a", "b"], 2, g(), "X"))
    assert set(drawn[:2].tolist()) <= {0, 1, 2} and set(drawn[2:].tolist()) <= {3, 4, 5, 6}
    with pytest.raises(StageError, match="class a has 3 images, IPC 4"):
        per_class_indices(labels, ["a", "b"], 4, None, "X")


def test_imagenet_val_layout(tmp_path):
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (12, 10), "red").save(tmp_path / "train" / wnid / "a.JPEG")
    (tmp_path / "val").mkdir()
    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (10, 10), color).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000000,n01440764 1 2 3 4\n"
                                     "ILSVRC2012_val_00000001,n02102040 1 2 3 4\nILSVRC2012_val_00000002,n09999999 1\n")
    cfg = DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val"), val_labels=str(tmp_path / "gt.csv"),
                     image_size=8)
    _, val = load_data(cfg)
    assert val.labels.tolist() == [0, 1] and val.images.shape == (2, 3, 8, 8)  # other classes left out
    (tmp_path / "gt.txt").write_text("ILSVRC2012_val_00000000.JPEG n01440764\n")
    with pytest.raises(StageError, match="no image of class n02102040"):
        load_data(DataConfig(train=cfg.train, val=cfg.val, val_labels=str(tmp_path / "gt.txt")))
    (tmp_path / "bad.txt").write_text("just-one-token\n")
    with pytest.raises(StageError, match="line 1: expected 'IMAGE WNID'"):
        load_data(DataConfig(train=cfg.train, val=cfg.val, val_labels=str(tmp_path / "bad.txt")))


@pytest.mark.slow
def test_three_nets_full_recipe_and_resume(tmp_path, monkeypatch):
    from diffdistill.cli import main
    from diffdistill.stages import evaluate

    real = digits_set(tmp_path / "set", 3)  # a "distilled" set made elsewhere: 3 real digits per class, as PNGs
    args = ["evaluate", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "evaluate.workers=1",
            "evaluate.nets=[convnet3,resnetap10,resnet18]", "evaluate.ipc=[2]", "evaluate.epochs=2",
            "evaluate.full=false", "evaluate.labels=[hard]", "evaluate.seeds=2", "evaluate.width=16",
            "evaluate.color_jitter=0.4",
            "evaluate.cutmix_prob=1.0"]
    where = ["--distilled", str(real)]
    assert main(args + ["evaluate.lighting=0.1", "--pool"] + where) == 0  # a run named after the set
    res = json.loads((tmp_path / "set" / "results.json").read_text())
    assert set(res["by_net"]) == {"convnet3", "resnetap10", "resnet18"}
    assert res["by_net"]["resnet18"]["norm"] == "batch" and res["norm"] == "instance"
    report = (tmp_path / "set" / "report.md").read_text()
    assert "resnet18 (batch norm)" in report and report.count("| IPC | distilled |") == 3
    assert res["protocol"]["epochs"] == {"2": 2}
    assert res["data"]["ipc_handling"].startswith("IPC per class drawn at random")
    assert len(res["ipc"]["2"]["distilled"]["indices"]) == 2
    jobs = sorted((tmp_path / "set" / "evaluate-jobs").glob("*.json"))
    assert len(jobs) == 3 * 2 * 2
    # an interrupted evaluation: one job missing; only that one is trained again
    jobs[0].unlink()
    calls = []
    original = evaluate._run_job
    monkeypatch.setattr(evaluate, "_run_job", lambda *a, **k: calls.append(a[1:5]) or original(*a, **k))
    assert main(args + ["evaluate.lighting=0.1", "--pool", "--force"] + where) == 0
    assert len(calls) == 1
    again = json.loads((tmp_path / "set" / "results.json").read_text())
    assert again["by_net"]["resnet18"]["ipc"] == res["by_net"]["resnet18"]["ipc"]
    assert again["ipc"] == res["ipc"]  # the retrained job reproduces its result exactly (CPU)
    # a changed recipe is a different job: nothing is reused
    calls.clear()
    assert main(args + ["evaluate.lighting=0.0", "--pool", "--force"] + where) == 0
    assert len(calls) == 12


def test_each_net_gets_its_protocol_norm_unless_one_is_set():
    from diffdistill.models.classifiers import DEFAULT_NORM

    assert DEFAULT_NORM["resnet18"] == "batch" and DEFAULT_NORM["resnetap10"] == "instance"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_classifier("resnet18", 3, 10, 32).modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d)
                   for m in build_classifier("resnet18", 3, 10, 32, norm="instance").modules())
