import math

import pytest
import torch

from diffdistill.memory import MemoryBank, cosine_matrix, select_adaptive, select_adaptive_naive, select_fifo


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def test_adaptive_hand_computed_case():
    # a=[1,0] b=[0,1] c=[1,0] (duplicate of a) d=[1,1]
    # s = [1+0+1+.707, 0+1+0+.707, 2.707, .707*3+1] -> d (3.121) goes first;
    # then s = [2, 1, 2] -> tie between a and c: the first (oldest), a, goes.
    bank = t([[1, 0], [0, 1], [1, 0], [1, 1]])
    assert select_adaptive(bank, 3).tolist() == [0, 1, 2]
    assert select_adaptive(bank, 2).tolist() == [1, 2]
    assert select_adaptive(bank, 1).tolist() == [2]  # then s = [1, 1]: b (older) goes


def test_adaptive_ties_remove_oldest():
    bank = t([[2, 0], [1, 0], [3, 0]])  # identical directions: every s_i ties
    assert select_adaptive(bank, 2).tolist() == [1, 2]
    assert select_adaptive(bank, 1).tolist() == [2]


def test_adaptive_drops_a_near_duplicate_before_distinct_rows():
    bank = t([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1e-6, 0]])
    kept = select_adaptive(bank, 3).tolist()
    assert kept in ([1, 2, 3], [0, 1, 2])
    assert 1 in kept and 2 in kept  # the distinct rows survive


def test_adaptive_keeps_everything_when_small_or_empty():
    bank = t([[1, 2], [3, 4]])
    assert select_adaptive(bank, 2).tolist() == [0, 1]
    assert select_adaptive(bank, 5).tolist() == [0, 1]
    empty = torch.zeros(0, 4)
    assert select_adaptive(empty, 3).tolist() == []
    assert select_fifo(empty, 3).tolist() == []


def test_zero_rows_have_zero_similarity():
    bank = t([[0, 0], [1, 0], [1, 0]])
    # s = [0, 2, 2]: one of the duplicates goes (the older), the zero row stays
    assert select_adaptive(bank, 2).tolist() == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adaptive_equals_recompute_from_scratch(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        m = int(torch.randint(2, 40, (1,), generator=g))
        size = int(torch.randint(1, m + 1, (1,), generator=g))
        bank = torch.randn(m, 16, generator=g, dtype=torch.float64).to(dtype)
        if trial % 3 == 0:  # plant exact duplicates to exercise ties
            bank[m // 2] = bank[0]
        got, want = select_adaptive(bank, size), select_adaptive_naive(bank, size)
        assert got.tolist() == want.tolist(), (trial, m, size)
        assert got.dtype == torch.long and got.tolist() == sorted(got.tolist())


def test_adaptive_accepts_half_precision():
    bank = torch.randn(10, 8).to(torch.bfloat16)
    assert len(select_adaptive(bank, 6)) == 6


def test_fifo_drops_oldest():
    bank = torch.arange(12.0).view(6, 2)
    assert select_fifo(bank, 4).tolist() == [2, 3, 4, 5]
    assert select_fifo(bank, 6).tolist() == list(range(6))
    assert select_fifo(bank, 9).tolist() == list(range(6))


def test_bank_push_appends_in_batch_order_and_shrinks_per_class():
    bank = MemoryBank(num_classes=3, size=3, dim=2, policy="fifo")
    rows = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]])
    bank.push(rows, torch.tensor([0, 1, 0, 0]))
    assert bank[0].tolist() == [[1, 0], [3, 0], [4, 0]]
    assert bank[1].tolist() == [[2, 0]]
    assert bank[2].shape == (0, 2)
    bank.push(torch.tensor([[5.0, 0], [6, 0]]), torch.tensor([0, 2]))
    assert bank[0].tolist() == [[3, 0], [4, 0], [5, 0]]  # oldest (1) dropped
    assert bank[2].tolist() == [[6, 0]]


def test_bank_adaptive_uses_similarity_vector():
    bank = MemoryBank(num_classes=1, size=2, dim=2, policy="adaptive", dtype=torch.float64)
    bank.push(t([[1, 0], [0, 1], [1, 0], [1, 1]]), torch.tensor([0, 0, 0, 0]))
    assert bank[0].tolist() == [[0, 1], [1, 0]]  # same as the hand-computed case: rows 1 and 2


