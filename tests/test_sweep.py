"""`diffdistill sweep` on a tiny config: 2 values × 2 seeds, one CSV, a summary and a Fig. 4-style plot."""

import csv

import pytest
from PIL import Image

from diffdistill.cli import main
from diffdistill.config import ConfigError
from diffdistill.stages.sweep import load_sweep, summarize

TINY = ["pretrain.steps=20", "pretrain.log_every=10", "finetune.steps=4", "finetune.log_every=2", "sample.steps=3",
        "sample.ipc=[2]", "evaluate.epochs=2", "evaluate.full_epochs=1", "evaluate.seeds=1", "evaluate.width=8",
        "evaluate.eval_every=1", "threads=1"]


@pytest.mark.slow
def test_sweep_two_values_two_seeds(tmp_path, capsys):
    args = ["sweep", "configs/demo-digits.yaml", f"out_dir={tmp_path}", *TINY,
            "--vary", "finetune.memory.lambda_gen=0.008,0.08", "--seeds", "0,1"]
    assert main(args) == 0
    root = tmp_path / "demo-digits-sweep"
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert len(rows) == 2 * 2  # 2 values × 2 seeds, one net, one IPC
    assert {(r["label"], r["seed"]) for r in rows} == {(f"finetune.memory.lambda_gen={v}", s)
                                                      for v in ("0.008", "0.08") for s in ("0", "1")}
    assert all(r["diversity"] and r["fidelity"] for r in rows)
    assert (root / "shared" / "pretrain" / "ema").is_dir()  # one pretraining for all runs
    assert not (root / "finetune.memory.lambda_gen=0.008-s0" / "pretrain").exists()
    with Image.open(root / "sweep.png") as img:
        assert img.format == "PNG" and img.width > 100
    summary = (root / "summary.md").read_text()
    assert "Mean ± std over 2 seeds" in summary and "lambda_gen=0.08" in summary
    # a rerun reuses every finished run
    capsys.readouterr()
    assert main(args) == 0
    assert "[1/4]" not in capsys.readouterr().out


def test_summary_statistics_and_bad_vary(tmp_path):
    rows = [{"label": "a", "group": "g", "x": 1.0, "net": "n", "ipc": 1, "distilled": v, "random_real": 10.0,
             "gap": v - 10, "fidelity": None, "diversity": None, "precision": None, "coverage": None}
            for v in (50.0, 54.0)]
    (s,) = summarize(rows)
    assert s["distilled"] == (52.0, pytest.approx(2 ** 0.5 * 2), 50.0, 54.0) and "fidelity" not in s
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        load_sweep("configs/demo-digits.yaml", [], ["finetune.lr"], None)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_sweep("configs/demo-digits.yaml", [], ["finetune.lrr=1,2"], None)
    ablation = load_sweep("configs/ablation-demo.yaml", [], [], None)
    assert len(ablation.points) == 9 and ablation.seeds == [0, 1, 2]
