"""Per-class memories of latents and the policies that shrink them. Pure tensor code, no I/O.

Two entry points, one rule. `select_adaptive` / `select_fifo` are the public reference functions of the
spec (one bank at a time; METHOD.md); `MemoryBank.push` is the batched path training uses (every class of a
batch at once, cached similarities). Both prune through `adaptive_keep_mask`, and tests hold the bank's
selections equal to the reference functions' and both to an independent exact-arithmetic implementation.

`select_adaptive` is the paper's self-adaptive rule: while the bank is too large, drop the row whose
similarity vector entry s_i = Σ_j cos(m_i, m_j) (diagonal included) is largest — the most redundant
row — taking the first (oldest) on ties. The similarity matrix is computed once; after each removal the
removed column is subtracted from s, which gives the same selection as recomputing S every time.

Ties are common in exact arithmetic (duplicate rows; any two remaining rows, s = 1 + S_ab for both), and
floating-point rounding would break them arbitrarily. So S is made exactly symmetric with a unit diagonal
and rounded to a fixed grid of 2^-32: every row sum is then exact in float64, whatever the order of
summation, and exact ties really go to the oldest row. Similarities are computed in float64 whatever the
bank's dtype, so that a similarity taken from a bank's cache and a fresh one of the same rows agree; values
of s closer than about 1e-9 count as a tie (the grid's resolution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Norm floor for cosine similarity: an all-zero row has similarity 0 to everything (itself included).
COSINE_EPS = 1e-12
# Similarities are rounded to multiples of this, so that sums of up to 2^20 of them are exact in float64.
SIMILARITY_GRID = 2.0**-32


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm (rows with norm <= COSINE_EPS are divided by COSINE_EPS)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[M, D] × [N, D] -> [M, N] cosine similarities."""
    return unit_rows(a) @ unit_rows(b).T


def _on_grid(sim: Tensor, nonzero: Tensor) -> Tensor:
    """float64, exactly symmetric from the upper triangle, diagonal 1 (0 for a zero row), grid-rounded."""
    sim = torch.triu(sim.double(), diagonal=1)
    sim = sim + sim.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).copy_(nonzero.double())
    return torch.round(sim / SIMILARITY_GRID) * SIMILARITY_GRID


