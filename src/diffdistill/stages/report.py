"""Turn a run folder into results.json, report.md and PNGs (sample grids, training losses) for people.

Reads only the run folder: evaluate/results.json (+ real_examples.safetensors), the samples, the training
logs. Each section of report.md is one function below; `write_report` puts them together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from diffdistill.data.datasets import IMAGE_EXTENSIONS
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffdistill.metrics import FIDELITY_GOAL, fidelity_goal, goal_number
from diffdistill.plots import (
    EXAMPLE_CLASSES,
    EXAMPLES_PER_CLASS,
    GRID_CLASSES,
    GRID_COLUMNS,
    loss_plot,
    memory_plot,
    real_vs_distilled,
    sample_grid,
)
from diffdistill.runs import (
    REAL_EXAMPLES,
    TRAINING_STAGES,
    generator_check_file,
    results_file,
    stage_dir,
    training_log,
)


def _fmt(r: dict | None) -> str:
    """mean ± std; with one seed there is no spread to show (n/a, not 0.0)."""
    if not r:
        return "—"
    return f"{r['mean']:.1f} ± " + ("n/a" if len(r.get("runs", [])) == 1 else f"{r['std']:.1f}")


def _augmentation(protocol: dict) -> str:
    a = protocol["augmentation"]
    parts = [f"RandomResizedCrop{tuple(a['crop_scale'])}" if a["crop_scale"] != [1.0, 1.0] else None,
             "flip" if a["hflip"] else None,
             f"ColorJitter({a['color_jitter']})" if a["color_jitter"] else None,
             f"lighting({a['lighting']})" if a["lighting"] else None,
             f"CutMix(p={a['cutmix_prob']}, β={a['cutmix_beta']})" if a["cutmix_prob"] else None]
    return ", ".join(p for p in parts if p) or "none"


def protocols(entry: dict) -> list[str]:
    """The label protocols of a net's results ("hard", "soft"), in the order they ran."""
    first = next(iter(entry["ipc"].values()), {})
    return list(first.get("by_labels", {"hard": None}))


def accuracy_table(results: dict) -> str:
    """Markdown table: per IPC (and label protocol, when soft labels ran), distilled vs random-real (final
    epoch), gap, and best-epoch numbers."""
    labels = protocols(results)
    named = labels != ["hard"]
    head = "| IPC | labels " if named else "| IPC "
    lines = [head + "| distilled | random real | gap | distilled (best epoch*) | random real (best epoch*) |",
             "|---:" + ("|---" if named else "") + "|---:|---:|---:|---:|---:|"]
    for ipc, entry in results["ipc"].items():
        for protocol in labels:
            e = entry.get("by_labels", {}).get(protocol, entry)
            d, r = e["distilled"], e["random_real"]
            lines.append(f"| {ipc} " + (f"| {protocol} " if named else "") +
                         f"| **{_fmt(d)}** | {_fmt(r)} | {e['gap_over_random_real']:+.1f} | "
                         f"{_fmt(d['best_epoch'])} | {_fmt(r['best_epoch'])} |")
    if results.get("full"):
        f = results["full"]
        lines.append("| full " + ("| hard " if named else "") + f"| {_fmt(f)} | | | {_fmt(f['best_epoch'])} | |")
    return "\n".join(lines)


# samples "too alike": diversity or coverage below this share of the random-real subsets' at the same IPC
TOO_ALIKE = 0.75
# samples "unlike real images": precision (the share inside real images' k-NN balls) below this share of the
# random-real subsets' — classifiable, but off the real images' manifold
UNREALISTIC = 0.75


def goal_text(goal: float) -> str:
    """'the 97 % goal', or where the classifier's own accuracy set it, says so."""
    shown = f"the {goal_number(goal)} % goal"
    if goal >= FIDELITY_GOAL:
        return shown
    return f"{shown} (the classifier's own accuracy on real val images, below {FIDELITY_GOAL:.0f} %)"


