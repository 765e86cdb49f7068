import decimal
import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from diffdistill.memory import MemoryBank, select_adaptive, select_fifo, similarity_matrix

# The reference below imports nothing from diffdistill: it is the spec's rule evaluated in 60-digit decimal
# arithmetic from the rows' exact float values, so a bug shared by the code's similarity helpers shows up.
_CTX = decimal.Context(prec=60)
_TIE = Decimal("1e-40")  # far below any real gap between float rows, far above 60-digit rounding


def reference_adaptive(rows: torch.Tensor, size: int) -> list[int]:
    """Indices kept by the spec's rule: cos(a, b) = a·b / (|a||b|), S_ii = 1 (0 for a zero row, which is
    0-similar to everything), s_i = Σ_j S_ij over the kept rows, recomputed every round; the largest s_i goes,
    the first (oldest) on ties."""
    vals = [[Decimal(v) for v in row] for row in rows.double().tolist()]  # float -> Decimal is exact
    m = len(vals)
    with decimal.localcontext(_CTX):
        norms = [sum((v * v for v in row), Decimal(0)).sqrt() for row in vals]
        sim = [[Decimal(0)] * m for _ in range(m)]
        for i in range(m):
            if norms[i]:
                sim[i][i] = Decimal(1)
            for j in range(i + 1, m):
                if norms[i] and norms[j]:
                    dot = sum((a * b for a, b in zip(vals[i], vals[j])), Decimal(0))
                    sim[i][j] = sim[j][i] = dot / (norms[i] * norms[j])
        keep = list(range(m))
        while len(keep) > size:
            s = [sum((sim[i][j] for j in keep), Decimal(0)) for i in keep]  # naive: from scratch every round
            worst = 0
            for k in range(1, len(keep)):
                if s[k] - s[worst] > _TIE:  # strictly larger: an equal later row does not displace the oldest
                    worst = k
            del keep[worst]
    return keep


