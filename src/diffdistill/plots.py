"""Every figure the tool draws (report and sweep), as PNG bytes from plain data: no file is read here.

matplotlib is imported on first use (it is slow to import) with the file-only Agg backend.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffdistill.data.datasets import resize_center_crop

GRID_COLUMNS = 10  # images per class in samples.png
EXAMPLE_CLASSES = 20  # rows of the real-vs-distilled picture (classes.png)
EXAMPLES_PER_CLASS = 8  # images per side and row in classes.png


def pyplot():
    """matplotlib's pyplot on the Agg backend."""
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


def _cells(images: list[np.ndarray], count: int, size: int) -> np.ndarray:
    """`count` cells of `size` px in a row (blank where there are fewer images), 1 px white borders."""
    imgs = [np.asarray(resize_center_crop(Image.fromarray(im).convert("RGB"), size)) for im in images[:count]]
    imgs += [np.full((size, size, 3), 255, np.uint8)] * (count - len(imgs))
    return np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in imgs], 1)


def _enlarged(strips: list[np.ndarray], scale: int) -> bytes:
    """Strips of cells stacked into one picture, enlarged `scale` times (nearest) so small images can be seen."""
    grid = Image.fromarray(np.concatenate(strips, 0))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return image_png(grid)


def sample_grid(per_class: list[list[np.ndarray]], size: int, columns: int = GRID_COLUMNS) -> bytes:
    """PNG: one row per class, the first `columns` images of each, as `size` px cells."""
    return _enlarged([_cells(images, columns, size) for images in per_class if images], max(1, 256 // (size + 2)))


def real_vs_distilled(real: dict[str, list[np.ndarray]], distilled: dict[str, list[np.ndarray]], size: int,
                      per_side: int = EXAMPLES_PER_CLASS) -> bytes:
    """PNG: one row per class, `per_side` real images | `per_side` distilled images."""
    strips = []
    for c in distilled:
        gap = np.full((size + 2, max(4, size // 2), 3), 160, np.uint8)
        strips.append(np.concatenate([_cells(real.get(c, []), per_side, size), gap,
                                      _cells(distilled[c], per_side, size)], 1))
    return _enlarged(strips, max(1, 96 // size))


def loss_plot(logs: dict[str, list[dict]]) -> bytes:
    """PNG of the training losses of each stage's log rows ({stage: rows})."""
    plt = pyplot()
    keys = [k for k in ("diffusion", "representativeness", "diversity") if any(k in r[0] for r in logs.values() if r)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stage, entries in logs.items():
            pts = [(r["step"], r[key]) for r in entries if key in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "diffusion":
            ax.set_yscale("log")  # the early drop would hide the fine-tuning curve
        ax.legend()
    return figure_png(fig)


def memory_plot(entries: list[dict]) -> bytes:
    """PNG of the mean pairwise cosine similarity inside the real and generated banks over fine-tuning."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in entries]
    ax.plot(steps, [r["real_bank_similarity"] for r in entries], label="real memory")
    ax.plot(steps, [r["gen_bank_similarity"] for r in entries], label="generated memory")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title("redundancy inside the memories\n(lower = more diverse)", fontsize=10)
    ax.legend()
    return figure_png(fig)


def fig4_plot(summary: list[dict], x_label: str, default_x: float | None) -> bytes:
    """One panel per (net, IPC): for each group a mean line over x with a min–max band; points without
    an x (or a group of one x) are horizontal reference lines; the default x is a dashed vertical line."""
    plt = pyplot()
    panels = sorted({(e["net"], e["ipc"]) for e in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (net, ipc) in zip(axes[0], panels):
        entries = [e for e in summary if e["net"] == net and e["ipc"] == ipc and "distilled" in e]
        groups: dict[str, list[dict]] = {}
        for e in entries:
            groups.setdefault(e["group"] or e["label"], []).append(e)
        xs_all = [e["x"] for e in entries if e["x"] is not None]
        for name, es in groups.items():
            es = sorted((e for e in es if e["x"] is not None), key=lambda e: e["x"]) or es
            if len(es) > 1:
                xs = [e["x"] for e in es]
                ax.plot(xs, [e["distilled"][0] for e in es], marker="o", label=name)
                ax.fill_between(xs, [e["distilled"][2] for e in es], [e["distilled"][3] for e in es], alpha=0.2)
            else:
                e = es[0]
                ax.axhline(e["distilled"][0], color="gray", lw=1, label=f"{name} (mean; band min–max)")
                ax.axhspan(e["distilled"][2], e["distilled"][3], color="gray", alpha=0.15)
        rr = [e["random_real"][0] for e in entries if "random_real" in e]
        if rr:
            ax.axhline(sum(rr) / len(rr), color="black", ls=":", lw=1, label="random real")
        if default_x is not None:
            ax.axvline(default_x, color="black", ls="--", lw=1, label="default")
        if len(set(xs_all)) > 1 and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("distilled accuracy (%)")
        ax.set_title(f"{net}, IPC {ipc}")
        ax.legend(fontsize=7)
    return figure_png(fig)