def choice_summary(results: dict) -> tuple[str, dict] | None:
    """How the distilled set's sampling let the check's classifier choose its images: ("redraw", {redrawn,
    replaced, assigned, of}) or ("candidates", {draws, first_kept, assigned, assigned_draws, of}); None if not."""
    info = Path(results["data"].get("distilled_set") or "") / "run_info.json"
    recorded = json.loads(info.read_text()) if info.is_file() else {}
    return next(((kind, recorded[kind]) for kind in ("redraw", "candidates") if recorded.get(kind)), None)


def drawn_fidelity(kind: str, summary: dict) -> tuple[float, str, str]:
    """The generator's own fidelity by the check's classifier before it chose (%), what it counts, and when."""
    if kind == "redraw":
        return 100 * (summary["of"] - summary["redrawn"]) / max(summary["of"], 1), "first draws", "before sample.redraw"
    return (100 * summary["assigned_draws"] / max(summary["of"] * summary["draws"], 1), "draws",
            "before sample.candidates chose")


def candidates_line(c: dict) -> str:
    """report.md's line on `sample.candidates` ({draws, first_kept, assigned, assigned_draws, of})."""
    return (f"**Chosen from {c['draws']} draws**: each of the {c['of']} distilled images is the generator check's "
            f"classifier's pick of {c['draws']} draws (`sample.candidates`: herding in its features toward the real "
            f"class's mean, among the draws it assigns their class). It assigned {c['assigned_draws']} of all "
            f"{c['of'] * c['draws']} draws their class and {c['assigned']} of the kept images; {c['first_kept']} "
            "kept their first draw. The fidelity above is then partly by construction (a classifier of the same "
            "kind, trained on the same data, chose them).")


def redraw_line(redraw: dict) -> str:
    """report.md's line on `sample.redraw` ({redrawn, replaced (absent before it was recorded), assigned, of})."""
    if not redraw["redrawn"]:
        return (f"**Redrawn**: none of the {redraw['of']} distilled images (`sample.redraw`): the generator check's "
                f"classifier assigned {redraw['assigned']} of them their class at the first draw.")
    replaced = redraw.get("replaced", redraw["redrawn"])
    line = (f"**Redrawn**: {redraw['redrawn']} of {redraw['of']} distilled images were drawn again "
            f"(`sample.redraw`) because the generator check's classifier assigned them another class; "
            f"{replaced} kept a later draw, and {redraw['assigned']} are assigned their class by it.")
    if not replaced:
        return line + " Every first draw was kept: the fidelity above is the generator's own."
    return line + (" The fidelity above is then partly by construction (a classifier of the same kind, trained "
                   "on the same data, chose them).")


