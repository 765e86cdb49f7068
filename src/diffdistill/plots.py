"""Every figure the tool draws (report and sweep), as PNG bytes from plain data: no file is read here.

matplotlib is imported on first use (it is slow to import) with the file-only Agg backend.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffdistill.data.datasets import resize_center_crop

GRID_COLUMNS = 10  # images per class in samples.png
GRID_CLASSES = 50  # rows of samples.png: the first classes (1,000 rows would be a picture of gigabytes)
EXAMPLE_CLASSES = 20  # rows of the real-vs-distilled picture (classes.png)
EXAMPLES_PER_CLASS = 8  # images per side and row in classes.png
MARK = (220, 40, 40)  # the frame around the IPC-1 images


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


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # pragma: no cover - older Pillow: its fixed bitmap font
        return ImageFont.load_default()


def _labelled(strips: list[np.ndarray], scale: int, rows: list[str], headers: list[tuple[int, str]],
              marks: list[tuple[int, int]] = ()) -> bytes:
    """Strips of cells stacked and enlarged `scale` times (nearest, so small images can be seen), with each
    row's name on the left, `headers` (x in strip pixels, text) above, and `marks` (x0, x1 in strip pixels)
    framed over all rows."""
    grid = Image.fromarray(np.concatenate(strips, 0))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    row_h = strips[0].shape[0] * scale
    font = _font(max(11, min(16, row_h // 2)))
    probe = ImageDraw.Draw(grid)
    left = int(max(probe.textlength(r, font=font) for r in rows)) + 10
    top = int(font.size * 1.8) if hasattr(font, "size") else 20
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(rows):
        draw.text((left - 5, top + i * row_h + row_h // 2), name, fill="black", font=font, anchor="rm")
    for x, text in headers:
        draw.text((left + x * scale + 2, top // 2), text, fill="black", font=font, anchor="lm")
    for x0, x1 in marks:
        draw.rectangle([left + x0 * scale, top, left + x1 * scale - 1, top + grid.height - 1], outline=MARK, width=2)
    return image_png(canvas)


def sample_grid(per_class: dict[str, list[np.ndarray]], size: int, columns: int = GRID_COLUMNS) -> bytes:
    """PNG: one row per class (named on the left), its first `columns` images as `size` px cells; the first
    column — the IPC-1 set — framed."""
    shown = {name: images for name, images in per_class.items() if images}
    cell = size + 2
    return _labelled([_cells(images, columns, size) for images in shown.values()], max(1, 256 // cell),
                     list(shown), [(0, "IPC 1"), (cell, "IPC k: the first k images of each row")],
                     [(0, cell)])


def real_vs_distilled(real: dict[str, list[np.ndarray]], distilled: dict[str, list[np.ndarray]], size: int,
                      per_side: int = EXAMPLES_PER_CLASS) -> bytes:
    """PNG: one row per class (named on the left), `per_side` real images | `per_side` distilled images, with
    "real" and "distilled" above; the first distilled image of each class (the IPC-1 set) framed."""
    strips = []
    gap_w = max(4, size // 2)
    for c in distilled:
        gap = np.full((size + 2, gap_w, 3), 160, np.uint8)
        strips.append(np.concatenate([_cells(real.get(c, []), per_side, size), gap,
                                      _cells(distilled[c], per_side, size)], 1))
    start = per_side * (size + 2) + gap_w
    return _labelled(strips, max(1, 96 // size), list(distilled), [(0, "real"), (start, "distilled")],
                     [(start, start + size + 2)])


# how each logged term enters the loss: (log key, config weight or None, title, y label)
LOSS_TERMS = (
    ("diffusion", None, "diffusion loss (MSE of ε̂)", "loss (log scale), lower = better fit"),
    ("representativeness", "lambda_real", "λ_R · representativeness\n(1 − min cos to the real memory)",
     "weighted term, lower = closer to real"),
    ("diversity", "lambda_gen", "λ_G · diversity\n(max cos to the generated memory)",
     "weighted term, lower = less alike"),
)


def loss_plot(logs: dict[str, list[dict]], weights: dict[str, float], offsets: dict[str, int]) -> bytes:
    """PNG of the training losses of each stage's log rows ({stage: rows}); memory terms multiplied by their
    weights (`weights`: lambda_real, lambda_gen) as they enter the loss; a stage's steps shifted by
    `offsets[stage]` so that fine-tuning continues after pretraining."""
    plt = pyplot()
    terms = [t for t in LOSS_TERMS if any(t[0] in r[0] for r in logs.values() if r)]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.8 * len(terms), 3.4), squeeze=False)
    for ax, (key, weight, title, ylabel) in zip(axes[0], terms):
        factor = weights.get(weight, 1.0) if weight else 1.0
        for stage, entries in logs.items():
            pts = [(r["step"] + offsets.get(stage, 0), factor * r[key]) for r in entries if key in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (fine-tuning continues after pretraining)" if len(logs) > 1 else "step")
        ax.set_ylabel(ylabel, fontsize=9)
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


def compare_plot(summary: list[dict]) -> bytes:
    """One panel per net: accuracy against IPC, one line per method (mean over seeds, min–max band);
    random real images dotted black."""
    plt = pyplot()
    nets = sorted({e["net"] for e in summary})
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        methods = list(dict.fromkeys(e["method"] for e in summary if e["net"] == net))
        for method in methods:
            es = sorted((e for e in summary if e["net"] == net and e["method"] == method and "accuracy" in e),
                        key=lambda e: e["ipc"])
            xs = [e["ipc"] for e in es]
            style = {"color": "black", "ls": ":"} if method == "random" else {}
            line = ax.plot(xs, [e["accuracy"][0] for e in es], marker="o", label=method, **style)[0]
            ax.fill_between(xs, [e["accuracy"][2] for e in es], [e["accuracy"][3] for e in es], alpha=0.15,
                            color=line.get_color())
        ipcs = sorted({e["ipc"] for e in summary})
        if len(ipcs) > 1 and ipcs[-1] / ipcs[0] >= 5:
            ax.set_xscale("log")
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.set_xlabel("images per class (IPC)")
        ax.set_ylabel("accuracy on real val images (%)")
        ax.set_title(net)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
