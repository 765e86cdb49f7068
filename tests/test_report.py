"""The report says plainly where the distilled set loses to random real images, and why it likely does; its
pictures can be read on their own."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffdistill.metrics import fidelity_goal
from diffdistill.stages.report import candidates_line, goal_text, verdicts, write_report


def summary(mean: float, std: float = 0.5) -> dict:
    runs = [mean - std, mean, mean + std]
    return {"mean": mean, "std": std, "runs": runs, "best_epoch": {"mean": mean, "std": std, "runs": runs}}


def overall(diversity: float, coverage: float, precision: float = 1.0) -> dict:
    return {"overall": {"diversity": diversity, "precision": precision, "recall": 1.0, "density": 1.0,
                        "coverage": coverage, "mean_distance": 1.0}}


def results(distilled: dict[str, float], random_real: dict[str, float], fidelity: float | None = 100.0,
            metrics: dict | None = None) -> dict:
    ipc = {k: {"distilled": summary(distilled[k]), "random_real": summary(random_real[k]),
               "gap_over_random_real": distilled[k] - random_real[k]} for k in distilled}
    return {
        "net": "convnet3", "norm": "instance", "ipc": ipc, "full": summary(99.0),
        "fidelity": None if fidelity is None else {"mean": fidelity, "std": 0.0, "num_images": 100,
                                                   "classifier": "convnet3 trained on the full real train set"},
        "metrics": metrics,
        "config": {"out_dir": "runs", "name": "r",
                   "pretrain": {"steps": 4800}, "finetune": {"steps": 600, "memory": {"lambda_gen": 0.008}},
                   "model": {"size": "tiny"}, "sample": {"guidance": 2.0}, "data": {"image_size": 16}},
        "protocol": {"seeds": 3, "epochs": {k: 300 for k in distilled}, "full_epochs": 30,
                     "augmentation": {"crop_scale": [1.0, 1.0], "hflip": False, "color_jitter": 0, "lighting": 0,
                                      "cutmix_prob": 0, "cutmix_beta": 1.0}},
        "data": {"num_val": 360, "num_train": 1437, "classes": ["0", "1"], "distilled_set": "runs/r/samples",
                 "train_sha256": "a" * 64, "val_sha256": "b" * 64, "distilled_sha256": "c" * 64,
                 "ipc_handling": "the first IPC images per class of the set"},
    }


def test_no_line_where_distilled_wins():
    assert verdicts(results({"1": 85.0, "10": 95.0}, {"1": 65.0, "10": 94.4})) == []


def test_a_weak_generator_is_named_as_the_cause():
    (line,) = verdicts(results({"1": 50.0}, {"1": 60.0}, fidelity=72.5))
    assert line.startswith("IPC 1: distilled 50.0 % < random real 60.0 % (-10.0)")
    assert "generator is not good enough" in line and "72.5 %" in line and "(pretrain.steps, now 4800) or" in line
    went_on = results({"1": 50.0}, {"1": 60.0}, fidelity=72.5)
    went_on["config"]["pretrain"]["max_steps"] = 9600  # pretraining may go on: both keys are named
    (line,) = verdicts(went_on)
    assert "(pretrain.steps, now 4800, and pretrain.max_steps, now 9600) or" in line


def test_fidelity_at_the_classifiers_own_accuracy_on_real_images_is_not_blamed_on_the_generator():
    capped = results({"1": 14.1}, {"1": 15.1}, fidelity=95.9)
    capped["full"] = summary(93.7)  # the full-data classifiers miss 6.3 % of real val images
    (line,) = verdicts(capped)
    assert "generator is not good enough" not in line
    assert "fidelity 95.9 %, not below the full-data classifiers' own 93.7 % on real val images" in line
    capped["full"] = summary(96.0)  # below what real images reach: the generator's
    (line,) = verdicts(capped)
    assert "generator is not good enough" in line and "95.9 %" in line


def test_samples_too_alike_are_named_when_fidelity_is_fine():
    metrics = {"ipc": {"10": {"distilled": overall(0.049, 0.25), "random_real": overall(0.103, 0.34)}}}
    (line,) = verdicts(results({"10": 92.5}, {"10": 94.4}, metrics=metrics))
    assert "too alike (diversity 0.049 vs 0.103 and coverage 0.250 vs 0.340" in line
    assert "or mode guidance (sample.mode_guidance.scale, now 0.0; compare's mgd3 uses 0.1)" in line
    assert "sample.guidance, now 2.0" in line and "lambda_gen, now 0.008" in line
    close = {"ipc": {"10": {"distilled": overall(0.1, 0.33), "random_real": overall(0.103, 0.34)}}}
    (line,) = verdicts(results({"10": 94.0}, {"10": 94.4}, metrics=close))
    assert "No single cause" in line and "within the seed-to-seed spread" in line


def test_samples_unlike_real_images_are_named_before_too_alike():
    # glyphs, measured: more diverse than random real, but half of them outside the real images' k-NN balls
    metrics = {"ipc": {"10": {"distilled": overall(0.109, 0.05, precision=0.46),
                              "random_real": overall(0.091, 0.219)}}}
    (line,) = verdicts(results({"10": 81.7}, {"10": 96.2}, fidelity=99.3, metrics=metrics))
    assert "unlike real images (precision 0.46 vs 1.00 for random real images; fidelity 99.3 % is fine" in line
    assert "too alike" not in line and "sample.guidance, now 2.0" in line
    assert "model.size, now tiny" in line and "--methods random,herding,kmeans" in line  # what helped, measured


def test_without_fidelity_the_line_says_what_is_missing():
    (line,) = verdicts(results({"1": 50.0}, {"1": 60.0}, fidelity=None))
    assert "evaluate.full=true" in line
    (line,) = verdicts(results({"1": 59.8}, {"1": 60.0}))  # fidelity fine, no metrics: not claimed as measured
    assert "diversity and coverage not measured" in line


def test_one_seed_and_a_set_made_elsewhere_are_said():
    res = results({"1": 50.0}, {"1": 60.0}, fidelity=72.5)
    for kind in ("distilled", "random_real"):
        res["ipc"]["1"][kind]["runs"] = [res["ipc"]["1"][kind]["mean"]]
    res["data"]["distilled_set"] = "/elsewhere/set"
    (line,) = verdicts(res)
    assert "one seed: the spread is unknown" in line and "made elsewhere (--distilled)" in line
    assert "pretrain.steps" not in line  # this run's generator is not what made the set


def test_one_seed_shows_no_spread_rather_than_zero():
    from diffdistill.stages.report import _fmt

    assert _fmt({"mean": 85.25, "std": 0.0, "runs": [85.25]}) == "85.2 ± n/a"
    assert _fmt({"mean": 85.25, "std": 0.0, "runs": [85.25, 85.25]}) == "85.2 ± 0.0"  # two equal seeds: measured
    assert _fmt(None) == "—"


@pytest.mark.parametrize("loses", [True, False])
def test_report_and_terminal_lead_with_the_loss(tmp_path, loses):
    res = results({"1": 85.0, "10": 92.5 if loses else 95.0}, {"1": 65.0, "10": 94.4}, fidelity=90.0)
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "results.json").write_text(json.dumps(res))
    printed = write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert ("scores below random real" in report.split("Top-1 accuracy")[0]) == loses  # above the tables
    assert ("below random real (convnet3): IPC 10: distilled 92.5 %" in printed) == loses
    assert "IPC 1:" not in printed  # distilled wins at IPC 1
    # the fidelity's yardstick: what the same classifiers score on real images (full: 99.0 ± 0.5)
    yardstick = "(on real validation images the same classifiers score 99.0 ± 0.5 %)"
    assert "fidelity: 90.0 ± 0.0 % of the 100 distilled images" in printed and yardstick in printed
    assert yardstick in report


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_grids_name_their_rows_and_frame_the_ipc1_images():
    from diffdistill.plots import MARK, real_vs_distilled, sample_grid

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(10)]
    short, long = (_png(sample_grid({name: images, "b": images}, 16)) for name in ("a", "a-much-longer-name"))
    assert short.shape[0] == long.shape[0] and long.shape[1] > short.shape[1]  # the name column fits the names
    scale = 256 // 18
    assert short.shape[1] - 10 * 18 * scale < 60  # ten cells of 16 px + borders, enlarged, and the name column
    left = short.shape[1] - 10 * 18 * scale
    assert (short[:, :left] < 128).any()  # the names are drawn (dark pixels left of the cells)
    other = _png(sample_grid({"a": images, "c": images}, 16))
    assert not np.array_equal(short[:, :left], other[:, :left])  # ... and they are these names
    top = short.shape[0] - 2 * 18 * scale
    assert top > 0 and (short[:top] < 128).any()  # the header line
    assert (np.abs(short[top + 5, left].astype(int) - MARK) < 30).all()  # the IPC-1 column is framed
    pair = _png(real_vs_distilled({"a": images[:8]}, {"a": images[:8]}, 16))
    assert (pair[: pair.shape[0] - 18 * (96 // 16)] < 128).any()  # "real" / "distilled" above the cells


def test_loss_plot_weights_the_memory_terms_and_continues_the_steps(monkeypatch):
    from diffdistill import plots

    drawn = []

    class Axes:
        def plot(self, xs, ys, label):
            drawn.append((label, list(xs), list(ys)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    class Figure:
        pass

    monkeypatch.setattr(plots, "figure_png", lambda fig: b"")
    monkeypatch.setattr(plots, "pyplot", lambda: type("plt", (), {"subplots": staticmethod(
        lambda rows, cols, **k: (Figure(), [[Axes() for _ in range(cols)]]))}))
    logs = {"pretrain": [{"step": 100, "diffusion": 0.5}, {"step": 200, "diffusion": 0.4}],
            "finetune": [{"step": 10, "diffusion": 0.3, "representativeness": 0.5, "diversity": 0.9}]}
    plots.loss_plot(logs, {"lambda_real": 0.002, "lambda_gen": 0.008}, {"finetune": 200})
    assert ("finetune", [210], [0.3]) in drawn  # after pretraining's 200 steps
    assert ("finetune", [210], [pytest.approx(0.001)]) in drawn  # 0.002 × 0.5, as it enters the loss
    assert ("finetune", [210], [pytest.approx(0.0072)]) in drawn  # 0.008 × 0.9


def test_the_sample_grid_shows_the_first_classes_of_a_large_set(tmp_path):
    from diffdistill.plots import GRID_CLASSES
    from diffdistill.stages.report import samples_section

    names = [f"c{i:03d}" for i in range(GRID_CLASSES + 10)]
    for name in names:
        (tmp_path / "set" / name).mkdir(parents=True)
        Image.new("L", (8, 8), 200).save(tmp_path / "set" / name / "0.png")
    res = {"data": {"distilled_set": str(tmp_path / "set"), "classes": names}, "config": {"data": {"image_size": 8}}}
    lines = samples_section(tmp_path, res)
    assert lines[0] == f"## Distilled images (one row per class, the first {GRID_CLASSES} of {len(names)} classes)"
    capped = (tmp_path / "samples.png").read_bytes()
    first = samples_section(tmp_path, {**res, "data": {**res["data"], "classes": names[:GRID_CLASSES]}})
    assert first[0] == "## Distilled images (one row per class)"
    assert (tmp_path / "samples.png").read_bytes() == capped  # the same picture: the first classes' rows


def test_redrawn_samples_judge_the_generator_by_its_first_draws(tmp_path):
    """With sample.redraw the kept images' fidelity is partly by construction: the cause is read from the share of
    first draws the check's classifier accepted (glyphs, measured: 6 of 100 redrawn, fidelity 95.0 -> 99.3 %)."""
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "run_info.json").write_text(json.dumps({"redraw": {"redrawn": 6, "assigned": 100, "of": 100}}))
    res = results({"10": 93.4}, {"10": 96.9}, fidelity=99.3)
    res["config"]["out_dir"], res["config"]["name"] = str(tmp_path.parent), tmp_path.name
    res["data"]["distilled_set"] = str(samples)
    (line,) = verdicts(res)
    assert "generator is not good enough" in line and "94.0 % of the first draws (before sample.redraw)" in line
    (samples / "run_info.json").write_text(json.dumps({"redraw": {"redrawn": 1, "assigned": 100, "of": 100}}))
    (line,) = verdicts(res)
    assert "generator is not good enough" not in line and "fidelity 99.0 % of the first draws" in line