def random_bank(g: torch.Generator, m: int, dim: int, trial: int) -> torch.Tensor:
    """float64 rows with planted exact ties (duplicates, power-of-two multiples: same direction, exact in
    floating point, zero rows) and near-duplicates (gaps in s that a bfloat16 computation cannot resolve)."""
    bank = torch.randn(m, dim, generator=g, dtype=torch.float64)
    if m > 2 and trial % 3 == 0:
        bank[m // 2] = bank[0]
    if m > 3 and trial % 3 == 1:
        bank[1 + m // 3] = bank[1] + 0.02 * torch.randn(dim, generator=g, dtype=torch.float64)
    if m > 3 and trial % 4 == 1:
        bank[-1] = bank[1] * 4
    if m > 4 and trial % 5 == 2:
        bank[2] = 0
        bank[m - 2] = 0
    return bank


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def test_reference_hand_computed_case():
    # the reference must itself pass the hand-computed cases the code is held to
    bank = t([[1, 0], [0, 1], [1, 0], [1, 1]])
    assert [reference_adaptive(bank, n) for n in (3, 2, 1)] == [[0, 1, 2], [1, 2], [2]]
    assert reference_adaptive(t([[0, 0], [1, 0], [1, 0]]), 2) == [0, 2]
    assert reference_adaptive(t([[2, 0], [1, 0], [3, 0]]), 1) == [2]


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
def test_adaptive_equals_the_decimal_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        m = int(torch.randint(2, 24, (1,), generator=g))
        size = int(torch.randint(1, m + 1, (1,), generator=g))
        bank = random_bank(g, m, 12, trial).to(dtype)
        got = select_adaptive(bank, size)
        assert got.dtype == torch.long
        assert got.tolist() == reference_adaptive(bank, size), (trial, m, size)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_adaptive_on_half_precision_equals_the_rounded_values_in_full_precision(half):
    g = torch.Generator().manual_seed(6)
    for trial in range(15):
        m = int(torch.randint(3, 16, (1,), generator=g))
        size = int(torch.randint(1, m, (1,), generator=g))
        bank = random_bank(g, m, 8, trial).to(half)
        got = select_adaptive(bank, size).tolist()
        # compared in float32: the same selection as the rounded values given in float32 or float64
        assert got == select_adaptive(bank.float(), size).tolist() == select_adaptive(bank.double(), size).tolist()
        assert got == reference_adaptive(bank, size), (trial, m, size)


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


def push_reference(policy: str, held: list[list[float]], new: list[list[float]], size: int) -> list[list[float]]:
    """A class's bank after a push, as plain lists: fifo keeps the newest `size`, adaptive the reference."""
    merged = held + new
    if policy == "fifo":
        return merged[max(0, len(merged) - size) :]
    return [merged[i] for i in reference_adaptive(torch.tensor(merged, dtype=torch.float64), size)]


@pytest.mark.parametrize("policy", ["adaptive", "fifo"])
def test_batched_push_equals_per_class_reference(policy):
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(num_classes=5, size=6, dim=8, policy=policy, dtype=torch.float64)
    bounded = MemoryBank(num_classes=5, size=6, dim=8, policy=policy, dtype=torch.float64)  # told `most`
    ref: dict[int, list[list[float]]] = {c: [] for c in range(5)}
    for step in range(12):
        b = int(torch.randint(1, 12, (1,), generator=g))
        rows = torch.randn(b, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (b,), generator=g)
        if b > 3:
            rows[1] = rows[0]  # duplicates in the batch
        if step % 2 and ref[int(labels[0])]:  # a copy of a held row: a tie between cached and new similarities
            rows[0] = torch.tensor(ref[int(labels[0])][0], dtype=torch.float64)
        bank.push(rows, labels)
        bounded.push(rows, labels, most=int(torch.bincount(labels).max()))
        for c in labels.unique().tolist():
            ref[c] = push_reference(policy, ref[c], rows[labels == c].tolist(), 6)
        assert all(torch.equal(a, b) for a, b in zip(bank.state_dict().values(), bounded.state_dict().values()))
        for c in range(5):
            assert bank[c].tolist() == ref[c], (step, c)
            assert not bank.rows[c, len(ref[c]) :].any()  # rows beyond the count stay zero


def test_half_precision_banks_hold_the_rounded_rows_in_half_the_bytes():
    g = torch.Generator().manual_seed(4)
    rows, labels = torch.randn(40, 16, generator=g), torch.randint(0, 3, (40,), generator=g)
    full, half = MemoryBank(3, 8, 16, "fifo"), MemoryBank(3, 8, 16, "fifo", dtype=torch.float16)
    full.push(rows, labels)
    half.push(rows, labels)
    assert half.rows.dtype == torch.float16 and half.rows.nbytes * 2 == full.rows.nbytes
    assert torch.equal(half.rows, full.rows.half())


def test_float16_adaptive_bank_selects_like_the_reference_on_the_rounded_rows():
    g = torch.Generator().manual_seed(7)
    bank = MemoryBank(3, 6, 8, "adaptive", dtype=torch.float16)
    ref: dict[int, list[list[float]]] = {c: [] for c in range(3)}
    for _ in range(4):  # several pushes: later ones read the cached similarities of the stored rows
        rows, labels = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
        rows[5] = rows[2]  # duplicates within a push (copies of held rows: see the known disagreement below)
        # distinct in float32, equal once stored in float16 (each entry moves < half a float16 step): the tie
        # (the older goes) exists only if the similarities are those of the stored, rounded rows
        rows[2] = rows[2].half().float()
        rows[8], labels[8] = rows[2] + rows[2].abs() * 2**-13 * torch.randn(8, generator=g).sign(), labels[2]
        assert not torch.equal(rows[8], rows[2]) and torch.equal(rows[8].half(), rows[2].half())
        bank.push(rows, labels)
        rounded = rows.half().double()  # the values the bank stores
        for c in labels.unique().tolist():
            ref[c] = push_reference("adaptive", ref[c], rounded[labels == c].tolist(), 6)
        for c in range(3):
            assert bank[c].double().tolist() == ref[c]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        # float32/float16 banks: the cached similarities of the held row and the copy's fresh ones must round
        # alike (they are computed in float64; in float32 their ~1e-7 error let rounding, not age, decide)
        torch.float32,
        torch.float16,
    ],
)
def test_a_copy_of_a_held_row_ties_with_it_so_the_held_row_goes(dtype):
    # [a, b] held, then a again: s = [2 + S_ab, 1 + 2 S_ab, 2 + S_ab], so the spec drops the held a -> [b, a]
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        a, b = torch.randn(2, 8, generator=g, dtype=torch.float64).to(dtype)
        bank = MemoryBank(1, 2, 8, "adaptive", dtype=dtype)
        bank.push(torch.stack([a, b]), torch.tensor([0, 0]))
        bank.push(a[None], torch.tensor([0]))
        assert torch.equal(bank[0], torch.stack([b, a]))