def verdicts(results: dict) -> list[str]:
    """One line per IPC at which the distilled set scores below random real images (the first net): the
    gap, the likely cause read from fidelity and the diversity metrics, and what to try. With `sample.redraw`
    or `sample.candidates` the generator is judged by its draws before the check's classifier chose among them (the
    fidelity of the kept images is partly by construction)."""
    cfg, fid = results["config"], results.get("fidelity")
    choice = choice_summary(results)
    which, of_first = "distilled images", ""
    # the classifier that judged fidelity, and its own accuracy on real val images
    judge, real = "the full-data classifiers'", (results.get("full") or {}).get("mean")
    if fid and choice:  # the kept images were chosen by a classifier like the evaluation's: judge by the draws
        drawn, counted, when = drawn_fidelity(*choice)
        if drawn < fid["mean"]:
            fid, which, of_first = {**fid, "mean": drawn}, f"{counted} ({when})", f" of the {counted}"
            check = generator_check_file(Path(cfg["out_dir"], cfg["name"]))  # the check's classifier judged them
            judge = "the generator check's classifier's"
            real = json.loads(check.read_text()).get("classifier_val_accuracy") if check.is_file() else None
    metrics = (results.get("metrics") or {}).get("ipc", {})
    # below the goal but not below the judge's own accuracy on real val images: a classifier that misses that
    # share of real images cannot show that a generator falls short of the goal
    capped = bool(fid) and fidelity_goal(real) <= fid["mean"] < FIDELITY_GOAL
    lines = []
    for ipc, e in results["ipc"].items():
        d, r = e["distilled"], e["random_real"]
        if d["mean"] >= r["mean"]:
            continue
        gap = d["mean"] - r["mean"]
        if len(d.get("runs", [])) < 2:
            noise = " — one seed: the spread is unknown"
        else:
            noise = " — within the seed-to-seed spread" if abs(gap) <= (d["std"] ** 2 + r["std"] ** 2) ** 0.5 else ""
        line = f"IPC {ipc}: distilled {d['mean']:.1f} % < random real {r['mean']:.1f} % ({gap:+.1f}{noise}). "
        m = metrics.get(ipc, {})
        dm, rm = (m.get(k, {}).get("overall", {}) for k in ("distilled", "random_real"))
        alike = [f"{k} {dm[k]:.3f} vs {rm[k]:.3f}" for k in ("diversity", "coverage")
                 if dm.get(k) is not None and rm.get(k) and dm[k] < TOO_ALIKE * rm[k]]
        unlike = dm.get("precision") is not None and rm.get("precision") and \
            dm["precision"] < UNREALISTIC * rm["precision"]
        own = Path(results["data"]["distilled_set"]) == Path(cfg["out_dir"], cfg["name"], "samples")
        fine = f"; fidelity {fid['mean']:.1f} %{of_first} is fine" if fid else ""
        if capped:
            fine = (f"; fidelity {fid['mean']:.1f} %{of_first} is below {FIDELITY_GOAL:.0f} % but not below "
                    f"{judge} own {real:.1f} % on real val images")
        guidance = f"lower guidance (sample.guidance, now {cfg['sample']['guidance']})"
        if not own:
            line += "The set was made elsewhere (--distilled): this run's generator settings do not apply to it."
        elif fid and fid["mean"] < FIDELITY_GOAL and not capped:
            stage = "pretrain" if cfg["pretrain"]["steps"] > 0 else "finetune"
            line += (f"Likely cause: the generator is not good enough yet — {fid['mean']:.1f} % of the {which} "
                     f"are classified as their class (goal ≥ {FIDELITY_GOAL:.0f} %). Try: train longer "
                     f"({_steps_now(cfg, stage)}) or a larger model (model.size, now {cfg['model']['size']}).")
        elif unlike:
            line += (f"Likely cause: the samples are unlike real images (precision {dm['precision']:.2f} vs "
                     f"{rm['precision']:.2f} for random real images{fine}: recognisable, but oversaturated or with "
                     f"artifacts). Try: a larger model (model.size, now {cfg['model']['size']}), more pretraining "
                     f"({_steps_now(cfg, 'pretrain')}) or {guidance}; and compare with real-image "
                     "coresets (diffdistill compare CONFIG --methods random,herding,kmeans,adaptive).")
        elif alike:
            line += (f"Likely cause: the samples are too alike ({' and '.join(alike)} for random real images"
                     f"{fine}). Try: {guidance}, a stronger diversity term (finetune.memory.lambda_gen, now "
                     f"{cfg['finetune']['memory']['lambda_gen']}) or mode guidance (sample.mode_guidance.scale, now "
                     f"{cfg['sample'].get('mode_guidance', {}).get('scale', 0.0)}; compare's mgd3 uses 0.1).")
        elif fid is None:
            line += ("No cause can be read: fidelity and the diversity metrics need the full-data classifiers "
                     "(evaluate.full=true).")
        else:
            measured = "diversity and coverage near random real's" if dm else "diversity and coverage not measured"
            ceiling = f", not below {judge} own {real:.1f} % on real val images" if capped else ""
            line += (f"No single cause in the measurements (fidelity {fid['mean']:.1f} %{of_first}{ceiling}, "
                     f"{measured}). "
                     f"Try: more seeds (evaluate.seeds) to see whether the gap is real, or more fine-tuning "
                     f"(finetune.steps, now {cfg['finetune']['steps']}).")
        lines.append(line)
    return lines


