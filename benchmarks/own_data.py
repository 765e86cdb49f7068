"""Your own data, measured: five folder sets, each run end to end through a config with several seeds; prints
JSON and writes own-data.md (distilled vs random real per IPC, fidelity, time). Its sampling settings were chosen
on glyphs, and sample.candidates after looking at all three of the first sets; doodles came after every choice
(held out), and scenes100 after the last (held out: the recipe's upper end of 100 classes, a few thousand images).

The sets are drawn here from a seed (class subfolders of PNGs, train and val), so anyone can remake them:
- glyphs:   10 letters, grayscale 28 px: a font's glyph at a random size, rotation, shift and stroke blur.
- textures: 10 classes of RGB 32 px textures: oriented gratings and blobs whose orientation, frequency and
            palette depend on the class, with noise.
- shapes30: 30 classes (5 shapes × 6 hues) of RGB 32 px drawings on cluttered backgrounds.
- doodles:  10 classes of RGB 32 px hand-drawn-like strokes (a class's polyline jittered, turned, scaled and
            shifted, in a random colour and width) over colour gradients with noise.
- scenes100: 100 classes of RGB 32 px scenes, 40 train and 10 val images each: a class's layout of three soft
            colour patches (moved, resized and recoloured a little) over a random two-tone background.

    python benchmarks/own_data.py --seeds 0,1,2        # configs/own-data.yaml, as a user would run it
    python benchmarks/own_data.py --seeds 0,1,2 --jobs 4   # on a GPU: four runs at once
    python benchmarks/own_data.py --seeds 0,1,2 --resume   # after a change to sampling: keeps the trained models

Not part of `make bench` (hours on 2 CPU cores; minutes on a GPU). Glyphs, textures and doodles are not
flip-invariant: own-data.yaml has `data.hflip: false`. Glyphs need Pillow's scalable default font
(Pillow >= 10.1 with FreeType).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LETTERS = "ACEGKMPRTX"
HUES = (0, 60, 120, 180, 240, 300)
SHAPES = ("circle", "square", "triangle", "cross", "ring")


def glyph(label: int, rng: np.random.Generator, size: int = 28) -> Image.Image:
    font = ImageFont.load_default(size=int(rng.integers(16, 24)))
    img = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(img).text((size, size), LETTERS[label], fill=int(rng.integers(170, 256)), font=font,
                             anchor="mm")
    img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
    dx, dy = rng.integers(-4, 5, 2)
    img = img.crop((size // 2 + dx, size // 2 + dy, size // 2 + dx + size, size // 2 + dy + size))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def texture(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = label * math.pi / 10 + rng.normal(0, 0.08)
    freq = 3 + (label % 5) * 1.5 + rng.normal(0, 0.3)
    wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    if label >= 5:  # blobs on top of the grating for the second half of the classes
        cx, cy = rng.uniform(0.2, 0.8, 2)
        wave = wave + 1.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
    base = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256], float)
    other = 255 - base
    t = (wave - wave.min()) / (np.ptp(wave) + 1e-6)
    rgb = base * (1 - t[..., None]) + other * t[..., None] + rng.normal(0, 18, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def shape(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    kind, hue = SHAPES[label % len(SHAPES)], HUES[label // len(SHAPES)]
    bg = rng.integers(0, 120, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    for _ in range(3):  # clutter
        x, y = rng.integers(0, size, 2)
        d.line([(int(x), int(y)), (int(x + rng.integers(-8, 9)), int(y + rng.integers(-8, 9)))],
               fill=tuple(int(v) for v in rng.integers(0, 160, 3)), width=1)
    fg = Image.new("HSV", (1, 1), (int(hue / 360 * 255 + rng.integers(-8, 9)) % 256, int(rng.integers(170, 256)),
                                   int(rng.integers(180, 256)))).convert("RGB").getpixel((0, 0))
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        d.ellipse(box, fill=fg)
    elif kind == "square":
        d.rectangle(box, fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "cross":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fg)
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fg)
    else:
        d.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    return img


def doodle_template(label: int) -> np.ndarray:
    """The class's stroke: 5 points in [0.15, 0.85]², fixed per class (its own seed)."""
    return np.random.default_rng([7, label]).uniform(0.15, 0.85, (5, 2))