def group_by_class(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(classes [K] ascending, inv [B]: each row's class index, rank [B]: its index within its class in
    batch order). Rows can then be laid out as a padded [K, max count, ...] tensor at [inv, rank]."""
    classes, inv = torch.unique(labels, return_inverse=True)
    new = torch.bincount(inv, minlength=len(classes))
    order = torch.argsort(inv, stable=True)  # rows grouped by class, batch order kept
    rank = torch.empty_like(inv)
    rank[order] = torch.arange(len(inv), device=inv.device) - (torch.cumsum(new, 0) - new)[inv[order]]
    return classes, inv, rank


def similarity_matrix(bank: Tensor) -> Tensor:
    """[..., M, D] -> [..., M, M] cosine similarities computed in float64 from the rows' values: exactly
    symmetric, diagonal 1 (0 for a zero row), on the SIMILARITY_GRID."""
    bank = bank.double()
    unit = unit_rows(bank)
    return _on_grid(unit @ unit.transpose(-1, -2), bank.norm(dim=-1) > COSINE_EPS)


def adaptive_keep_mask(sim: Tensor, valid: Tensor, size: int) -> Tensor:
    """Batched self-adaptive pruning. sim [K, M, M] (`similarity_matrix` of each bank) with valid [K, M]
    -> alive [K, M]: each bank keeps min(#valid, size) rows. Invalid rows must have zero similarity."""
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
    """Indices (ascending) of the rows kept by the similarity-vector rule (see module doc). Any float dtype:
    the similarities are computed in float64 from the rows' values."""
    m = bank.shape[0]
    if m <= size:
        return torch.arange(m, device=bank.device)
    valid = torch.ones(1, m, dtype=torch.bool, device=bank.device)
    return adaptive_keep_mask(similarity_matrix(bank[None]), valid, size)[0].nonzero().squeeze(1)


POLICIES = ("adaptive", "fifo")  # the policies a MemoryBank prunes with ("none" = no banks at all)


class MemoryBank:
    """Banks of up to `size` rows of dimension `dim` for each of `num_classes` classes, in one tensor.

    Rows of a class are kept in insertion order (oldest first); `bank[c]` is class c's [n, D] view. The
    adaptive policy also keeps each bank's similarity matrix, so a push computes only the new rows'
    similarities ([n + B_c] × B_c dot products instead of (n + B_c)²). Size: C·N·D rows in `dtype`
    plus C·N² float64 similarities; a push works on the batch's classes only ([K, n + B_c, D] in float32,
    similarities in float64).
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
        if policy not in POLICIES:
            raise ValueError(f"memory policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.size, self.policy = size, policy
        self.rows = torch.zeros(num_classes, size, dim, device=device, dtype=dtype)  # [C, N, D]
        self.counts = torch.zeros(num_classes, dtype=torch.long)  # [C] on CPU: read every step
        gram_size = size if policy == "adaptive" else 0
        self.gram = torch.zeros(num_classes, gram_size, gram_size, device=device, dtype=torch.float64)
        # optional: gathers a push's rows (and labels) from every process, so all hold the same banks
        self.sync: Callable[[Tensor], Tensor] | None = None

    def __getitem__(self, c: int) -> Tensor:
        return self.rows[c, : int(self.counts[c])]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, rows: Tensor, labels: Tensor) -> None:
        """Append each class's rows in batch order, then shrink that class's bank to `size`.

        All classes of the batch are handled at once, as one padded tensor [K, M, D] (K classes in the
        batch, M = the largest bank after the new rows arrive):
          1. round the rows to the storage dtype (so cached similarities are those of the stored rows);
          2. lay out each class's old rows followed by its new ones (`merged`);
          3. mark the rows each bank keeps: the newest `size` (fifo) or the adaptive rule on the
             similarity matrix, whose old-row block comes from the cache (adaptive);
          4. compact the kept rows to the front, in order, and write them back with the new counts;
          5. (adaptive) store the kept rows' similarity matrix as the new cache."""
        # 1. half-precision banks are computed on in float32
        compute = torch.promote_types(self.rows.dtype, torch.float32)
        rows = rows.detach().flatten(1).to(self.rows.dtype).to(compute)  # [B, D]
        labels = labels.to(self.rows.device)
        if self.sync is not None:
            rows, labels = self.sync(rows), self.sync(labels)  # every process's rows, in process order
        if labels.numel() == 0:
            return
        # 2. merged [K, M + 1, D]; one spare all-zero row at index M, onto which dropped slots are compacted
        classes, inv, rank = group_by_class(labels)  # [K], [B], [B]
        k, n = len(classes), self.counts[classes.cpu()].to(labels.device)  # n: rows held now, [K]
        total = n + torch.bincount(inv, minlength=k)  # [K] after the new rows arrive
        width = int(total.max())
        held = min(self.size, width)
        merged = rows.new_zeros(k, width + 1, rows.shape[1])
        merged[:, :held] = self.rows[classes, :held].to(compute)  # rows beyond a count are zero (invariant)
        merged[inv, n[inv] + rank] = rows
        # 3. alive [K, M]
        pos = torch.arange(width, device=labels.device)
        valid = pos[None] < total[:, None]  # [K, M]
        if self.policy == "fifo":
            alive = valid & (pos[None] >= (total - self.size)[:, None])
        else:
            sim = self._similarities(merged[:, :width], rows, classes, inv, n, rank, held)  # [K, M, M]
            sim.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)  # stale cache beyond the counts
            alive = adaptive_keep_mask(sim, valid, self.size)
        # 4. survivors to the front, order kept; the slots left over read the zero row
        keep = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, : self.size]  # [K, <=N]
        count = alive.sum(1)  # [K]
        slots = torch.arange(keep.shape[1], device=keep.device)[None] < count[:, None]
        src = torch.where(slots, keep, width)
        kept = torch.gather(merged, 1, src[..., None].expand(-1, -1, merged.shape[2]))
        self.rows[classes, : kept.shape[1]] = kept.to(self.rows.dtype)
        self.counts[classes.cpu()] = count.cpu()
        # 5. the kept rows' similarities, for the next push
        if self.policy == "adaptive":
            sim = torch.gather(sim, 1, keep[..., None].expand(-1, -1, width))
            self.gram[classes, : keep.shape[1], : keep.shape[1]] = torch.gather(
                sim, 2, keep[:, None, :].expand(-1, keep.shape[1], -1))

    def _similarities(self, merged: Tensor, rows: Tensor, classes: Tensor, inv: Tensor, n: Tensor,
                      rank: Tensor, held: int) -> Tensor:
        """similarity_matrix(merged) with the old rows' block taken from the cache. In float64, like
        `similarity_matrix`: a cached similarity and a fresh one of the same two rows then land on the same
        grid point, so a new copy of a held row ties with it exactly (in float32 they differ by ~1e-7)."""
        merged = merged.double()
        norms = merged.norm(dim=-1)  # [K, M]
        new_pad = merged.new_zeros(len(classes), int(rank.max()) + 1, rows.shape[1])  # [K, Bmax, D]
        new_pad[inv, rank] = unit_rows(rows.double())
        cross = (merged @ new_pad.transpose(1, 2)) / norms.clamp_min(COSINE_EPS)[..., None]  # [K, M, Bmax]
        sim = torch.zeros(merged.shape[0], merged.shape[1], merged.shape[1], dtype=torch.float64,
                          device=merged.device)
        sim[:, :held, :held] = self.gram[classes, :held, :held]
        col = n[inv] + rank  # position of each new row in its class's merged bank
        sim[inv, :, col] = cross[inv, :, rank]
        return _on_grid(sim, norms > COSINE_EPS)  # keeps the upper triangle: (earlier, later) pairs

    def state_dict(self) -> dict[str, Tensor]:
        return {"rows": self.rows, "counts": self.counts, "gram": self.gram}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["rows"].shape != self.rows.shape:
            raise ValueError(
                f"memory bank shape {tuple(state['rows'].shape)} does not match {tuple(self.rows.shape)}"
            )
        self.rows.copy_(state["rows"])
        self.counts.copy_(state["counts"])
        self.gram.copy_(state["gram"])

    def mean_similarity(self, chunk: int = 64) -> float:
        """Mean off-diagonal cosine similarity inside the banks (0 when no bank has two rows). Adaptive banks
        read their cached similarity matrices; others are computed `chunk` classes at a time."""
        valid = torch.arange(self.size)[None] < self.counts[:, None]  # [C, N]
        pairs = (valid[:, :, None] & valid[:, None, :]).to(self.rows.device)  # [C, N, N]
        pairs.diagonal(dim1=1, dim2=2).fill_(False)
        count = int(pairs.sum())
        if count == 0:
            return 0.0
        if self.policy == "adaptive":
            return float((self.gram * pairs).sum()) / count  # entries beyond a bank's count may be stale: masked
        total = 0.0
        compute = torch.promote_types(self.rows.dtype, torch.float32)
        for lo in range(0, len(self), chunk):
            unit = unit_rows(self.rows[lo : lo + chunk].to(compute))  # [c, N, D]
            total += float(((unit @ unit.transpose(1, 2)) * pairs[lo : lo + chunk]).sum())
        return total / count
