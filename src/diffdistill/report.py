"""Turn a run folder into results.json, report.md and PNGs (sample grid, training losses) for people."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffdistill.checkpoint import StageError, atomic_write_bytes, atomic_write_json, atomic_write_text
from diffdistill.data.datasets import IMAGE_EXTENSIONS, resize_center_crop

GRID_COLUMNS = 10


def _fmt(r: dict | None) -> str:
    return "—" if not r else f"{r['mean']:.1f} ± {r['std']:.1f}"


def _augmentation(protocol: dict) -> str:
    a = protocol["augmentation"]
    parts = [f"RandomResizedCrop{tuple(a['crop_scale'])}" if a["crop_scale"] != [1.0, 1.0] else None,
             "flip" if a["hflip"] else None,
             f"ColorJitter({a['color_jitter']})" if a["color_jitter"] else None,
             f"lighting({a['lighting']})" if a["lighting"] else None,
             f"CutMix(p={a['cutmix_prob']}, β={a['cutmix_beta']})" if a["cutmix_prob"] else None]
    return ", ".join(p for p in parts if p) or "none"


def accuracy_table(results: dict) -> str:
    """Markdown table: per IPC, distilled vs random-real (final epoch), gap, and best-epoch numbers."""
    lines = [
        "| IPC | distilled | random real | gap | distilled (best epoch*) | random real (best epoch*) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for ipc, e in results["ipc"].items():
        d, r = e["distilled"], e["random_real"]
        lines.append(f"| {ipc} | **{_fmt(d)}** | {_fmt(r)} | {e['gap_over_random_real']:+.1f} | "
                     f"{_fmt(d['best_epoch'])} | {_fmt(r['best_epoch'])} |")
    if results.get("full"):
        f = results["full"]
        lines.append(f"| full | {_fmt(f)} | | | {_fmt(f['best_epoch'])} | |")
    return "\n".join(lines)


def fidelity_line(fid: dict) -> str:
    return (f"{fid['mean']:.1f} ± {fid['std']:.1f} % of the {fid['num_images']} distilled images are assigned "
            f"their intended class by a {fid['classifier']}.")


def sample_grid(samples: Path, classes: list[str], size: int, columns: int = GRID_COLUMNS, scale: int = 0) -> bytes:
    """PNG bytes: one row per class, the first `columns` images of each, as `size` px cells."""
    rows = []
    for c in classes:
        files = sorted(f for f in (samples / c).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:columns]
        if not files:
            continue
        imgs = [np.asarray(resize_center_crop(Image.open(f).convert("RGB"), size)) for f in files]
        blank = np.full_like(imgs[0], 255)
        imgs += [blank] * (columns - len(imgs))
        rows.append(np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in imgs], 1))
    if not rows:
        raise StageError(f"no sample images under {samples}")
    grid = Image.fromarray(np.concatenate(rows, 0))
    scale = scale or max(1, 256 // rows[0].shape[0])  # small images are enlarged for viewing
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def loss_plot(run_dir: Path) -> bytes | None:
    """PNG of the training losses of each stage found (log.jsonl), or None."""
    logs = {s: run_dir / s / "log.jsonl" for s in ("pretrain", "finetune")}
    logs = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in logs.items() if p.is_file()}
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("diffusion", "representativeness", "diversity") if any(k in r[0] for r in logs.values() if r)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stage, rows in logs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "diffusion":
            ax.set_yscale("log")  # the early drop would hide the fine-tuning curve
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: Path) -> str:
    """results.json, report.md, samples.png (+ losses.png) at the top of the run folder; returns the table."""
    res_file = run_dir / "evaluate" / "results.json"
    if not res_file.is_file():
        raise StageError(f"{res_file} does not exist: run `diffdistill evaluate` first")
    results = json.loads(res_file.read_text())
    atomic_write_json(run_dir / "results.json", results)
    by_net = results.get("by_net") or {results["net"]: results}
    table = "\n\n".join((f"{net} ({entry['norm']} norm)\n\n" if len(by_net) > 1 else "") + accuracy_table(entry)
                         for net, entry in by_net.items())
    nets_text = " / ".join(f"{net} ({entry['norm']} norm)" for net, entry in by_net.items())
    samples = Path(results["data"]["distilled_set"])
    parts = [f"# {run_dir.name}", "",
             f"Top-1 accuracy (%) on {results['data']['num_val']} real validation images of a "
             f"{nets_text} trained from scratch on each set; "
             f"mean ± std over {results['protocol']['seeds']} seeds, **final epoch** (epochs by IPC: "
             f"{', '.join(f'{k}: {v}' for k, v in results['protocol']['epochs'].items())}; full data "
             f"{results['protocol']['full_epochs']}). Augmentation: {_augmentation(results['protocol'])}.", "",
             table, "",
             "\\* best epoch = the maximum over evaluated epochs, selected on the validation set: optimistic, "
             "shown only for comparison with papers that report it.", ""]
    if results.get("fidelity"):
        parts += [f"**Fidelity**: {fidelity_line(results['fidelity'])}", ""]
    if samples.is_dir():
        size = results["config"]["data"]["image_size"]
        atomic_write_bytes(run_dir / "samples.png", sample_grid(samples, results["data"]["classes"], size))
        parts += ["## Distilled images (one row per class)", "", "![samples](samples.png)", ""]
    plot = loss_plot(run_dir)
    if plot:
        atomic_write_bytes(run_dir / "losses.png", plot)
        parts += ["## Training losses", "", "![losses](losses.png)", ""]
    d = results["data"]
    parts += ["## Provenance", "",
              f"- classes: {', '.join(d['classes'])}",
              f"- real train: {d['num_train']} images (sha256 {d['train_sha256'][:16]}…), "
              f"val: {d['num_val']} (sha256 {d['val_sha256'][:16]}…)",
              f"- distilled set: {d['distilled_set']} ({d['ipc_handling']}; sha256 {d['distilled_sha256'][:16]}…)",
              "- resolved config, package versions, git commit and seeds: `config.yaml` and `run_info.json` "
              "in each stage folder", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(parts))
    if results.get("fidelity"):
        table += f"\nfidelity: {fidelity_line(results['fidelity'])}"
    return table
