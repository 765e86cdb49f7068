"""Per-class memories of latents and the policies that shrink them. Pure tensor code, no I/O.

`select_adaptive` is the paper's self-adaptive rule: while the bank is too large, drop the row whose
similarity vector entry s_i = Σ_j cos(m_i, m_j) (diagonal included) is largest — the most redundant
row — taking the first (oldest) on ties. The similarity matrix is computed once; after each removal the
removed column is subtracted from s, which gives the same selection as recomputing S every time.

Ties are common in exact arithmetic (duplicate rows; any two remaining rows, s = 1 + S_ab for both), and
floating-point rounding would break them arbitrarily. So S is made exactly symmetric with a unit diagonal
and rounded to a fixed grid of 2^-32: every row sum is then exact in float64, whatever the order of
summation, and exact ties really go to the oldest row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Norm floor for cosine similarity: an all-zero row has similarity 0 to everything (itself included).
COSINE_EPS = 1e-12
# Similarities are rounded to multiples of this, so that sums of up to 2^20 of them are exact in float64.
SIMILARITY_GRID = 2.0**-32


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[M, D] × [N, D] -> [M, N] cosine similarities."""
    return F.normalize(a, dim=1, eps=COSINE_EPS) @ F.normalize(b, dim=1, eps=COSINE_EPS).T


def similarity_matrix(bank: Tensor) -> Tensor:
    """[M, D] -> [M, M] float64 cosine similarities: exactly symmetric, diagonal 1 (0 for a zero row),
    on the SIMILARITY_GRID."""
    sim = torch.triu(cosine_matrix(bank, bank).double(), diagonal=1)
    sim = sim + sim.T
    sim.diagonal().copy_((bank.double().norm(dim=1) > COSINE_EPS).double())
    return torch.round(sim / SIMILARITY_GRID) * SIMILARITY_GRID


def select_fifo(bank: Tensor, size: int) -> Tensor:
    """Indices (ascending) of the rows kept when the oldest rows are dropped down to `size`."""
    m = bank.shape[0]
    return torch.arange(max(0, m - size), m, device=bank.device)


def select_adaptive(bank: Tensor, size: int) -> Tensor:
    """Indices (ascending) of the rows kept by the similarity-vector rule (see module doc)."""
    m = bank.shape[0]
    if m <= size:
        return torch.arange(m, device=bank.device)
    sim = similarity_matrix(bank)  # [M, M]
    score = sim.sum(dim=1)  # [M] the similarity vector; exact, so the updates below are too
    alive = torch.ones(m, dtype=torch.bool, device=bank.device)
    removed_score = torch.tensor(-float("inf"), dtype=score.dtype, device=bank.device)
    for _ in range(m - size):
        # argmax returns the first maximal index: ties remove the oldest row
        i = int(torch.where(alive, score, removed_score).argmax())
        alive[i] = False
        score -= sim[:, i]
    return alive.nonzero().squeeze(1)


def select_adaptive_naive(bank: Tensor, size: int) -> Tensor:
    """Reference for tests and benchmarks: recompute the similarity matrix after every removal."""
    keep = torch.arange(bank.shape[0], device=bank.device)
    while keep.numel() > size:
        i = int(similarity_matrix(bank[keep]).sum(dim=1).argmax())
        keep = torch.cat([keep[:i], keep[i + 1 :]])
    return keep


SELECTORS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "adaptive": select_adaptive,
    "fifo": select_fifo,
}


class MemoryBank:
    """Banks of up to `size` rows of dimension `dim` for each of `num_classes` classes, in one tensor.

    Rows of a class are kept in insertion order (oldest first); `bank[c]` is class c's [n, D] view.
    """

    def __init__(
        self,
        num_classes: int,
        size: int,
        dim: int,
        policy: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if policy not in SELECTORS:
            raise ValueError(f"memory policy {policy!r}: expected one of {', '.join(SELECTORS)}")
        self.size, self.policy = size, policy
        self.select = SELECTORS[policy]
        self.rows = torch.zeros(num_classes, size, dim, device=device, dtype=dtype)  # [C, N, D]
        self.counts = torch.zeros(num_classes, dtype=torch.long)  # [C] on CPU: read every step

    def __getitem__(self, c: int) -> Tensor:
        return self.rows[c, : int(self.counts[c])]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, rows: Tensor, labels: Tensor) -> None:
        """Append each class's rows in batch order, then shrink that class's bank to `size`."""
        rows = rows.detach().to(self.rows.dtype).flatten(1)  # [B, D]
        labels = labels.to(self.rows.device)
        for c in torch.unique(labels).tolist():
            merged = torch.cat([self[c], rows[labels == c]])  # [n + B_c, D]
            kept = merged[self.select(merged, self.size)]
            self.rows[c, : kept.shape[0]] = kept
            self.counts[c] = kept.shape[0]

    def state_dict(self) -> dict[str, Tensor]:
        return {"rows": self.rows, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["rows"].shape != self.rows.shape:
            raise ValueError(
                f"memory bank shape {tuple(state['rows'].shape)} does not match {tuple(self.rows.shape)}"
            )
        self.rows.copy_(state["rows"])
        self.counts.copy_(state["counts"])

    def mean_similarity(self) -> float:
        """Mean off-diagonal cosine similarity inside the banks (0 when no bank has two rows)."""
        total, pairs = 0.0, 0
        for c in range(len(self)):
            n = int(self.counts[c])
            if n > 1:
                sim = cosine_matrix(self[c], self[c])
                total += float(sim.sum() - sim.diagonal().sum())
                pairs += n * (n - 1)
        return total / pairs if pairs else 0.0
