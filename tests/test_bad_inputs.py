"""Bad input across all stages: each case gives its documented result — a one-line error naming the file or
key and exit code 2, or a logged skip and success — and never leaves a half-written output."""

import importlib
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from helpers import make_shapes
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import DataConfig
from diffdistill.data.datasets import load_data
from diffdistill.models.dit import build_dit, save_dit

CFG = "configs/demo-digits.yaml"
FAST = ["finetune.init=null", "finetune.steps=2", "finetune.batch_size=4", "sample.steps=2", "sample.ipc=[2]",
        "evaluate.epochs=1", "evaluate.full=false", "evaluate.labels=[hard]", "evaluate.seeds=1", "evaluate.width=8",
        "threads=1"]


def folders(root: Path) -> list[str]:
    make_shapes(root / "train", per_class=4, size=20)
    make_shapes(root / "val", per_class=2, size=20, seed=1)
    return [f"data.train={root / 'train'}", f"data.val={root / 'val'}"]


def tiny_model(path: Path, in_channels: int) -> str:
    model = build_dit("tiny", in_channels, 8, 3)
    save_dit(path, model, model.state_dict())
    return str(path)


def trained_on(root: Path, err: str, count: int, swap: tuple[str, str] | None = None, note: str = "") -> None:
    """Check of a case that succeeds: finetune trained on `count` train images and, with `swap` (a train file
    of class circle, a plain 8-bit file beside the folders), on the pixels of the folder with that file replaced
    by the plain one; so an image dropped or decoded wrongly fails the case."""
    info = json.loads((root / "demo-digits" / "finetune" / "run_info.json").read_text())
    assert info["num_train_images"] == count, info["num_train_images"]
    assert note in err, err[-2000:]
    if swap:
        ref = root / "ref"
        shutil.copytree(root / "train", ref)
        (ref / "circle" / swap[0]).unlink()
        shutil.copy(root / swap[1], ref / "circle")
        expected, _ = load_data(DataConfig(train=str(ref), image_size=16), need_val=False)
        assert info["data_sha256"] == expected.sha256()  # hashes the pixels, labels and classes


def _cmyk(r: Path) -> list[str]:
    """A CMYK JPEG with varied pixels, and (as ref_c.png) PIL's own RGB conversion of that file."""
    out = folders(r)
    arr = np.random.default_rng(2).integers(0, 256, (24, 24, 4), dtype=np.uint8)
    Image.fromarray(arr, "CMYK").save(r / "train" / "circle" / "c.jpg")
    with Image.open(r / "train" / "circle" / "c.jpg") as img:
        img.convert("RGB").save(r / "ref_c.png")
    return out