def doodle(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The class's stroke drawn by hand: its points jittered, the whole turned, scaled and shifted, in a random
    colour and width, over a random colour gradient with noise."""
    pts = doodle_template(label) + rng.normal(0, 0.05, (5, 2)) - 0.5
    angle, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.8, 1.1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (pts @ rot.T * scale + 0.5 + rng.uniform(-0.08, 0.08, 2)) * size
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    bg = a * (1 - ramp) + b * ramp + rng.normal(0, 10, (size, size, 3))
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    ink = tuple(int(v) for v in 255 - (a + b) // 2)  # away from the background's colours
    ImageDraw.Draw(img).line([tuple(p) for p in pts.tolist()], fill=ink, width=int(rng.integers(2, 4)), joint="curve")
    return img


def scene_layout(label: int) -> np.ndarray:
    """The class's layout: 3 soft ellipses, each a row (x, y, radius x, radius y, hue in [0, 1)), fixed per class
    (its own seed)."""
    rng = np.random.default_rng([11, label])
    return np.column_stack([rng.uniform(0.2, 0.8, (3, 2)), rng.uniform(0.1, 0.3, (3, 2)), rng.random(3)])


def scene(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The class's layout of soft colour patches, each moved, resized and recoloured a little, over a random
    two-tone background (a horizon at a random height) with noise: many classes that differ in where which
    colour lies."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    sky, ground = rng.integers(0, 256, (2, 3))
    horizon = rng.uniform(0.3, 0.7)
    img = np.where((yy < horizon)[..., None], sky, ground).astype(float)
    for x, y, rx, ry, hue in scene_layout(label):
        x, y = np.array([x, y]) + rng.normal(0, 0.05, 2)
        rx, ry = np.array([rx, ry]) * rng.uniform(0.85, 1.15, 2)
        colour = Image.new("HSV", (1, 1), (int(255 * (hue + rng.normal(0, 0.03))) % 256, int(rng.integers(160, 256)),
                                           int(rng.integers(150, 256)))).convert("RGB").getpixel((0, 0))
        alpha = np.exp(-(((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2) ** 2)[..., None]  # a soft-edged ellipse
        img = img * (1 - alpha) + np.array(colour, float) * alpha
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


# name -> (drawing function, number of classes, train and val images per class when not given); a new set goes
# last (each set's seed is its index here)
SETS: dict[str, tuple[Callable[[int, np.random.Generator], Image.Image], int, int, int]] = {
    "glyphs": (glyph, 10, 250, 50), "textures": (texture, 10, 250, 50), "shapes30": (shape, 30, 250, 50),
    "doodles": (doodle, 10, 250, 50), "scenes100": (scene, 100, 40, 10)}


def make_set(root: Path, name: str, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """<root>/<name>/{train,val}/<class>/<i>.png, drawn from `seed`; kept if already complete."""
    draw, classes = SETS[name][:2]
    out = root / name
    done = out / ".complete"
    if done.is_file() and done.read_text() == f"{train_per_class} {val_per_class} {seed}":
        return out
    shutil.rmtree(out, ignore_errors=True)  # another size or seed: no image of the old set stays
    rng = np.random.default_rng([seed, list(SETS).index(name)])
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = out / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(label, rng).save(folder / f"{i:04d}.png")
    done.write_text(f"{train_per_class} {val_per_class} {seed}")
    return out


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _write_table(path: Path, rows: list[dict]) -> None:
    """own-data.md: per set and IPC over its seeds (mean ± std), then every run with the choices it made."""
    table = ["| set | IPC | seeds | distilled | random real | gap | fidelity | check | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        runs = [r for r in rows if r["set"] == name]
        for ipc in runs[0]["ipc"]:
            d, rr = ([r["ipc"][ipc][k] for r in runs] for k in ("distilled", "random_real"))
            fid, chk = [r["fidelity"] for r in runs if r["fidelity"] is not None], \
                [r["check"] for r in runs if r["check"] is not None]
            table.append(f"| {name} | {ipc} | {len(runs)} | {_mean_std(d)} | {_mean_std(rr)} | "
                         f"{np.mean(d) - np.mean(rr):+.1f} | {_mean_std(fid) if fid else '—'} | "
                         f"{_mean_std(chk) if chk else '—'} | {_mean_std([r['minutes'] for r in runs])}"
                         f"{' (resumed)' if any(r.get('resumed') for r in runs) else ''} |")
    table += ["", "| set | seed | IPC | distilled | random real | gap | fidelity | of all draws | check | "
                  "pretrain steps | minutes | auto |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for ipc, e in r["ipc"].items():
            table.append(f"| {r['set']} | {r['seed']} | {ipc} | {e['distilled']:.1f} | {e['random_real']:.1f} | "
                         f"{e['distilled'] - e['random_real']:+.1f} | {r['fidelity']} | {r.get('drawn') or '—'} | "
                         f"{r['check']} | {r.get('pretrain_steps') or '—'} | "
                         f"{r['minutes']}{' (resumed)' if r.get('resumed') else ''} | "
                         f"{'; '.join(f'{k} = {v}' for k, v in r['auto'].items())} |")
    path.write_text("\n".join(table) + "\n")


def _info(folder: Path) -> dict:
    return json.loads((folder / "run_info.json").read_text()) if (folder / "run_info.json").is_file() else {}


def _auto_choices(run_dir: Path) -> dict[str, str]:
    """The value each auto key got (from the first stage folder that recorded it)."""
    for stage in ("pretrain", "finetune", "samples", "evaluate"):
        info = run_dir / stage / "run_info.json"
        if info.is_file():
            return {k: v.split(":")[0] for k, v in (json.loads(info.read_text()).get("auto") or {}).items()}
    return {}


def main(argv: list[str] | None = None) -> None:
    from diffdistill.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/own-data.yaml")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-per-class", type=int, help="default: the set's own (250; scenes100: 40)")
    parser.add_argument("--val-per-class", type=int, help="default: the set's own (50; scenes100: 10)")
    parser.add_argument("--out", default="runs/own-data")
    parser.add_argument("--keep", action="store_true", help="keep the runs that an earlier call with the same "
                        "config and overrides finished (own-data.json)")
    parser.add_argument("--resume", action="store_true", help="run each run with --resume instead of --force: "
                        "finished stages whose settings and inputs did not change are kept (their time is not in "
                        "the minutes, which are then marked resumed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (on one GPU "
                        "the small runs leave it mostly idle: four at once took 3.1 min each on an H200)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    root = Path(args.out)
    saved = root / "own-data.json"
    setup = {"benchmark": "own data", "config": args.config, "overrides": args.overrides}  # what --keep compares
    earlier = json.loads(saved.read_text()) if args.keep and saved.is_file() else {}
    same = {k: earlier.get(k) for k in setup} == setup
    done = {(r["set"], r["seed"]): r for r in earlier.get("runs", [])
            if same and (root / f"{r['set']}-s{r['seed']}" / "results.json").is_file()}
    runs = []  # (set, seed, run name, its data folder), in table order
    for name in args.sets.split(","):
        train_per_class, val_per_class = SETS[name][2:]
        data = make_set(root / "data", name, train_per_class if args.train_per_class is None else args.train_per_class,
                        val_per_class if args.val_per_class is None else args.val_per_class)
        runs += [(name, int(seed), f"{name}-s{seed}", data) for seed in args.seeds.split(",")]
    todo = [r for r in runs if r[:2] not in done]
    resumed = {run for _, _, run, _ in todo if args.resume and (root / run).is_dir()}  # stages kept: minutes partial
    finished = dict(done)

    def command(run: str, seed: int, data: Path) -> list[str]:
        return ["run", args.config, f"out_dir={root}", f"name={run}", f"seed={seed}", f"data.train={data / 'train'}",
                f"data.val={data / 'val'}", *args.overrides, "--resume" if args.resume else "--force"]

    def record(name: str, seed: int, run: str, seconds: float) -> None:
        res = json.loads((root / run / "results.json").read_text())
        check = root / run / "pretrain" / "check.json"
        pretrain, sampled = (_info(root / run / stage) for stage in ("pretrain", "samples"))
        draws = sampled.get("candidates") or {}
        finished[(name, seed)] = {
            "set": name, "seed": seed, "minutes": round(seconds / 60, 1), "resumed": run in resumed,
            "fidelity": (res.get("fidelity") or {}).get("mean"),
            # the share of all draws the check's classifier assigned their class (sample.candidates > 1)
            "drawn": round(100 * draws["assigned_draws"] / (draws["of"] * draws["draws"]), 1) if draws else None,
            "check": json.loads(check.read_text())["fidelity"] if check.is_file() else None,
            # steps pretraining ran, and the checks on the way that made it go on past pretrain.steps
            "pretrain_steps": pretrain.get("steps"),
            "checks_on_the_way": (pretrain.get("extension") or {}).get("checks"),
            "auto": _auto_choices(root / run),
            "ipc": {ipc: {"distilled": e["distilled"]["mean"], "random_real": e["random_real"]["mean"]}
                    for ipc, e in res["ipc"].items()}}
        rows = [finished[r[:2]] for r in runs if r[:2] in finished]
        _write_table(root / "own-data.md", rows)  # after every run: an interrupted sweep keeps what it has
        saved.write_text(json.dumps({**setup, "runs": rows}, indent=2))

    if args.jobs <= 1:
        for name, seed, run, data in todo:
            t0 = time.perf_counter()
            code = cli(command(run, seed, data))
            if code:
                sys.exit(f"own_data: the run {run} failed (exit {code})")
            record(name, seed, run, time.perf_counter() - t0)
    else:  # several runs at once, each in its own process with its log beside its run folder
        waiting, active = list(todo), {}
        root.mkdir(parents=True, exist_ok=True)
        while waiting or active:
            while waiting and len(active) < args.jobs:
                name, seed, run, data = waiting.pop(0)
                log = (root / f"{run}.log").open("w")
                proc = subprocess.Popen([sys.executable, "-m", "diffdistill", *command(run, seed, data)],
                                        stdout=log, stderr=subprocess.STDOUT)
                active[proc] = (name, seed, run, time.perf_counter(), log)
            time.sleep(1)
            for proc in [p for p in active if p.poll() is not None]:
                name, seed, run, t0, log = active.pop(proc)
                log.close()
                if proc.returncode:
                    for other in active:
                        other.terminate()
                    sys.exit(f"own_data: the run {run} failed (exit {proc.returncode}); see {root / f'{run}.log'}")
                record(name, seed, run, time.perf_counter() - t0)
    rows = [finished[r[:2]] for r in runs]
    _write_table(root / "own-data.md", rows)
    print(json.dumps({**setup, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
