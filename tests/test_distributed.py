"""Two processes under torchrun (gloo, CPU): DDP keeps the ranks' weights identical at every step, and the
sampled set is byte-identical to a single-process run."""

import json
import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffdistill", *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_finetune_and_sample_under_torchrun(tmp_path):
    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=6",
              "finetune.batch_size=16", "finetune.log_every=1", "sample.ipc=[3]", "sample.steps=4",
              "sample.batch_size=4", "threads=1", "device=cpu"]
    torchrun("finetune", *common)
    run = tmp_path / "demo-digits"
    info = json.loads((run / "finetune" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["per_rank_batch_size"] == 8
    rows = [json.loads(line) for line in (run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:  # after every step both ranks hold the same weights
        assert len(r["rank_checksums"]) == 2 and r["rank_checksums"][0] == r["rank_checksums"][1]
    assert (run / "finetune" / "memory-rank1.safetensors").is_file()  # per-rank banks (memory.sync: none)
    assert not (run / "checkpoints").exists()

    model = f"sample.checkpoint={run / 'finetune' / 'ema'}"
    torchrun("sample", *common, model)
    from diffdistill.cli import main

    assert main(["sample", *common, model, "name=single"]) == 0
    two, one = run / "samples", tmp_path / "single" / "samples"
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 30 and sorted(p.relative_to(two) for p in two.rglob("*.png")) == files
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2

    # evaluation: jobs dealt to the two processes, merged by rank 0; the numbers do not depend on that
    score = ["evaluate.epochs=2", "evaluate.full_epochs=1", "evaluate.seeds=2", "evaluate.width=8",
             "evaluate.eval_every=1"]
    torchrun("evaluate", *common, *score)
    assert main(["evaluate", *common, *score, "name=single"]) == 0
    a = json.loads((run / "evaluate" / "results.json").read_text())
    b = json.loads((tmp_path / "single" / "evaluate" / "results.json").read_text())
    assert a["world_size"] == 2 and a["by_net"] == b["by_net"]


@pytest.mark.slow
def test_allgather_memories_are_the_same_on_every_rank(tmp_path):
    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=4",
              "finetune.batch_size=16", "finetune.memory.sync=allgather", "threads=1", "device=cpu"]
    torchrun("finetune", *common)
    out = tmp_path / "demo-digits" / "finetune"
    assert (out / "memory.safetensors").is_file() and not (out / "memory-rank1.safetensors").exists()
    from safetensors.torch import load_file

    banks = load_file(str(out / "memory.safetensors"))
    assert int(banks["real.counts"].sum()) == 4 * 16  # every rank pushed both ranks' rows (capacity not reached)


@pytest.mark.slow
def test_torchrun_finetune_killed_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    import time

    from safetensors.torch import load_file

    common = ["configs/demo-digits.yaml", f"out_dir={tmp_path}", "finetune.init=null", "finetune.steps=40",
              "finetune.batch_size=16", "finetune.log_every=5", "finetune.checkpoint_every=2", "threads=1",
              "device=cpu", "data.classes=[0,1,2]"]  # 3 classes: an epoch is 27 steps, so the resume crosses one
    torchrun("finetune", *common, "name=ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffdistill",
           "finetune", *common, "name=killed"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints" / "finetune"
    start = time.time()
    while not any((p / "state.json").is_file() for p in ckpts.glob("step-*")):
        assert proc.poll() is None and time.time() - start < 300
        time.sleep(0.05)
    # the launcher and both ranks (torchrun puts its workers in sessions of their own)
    subprocess.run(["pkill", "-KILL", "-f", f"out_dir={tmp_path} .*name=killed"], check=False)
    proc.wait()
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", f"out_dir={tmp_path} .*name=killed"]).returncode == 1  # none left
    assert not (tmp_path / "killed" / "finetune").exists()
    torchrun("finetune", *common, "name=killed", "--resume")
    for name in ("raw/diffusion_pytorch_model.safetensors", "memory.safetensors", "memory-rank1.safetensors"):
        ref, got = (load_file(str(tmp_path / run / "finetune" / name)) for run in ("ref", "killed"))
        assert all(torch.equal(ref[k], got[k]) for k in ref), name  # weights and both ranks' banks, bit for bit


def test_evaluation_workers_give_the_results_of_one_process(tmp_path):
    """evaluate.workers=2 on 2 threads: two local processes of one thread each, the full-data teachers first; the
    same records as one process on one thread."""
    from helpers import digits_set

    from diffdistill.cli import main

    syn = digits_set(tmp_path / "set", 2)
    common = ["evaluate", "configs/demo-digits.yaml", "evaluate.ipc=[1,2]", "evaluate.epochs=2",
              "evaluate.full_epochs=1", "evaluate.seeds=2", "evaluate.width=8", "evaluate.eval_every=1",
              "evaluate.labels=[hard,soft]", "evaluate.metrics=false", "device=cpu", "--distilled", str(syn)]
    assert main([*common, f"out_dir={tmp_path / 'two'}", "evaluate.workers=2", "threads=2"]) == 0
    assert main([*common, f"out_dir={tmp_path / 'one'}", "evaluate.workers=1", "threads=1"]) == 0
    two, one = (json.loads(next((tmp_path / n).rglob("evaluate/results.json")).read_text()) for n in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["by_net"] == one["by_net"]


def test_a_failing_evaluation_worker_is_a_one_line_error(tmp_path):
    from diffdistill.config import load_config
    from diffdistill.errors import StageError
    from diffdistill.stages.evaluate import in_workers

    cfg = load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", "evaluate.workers=2", "device=cpu"])
    with pytest.raises(StageError, match=r"^distilled set .*nowhere does not exist: run `diffdistill sample` first$"):
        in_workers(cfg, False, str(tmp_path / "nowhere"), None)
