"""The Python API: the demo config end to end from a script, the stages one by one, and its errors."""

import pytest

import diffdistill as dd
from diffdistill.errors import StageError

TINY = ["pretrain.steps=30", "pretrain.log_every=10", "finetune.steps=8", "finetune.log_every=4",
        "sample.steps=4", "sample.ipc=[1,3]", "evaluate.epochs=4", "evaluate.full_epochs=1", "evaluate.seeds=2",
        "evaluate.eval_every=2", "evaluate.width=16", "pretrain.check_images=2", "evaluate.workers=1"]


def test_the_package_exposes_the_api_without_importing_it():
    assert {"load_config", "run", "evaluate", "plan", "Result"} <= set(dir(dd))
    with pytest.raises(AttributeError, match="no attribute 'runn'"):
        dd.runn  # noqa: B018


@pytest.mark.slow
def test_the_demo_config_runs_from_python(tmp_path, capsys):
    cfg = dd.load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", *TINY])
    steps = dd.plan(cfg)
    assert steps[0].startswith("plan for") and not (tmp_path / "demo-digits").exists()
    result = dd.run(cfg)
    out = capsys.readouterr().out
    assert "== pretrain (1/5) ==" in out and "== evaluate (5/5) ==" in out and "done in" in out
    rows = result.table()
    assert [(r["net"], r["ipc"]) for r in rows] == [("convnet3", 1), ("convnet3", 3)]
    assert all(0 <= r["distilled"] <= 100 and r["gap"] == pytest.approx(r["distilled"] - r["random_real"], abs=0.02)
               for r in rows)
    assert result.report == tmp_path / "demo-digits" / "report.md" and "IPC 1:" in repr(result)
    # a stage alone, then a set made elsewhere (this run's own samples) scored into a run of its own
    assert dd.check(cfg)["images_per_class"] == 2
    other = dd.evaluate(dd.scoring_config(cfg, str(tmp_path / "demo-digits" / "samples")),
                        distilled=str(tmp_path / "demo-digits" / "samples"))
    assert other.run_dir == tmp_path / "demo-digits-samples"
    assert other.table()[0]["distilled"] == rows[0]["distilled"]  # the same set, the same seeds: the same score
    with pytest.raises(StageError, match="exists; pass --resume"):
        dd.run(cfg)
