"""benchmarks/own_data.py: the folder sets it draws, and one tiny run through it."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import own_data  # noqa: E402


@pytest.mark.parametrize("name, classes, size, mode", [("glyphs", 10, 28, "L"), ("textures", 10, 32, "RGB"),
                                                       ("shapes30", 30, 32, "RGB"), ("doodles", 10, 32, "RGB"),
                                                       ("scenes100", 100, 32, "RGB")])
def test_sets_are_class_folders_drawn_from_a_seed(tmp_path, name, classes, size, mode):
    root = own_data.make_set(tmp_path / "a", name, 3, 2)
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"{c:02d}" for c in range(classes)]
    assert len(list((root / "train").rglob("*.png"))) == 3 * classes
    assert len(list((root / "val").rglob("*.png"))) == 2 * classes
    with Image.open(root / "train" / "00" / "0000.png") as img:
        assert img.size == (size, size) and img.mode == mode
    again = own_data.make_set(tmp_path / "b", name, 3, 2)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)  # the same seed, the same set
    first = {(root / "train" / f"{c:02d}" / "0000.png").read_bytes() for c in range(classes)}
    assert len(first) == classes  # classes differ


@pytest.mark.slow
def test_one_tiny_run_gives_the_table(tmp_path, capsys, monkeypatch):
    tiny = ["pretrain.steps=10", "finetune.steps=2", "sample.steps=2", "sample.ipc=[1]", "evaluate.epochs=1",
            "evaluate.full_epochs=1", "evaluate.seeds=1", "evaluate.width=8", "pretrain.check_images=0",
            "sample.candidates=1"]  # no check, so nothing to choose by
    own_data.main(["--sets", "glyphs", "--seeds", "0", "--train-per-class", "4", "--val-per-class", "2",
                   "--out", str(tmp_path), *tiny])
    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n  "benchmark"'):])
    (run,) = report["runs"]
    assert run["set"] == "glyphs" and set(run["ipc"]) == {"1"} and 0 <= run["ipc"]["1"]["distilled"] <= 100
    # configs/own-data.yaml sized the rest: 16 px gray -> unshuffle 2 and the tiny DiT; steps were given
    assert run["auto"] == {"autoencoder.unshuffle": "2", "model.size": "tiny", "pretrain.max_steps": "0"}
    assert run["check"] is None
    table = (tmp_path / "own-data.md").read_text().splitlines()
    assert len(table) == 7 and table[2].startswith("| glyphs | 1 | 1 |")
    assert table[6].startswith("| glyphs | 0 | 1 |")
    cells = table[6].split(" | ")
    assert cells[7:10] == ["—", "None", "10"]  # no candidates' draws, no check; 10 pretraining steps
    assert table[6].endswith("autoencoder.unshuffle = 2; model.size = tiny; pretrain.max_steps = 0 |")
    # a second call with --keep reuses the finished run instead of training it again
    import diffdistill.cli

    monkeypatch.setattr(diffdistill.cli, "main", lambda argv: pytest.fail(f"ran again: {argv}"))
    own_data.main(["--sets", "glyphs", "--seeds", "0", "--train-per-class", "4", "--val-per-class", "2",
                   "--out", str(tmp_path), "--keep", *tiny])
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "benchmark"'):])["runs"] == [run]
    # --resume: each run resumes (a stage runs again only if its settings or inputs changed); minutes marked
    calls = []
    monkeypatch.setattr(diffdistill.cli, "main", lambda argv: calls.append(argv) or 0)
    own_data.main(["--sets", "glyphs", "--seeds", "0", "--train-per-class", "4", "--val-per-class", "2",
                   "--out", str(tmp_path), "--resume", *tiny])
    assert len(calls) == 1 and calls[0][-1] == "--resume" and "--force" not in calls[0]
    assert (tmp_path / "own-data.md").read_text().splitlines()[6].split(" | ")[10].endswith("(resumed)")


@pytest.mark.slow
def test_runs_at_once_give_the_same_table_in_order(tmp_path, capsys):
    """--jobs 2: two seeds run in two processes at once; the table lists them in seed order, each run's log
    beside its folder. A run that fails stops the sweep with one line naming its log."""
    tiny = ["pretrain.steps=4", "finetune.steps=2", "sample.steps=2", "sample.ipc=[1]", "evaluate.epochs=1",
            "evaluate.full_epochs=1", "evaluate.seeds=1", "evaluate.width=8", "pretrain.check_images=0",
            "sample.candidates=1", "evaluate.workers=1", "threads=1"]
    own_data.main(["--sets", "glyphs", "--seeds", "1,0", "--train-per-class", "4", "--val-per-class", "2",
                   "--out", str(tmp_path), "--jobs", "2", *tiny])
    out = capsys.readouterr().out
    runs = json.loads(out[out.index('{\n  "benchmark"'):])["runs"]
    assert [r["seed"] for r in runs] == [1, 0] and all(set(r["ipc"]) == {"1"} for r in runs)
    assert all((tmp_path / f"glyphs-s{s}.log").is_file() and (tmp_path / f"glyphs-s{s}" / "results.json").is_file()
               for s in (0, 1))
    with pytest.raises(SystemExit) as stop:
        own_data.main(["--sets", "glyphs", "--seeds", "2", "--train-per-class", "4", "--val-per-class", "2",
                       "--out", str(tmp_path), "--jobs", "2", *tiny, "evaluate.nets=[nonet]"])
    assert "glyphs-s2 failed" in str(stop.value) and "glyphs-s2.log" in str(stop.value)
    assert "nonet" in (tmp_path / "glyphs-s2.log").read_text()


def test_the_generator_check_samples_from_noise_when_the_run_starts_from_prototypes(tmp_path, monkeypatch):
    """own-data.yaml starts sampling from prototypes; the check right after pretraining measures the generator
    alone (from noise, no modes), so it needs no real latents and cannot borrow them."""
    from diffdistill.config import load_config
    from diffdistill.stages import check

    data = own_data.make_set(tmp_path / "data", "glyphs", 4, 2)
    cfg = load_config("configs/own-data.yaml", [f"data.train={data}/train", f"data.val={data}/val",
                                                f"out_dir={tmp_path}", "model.size=tiny", "autoencoder.unshuffle=2",
                                                "pretrain.steps=4", "sample.steps=2"])
    assert cfg.sample.start == "prototype"
    seen = []
    monkeypatch.setattr(check, "sample_images", lambda model, dec, c, labels, *a, **k: seen.append(c.sample) or
                        torch.zeros(len(labels), 1, 16, 16, dtype=torch.uint8))
    from diffdistill.models.dit import load_dit
    from diffdistill.stages.train import train_stage

    model = load_dit(str(train_stage(cfg, "pretrain") / "ema"), key="pretrain")
    check._generate(cfg, model, ["A", "C"], 2, torch.device("cpu"))
    assert seen and all(s.start == "noise" and s.mode_guidance.scale == 0 for s in seen)