def _gray16(r: Path) -> list[str]:
    """A 16-bit PNG of 40000 and (as ref_d.png) the 8-bit 40000 * 255 // 65535 = 155 it must scale to
    (rounding would give 156, so would / 256)."""
    out = folders(r)
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(r / "train" / "circle" / "d.png")
    Image.fromarray(np.full((20, 20), 40000 * 255 // 65535, np.uint8), "L").save(r / "ref_d.png")
    return out


# (id, stage, extra overrides, setup(root) -> extra overrides, expected exit code, expect): for a failure,
# expect is text of the one error line; for a success, expect(root, stderr) checks what was done.
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
     lambda r, err: trained_on(r, err, 12, note="skipped 1 files that are not images")),
    ("CMYK JPEG is converted", "finetune", [], _cmyk, 0,
     lambda r, err: trained_on(r, err, 13, ("c.jpg", "ref_c.png"))),
    ("16-bit PNG is scaled", "finetune", [], _gray16, 0, lambda r, err: trained_on(r, err, 13, ("d.png", "ref_d.png"))),
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
     2, "exists; pass --resume to continue an interrupted run, --force"),
    ("model of another size", "finetune", [], lambda r: [f"finetune.init={tiny_model(r / 'm3', 12)}"], 2,
     "does not fit this run: 12 input channels, the autoencoder gives 4"),
    ("corrupted model weights", "finetune", [],
     lambda r: [f"finetune.init={_corrupt(tiny_model(r / 'mc', 4))}"], 2, "does not hold diffusers weights"),
    ("corrupted original DiT checkpoint", "finetune", [],
     lambda r: [(r / "DiT.pt").write_bytes(b"\x80garbage"), f"finetune.init={r / 'DiT.pt'}"], 2,
     "cannot read the checkpoint"),
    ("sampling before training", "sample", [], lambda r: [], 2, "run `diffdistill finetune` with this config first"),
    ("evaluating without samples", "evaluate", [], lambda r: [], 2,
     "run `diffdistill sample` with this config first, or score another"),
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
    name, stage, overrides, setup, code, expect = case
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
        assert expect in lines[0], err[-2000:]  # in the error line itself, not in some log above it
    else:
        assert not [line for line in lines if line.startswith("diffdistill: error")], err[-2000:]
        expect(tmp_path, err)
    after = _outputs(tmp_path)
    assert not [p for p in after if p.endswith(".tmp")]  # never a half-written output
    if code:
        assert after == before  # a failing stage leaves nothing behind


def _outputs(root: Path) -> list[str]:
    run = root / "runs" if (root / "runs").is_dir() else root
    return sorted(str(p.relative_to(root)) for p in run.rglob("*") if "demo-digits" in str(p)
                  and not str(p.relative_to(root)).startswith(("train", "val", "m3", "mc")))


def test_read_only_output_folder(capsys):
    """An output folder the user may not write: exit 2, one error line, nothing made. Root writes anywhere, so
    as root (as CI runs) the CLI runs in a forked child that has dropped to user nobody."""
    # not tmp_path (under root's 0700 pytest-of-root): nobody must reach the folder and the config, which is
    # copied because the repository may lie where nobody cannot read (e.g. /root)
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    out = base / "ro"
    try:
        base.chmod(0o755)
        config = base / "demo-digits.yaml"
        shutil.copyfile(CFG, config)
        config.chmod(0o644)
        out.mkdir()
        out.chmod(0o555)
        args = ["finetune", str(config), f"out_dir={out}", *FAST, "device=cpu"]
        if os.geteuid() == 0:
            code, err = _main_as_nobody(args, base)
        else:
            code, err = main(args), capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("diffdistill:")]
        assert code == 2, err[-2000:]
        assert len(lines) == 1, err[-2000:]
        assert lines[0].startswith(f"diffdistill: error: cannot write the output folder {out / 'demo-digits'}: ")
        assert not list(out.iterdir())
    finally:
        if out.exists():
            out.chmod(0o755)
        shutil.rmtree(base)


def _main_as_nobody(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """(exit code, stderr) of `main(args)` in a forked child running as nobody (uid/gid 65534)."""
    for stage in ("check", "evaluate", "prepare", "report", "sample", "train"):  # the child may not be able to
        importlib.import_module(f"diffdistill.stages.{stage}")  # read the package's files: import them now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            sys.stdout = open(os.devnull, "w")
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(args)
        except BaseException:
            traceback.print_exc()  # e.g. EPERM from setuid: the test fails with this text
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write)
    chunks, status, deadline = [], None, time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0 and select.select([read], [], [], left)[0]:
            chunk = os.read(read, 65536)
            if not chunk:  # EOF: the child has exited (its stderr closed)
                break
            chunks.append(chunk)
        while status is None and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            else:
                time.sleep(0.05)
    finally:
        os.close(read)
        if status is None:  # hung: kill and reap it, then fail
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    err = b"".join(chunks).decode(errors="replace")
    assert status is not None, f"the child did not finish in {timeout} s: {err[-2000:]}"
    return os.waitstatus_to_exitcode(status), err
