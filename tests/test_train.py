"""The training loop's parts on tiny settings: how the data is dealt to processes, which rows the memories
take, and that the memory losses reach the DiT's weights in the direction they should."""

import pytest
import torch

from diffdistill.config import load_config
from diffdistill.latents import BatchOrder, latent_source
from diffdistill.models.adapters import make_trainable
from diffdistill.models.dit import build_dit
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