def test_mean_similarity_from_the_cache_equals_the_direct_computation():
    g = torch.Generator().manual_seed(5)
    rows, labels = torch.randn(30, 6, generator=g) + 1, torch.randint(0, 4, (30,), generator=g)
    adaptive, fifo = MemoryBank(4, 5, 6, "adaptive"), MemoryBank(4, 5, 6, "fifo")
    adaptive.push(rows, labels)
    for c in range(4):  # the same rows in a fifo bank: the direct path
        fifo.push(adaptive[c], torch.full((len(adaptive[c]),), c))
    total, pairs = 0.0, 0
    for c in range(4):  # plain numpy: mean cos(a, b) over ordered pairs of distinct rows of one bank
        a = adaptive[c].double().numpy()
        cos = (a @ a.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(a, axis=1))
        total += cos.sum() - np.trace(cos)
        pairs += len(a) * (len(a) - 1)
    assert pairs > 0
    assert adaptive.mean_similarity() == pytest.approx(total / pairs, abs=1e-6)
    assert fifo.mean_similarity(chunk=3) == pytest.approx(total / pairs, abs=1e-6)


def test_pushing_no_rows_changes_nothing():
    bank = MemoryBank(2, 3, 4, "adaptive")
    bank.push(torch.ones(2, 4), torch.tensor([0, 1]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.push(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())


def test_class_slots_lay_out_the_batch_in_fixed_slots():
    from diffdistill.memory import class_slots

    classes, inv, rank = class_slots(torch.tensor([4, 1, 4, 7, 1, 4]), 5)
    assert classes.tolist() == [1, 4, 7, -1, -1]  # ascending, then unused slots
    assert inv.tolist() == [1, 0, 1, 2, 0, 1]
    assert rank.tolist() == [0, 0, 1, 0, 1, 2]  # batch order within each class


def test_push_with_an_accept_mask_equals_pushing_the_accepted_rows():
    """Also when told the batch's largest class (as the training loop counts it, rejected rows included): the
    rejected rows, more of them than that bound, all go to the spare row and change no class."""
    g = torch.Generator().manual_seed(6)
    for policy in ("adaptive", "fifo"):
        banks = {k: MemoryBank(3, 4, 5, policy) for k in ("masked", "told", "subset")}
        rejected_beyond_bound = 0
        for _ in range(6):
            rows, labels = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
            accept = torch.rand(12, generator=g) < 0.5
            most = int(torch.bincount(labels).max())
            rejected_beyond_bound += int((~accept).sum()) > most
            banks["masked"].push(rows, labels, accept)
            banks["told"].push(rows, labels, accept, most=most)
            banks["subset"].push(rows[accept], labels[accept])
        states = [b.state_dict().values() for b in banks.values()]
        assert all(torch.equal(a, b) for a, b in zip(states[0], states[2]))
        assert all(torch.equal(a, b) for a, b in zip(states[1], states[2]))
        assert banks["subset"].counts.sum() > 0 and rejected_beyond_bound


def test_the_cached_similarities_are_those_of_the_held_rows():
    """The adaptive bank's cache (held block kept, new blocks computed and mirrored at each push) equals a fresh
    similarity_matrix of the rows it holds, bit for bit, duplicates and zero rows included."""
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(4, 6, 5, "adaptive")
    for step in range(25):
        rows = torch.randn(7, 5, generator=g)
        rows[0] = 0.0 if step % 5 == 0 else rows[0]
        rows[1] = rows[2] if step % 3 == 0 else rows[1]  # a duplicate in the batch
        bank.push(rows, torch.randint(0, 4, (7,), generator=g))
        for c in range(4):
            n = int(bank.counts[c])
            assert torch.equal(bank.gram[c, :n, :n], similarity_matrix(bank[c][None])[0])


def test_a_push_runs_as_many_pruning_rounds_as_the_largest_class_of_the_batch_when_told(monkeypatch):
    """`most` bounds the adaptive rule's rounds (one per row of the batch otherwise); with `sync` set, other
    processes' rows arrive too, so it is not trusted."""
    import diffdistill.memory as memory

    rounds, keep_mask = [], memory.adaptive_keep_mask
    monkeypatch.setattr(memory, "adaptive_keep_mask", lambda *a: rounds.append(a[3]) or keep_mask(*a))
    bank = MemoryBank(3, 2, 4, "adaptive")
    rows, labels = torch.randn(7, 4), torch.tensor([0, 2, 2, 1, 2, 0, 2])
    bank.push(rows, labels)
    bank.push(rows, labels, most=4)
    bank.sync = lambda x: x
    bank.push(rows, labels, most=4)
    assert rounds == [7, 4, 7]
