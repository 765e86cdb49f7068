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
MAX_CLASS_ROWS = 20  # rows of the real-vs-distilled picture


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()


def image_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
    rows = [_cells(images, columns, size) for images in (_first_images(samples / c, columns) for c in classes)
            if images]
    if not rows:
        raise StageError(f"no sample images under {samples}")
    grid = Image.fromarray(np.concatenate(rows, 0))
    scale = scale or max(1, 256 // rows[0].shape[0])  # small images are enlarged for viewing
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return image_png(grid)


def _cells(images: list[np.ndarray], count: int, size: int) -> np.ndarray:
    """`count` cells of `size` px in a row (blank where there are fewer images), 1 px white borders."""
    imgs = [np.asarray(resize_center_crop(Image.fromarray(im).convert("RGB"), size)) for im in images[:count]]
    imgs += [np.full((size, size, 3), 255, np.uint8)] * (count - len(imgs))
    return np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in imgs], 1)


def real_vs_distilled(real: dict[str, list[np.ndarray]], distilled: dict[str, list[np.ndarray]], size: int,
                      per_side: int = 8) -> bytes:
    """PNG: one row per class, `per_side` real images | `per_side` distilled images."""
    rows = []
    for c in distilled:
        gap = np.full((size + 2, max(4, size // 2), 3), 160, np.uint8)
        rows.append(np.concatenate([_cells(real.get(c, []), per_side, size), gap,
                                    _cells(distilled[c], per_side, size)], 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    scale = max(1, 96 // size)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return image_png(grid)


def _first_images(folder: Path, count: int) -> list[np.ndarray]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:count]
    out = []
    for f in files:
        with Image.open(f) as img:
            out.append(np.asarray(img.convert("RGB")))
    return out


def _real_examples(data_cfg: dict, classes: list[str], count: int) -> dict[str, list[np.ndarray]]:
    """The first `count` real train images of each class (the run's data config)."""
    from diffdistill.config import build_config
    from diffdistill.data.datasets import BUILTINS, list_images, read_images

    cfg = build_config({"data": data_cfg}).data
    if cfg.train is None:
        train = BUILTINS[cfg.builtin](cfg)[0]
        pick = {c: (train.labels == i).nonzero().squeeze(1)[:count] for i, c in enumerate(train.classes)}
        return {c: [im.permute(1, 2, 0).numpy().squeeze(-1) if im.shape[0] == 1 else im.permute(1, 2, 0).numpy()
                    for im in train.images[idx]] for c, idx in pick.items() if c in classes}
    files, labels = list_images(cfg.train, classes)
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):  # the first `count` files of each class
        if seen.get(y, 0) < count:
            keep.append(i)
            seen[y] = seen.get(y, 0) + 1
    subset = read_images([files[i] for i in keep], [labels[i] for i in keep], classes, cfg.image_size, None, cfg.train)
    out: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for im, y in zip(subset.images, subset.labels.tolist()):
        arr = im.permute(1, 2, 0).numpy()
        out[classes[y]].append(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    return out


def memory_plot(run_dir: Path) -> bytes | None:
    """PNG of the mean pairwise cosine similarity inside the real and generated banks over fine-tuning."""
    log = run_dir / "finetune" / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    rows = [r for r in rows if "real_bank_similarity" in r]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["real_bank_similarity"] for r in rows], label="real memory")
    ax.plot(steps, [r["gen_bank_similarity"] for r in rows], label="generated memory")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title("redundancy inside the memories\n(lower = more diverse)", fontsize=10)
    ax.legend()
    return figure_png(fig)


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def metrics_table(metrics: dict, fidelity: dict | None) -> str:
    """Markdown: per IPC, distilled vs random-real (and the real train set's own diversity)."""
    lines = ["| set | IPC | diversity ↑ | precision | recall | density | coverage | distance of means ↓ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ipc, sets in metrics["ipc"].items():
        for name, label in (("distilled", "distilled"), ("random_real", "random real")):
            m = sets[name]["overall"]
            lines.append(f"| {label} | {ipc} | {_num(m['diversity'])} | {_num(m['precision'])} | "
                         f"{_num(m['recall'])} | {_num(m['density'])} | {_num(m['coverage'])} | "
                         f"{_num(m['mean_distance'], 2)} |")
    lines.append(f"| real train set | all | {_num(metrics['real_train_diversity'])} | | | | | |")
    text = "\n".join(lines)
    if fidelity:
        text += f"\n\nFidelity beside it: {fidelity_line(fidelity)}"
    return text


def dd_ranking_table(by_net: dict) -> str:
    lines = ["| net | IPC | IOR (gap over random real) | HLR (full − distilled) | LRS |", "|---|---:|---:|---:|---:|"]
    for net, entry in by_net.items():
        for ipc, e in entry["ipc"].items():
            d = e.get("dd_ranking")
            if d:
                lines.append(f"| {net} | {ipc} | {d['ior_mean']:+.1f} | "
                             f"{_num(d.get('hlr_mean'), 1)} | {_num(d.get('lrs_mean'), 1)} |")
    return "\n".join(lines)


def loss_plot(run_dir: Path) -> bytes | None:
    """PNG of the training losses of each stage found (log.jsonl), or None."""
    logs = {s: run_dir / s / "log.jsonl" for s in ("pretrain", "finetune")}
    logs = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in logs.items() if p.is_file()}
    if not logs:
        return None
    plt = pyplot()
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
    return figure_png(fig)


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
    if results.get("metrics"):
        m = results["metrics"]
        parts += ["## Diversity and coverage", "",
                  f"In the {m['feature_space']}, per class against {m['reference']}, averaged over classes; "
                  f"k = {m['k']} nearest neighbours. Diversity = mean pairwise cosine distance inside the set; "
                  "precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) by "
                  "k-NN balls; distance of means = ‖mean(set) − mean(real)‖ (representativeness). A set can be "
                  "more \"diverse\" than real data and still less accurate: read diversity beside precision and "
                  "fidelity.", "", metrics_table(m, results.get("fidelity")), ""]
    if any(e.get("dd_ranking") for entry in by_net.values() for e in entry["ipc"].values()):
        parts += ["## DD-Ranking scores", "",
                  "IOR = acc(distilled) − acc(random real); HLR = acc(full) − acc(distilled); "
                  "LRS = (e^(λ·IOR − (1−λ)·HLR) − e^−1) / (e − e^−1) with accuracies as fractions and λ = 0.5, "
                  "shown × 100 (DD-Ranking, Li et al. 2025). Per seed, then the mean; hard labels.", "",
                  dd_ranking_table(by_net), ""]
    if samples.is_dir():
        shown = results["data"]["classes"][:MAX_CLASS_ROWS]
        distilled = {c: _first_images(samples / c, 8) for c in shown if (samples / c).is_dir()}
        real = _real_examples(results["config"]["data"], shown, 8)
        atomic_write_bytes(run_dir / "classes.png", real_vs_distilled(real, distilled, results["config"]["data"][
            "image_size"]))
        more = f" (first {MAX_CLASS_ROWS} classes)" if len(results["data"]["classes"]) > MAX_CLASS_ROWS else ""
        parts += [f"## Real (left) vs distilled (right), one row per class{more}", "", "![classes](classes.png)",
                  ""]
    plot = loss_plot(run_dir)
    if plot:
        atomic_write_bytes(run_dir / "losses.png", plot)
        parts += ["## Training losses", "", "![losses](losses.png)", ""]
    plot = memory_plot(run_dir)
    if plot:
        atomic_write_bytes(run_dir / "memory.png", plot)
        parts += ["## Memories during fine-tuning", "", "![memory](memory.png)", ""]
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
