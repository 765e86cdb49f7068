"""Bad input across all stages: each case gives its documented result — a one-line error naming the file or
key and exit code 2, or a logged skip and success — and never leaves a half-written output."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_shapes
from PIL import Image

from diffdistill.cli import main
from diffdistill.models.dit import build_dit
from diffdistill.train import save_model_folder

CFG = "configs/demo-digits.yaml"
FAST = ["finetune.init=null", "finetune.steps=2", "finetune.batch_size=4", "sample.steps=2", "sample.ipc=[2]",
        "evaluate.epochs=1", "evaluate.full=false", "evaluate.seeds=1", "evaluate.width=8", "threads=1"]


def folders(root: Path) -> list[str]:
    make_shapes(root / "train", per_class=4, size=20)
    make_shapes(root / "val", per_class=2, size=20, seed=1)
    return [f"data.train={root / 'train'}", f"data.val={root / 'val'}"]


def first_image(root: Path) -> Path:
    return sorted((root / "train" / "circle").iterdir())[0]


def tiny_model(path: Path, in_channels: int) -> str:
    model = build_dit("tiny", in_channels, 8, 3)
    save_model_folder(path, model, model.state_dict())
    return str(path)


# (id, stage, extra overrides, setup(root) -> extra overrides, expected exit code, expected text in stderr)
CASES = [
    ("missing train folder", "finetune", [], lambda r: [f"data.train={r / 'nope'}", f"data.val={r / 'val'}"], 2,
     "data.train: folder"),
    ("empty train folder", "finetune", [], lambda r: (r / "empty").mkdir() or [f"data.train={r / 'empty'}"], 2,
     "has no class subfolders"),
    ("class folder without images", "finetune", [],
     lambda r: [*folders(r), shutil.rmtree(r / "train" / "square") or (r / "train" / "square").mkdir()][:2], 2,
     "has no images"),
    ("truncated JPEG", "finetune", [],
     lambda r: [*folders(r), _truncate(r / "train" / "circle" / "bad.jpg")][:2], 2, "image file is truncated"),
    ("zero-byte image", "finetune", [],
     lambda r: [*folders(r), (r / "train" / "circle" / "zero.png").write_bytes(b"")][:2], 2,
     "cannot read image"),
    ("text file named .png", "finetune", [],
     lambda r: [*folders(r), (r / "train" / "circle" / "a.png").write_text("hello")][:2], 2, "cannot read image"),
    ("non-image files are skipped", "finetune", [],
     lambda r: [*folders(r), (r / "train" / "circle" / "notes.txt").write_text("x")][:2], 0,
     "skipped 1 files that are not images"),
    ("CMYK JPEG is converted", "finetune", [],
     lambda r: [*folders(r), Image.new("CMYK", (24, 24), (0, 50, 100, 0)).save(r / "train" / "circle" / "c.jpg")][:2],
     0, ""),
    ("16-bit PNG is scaled", "finetune", [],
     lambda r: [*folders(r), Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(
         r / "train" / "circle" / "d.png")][:2], 0, ""),
    ("duplicate class names", "finetune", ["data.classes=[circle,circle]"], folders, 2, "duplicate class names"),
    ("class not in the folder", "finetune", ["data.classes=[circle,hexagon]"], folders, 2,
     "hexagon not found in"),
    ("unknown wnid with ImageNet ids", "finetune", ["model.class_ids=imagenet"], folders, 2,
     "are not ImageNet-1K wnids"),
    ("unknown preset", "finetune", ["data.classes=imagewolf"], folders, 2, "unknown preset 'imagewolf'"),
    ("IPC larger than the real pool", "evaluate", ["evaluate.ipc=[9]", "sample.ipc=[9]"],
     lambda r: [*folders(r), _fake_samples(r, 9)][:2], 2, "class circle has 4 images, IPC 9 needs at least 9"),
    ("zero image size", "finetune", ["data.image_size=0"], lambda r: [], 2,
     "'data.image_size': expected a positive number"),
    ("negative batch size", "finetune", ["finetune.batch_size=-4"], lambda r: [], 2,
     "'finetune.batch_size': expected a positive number"),
    ("zero IPC", "sample", ["sample.ipc=[0]"], lambda r: [], 2, "'sample.ipc': expected a non-empty list"),
    ("wrong type", "finetune", ["finetune.lr=fast"], lambda r: [], 2, "'finetune.lr': expected float"),
    ("unknown config key", "finetune", ["finetune.memory.polcy=fifo"], lambda r: [], 2,
     "unknown config key 'finetune.memory.polcy'"),
    ("config file missing", None, [], lambda r: [], 2, "does not exist"),
    ("output folder exists", "finetune", [], lambda r: (r / "demo-digits" / "finetune").mkdir(parents=True) or [],
     2, "exists; pass --force"),
    ("model of another size", "finetune", [], lambda r: [f"finetune.init={tiny_model(r / 'm3', 12)}"], 2,
     "does not fit this run: 12 input channels, the autoencoder gives 4"),
    ("corrupted model weights", "finetune", [],
     lambda r: [f"finetune.init={_corrupt(tiny_model(r / 'mc', 4))}"], 2, "does not hold diffusers weights"),
    ("corrupted original DiT checkpoint", "finetune", [],
     lambda r: [(r / "DiT.pt").write_bytes(b"\x80garbage"), f"finetune.init={r / 'DiT.pt'}"], 2,
     "cannot read the checkpoint"),
    ("sampling before training", "sample", [], lambda r: [], 2, "run `diffdistill finetune` with this config first"),
    ("evaluating without samples", "evaluate", [], lambda r: [], 2, "run `diffdistill sample` first"),
    ("malformed val labels file", "evaluate", [],
     lambda r: [*folders(r), _fake_samples(r, 2), (r / "labels.txt").write_text("only-one-column\n"),
                f"data.val_labels={r / 'labels.txt'}"][:2] + [f"data.val_labels={r / 'labels.txt'}"], 2,
     "expected 'IMAGE WNID'"),
    ("image size not divisible by the unshuffle", "finetune", ["data.image_size=15"], lambda r: [], 2,
     "not divisible by autoencoder.unshuffle 2"),
    ("latent cache missing", "finetune", ["finetune.latents=cache"], lambda r: [], 2, "no latent cache"),
    ("output folder under a file", "finetune", [],
     lambda r: [(r / "afile").write_text("x"), f"out_dir={r / 'afile' / 'runs'}"], 2,
     "cannot write the output folder"),
]


def _truncate(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(folder: str) -> str:
    (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    return folder


def _fake_samples(root: Path, ipc: int) -> None:
    for name in ("circle", "square", "triangle"):
        (root / "demo-digits" / "samples" / name).mkdir(parents=True, exist_ok=True)
        for i in range(ipc):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(root / "demo-digits" / "samples" / name / f"{i:05d}.png")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    name, stage, overrides, setup, code, text = case
    extra = setup(tmp_path)
    extra = [e for e in (extra or []) if isinstance(e, str)]
    config = CFG if stage else str(tmp_path / "missing.yaml")
    args = [stage or "finetune", config, f"out_dir={tmp_path}", *FAST, *overrides, *extra]  # later keys win
    before = _outputs(tmp_path)
    assert main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffdistill:")]
    if code:
        assert len(lines) == 1 and lines[0].startswith("diffdistill: error: "), err[-2000:]
    assert text in err, err[-2000:]
    after = _outputs(tmp_path)
    assert not [p for p in after if p.endswith(".tmp")]  # never a half-written output
    if code:
        assert after == before  # a failing stage leaves nothing behind


def _outputs(root: Path) -> list[str]:
    run = root / "runs" if (root / "runs").is_dir() else root
    return sorted(str(p.relative_to(root)) for p in run.rglob("*") if "demo-digits" in str(p)
                  and not str(p.relative_to(root)).startswith(("train", "val", "m3", "mc")))


def test_read_only_output_folder(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; 'output folder under a file' covers this path")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(["finetune", CFG, f"out_dir={out}", *FAST]) == 2
        assert "cannot write the output folder" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


def test_case_matrix_covers_every_stage():
    assert len(CASES) >= 20
    assert {c[1] for c in CASES} >= {"finetune", "sample", "evaluate", None}
    assert json.dumps([c[0] for c in CASES])  # ids are plain strings