def test_candidates_judge_the_generator_by_all_its_draws(tmp_path):
    """With sample.candidates the cause is read from the share of all draws the check's classifier assigned their
    class, not from the kept images' fidelity; report.md's line says how the images were chosen."""
    samples = tmp_path / "samples"
    samples.mkdir()
    summary = {"draws": 8, "first_kept": 20, "assigned": 100, "assigned_draws": 760, "of": 100}
    (samples / "run_info.json").write_text(json.dumps({"candidates": summary}))
    res = results({"10": 93.4}, {"10": 96.9}, fidelity=100.0)
    res["config"]["out_dir"], res["config"]["name"] = str(tmp_path.parent), tmp_path.name
    res["data"]["distilled_set"] = str(samples)
    (line,) = verdicts(res)
    assert "generator is not good enough" in line and "95.0 % of the draws (before sample.candidates chose)" in line
    (tmp_path / "pretrain").mkdir()  # the check's classifier, which judged the draws, scores 94.0 % on real images
    (tmp_path / "pretrain" / "check.json").write_text(json.dumps({"classifier_val_accuracy": 94.0}))
    (line,) = verdicts(res)  # the full-data classifiers' 99.0 % is not the ceiling of the draws' fidelity
    assert "generator is not good enough" not in line
    assert "fidelity 95.0 % of the draws, not below the generator check's classifier's own 94.0 %" in line
    (tmp_path / "pretrain" / "check.json").unlink()
    (samples / "run_info.json").write_text(json.dumps({"candidates": {**summary, "assigned_draws": 790}}))
    (line,) = verdicts(res)
    assert "generator is not good enough" not in line and "fidelity 98.8 % of the draws," in line
    text = candidates_line(summary)
    assert text.startswith("**Chosen from 8 draws**: each of the 100 distilled images")
    assert "760 of all 800 draws" in text and "20 kept their first draw" in text and "by construction" in text


