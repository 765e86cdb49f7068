"""End to end through the CLI on tiny settings: digits, a folder dataset that is not digits, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_shapes
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import build_config
from diffdistill.stages.sample import sample_latents

TINY = ["pretrain.steps=30", "pretrain.log_every=10", "finetune.steps=8", "finetune.log_every=4",
        "sample.steps=4", "sample.ipc=[1,3]", "evaluate.epochs=4", "evaluate.full_epochs=1", "evaluate.seeds=2",
        "evaluate.eval_every=2", "evaluate.width=16", "evaluate.workers=1"]


def run(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert run("run", "configs/demo-digits.yaml", f"out_dir={out}", *TINY) == 0
    return out / "demo-digits"


@pytest.mark.slow
def test_run_writes_results_report_grid_and_manifest(digits_run):
    res = json.loads((digits_run / "results.json").read_text())
    for ipc in ("1", "3"):
        for kind in ("distilled", "random_real"):
            entry = res["ipc"][ipc][kind]
            assert {"mean", "std", "runs"} <= set(entry) and len(entry["runs"]) == 2
            assert 0 <= entry["mean"] <= 100
            assert entry["best_epoch"]["label"].startswith("best epoch, selected on the validation set")
            assert entry["best_epoch"]["mean"] >= entry["mean"] - 1e-9
    assert {"mean", "std", "runs"} <= set(res["full"]) and 0 <= res["fidelity"]["mean"] <= 100
    assert res["fidelity"]["num_images"] == 30
    assert res["config"]["finetune"]["memory"]["policy"] == "adaptive"
    assert len(res["ipc"]["3"]["random_real"]["indices"]) == 2  # one subset per seed, recorded
    assert len(res["ipc"]["3"]["random_real"]["indices"][0]) == 30
    report = (digits_run / "report.md").read_text()
    assert "random real" in report and "selected on the validation set" in report and "samples.png" in report
    assert Image.open(digits_run / "samples.png").size[0] > 0
    assert Image.open(digits_run / "losses.png").size[0] > 0
    manifest = json.loads((digits_run / "samples" / "manifest.json").read_text())
    assert manifest["ipc"] == 3 and len(manifest["images"]) == 30
    for c in range(10):
        assert len(list((digits_run / "samples" / str(c)).glob("*.png"))) == 3  # exactly IPC per class
    info = json.loads((digits_run / "finetune" / "run_info.json").read_text())
    assert info["versions"]["torch"] and len(info["data_sha256"]) == 64
    assert (digits_run / "finetune" / "config.yaml").is_file()
    assert (digits_run / "finetune" / "memory.safetensors").is_file()
    log = [json.loads(x) for x in (digits_run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert {"diffusion", "representativeness", "diversity", "gen_bank_similarity"} <= set(log[-1])
    check = json.loads((digits_run / "pretrain" / "check.json").read_text())  # run checked the generator
    assert check["num_images"] == 100 and check["images_per_class"] == 10 and 0 <= check["fidelity"] <= 100
    assert 0 <= check["classifier_val_accuracy"] <= 100
    assert f"Generator check right after pretraining (before fine-tuning): {check['fidelity']:.1f} %" in report


@pytest.mark.slow
def test_report_of_a_run_folder_has_pictures_metrics_and_dd_ranking(digits_run, capsys):
    assert run("report", str(digits_run)) == 0  # `diffdistill report RUN_DIR`
    assert "report.md" in capsys.readouterr().out
    res = json.loads((digits_run / "results.json").read_text())
    m = res["metrics"]
    assert m["k"] == 5 and "penultimate layer" in m["feature_space"]
    for kind in ("distilled", "random_real"):
        overall = m["ipc"]["3"][kind]["overall"]
        assert 0 <= overall["precision"] <= 1 and 0 <= overall["coverage"] <= 1 and overall["diversity"] >= 0
        assert set(m["ipc"]["3"][kind]["per_class"]) == {str(d) for d in range(10)}
    assert m["ipc"]["1"]["distilled"]["overall"]["diversity"] is None  # one image per class: no pairs
    dd = res["ipc"]["3"]["dd_ranking"]
    assert dd["ior"] == pytest.approx([a - b for a, b in zip(res["ipc"]["3"]["distilled"]["runs"],
                                                            res["ipc"]["3"]["random_real"]["runs"])], abs=0.011)
    assert 0 <= dd["lrs_mean"] <= 100
    report = (digits_run / "report.md").read_text()
    for text in ("## Diversity and coverage", "## DD-Ranking scores", "classes.png", "memory.png", "losses.png",
                 "| random real | 3 |", "The framed first column is the IPC-1 set"):
        assert text in report, text
    assert report.count("% of the 30 distilled images are assigned") == 1  # one fidelity line
    for png in ("classes.png", "memory.png", "losses.png", "samples.png"):
        with Image.open(digits_run / png) as img:
            img.verify()


@pytest.mark.slow
def test_existing_output_needs_force(digits_run, capsys):
    out = str(digits_run.parent)
    assert run("sample", "configs/demo-digits.yaml", f"out_dir={out}", *TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "samples exists; pass --resume to continue an interrupted run, --force" in err
    before = sorted(p.name for p in (digits_run / "samples").iterdir())
    assert run("run", "configs/demo-digits.yaml", f"out_dir={out}", *TINY) == 2  # refused before any work
    assert sorted(p.name for p in (digits_run / "samples").iterdir()) == before


@pytest.mark.slow
def test_difffit_finetune_is_reproducible_and_images_do_not_depend_on_their_batch(digits_run, tmp_path):
    from safetensors.torch import load_file

    from diffdistill.diffusion import cosine_betas
    from diffdistill.models.dit import load_dit

    out = str(digits_run.parent)
    args = ["configs/demo-digits.yaml", f"out_dir={out}", *TINY, "finetune.trainable=difffit",
            "finetune.memory.policy=fifo", f"finetune.init={digits_run / 'pretrain' / 'ema'}"]
    assert run("finetune", *args, "--force") == 0
    assert run("finetune", *args, "name=again") == 0  # the same config and seed under another name
    info = json.loads((digits_run / "finetune" / "run_info.json").read_text())
    assert info["trainable_parameters"] < 100_000  # biases, class table, γ only
    for weights in ("raw", "ema"):
        a, b = (load_file(str(run_dir / "finetune" / weights / "diffusion_pytorch_model.safetensors"))
                for run_dir in (digits_run, digits_run.parent / "again"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert (digits_run / "finetune" / "memory.safetensors").read_bytes() == \
        (digits_run.parent / "again" / "finetune" / "memory.safetensors").read_bytes()

    cfg = build_config({"out_dir": out, "name": "demo-digits"})
    model = load_dit(str(digits_run / "finetune" / "ema"))
    betas = cosine_betas(1000)
    scfg = cfg.sample.__class__(steps=3, guidance=2.0, scheduler="ddpm", timestep_spacing="leading")
    labels = torch.tensor([0, 1, 2, 3])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]  # noqa: E731
    together = sample_latents(model, scfg, betas, labels, gens(), (4, 8, 8), torch.device("cpu"))
    alone = sample_latents(model, scfg, betas, labels[2:3], gens()[2:3], (4, 8, 8), torch.device("cpu"))
    assert torch.allclose(together[2:3], alone, atol=1e-5)  # an image does not depend on its batch
    assert not torch.allclose(together[2:3], together[3:4], atol=1e-3)  # (and images do differ)


@pytest.mark.slow
def test_folder_dataset_that_is_not_digits(tmp_path):
    make_shapes(tmp_path / "train", per_class=12, size=20)
    make_shapes(tmp_path / "val", per_class=4, size=20, seed=1)
    rc = run("run", "configs/demo-digits.yaml", f"out_dir={tmp_path / 'runs'}", "name=shapes",
             f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}", *TINY)
    assert rc == 0
    res = json.loads((tmp_path / "runs" / "shapes" / "results.json").read_text())
    assert res["data"]["classes"] == ["circle", "square", "triangle"]
    img = Image.open(tmp_path / "runs" / "shapes" / "samples" / "circle" / "00000.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    # scoring a set made elsewhere (the real val images themselves, as a "distilled" set) without name=:
    # a run named after the set; the run that was scored before stays byte-identical
    before = {p: p.read_bytes() for p in (tmp_path / "runs" / "shapes").rglob("*") if p.is_file()}
    rc = run("evaluate", "configs/demo-digits.yaml", f"out_dir={tmp_path / 'runs'}",
             f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}", *TINY,
             "--distilled", str(tmp_path / "val"))
    assert rc == 0
    assert {p: p.read_bytes() for p in (tmp_path / "runs" / "shapes").rglob("*") if p.is_file()} == before
    report = (tmp_path / "runs" / "val" / "report.md").read_text()
    assert report.startswith("# val") and "losses.png" not in report  # no generator of its own
    scored = json.loads((tmp_path / "runs" / "val" / "evaluate" / "results.json").read_text())
    assert scored["data"]["distilled_set"] == str(tmp_path / "val")
    assert scored["data"]["distilled_sha256"] != res["data"]["distilled_sha256"]
    assert scored["fidelity"]["num_images"] == 12  # the 4 val images of each of the 3 classes


@pytest.mark.parametrize("args, message", [
    (["run", "configs/demo-digits.yaml", "finetune.memory.polcy=fifo"], "unknown config key 'finetune.memory.polcy'"),
    (["run", "configs/demo-digits.yaml", "finetune.steps=many"], "'finetune.steps': expected int"),
    # KEY=VALUE after a flag is an override too
    (["run", "configs/demo-digits.yaml", "--resume", "finetune.memory.polcy=fifo"],
     "unknown config key 'finetune.memory.polcy'"),
    (["run", "configs/missing.yaml"], "config file configs/missing.yaml does not exist"),
    (["run", "configs/demo-digits.yaml", "data.train=/nonexistent/train", "data.val=/nonexistent/val"],
     "data.train: folder /nonexistent/train does not exist"),
    (["run", "configs/demo-digits.yaml", "data.classes=imagewolf"], "unknown preset 'imagewolf'"),
    (["run", "configs/demo-digits.yaml", "data.classes=[1,12]"], "data.classes: 12 not found"),
    (["sample", "configs/demo-digits.yaml", "name=never-trained"], "run `diffdistill finetune`"),
])
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "diffdistill", *args, f"out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffdistill: error: ") and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir()) or not any((tmp_path / "demo-digits").glob("*/*.safetensors"))


def test_version(capsys):
    from diffdistill import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"diffdistill {__version__}"


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should go")
    assert run("pretrain", "configs/demo-digits.yaml", f"out_dir={blocker}", "pretrain.steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffdistill: error: cannot write the output folder") and "\n" not in err


def test_training_is_reproducible_from_the_seed(tmp_path):
    from safetensors.torch import load_file

    weights = []
    for name in ("a", "b", "c"):
        seed = "seed=1" if name == "c" else "seed=0"
        assert run("pretrain", "configs/demo-digits.yaml", f"out_dir={tmp_path}", f"name={name}", seed,
                   "pretrain.steps=3", "data.classes=[0,1]") == 0
        weights.append(load_file(str(tmp_path / name / "pretrain" / "raw" / "diffusion_pytorch_model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # same seed: bit-identical
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.slow
def test_the_generator_check_changes_nothing_that_follows(tmp_path, capsys):
    from safetensors.torch import load_file

    quick = [*TINY, "evaluate.seeds=1", "evaluate.epochs=1", "evaluate.metrics=false", f"out_dir={tmp_path}"]
    assert run("run", "configs/demo-digits.yaml", *quick, "name=checked", "pretrain.check_images=2") == 0
    assert "generator check: " in capsys.readouterr().out
    assert run("run", "configs/demo-digits.yaml", *quick, "name=plain", "pretrain.check_images=0") == 0
    assert not (tmp_path / "plain" / "pretrain" / "check.json").exists()
    weights = [load_file(str(tmp_path / name / "finetune" / "raw" / "diffusion_pytorch_model.safetensors"))
               for name in ("checked", "plain")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    plain, checked = tmp_path / "plain" / "samples", tmp_path / "checked" / "samples"
    images = sorted(p.relative_to(plain) for p in plain.rglob("*.png"))
    assert images and all((checked / f).read_bytes() == (plain / f).read_bytes() for f in images)
    capsys.readouterr()
    assert main(["check", "configs/demo-digits.yaml", f"out_dir={tmp_path}", "name=none"]) == 2  # no pretrain yet
    assert "run `diffdistill pretrain` with this config first" in capsys.readouterr().err
