"""Sets too large for memory are streamed from their files: same pixels, same statistics, same accuracy."""

import json

import torch
from helpers import SHAPES, make_shapes

from diffdistill.cli import main
from diffdistill.config import EvalConfig
from diffdistill.data import pixels
from diffdistill.data.datasets import list_images, load_image_folder
from diffdistill.data.pixels import (
    Streamed,
    batches,
    channel_stats,
    pixel_sha256,
    place,
    read_or_list,
    read_whole,
    resident_budget,
)
from diffdistill.stages.evaluate import accuracy, train_classifier


def _listed(root, size=16):
    from diffdistill.data.datasets import ImageFiles

    files, labels = list_images(root, list(SHAPES))
    return ImageFiles(files, torch.tensor(labels), list(SHAPES), root, size, 3)


def test_a_streamed_set_reads_the_pixels_of_the_set_read_whole(tmp_path):
    root = make_shapes(tmp_path / "s", per_class=4, size=20)  # files of 20-28 px, read at 16, trained at 12
    whole = load_image_folder(root, list(SHAPES), 16, 3)
    listed = _listed(root)
    resident, streamed = place(whole, 12, torch.device("cpu"), 0), place(listed, 12, torch.device("cpu"), 0)
    assert isinstance(streamed, Streamed) and streamed.shape == tuple(resident.shape) == (12, 3, 12, 12)
    order = torch.randperm(12).split(5)
    assert all(torch.equal(a, resident[i]) for i, a in zip(order, batches(streamed, order)))
    assert torch.equal(streamed[2:7], resident[2:7])
    # within the budget a listed set is filled in shard by shard: the same tensor
    assert torch.equal(place(listed, 12, torch.device("cpu"), 10**9), resident)
    assert pixel_sha256(listed) == whole.sha256()
    assert isinstance(read_or_list(listed, 12, 0), type(listed))
    assert torch.equal(read_or_list(listed, 12, 10**9).images, whole.images)
    # read whole by the larger of the file and classifier sizes: 12 images x 3 x 16² = 9,216 bytes; at 224 px more
    assert read_whole(listed, 12, 9216) and not read_whole(listed, 12, 9215) and not read_whole(listed, 224, 10**6)


def test_channel_statistics_by_shard_match_the_one_pass_statistics(tmp_path, monkeypatch):
    root = make_shapes(tmp_path / "s", per_class=5, size=20)
    whole, listed = load_image_folder(root, list(SHAPES), 16, 3), _listed(root)
    mean, std = channel_stats(whole, 12, torch.device("cpu"))
    assert mean.shape == std.shape == (1, 3, 1, 1) and len(set(mean.flatten().tolist())) == 3
    # the path follows the sample's size, not where it lives: a listed sample gives the very same numbers
    assert all(torch.equal(a, b) for a, b in zip(channel_stats(listed, 12, torch.device("cpu")), (mean, std)))
    # at the boundary (15 images x 3 x 16² x 4 bytes: one pass at 16 px files, even for a 12 px classifier)
    monkeypatch.setattr(pixels, "STATS_ONE_PASS_BYTES", 15 * 3 * 16 * 16 * 4)
    assert all(torch.equal(a, b) for a, b in zip(channel_stats(listed, 12, torch.device("cpu")), (mean, std)))
    assert all(torch.equal(a, b) for a, b in zip(channel_stats(whole, 12, torch.device("cpu")), (mean, std)))
    monkeypatch.setattr(pixels, "STATS_ONE_PASS_BYTES", 15 * 3 * 16 * 16 * 4 - 1)
    edge = [channel_stats(s, 12, torch.device("cpu")) for s in (whole, listed)]
    assert all(torch.equal(a, b) for a, b in zip(*edge))  # both by shard now
    monkeypatch.setattr(pixels, "STATS_ONE_PASS_BYTES", 0)
    monkeypatch.setattr(pixels, "STATS_SHARD", 4)  # 15 images: shards of 4, 4, 4, 3
    by_shard = [channel_stats(s, 12, torch.device("cpu")) for s in (whole, listed)]
    assert all(torch.equal(a, b) for a, b in zip(*by_shard))
    m, d = by_shard[0]
    assert torch.allclose(m, mean, atol=1e-6) and torch.allclose(d, std, atol=1e-6)


def test_streamed_training_gives_the_accuracy_of_in_memory_training(tmp_path, monkeypatch):
    root = make_shapes(tmp_path / "s", per_class=6, size=20)
    whole, listed = load_image_folder(root, list(SHAPES), 16, 3), _listed(root)
    x, streamed = place(whole, 16, torch.device("cpu"), 0), place(listed, 16, torch.device("cpu"), 0)
    y = whole.labels
    norm = (torch.full((1, 3, 1, 1), 0.4), torch.full((1, 3, 1, 1), 0.25))
    ecfg = EvalConfig(width=8, eval_every=1, batch_size=5)
    a = train_classifier("convnet3", x, y, x, y, norm, 3, 3, 0, ecfg, True)
    b = train_classifier("convnet3", streamed, y, streamed, y, norm, 3, 3, 0, ecfg, True)
    assert a.curve == b.curve
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    whole_batch = accuracy(a.model, x, y, norm)
    monkeypatch.setattr(pixels, "EVAL_BATCH_PIXELS", 4 * 16 * 16)  # scored 4 images at a time: 18 = 4 x 4 + 2
    assert accuracy(a.model, streamed, y, norm) == whole_batch


def test_the_evaluate_stage_streams_every_set_with_the_same_results(tmp_path, capsys, monkeypatch):
    made = []
    init = Streamed.__init__
    monkeypatch.setattr(Streamed, "__init__", lambda self, files, *a: made.append(len(files)) or init(self, files, *a))
    train, val, syn = (make_shapes(tmp_path / n, per_class=k, size=20, seed=s)
                       for n, k, s in (("train", 8, 0), ("val", 4, 1), ("syn", 3, 2)))
    args = ["evaluate", "configs/demo-digits.yaml", f"data.train={train}", f"data.val={val}", "data.hflip=true",
            "evaluate.full=false", "evaluate.metrics=false", "evaluate.ipc=[1,3]", "evaluate.epochs=2",
            "evaluate.seeds=2", "evaluate.width=8", "evaluate.labels=[hard]", "evaluate.workers=1", "--distilled",
            str(syn)]
    out = {}
    for name, budget in (("memory", "null"), ("streamed", "0")):
        made.clear()
        assert main([*args, f"out_dir={tmp_path / name}", f"evaluate.resident_gb={budget}"]) == 0
        # streamed: val (12 images), then per job its subset (3 classes x IPC)
        assert made == ([] if name == "memory" else [12] + [3] * 4 + [9] * 4)
        (found,) = (tmp_path / name).rglob("evaluate/results.json")
        out[name] = json.loads(found.read_text())
    for ipc in ("1", "3"):
        for kind in ("distilled", "random_real"):
            assert out["memory"]["ipc"][ipc][kind]["runs"] == out["streamed"]["ipc"][ipc][kind]["runs"]
            assert out["memory"]["ipc"][ipc][kind]["curves"] == out["streamed"]["ipc"][ipc][kind]["curves"]
    assert out["memory"]["data"] == out["streamed"]["data"]  # the same hashes: where a set lives is no key


def test_the_resident_budget_by_device():
    assert resident_budget(0.5, torch.device("cpu")) == 2**29
    assert resident_budget(None, torch.device("cpu")) == int(pixels.RESIDENT_CPU_GB * 2**30)
    assert resident_budget(0, torch.device("cpu")) == 0