def _by_net(results: dict) -> dict:
    """{net: its results}; results.json files older than the per-net tables hold one net at the top level."""
    return results.get("by_net") or {results["net"]: results}


def accuracy_tables(results: dict) -> str:
    """One accuracy table per net (headed by the net when there are several)."""
    by_net = _by_net(results)
    return "\n\n".join((f"{net} ({entry['norm']} norm)\n\n" if len(by_net) > 1 else "") + accuracy_table(entry)
                       for net, entry in by_net.items())


def _steps_now(cfg: dict, stage: str) -> str:
    """The key that sets a stage's training length, and its value; pretrain.max_steps beside it where set."""
    tcfg = cfg[stage]
    most = tcfg.get("max_steps") or 0
    went_on = f", and pretrain.max_steps, now {most}" if stage == "pretrain" and most > tcfg["steps"] else ""
    return f"{stage}.steps, now {tcfg['steps']}{went_on}"


def fidelity_line(fid: dict, full: dict | None = None) -> str:
    """The fidelity sentence; `full` (the same classifiers' accuracy on real validation images) is its yardstick:
    where real images themselves score below the fidelity goal, so will faithful samples."""
    real = f" (on real validation images the same classifiers score {_fmt(full)} %)" if full else ""
    return (f"{_fmt(fid)} % of the {fid['num_images']} distilled images are assigned "
            f"their intended class by a {fid['classifier']}{real}.")


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def metrics_table(metrics: dict) -> str:
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
    return "\n".join(lines)


def dd_ranking_table(by_net: dict) -> str:
    labels = protocols(next(iter(by_net.values())))
    named = labels != ["hard"]
    lines = ["| net | IPC " + ("| labels " if named else "") + "| IOR (gap over random real) | HLR (full − distilled) "
             "| LRS |", "|---|---:" + ("|---" if named else "") + "|---:|---:|---:|"]
    for net, entry in by_net.items():
        for ipc, e in entry["ipc"].items():
            for protocol in labels:
                d = e.get("by_labels", {}).get(protocol, e).get("dd_ranking")
                if d:
                    scores = f"| {d['ior_mean']:+.1f} | {_num(d.get('hlr_mean'), 1)} | {_num(d.get('lrs_mean'), 1)} |"
                    lines.append(f"| {net} | {ipc} " + (f"| {protocol} " if named else "") + scores)
    return "\n".join(lines)


def _first_images(folder: Path, count: int) -> list[np.ndarray]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:count] if folder.is_dir() \
        else []
    out = []
    for f in files:
        with Image.open(f) as img:
            out.append(np.asarray(img.convert("RGB")))
    return out


def _hwc(images) -> list[np.ndarray]:
    """uint8 [N, C, H, W] tensor -> HxW (gray) or HxWx3 arrays."""
    return [im.permute(1, 2, 0).numpy().squeeze(-1) if im.shape[0] == 1 else im.permute(1, 2, 0).numpy()
            for im in images]


def _read_log(run_dir: Path, stage: str) -> list[dict]:
    log = training_log(run_dir, stage)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


