"""The training loop's parts on tiny settings: how the data is dealt to processes, which rows the memories
take, and that the memory losses reach the DiT's weights in the direction they should."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.config import load_config
from diffdistill.latents import BatchOrder, latent_source
from diffdistill.models.adapters import make_trainable
from diffdistill.models.dit import build_dit
from diffdistill.runtime import CastOnce
from diffdistill.stages.train import TrainLoop

CPU = torch.device("cpu")


def test_one_process_order_is_the_generators_permutations():
    order = BatchOrder(10, 4, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    first, second = torch.randperm(10, generator=g), torch.randperm(10, generator=g)
    got = [next(order) for _ in range(4)]  # 2 batches an epoch: the last partial batch is dropped
    assert [b.tolist() for b in got] == [first[:4].tolist(), first[4:8].tolist(), second[:4].tolist(),
                                          second[4:8].tolist()]


def test_ranks_partition_every_epoch_and_resume_their_place():
    n, batch, world = 50, 8, 2
    orders = [BatchOrder(n, batch, torch.Generator().manual_seed(7), rank, world, owns_generator=True)
              for rank in range(world)]
    for _ in range(3):  # epochs
        seen = [torch.cat([next(o) for _ in range(n // batch)]) for o in orders]
        assert all(len(s) == n // batch * batch // world for s in seen)
        assert not set(seen[0].tolist()) & set(seen[1].tolist())  # disjoint
        assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == n // batch * batch  # the epoch, less the rest
    state = orders[1].state_dict()
    ahead = [next(orders[1]) for _ in range(8)]
    again = BatchOrder(n, batch, torch.Generator().manual_seed(0), 1, world, owns_generator=True)
    again.load_state_dict(state)  # the order's own generator comes back with it
    assert all(torch.equal(a, b) for a, b in zip(ahead, [next(again) for _ in range(8)]))


def _loop(*overrides: str) -> TrainLoop:
    cfg = load_config("configs/demo-digits.yaml", ["finetune.init=null", "finetune.batch_size=20",
                                                   "data.classes=[0,1]", "finetune.grad_clip=null",
                                                   "finetune.lr=0.001", "threads=1", *overrides])
    source, latent = latent_source(cfg, cfg.finetune, CPU)
    torch.manual_seed(0)
    model = build_dit(cfg.model.size, latent[0], latent[1], 2).train()
    return TrainLoop(cfg, "finetune", model, make_trainable(model, "full"), source, latent, torch.tensor([0, 1]), CPU)


def _weights(loop: TrainLoop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loop.trainable.params]


@pytest.mark.parametrize("term, key", [("representativeness", "finetune.memory.lambda_real"),
                                       ("diversity", "finetune.memory.lambda_gen")])
def test_memory_loss_moves_the_dit_weights_to_lower_its_term(term, key):
    plain = _loop("finetune.memory.lambda_real=0", "finetune.memory.lambda_gen=0")
    strong = _loop("finetune.memory.lambda_real=0", "finetune.memory.lambda_gen=0", f"{key}=50")
    for loop in (plain, strong):
        loop.train_step()  # step 1: the generated memory is empty, so the memory loss is 0 for both
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain), _weights(strong)))
    after = {}
    for name, loop in (("plain", plain), ("strong", strong)):
        batch = loop.draw()  # the same draws in both loops
        loss, parts, _ = loop.losses(batch)
        before = parts[term]
        loop._update(loss)
        with torch.no_grad():
            after[name] = loop.losses(batch)[1][term]  # the term on the same batch with the new weights
    assert not all(torch.equal(a, b) for a, b in zip(_weights(plain), _weights(strong)))  # the gradient arrived
    assert after["strong"] < before and after["strong"] < after["plain"]


def test_generated_memory_takes_only_small_t_when_push_max_t_is_set():
    loop = _loop("finetune.memory.push_max_t=400", "finetune.memory.size_gen=64", "finetune.memory.size_real=64")
    batch = loop.draw()
    loss, _, x0_hat = loop.losses(batch)
    loop._update(loss)
    loop._remember(batch, x0_hat)
    small = batch.t <= 400
    assert 0 < int(small.sum()) < len(batch.t)  # the seeded draw has both kinds
    real, gen = loop.banks["real"], loop.banks["gen"]
    assert int(real.counts.sum()) == len(batch.t) and int(gen.counts.sum()) == int(small.sum())
    for c in (0, 1):  # the generated rows are the x̂0 of the small-t samples of that class, in batch order
        assert torch.equal(gen[c], x0_hat.detach()[small & (batch.labels == c)])


@pytest.mark.parametrize("latents", ["images", "cache"])
@pytest.mark.parametrize("policy", ["none", "fifo", "adaptive"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_steps_between_log_steps_read_nothing_back_from_the_device(stage, policy, latents, tmp_path, monkeypatch):
    """No host synchronization inside the training loop between two log steps: the loss parts, the non-finite
    check and the memories (push, prune, loss terms) stay on the device until a log row. Counted are the calls
    made from diffdistill's own code (torch's CPU AdamW reads its step counter itself), except in
    `LatentCache.read` and `most_per_class`: they read shard rows by index and count a batch's labels, both
    host data (the data order drawn on the CPU), never a device tensor (`most_per_class` returns None for
    labels on a device: tested below). The memories are full after the first steps, so pruning runs in the watched
    steps."""
    import traceback

    import diffdistill
    from diffdistill.config import load_config
    from diffdistill.stages import train as T
    from diffdistill.stages.prepare import prepare_stage

    package = str(Path(diffdistill.__file__).parent)
    calls: list[str] = []
    active = [False]

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if active[0]:
                caller = traceback.extract_stack(limit=2)[0]
                host_io = (caller.name == "read" and caller.filename.endswith("latents.py")  # LatentCache.read
                           or caller.name == "most_per_class")  # counts host labels (asserted on the host)
                if caller.filename.startswith(package) and not host_io:
                    calls.append(f"{name} at {Path(caller.filename).name}:{caller.lineno}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    cfg = load_config("configs/demo-digits.yaml", [
        f"out_dir={tmp_path}", f"{stage}.steps=12", f"{stage}.log_every=6", f"{stage}.batch_size=8", "threads=1",
        "finetune.init=null", f"{stage}.memory.policy={policy}", f"{stage}.memory.size_real=4",
        f"{stage}.memory.size_gen=4", f"{stage}.latents={latents}", "pretrain.check_images=0",
        f"prepare.dir={tmp_path / 'cache'}", "data.hflip=true"])
    if latents == "cache":
        prepare_stage(cfg)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero", "unique"):
        counting(torch.Tensor, name)
    counting(torch, "nonzero")
    counting(torch, "unique")
    step = T.TrainLoop.train_step

    def watched(self):
        active[0] = self.step % self.tcfg.log_every not in (0, 1)  # not the log step, nor the one after it
        try:
            return step(self)
        finally:
            active[0] = False

    monkeypatch.setattr(T.TrainLoop, "train_step", watched)
    T.train_stage(cfg, stage, force=True)
    assert calls == []
    rows = [json.loads(r) for r in (tmp_path / "demo-digits" / stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12] and all(r["ms_per_step"] > 0 and r["images_per_s"] > 0 for r in rows)
    if policy != "none":  # the memories did their work: (nearly) full banks, similarities logged
        counts = load_file(tmp_path / "demo-digits" / stage / "memory.safetensors")["real.counts"]
        assert counts.tolist().count(4) >= 8 and math.isfinite(rows[-1]["gen_bank_similarity"])


def test_the_loop_tells_each_push_the_largest_class_of_its_batch_counted_on_the_host(monkeypatch):
    """The adaptive rule runs as many rounds as the batch's largest class has rows (not one per row), from labels
    counted before they cross to the device; labels already on a device are not read (None: one per row)."""
    import diffdistill.memory as memory
    from diffdistill.stages.train import most_per_class

    rounds, keep_mask = [], memory.adaptive_keep_mask
    monkeypatch.setattr(memory, "adaptive_keep_mask", lambda *a: rounds.append(a[3]) or keep_mask(*a))
    loop = _loop("data.classes=[0,1,2,3,4,5,6,7,8,9]", "finetune.memory.policy=adaptive")
    loop.cond = torch.arange(10)
    expected = []
    for loop.step in range(1, 4):
        batch = loop.draw()
        expected += [int(torch.bincount(batch.labels).max())] * 2  # the real and the generated bank
        loop._remember(batch, batch.z0.flatten(1))
    assert rounds == expected and max(expected) < 20  # batch 20 over 10 classes
    assert most_per_class(torch.zeros(4, dtype=torch.long, device="meta")) is None


def test_reading_the_cache_ahead_changes_no_draw(tmp_path):
    """The next step's rows are read in a thread while a step runs; z0 and the generator's stream are those
    of reading each batch when it is drawn, and `peek` names exactly the indices `next` then returns."""
    from diffdistill.latents import CachedLatents, open_cache
    from diffdistill.stages.prepare import prepare_stage

    cfg = load_config("configs/demo-digits.yaml", [f"out_dir={tmp_path}", f"prepare.dir={tmp_path / 'cache'}",
                                                   "data.hflip=true"])
    prepare_stage(cfg)
    draws = {}
    for ahead in (False, True):
        source = CachedLatents(open_cache(cfg), None, hflip=True)
        generator = torch.Generator().manual_seed(0)
        order = BatchOrder(100, 32, generator)  # 3 batches per epoch: a new permutation at steps 1, 4, 7
        out, named = [], None
        for step in range(8):
            idx = next(order)
            if named is not None:
                assert torch.equal(idx, named)
            named = order.peek() if ahead else None
            assert (named is None) == (not ahead or step % 3 == 2)  # unknown before a new permutation
            out.append(source.sample(idx, generator, torch.device("cpu"), upcoming=named))
        source.close()
        draws[ahead] = (out, generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(draws[False][0], draws[True][0]))
    assert torch.equal(draws[False][1], draws[True][1])


def test_compile_runs_the_training_step_through_torch_compile(monkeypatch):
    """`compile: true` sends the DiT, the memory loss and each bank's push through torch.compile (here with the
    eager backend, so the test needs no C compiler and stays fast): the step is the same step, to the bit."""
    real_compile, modes = torch.compile, []

    def eager(model, mode=None, **kwargs):
        modes.append((getattr(model, "__name__", type(model).__name__), mode))
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager)
    weights, banks = {}, {}
    for flag in ("false", "true"):
        loop = _loop(f"compile={flag}", "compile_mode=reduce-overhead", "finetune.memory.policy=adaptive")
        for loop.step in range(1, 4):
            loop.train_step()
        weights[flag], banks[flag] = _weights(loop), loop.banks
    assert sorted(modes) == sorted([("DiTTransformer2DModel", "reduce-overhead"), ("plan_push", "reduce-overhead"),
                                    ("plan_push", "reduce-overhead"), ("memory_loss_dense", "reduce-overhead")])
    assert all(torch.equal(a, b) for a, b in zip(weights["false"], weights["true"]))
    assert all(torch.equal(a, b) for name in banks["false"] for a, b in zip(banks["false"][name].state_dict().values(),
                                                                            banks["true"][name].state_dict().values()))


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dtype casts of parameters (tensors with the shape of a model parameter)."""

    def __init__(self, shapes: set) -> None:
        super().__init__()
        self.shapes, self.casts = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trainable", ["full", "difffit"])
