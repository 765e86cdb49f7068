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
    """[..., M, D] -> [..., M, M] float64 cosine similarities: exactly symmetric, diagonal 1 (0 for a
    zero row), on the SIMILARITY_GRID."""
    unit = F.normalize(bank, dim=-1, eps=COSINE_EPS)
    sim = torch.triu((unit @ unit.transpose(-1, -2)).double(), diagonal=1)
    sim = sim + sim.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).copy_((bank.double().norm(dim=-1) > COSINE_EPS).double())
    return torch.round(sim / SIMILARITY_GRID) * SIMILARITY_GRID


def adaptive_keep_mask(banks: Tensor, valid: Tensor, size: int) -> Tensor:
    """Batched self-adaptive pruning. banks [K, M, D] with valid [K, M] (valid rows first, padding after)
    -> alive [K, M]: each bank keeps min(#valid, size) rows. Invalid rows must be zero."""
    sim = similarity_matrix(banks)  # [K, M, M]; zero padding rows add nothing to any sum
    score = sim.sum(dim=-1)  # [K, M] similarity vectors
    alive = valid.clone()
    excess = valid.sum(1) - size  # [K] removals each bank needs
    gone = torch.tensor(-float("inf"), dtype=score.dtype, device=score.device)
    for r in range(int(excess.max()) if len(excess) else 0):
        active = (excess > r).nonzero().squeeze(1)  # banks still too large
        # argmax returns the first maximal index: ties remove the oldest row
        i = torch.where(alive[active], score[active], gone).argmax(dim=1)  # [A]
        alive[active, i] = False
        score[active] -= sim[active, :, i]  # drop the removed row's column from each sum
    return alive


def select_fifo(bank: Tensor, size: int) -> Tensor:
    """Indices (ascending) of the rows kept when the oldest rows are dropped down to `size`."""
    m = bank.shape[0]
    return torch.arange(max(0, m - size), m, device=bank.device)


def select_adaptive(bank: Tensor, size: int) -> Tensor:
    """Indices (ascending) of the rows kept by the similarity-vector rule (see module doc)."""
    m = bank.shape[0]
    if m <= size:
        return torch.arange(m, device=bank.device)
    valid = torch.ones(1, m, dtype=torch.bool, device=bank.device)
    return adaptive_keep_mask(bank[None], valid, size)[0].nonzero().squeeze(1)


def select_adaptive_naive(bank: Tensor, size: int) -> Tensor:
    """Reference for tests and benchmarks: recompute the similarity matrix after every removal."""
    keep = torch.arange(bank.shape[0], device=bank.device)
    while keep.numel() > size:
        i = int(similarity_matrix(bank[keep]).sum(dim=1).argmax())
        keep = torch.cat([keep[:i], keep[i + 1 :]])
    return keep


SELECTORS: dict[str, Callable[[Tensor, int], Tensor]] = {"adaptive": select_adaptive, "fifo": select_fifo}


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
        self.rows = torch.zeros(num_classes, size, dim, device=device, dtype=dtype)  # [C, N, D]
        self.counts = torch.zeros(num_classes, dtype=torch.long)  # [C] on CPU: read every step

    def __getitem__(self, c: int) -> Tensor:
        return self.rows[c, : int(self.counts[c])]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, rows: Tensor, labels: Tensor) -> None:
        """Append each class's rows in batch order, then shrink that class's bank to `size`.

        All classes of the batch are handled at once: their banks and new rows are laid out as one padded
        tensor [K, n + B_c, D] and pruned together."""
        rows = rows.detach().to(self.rows.dtype).flatten(1)  # [B, D]
        labels = labels.to(self.rows.device)
        classes, inv = torch.unique(labels, return_inverse=True)  # [K], [B]
        k, n = len(classes), self.counts[classes.cpu()].to(labels.device)  # n: rows held now, [K]
        new = torch.bincount(inv, minlength=k)  # [K] rows arriving
        total = n + new
        width = int(total.max())
        merged = rows.new_zeros(k, width, rows.shape[1])  # [K, M, D]: old rows, then new ones
        held = min(self.size, width)
        merged[:, :held] = self.rows[classes, :held]
        order = torch.argsort(inv, stable=True)  # batch rows grouped by class, batch order kept
        starts = torch.cumsum(new, 0) - new
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(len(inv), device=inv.device) - starts[inv[order]]
        merged[inv, n[inv] + rank] = rows
        pos = torch.arange(width, device=labels.device)
        valid = pos[None] < total[:, None]  # [K, M]
        merged[~valid] = 0
        if self.policy == "fifo":
            alive = valid & (pos[None] >= (total - self.size)[:, None])
        else:
            alive = adaptive_keep_mask(merged, valid, self.size)
        # compact the survivors to the front, keeping their order
        keep_idx = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, : self.size]  # [K, <=N]
        kept = torch.gather(merged, 1, keep_idx[..., None].expand(-1, -1, merged.shape[2]))
        self.rows[classes, : kept.shape[1]] = kept
        self.counts[classes.cpu()] = alive.sum(1).cpu()

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