# -- sections: (run folder, results) -> markdown lines (empty when the run has nothing for it) --------------
def accuracy_section(run_dir: Path, results: dict) -> list[str]:
    by_net = _by_net(results)
    nets_text = " / ".join(f"{net} ({entry['norm']} norm)" for net, entry in by_net.items())
    protocol = results["protocol"]
    losses_to_random = verdicts(results)
    warning = [f"**The distilled set scores below random real images ({results['net']}):**", "",
               *[f"- {line}" for line in losses_to_random], ""] if losses_to_random else []
    lines = [f"# {run_dir.name}", "", *warning,
             f"Top-1 accuracy (%) on {results['data']['num_val']} real validation images of a "
             f"{nets_text} trained from scratch on each set; "
             f"mean ± std over {protocol['seeds']} seeds, **final epoch** (epochs by IPC: "
             f"{', '.join(f'{k}: {v}' for k, v in protocol['epochs'].items())}; full data "
             f"{protocol['full_epochs']}). Augmentation: {_augmentation(protocol)}.", "",
             *([*(f"- {text}" for text in protocol["labels"].values()), ""] if protocol.get("labels") else []),
             accuracy_tables(results), "",
             "\\* best epoch = the maximum over evaluated epochs, selected on the validation set: optimistic, "
             "shown only for comparison with papers that report it.", ""]
    if results.get("fidelity"):
        lines += [f"**Fidelity**: {fidelity_line(results['fidelity'], results.get('full'))}", ""]
    choice = choice_summary(results)
    if choice:
        lines += [redraw_line(choice[1]) if choice[0] == "redraw" else candidates_line(choice[1]), ""]
    check = generator_check_file(run_dir)
    if check.is_file():
        c = json.loads(check.read_text())
        real = c.get("classifier_val_accuracy")
        scores = f" (on real val images it scores {real:.1f} %)" if real is not None else ""
        lines += [f"Generator check right after pretraining (before fine-tuning): {c['fidelity']:.1f} % of "
                  f"{c['num_images']} samples assigned their class by a {c['classifier']}{scores}."
                  f"{_went_on(run_dir)}", ""]
    return lines


def _went_on(run_dir: Path) -> str:
    """What the checks on the way decided (pretrain.max_steps), from the pretrain stage's run_info.json."""
    file = stage_dir(run_dir, "pretrain") / "run_info.json"
    info = json.loads(file.read_text()) if file.is_file() else {}
    ext = info.get("extension")
    if not ext or not ext["checks"]:
        return ""
    said = ", ".join(f"{c['fidelity']:.1f} % at step {c['step']}" for c in ext["checks"])
    return (f" Pretraining ran {info['steps']} steps: the checks on the way "
            f"(pretrain.max_steps {ext['max_steps']}, goal {goal_number(ext['goal'])} %) found {said}.")


def samples_section(run_dir: Path, results: dict) -> list[str]:
    samples = Path(results["data"]["distilled_set"])
    if not samples.is_dir():
        return []
    classes = results["data"]["classes"]
    per_class = {c: _first_images(samples / c, GRID_COLUMNS) for c in classes[:GRID_CLASSES]}
    if not any(per_class.values()):
        raise StageError(f"no sample images under {samples}")
    atomic_write_bytes(run_dir / "samples.png", sample_grid(per_class, results["config"]["data"]["image_size"]))
    rows = "one row per class" if len(classes) <= GRID_CLASSES else \
        f"one row per class, the first {GRID_CLASSES} of {len(classes)} classes"
    return [f"## Distilled images ({rows})", "",
            "The framed first column is the IPC-1 set; IPC k uses the first k images of each row.", "",
            "![samples](samples.png)", ""]


def metrics_section(run_dir: Path, results: dict) -> list[str]:
    m = results.get("metrics")
    if not m:
        return []
    return ["## Diversity and coverage", "",
            f"In the {m['feature_space']}, per class against {m['reference']}, averaged over classes; "
            f"k = {m['k']} nearest neighbours. Diversity = mean pairwise cosine distance inside the set; "
            "precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) by "
            "k-NN balls; distance of means = ‖mean(set) − mean(real)‖ (representativeness). A set can be "
            "more \"diverse\" than real data and still less accurate: read diversity beside precision and "
            "fidelity (above).", "", metrics_table(m), ""]


def dd_ranking_section(run_dir: Path, results: dict) -> list[str]:
    by_net = _by_net(results)
    if not any(e.get("dd_ranking") for entry in by_net.values() for e in entry["ipc"].values()):
        return []
    return ["## DD-Ranking scores", "",
            "IOR = acc(distilled) − acc(random real); HLR = acc(full) − acc(distilled); "
            "LRS = (e^(λ·IOR − (1−λ)·HLR) − e^−1) / (e − e^−1) with accuracies as fractions and λ = 0.5, "
            "shown × 100 (DD-Ranking, Li et al. 2025). Per seed, then the mean; HLR against the full-data "
            "classifiers, which are trained with hard labels.", "",
            dd_ranking_table(by_net), ""]