def test_the_redraw_line_says_partly_by_construction_only_when_an_image_was_redrawn():
    from diffdistill.stages.report import redraw_line

    some = redraw_line({"redrawn": 6, "assigned": 100, "of": 100})
    assert some.startswith("**Redrawn**: 6 of 100 distilled images were drawn again") and "by construction" in some
    none = redraw_line({"redrawn": 0, "assigned": 100, "of": 100})
    assert "by construction" not in none and "assigned 100 of them their class at the first draw" in none
    lost = redraw_line({"redrawn": 2, "replaced": 0, "assigned": 98, "of": 100})  # every redraw did worse
    assert "by construction" not in lost and "0 kept a later draw" in lost and "the generator's own" in lost
    assert "2 kept a later draw" in redraw_line({"redrawn": 6, "replaced": 2, "assigned": 98, "of": 100})


def test_a_goal_the_classifier_lowered_says_so():
    assert goal_text(97.0) == "the 97 % goal"
    assert goal_text(91.0) == "the 91 % goal (the classifier's own accuracy on real val images, below 97 %)"
    assert goal_text(93.44) == "the 93.4 % goal (the classifier's own accuracy on real val images, below 97 %)"
    assert fidelity_goal(None) == 97.0 and fidelity_goal(99.5) == 97.0 and fidelity_goal(93.4) == 93.4