def test_bf16_matrix_weights_cast_ahead_give_autocasts_exact_step(trainable):
    """Under bf16 autocast the loop casts the frozen Linear/Conv weights once instead of autocast casting them in
    every forward (trainable ones stay autocast's): the same losses, the same trainable weights and the same
    saved state dict (fp32, tied embedder included) after three steps, to the bit; with DiffFit no matrix
    weight is cast in a step any more, with every weight trainable nothing changes."""
    weights, losses, casts, states = {}, {}, {}, {}
    for ahead in (False, True):
        cfg = load_config("configs/demo-digits.yaml", ["finetune.init=null", "finetune.batch_size=20",
                                                       "data.classes=[0,1]", "threads=1", "precision=bf16",
                                                       "finetune.memory.policy=adaptive"])
        source, latent = latent_source(cfg, cfg.finetune, CPU)
        torch.manual_seed(0)
        model = build_dit(cfg.model.size, latent[0], latent[1], 2).train()
        loop = TrainLoop(cfg, "finetune", model, make_trainable(model, trainable, 2), source, latent,
                         torch.tensor([0, 1]), CPU)
        assert isinstance(loop.net, CastOnce)
        if not ahead:
            loop.net = model  # autocast alone (its Linear modules fall back to their own forward)
        losses[ahead] = []
        for loop.step in range(1, 4):
            losses[ahead].append(loop.train_step()["diffusion"].item())
        weights[ahead] = _weights(loop)
        states[ahead] = loop.trainable.folded_state_dict(model)
        counter = _CountCasts({tuple(p.shape) for p in model.parameters() if p.dim() == 2})  # matrix weights
        with counter:
            loop.losses(loop.draw())
        casts[ahead] = counter.casts
        named = list(model.named_parameters(remove_duplicate=False))
        assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for _, p in named)
    assert losses[True] == losses[False]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))
    assert states[True].keys() == states[False].keys()
    assert all(states[True][k].dtype == torch.float32 and torch.equal(states[True][k], states[False][k])
               for k in states[False])
    assert casts[False] >= 20  # autocast casts every Linear weight in every forward
    assert casts[True] == (0 if trainable == "difffit" else casts[False])
