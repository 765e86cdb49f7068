"""Every command the README (and docs/*.md) shows is one the tool accepts: each is run with --dry-run (the
whole preflight, nothing trained) on folders made here in place of the placeholder paths, and the shown
outputs of `$ diffdistill ...` examples are what the tool prints."""

import re
import shlex
from pathlib import Path

import pytest
from helpers import make_shapes

from diffdistill import preflight
from diffdistill.cli import main
from diffdistill.data.classes import PRESETS
from diffdistill.stages.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and the reference pages it links
# errors that mean "valid, but needs an earlier stage of the same run first": fine for a command shown alone
NEEDS_EARLIER_STAGE = "with this config first"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)


def commands() -> list[str]:
    """Concrete `diffdistill` commands in the README's bash blocks (continuations joined, shell variables and
    `for X in ...` loops expanded; synopsis lines with {a,b}, [optional] or CONFIG placeholders left out).
    Blocks that show a command with its output (`$ diffdistill ...`) are checked by the next test."""
    found = []
    for block in (b for page in DOCS for b in code_blocks(page.read_text())):
        if block.startswith("$ "):
            continue
        variables, loop = {}, ("", [""])
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            variables.update(re.findall(r"(?:^|;\s*)(\w+)=([^;\s]+)", line) if "diffdistill" not in line else [])
            if m := re.match(r"for (\w+) in (.*?); do", line):
                loop = (m.group(1), m.group(2).split())
            line = re.sub(r"^torchrun .*?-m diffdistill ", "diffdistill ", line)
            if not line.startswith("diffdistill ") or re.search(r"[{\[]|CONFIG|RUN_DIR|SWEEP|\.\.\.$", line):
                continue
            for value in loop[1]:
                expanded = line
                for name, text in [*variables.items(), (loop[0], value)]:
                    expanded = expanded.replace(f"${name}", text) if name else expanded
                found.append(expanded)
    return found


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Stand-ins for the README's paths: small folders of shapes, and an ImageNet-style train / val with the
    wnids of every preset the configs use."""
    root = tmp_path_factory.mktemp("docs")
    make_shapes(root / "train", 12)
    make_shapes(root / "val", 2)
    wnids = sorted({w for name in ("imagewoof", "imagenette", "imageidc") for w in PRESETS[name]()})
    make_shapes(root / "imagenet" / "train", 100, classes=wnids)  # IPC 100 needs 100 real images per class
    make_shapes(root / "imagenet" / "val", 2, classes=wnids)
    make_shapes(root / "set", 12)
    return root


def concrete(command: str, root: Path) -> list[str]:
    """The command's arguments with the README's placeholders replaced by the folders made here."""
    args = shlex.split(command)[1:]
    imagenet = any(re.search(r"image(woof|nette|idc|net)", a) for a in args if a.endswith(".yaml"))
    subs = {"data.train": root / ("imagenet/train" if imagenet else "train"),
            "data.val": root / ("imagenet/val" if imagenet else "val")}
    out = []
    for a in args:
        key = a.split("=")[0]
        if key in subs:
            a = f"{key}={subs[key]}"
        elif key == "data.val_labels":
            continue  # the flat ImageNet val layout is covered by tests/test_data.py
        elif a.startswith("/path/"):
            a = str(root / "set")
        out.append(a)
    return out


def test_the_readme_shows_commands():
    found = commands()
    assert len(found) >= 6, found
    assert any(c.startswith("diffdistill run configs/own-data.yaml") for c in found)


@pytest.mark.parametrize("command", commands())
def test_every_readme_command_passes_its_preflight(command, folders, tmp_path, capsys, monkeypatch):
    # the time estimate trains a few batches at the configs' sizes (224 px ResNets): tested in test_preflight
    monkeypatch.setattr(preflight, "estimate", lambda *a: "time: not estimated here")
    args = concrete(command, folders)
    if args == ["--version"]:
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
        return
    if args[0] == "sweep":  # a sweep checks every point's config before any run
        config, rest = args[1], args[2:]
        vary = [rest[i + 1] for i, a in enumerate(rest) if a == "--vary"]
        assert load_sweep(config, [], vary, None).points
        return
    code = main([*args, f"out_dir={tmp_path}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and NEEDS_EARLIER_STAGE in err), err


def test_shown_outputs_are_what_the_tool_prints(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(README.parent)  # the examples' relative paths (configs/, runs/)
    shown = [block for block in code_blocks(README.read_text()) if block.startswith("$ diffdistill")]
    assert len(shown) >= 2
    for block in shown:
        command, *expected = block.splitlines()
        code = main(shlex.split(command.removeprefix("$ "))[1:])
        printed = capsys.readouterr()
        lines = (printed.out + printed.err).splitlines()
        for want in expected:
            if "…" in want:  # a number that differs from machine to machine
                pattern = re.escape(want).replace("…", ".+")
                assert any(re.fullmatch(pattern, got) for got in lines), (want, lines)
            else:
                assert want in lines, (want, lines)
        assert code in (0, 2)