def test_the_report_says_how_long_pretraining_went_on_and_why(tmp_path):
    res = results({"1": 85.0}, {"1": 65.0})
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "results.json").write_text(json.dumps(res))
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "check.json").write_text(json.dumps(
        {"fidelity": 91.0, "num_images": 100, "classifier": "convnet3, 30 epochs on the real train set"}))
    info = {"steps": 12000, "extension": {"max_steps": 16000, "goal": 97.0, "checks": [
        {"step": 8000, "fidelity": 76.0, "seconds": 30.0}, {"step": 12000, "fidelity": 97.0, "seconds": 9.0}]}}
    (tmp_path / "pretrain" / "run_info.json").write_text(json.dumps(info))
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert ("Generator check right after pretraining (before fine-tuning): 91.0 % of 100 samples assigned their "
            "class by a convnet3, 30 epochs on the real train set. Pretraining ran 12000 steps: the checks on the "
            "way (pretrain.max_steps 16000, goal 97 %) found 76.0 % at step 8000, 97.0 % at step 12000.") in report
    # a classifier that scores 93.4 % on real val images set the goal there
    (tmp_path / "pretrain" / "check.json").write_text(json.dumps(
        {"fidelity": 91.0, "num_images": 100, "classifier": "convnet3, 30 epochs on the real train set",
         "classifier_val_accuracy": 93.4}))
    info["extension"]["goal"] = 93.4
    (tmp_path / "pretrain" / "run_info.json").write_text(json.dumps(info))
    write_report(tmp_path)
    assert ("class by a convnet3, 30 epochs on the real train set (on real val images it scores 93.4 %). Pretraining "
            "ran 12000 steps: the checks on the way (pretrain.max_steps 16000, goal 93.4 %)") in \
        (tmp_path / "report.md").read_text()
    info["extension"]["checks"] = []  # it stopped at pretrain.steps without a check: nothing more to say
    (tmp_path / "pretrain" / "run_info.json").write_text(json.dumps(info))
    write_report(tmp_path)
    assert "the real train set (on real val images it scores 93.4 %).\n" in (tmp_path / "report.md").read_text()