def classes_section(run_dir: Path, results: dict) -> list[str]:
    samples = Path(results["data"]["distilled_set"])
    examples = stage_dir(run_dir, "evaluate") / REAL_EXAMPLES
    if not samples.is_dir():
        return []
    if not examples.is_file():  # an evaluation by an earlier version, which did not keep real examples
        return ["## Real vs distilled", "", f"(No picture: {examples} is missing. `diffdistill evaluate CONFIG "
                "--force` writes it; it reuses the saved classifier results, so it takes seconds.)", ""]
    classes = results["data"]["classes"]
    shown = classes[:EXAMPLE_CLASSES]
    saved = load_file(str(examples))
    real = {c: _hwc(saved["images"][saved["labels"] == i]) for i, c in enumerate(shown)}
    distilled = {c: _first_images(samples / c, EXAMPLES_PER_CLASS) for c in shown if (samples / c).is_dir()}
    atomic_write_bytes(run_dir / "classes.png",
                       real_vs_distilled(real, distilled, results["config"]["data"]["image_size"]))
    more = f" (first {EXAMPLE_CLASSES} classes)" if len(classes) > EXAMPLE_CLASSES else ""
    return [f"## Real (left) vs distilled (right), one row per class{more}", "",
            "The framed distilled image of each class is its IPC-1 set.", "", "![classes](classes.png)", ""]


def losses_section(run_dir: Path, results: dict) -> list[str]:
    logs = {stage: entries for stage in TRAINING_STAGES if (entries := _read_log(run_dir, stage))}
    if not logs:
        return []
    finetune = results["config"].get("finetune", {})
    weights = {k: v for k, v in finetune.get("memory", {}).items() if k in ("lambda_real", "lambda_gen")}
    # fine-tuning this run's own pretrained model continues its step count
    pre = logs.get("pretrain")
    offsets = {"finetune": pre[-1]["step"]} if pre and finetune.get("init") == "pretrain" else {}
    atomic_write_bytes(run_dir / "losses.png", loss_plot(logs, weights, offsets))
    return ["## Training losses", "", "![losses](losses.png)", ""]


def memory_section(run_dir: Path, results: dict) -> list[str]:
    entries = [r for r in _read_log(run_dir, "finetune") if "real_bank_similarity" in r]
    if not entries:
        return []
    atomic_write_bytes(run_dir / "memory.png", memory_plot(entries))
    return ["## Memories during fine-tuning", "", "![memory](memory.png)", ""]


def provenance_section(run_dir: Path, results: dict) -> list[str]:
    d = results["data"]
    return ["## Provenance", "",
            f"- classes: {', '.join(d['classes'])}",
            f"- real train: {d['num_train']} images (sha256 {d['train_sha256'][:16]}…), "
            f"val: {d['num_val']} (sha256 {d['val_sha256'][:16]}…)",
            f"- distilled set: {d['distilled_set']} ({d['ipc_handling']}; sha256 {d['distilled_sha256'][:16]}…)",
            "- resolved config, package versions, git commit and seeds: `config.yaml` and `run_info.json` "
            "in each stage folder", ""]


SECTIONS: tuple[Callable[[Path, dict], list[str]], ...] = (
    accuracy_section, samples_section, metrics_section, dd_ranking_section, classes_section, losses_section,
    memory_section, provenance_section)


def write_report(run_dir: Path) -> str:
    """results.json, report.md and its PNGs at the top of the run folder; returns the accuracy table(s), the
    fidelity line and a line per IPC where distilled loses to random real, for the terminal."""
    res_file = results_file(run_dir)
    if not res_file.is_file():
        raise StageError(f"{res_file} does not exist: run `diffdistill evaluate` first")
    results = json.loads(res_file.read_text())
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "report.md", "\n".join(line for section in SECTIONS
                                                       for line in section(run_dir, results)))
    table = accuracy_tables(results)
    if results.get("fidelity"):
        table += f"\nfidelity: {fidelity_line(results['fidelity'], results.get('full'))}"
    for line in verdicts(results):
        table += f"\nbelow random real ({results['net']}): {line}"
    return table