def test_bank_state_roundtrip_and_similarity():
    bank = MemoryBank(num_classes=2, size=4, dim=3, policy="adaptive")
    bank.push(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 1, 0]))
    other = MemoryBank(num_classes=2, size=4, dim=3, policy="adaptive")
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.rows, bank.rows) and torch.equal(other.counts, bank.counts)
    same = MemoryBank(num_classes=1, size=4, dim=2, policy="fifo")
    same.push(torch.tensor([[1.0, 1], [2, 2]]), torch.tensor([0, 0]))
    assert math.isclose(same.mean_similarity(), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        MemoryBank(3, 4, 3, "fifo").load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="expected one of adaptive, fifo"):
        MemoryBank(1, 1, 1, "lru")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_rows_always_tie_so_the_older_goes(dtype):
    # s_a = 1 + cos(a, b) = s_b exactly: rounding must not decide
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        bank = torch.randn(2, 32, generator=g, dtype=torch.float64).to(dtype) * 10
        assert select_adaptive(bank, 1).tolist() == [1]


@pytest.mark.parametrize("policy", ["adaptive", "fifo"])
def test_batched_push_equals_per_class_reference(policy):
    select = {"adaptive": select_adaptive, "fifo": select_fifo}[policy]
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(num_classes=5, size=6, dim=8, policy=policy, dtype=torch.float64)
    ref = {c: torch.zeros(0, 8, dtype=torch.float64) for c in range(5)}
    for _ in range(12):
        b = int(torch.randint(1, 12, (1,), generator=g))
        rows = torch.randn(b, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (b,), generator=g)
        if b > 3:
            rows[1] = rows[0]  # duplicates in the batch
        bank.push(rows, labels)
        for c in labels.unique().tolist():
            merged = torch.cat([ref[c], rows[labels == c]])
            ref[c] = merged[select(merged, 6)]
        for c in range(5):
            assert torch.equal(bank[c], ref[c])
            assert not bank.rows[c, len(ref[c]):].any()  # rows beyond the count stay zero


def test_half_precision_banks_hold_the_rounded_rows_in_half_the_bytes():
    g = torch.Generator().manual_seed(4)
    rows, labels = torch.randn(40, 16, generator=g), torch.randint(0, 3, (40,), generator=g)
    full, half = MemoryBank(3, 8, 16, "fifo"), MemoryBank(3, 8, 16, "fifo", dtype=torch.float16)
    full.push(rows, labels)
    half.push(rows, labels)
    assert half.rows.dtype == torch.float16 and half.rows.nbytes * 2 == full.rows.nbytes
    assert torch.equal(half.rows, full.rows.half())
    adaptive = MemoryBank(3, 8, 16, "adaptive", dtype=torch.float16)
    adaptive.push(rows, labels)
    for c in range(3):  # same selection as the reference on the rounded rows
        kept = select_adaptive(rows[labels == c].half().double(), 8)
        assert torch.equal(adaptive[c].double(), rows[labels == c].half().double()[kept])


def test_mean_similarity_from_the_cache_equals_the_direct_computation():
    g = torch.Generator().manual_seed(5)
    rows, labels = torch.randn(30, 6, generator=g) + 1, torch.randint(0, 4, (30,), generator=g)
    adaptive, fifo = MemoryBank(4, 5, 6, "adaptive"), MemoryBank(4, 5, 6, "fifo")
    adaptive.push(rows, labels)
    for c in range(4):  # the same rows in a fifo bank: the direct path
        fifo.push(adaptive[c], torch.full((len(adaptive[c]),), c))
    direct = [cosine_matrix(adaptive[c], adaptive[c]) for c in range(4)]
    expected = sum(float(s.sum() - s.diagonal().sum()) for s in direct) / sum(len(s) * (len(s) - 1) for s in direct)
    assert adaptive.mean_similarity() == pytest.approx(expected, abs=1e-6)
    assert fifo.mean_similarity(chunk=3) == pytest.approx(expected, abs=1e-6)


def test_pushing_no_rows_changes_nothing():
    bank = MemoryBank(2, 3, 4, "adaptive")
    bank.push(torch.ones(2, 4), torch.tensor([0, 1]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.push(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())
