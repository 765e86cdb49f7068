import math

import pytest
import torch

from diffdistill.losses import memory_loss, memory_loss_terms

S = 1 / math.sqrt(2)


def case():
    x0 = torch.tensor([[1.0, 0], [0, 1], [-1, 0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    real = [torch.tensor([[1.0, 0]], dtype=torch.float64), torch.tensor([[1.0, 0]], dtype=torch.float64)]
    gen = [torch.tensor([[1.0, 1]], dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64)]
    return x0, labels, real, gen


def test_hand_computed_value():
    x0, labels, real, gen = case()
    # class 0: R = 1 - min(cos([1,0],[1,0]) = 1, cos([0,1],[1,0]) = 0) = 1; D = max(.707, .707) = .707
    # class 1: empty generated memory -> contributes 0, but K = 2
    loss = memory_loss(x0, labels, real, gen, lambda_real=0.002, lambda_gen=0.008)
    assert loss.item() == pytest.approx((0.002 * 1 + 0.008 * S) / 2, abs=1e-12)
    classes, reps, divs = memory_loss_terms(x0, labels, real, gen)
    assert classes == [0, 1]
    assert reps.tolist() == pytest.approx([1.0, 0.0]) and divs.tolist() == pytest.approx([S, 0.0])


def test_dict_banks_equal_list_banks():
    x0, labels, real, gen = case()
    a = memory_loss(x0, labels, real, gen, 0.3, 0.7)
    b = memory_loss(x0, labels, dict(enumerate(real)), {0: gen[0]}, 0.3, 0.7)  # missing key = empty bank
    assert a.item() == pytest.approx(b.item(), abs=1e-15)


def test_empty_memories_and_empty_batch_give_zero():
    x0 = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 1, 2])
    empty = [torch.zeros(0, 3)] * 3
    assert memory_loss(x0, labels, empty, empty, 1.0, 1.0).item() == 0.0
    assert memory_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), empty, empty, 1, 1).item() == 0.0


def test_gradient_pulls_least_similar_pair_and_pushes_most_similar():
    x0, labels, real, gen = case()
    loss = memory_loss(x0, labels, real, gen, lambda_real=1.0, lambda_gen=0.0)
    loss.backward()
    # only the least similar row to the real memory ([0,1]) receives gradient; it is pulled toward [1,0]
    assert x0.grad[0].abs().sum() == 0 and x0.grad[2].abs().sum() == 0
    assert x0.grad[1, 0] < 0  # gradient descent increases x_1's first coordinate
    x0.grad = None
    x1 = torch.tensor([[1.0, 0.2], [0.0, 1]], dtype=torch.float64, requires_grad=True)
    memory_loss(x1, torch.tensor([0, 0]), [real[0]], [torch.tensor([[1.0, 0]], dtype=torch.float64)], 0, 1).backward()
    assert x1.grad[1].abs().sum() == 0  # only the most similar row to the generated memory moves
    # cos([1, y], [1, 0]) = (1 + y^2)^-1/2, d/dy = -y (1 + y^2)^-3/2 < 0 at y = 0.2: descent grows y (pushes away)
    assert x1.grad[0, 1].item() == pytest.approx(-0.2 * (1 + 0.04) ** -1.5)


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x0 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    real = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    gen = [torch.randn(2, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), torch.zeros(0, 4)]
    assert torch.autograd.gradcheck(lambda x: memory_loss(x, labels, real, gen, 0.3, 0.7), (x0,))


def test_authors_accumulation_weights_first_class_k_times():
    x0, labels, real, gen = case()
    gen = [gen[0], torch.tensor([[0.0, 1]], dtype=torch.float64)]
    _, reps, divs = memory_loss_terms(x0, labels, real, gen)
    a = (0.2 * reps + 0.5 * divs) / 2
    assert memory_loss(x0, labels, real, gen, 0.2, 0.5, "authors").item() == pytest.approx((2 * a[0] + a[1]).item())
    assert memory_loss(x0, labels, real, gen, 0.2, 0.5).item() == pytest.approx((a[0] + a[1]).item())
    with pytest.raises(ValueError, match="accumulation"):
        memory_loss(x0, labels, real, gen, 0.2, 0.5, "sum")


def test_dense_terms_equal_the_per_class_reference_in_value_and_gradient():
    from diffdistill.losses import memory_loss_terms_dense
    from diffdistill.memory import MemoryBank

    g = torch.Generator().manual_seed(3)
    real, gen = MemoryBank(4, 5, 6, "fifo", dtype=torch.float64), MemoryBank(4, 5, 6, "fifo", dtype=torch.float64)
    real.push(torch.randn(9, 6, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1]))
    gen.push(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))  # class 2: empty
    x0 = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 1, 0, 3, 2, 1])  # class 3 has no memory at all
    c1, r1, d1 = memory_loss_terms(x0, labels, real, gen)
    c2, r2, d2 = memory_loss_terms_dense(x0, labels, real.rows, real.counts, gen.rows, gen.counts)
    assert c2.tolist() == c1 == [0, 1, 2, 3]
    assert torch.allclose(r1, r2) and torch.allclose(d1, d2)
    (ga,) = torch.autograd.grad((0.3 * r1 + 0.7 * d1).sum(), x0)
    (gb,) = torch.autograd.grad((0.3 * r2 + 0.7 * d2).sum(), x0)
    assert torch.allclose(ga, gb) and ga.abs().sum() > 0


@pytest.mark.parametrize("accumulation", ["per_class", "authors"])
def test_dense_terms_over_padded_slots_combine_like_the_reference(accumulation):
    from diffdistill.losses import combine_terms, memory_loss_terms_dense
    from diffdistill.memory import MemoryBank

    g = torch.Generator().manual_seed(8)
    real, gen = MemoryBank(6, 3, 4, "fifo"), MemoryBank(6, 3, 4, "fifo")
    real.push(torch.randn(12, 4, generator=g), torch.randint(0, 6, (12,), generator=g))
    gen.push(torch.randn(12, 4, generator=g), torch.randint(0, 6, (12,), generator=g))
    x0, labels = torch.randn(5, 4, generator=g), torch.tensor([3, 1, 3, 1, 5])  # 3 classes in 5 slots
    classes, reps, divs = memory_loss_terms_dense(x0, labels, real.rows, real.counts, gen.rows, gen.counts)
    present = classes >= 0
    assert classes.tolist() == [1, 3, 5, -1, -1] and not reps[~present].any() and not divs[~present].any()
    expected = memory_loss(x0, labels, real, gen, 0.3, 0.6, accumulation)
    got = combine_terms(reps, divs, 0.3, 0.6, accumulation, present)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
