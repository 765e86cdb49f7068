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
# What a removed row's similarity vector entry drops by: far below any live row's (|s_i| <= M <= 2^20) and a
# multiple of the grid, so live sums stay exact.
REMOVED = 2.0**40


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm (rows with norm <= COSINE_EPS are divided by COSINE_EPS)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[M, D] × [N, D] -> [M, N] cosine similarities."""
    return unit_rows(a) @ unit_rows(b).T


def _to_grid(x: Tensor) -> Tensor:
    return torch.round(x / SIMILARITY_GRID) * SIMILARITY_GRID


def _on_grid(sim: Tensor, nonzero: Tensor) -> Tensor:
    """float64, exactly symmetric from the upper triangle, diagonal 1 (0 for a zero row), grid-rounded."""
    sim = torch.triu(sim.double(), diagonal=1)
    sim = sim + sim.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).copy_(nonzero.double())
    return _to_grid(sim)


def class_slots(labels: Tensor, slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's classes in `slots` fixed slots, with no host synchronization (no unique, no data-dependent
    shapes): (classes [S]: the distinct labels ascending, then -1 for unused slots; inv [B]: each row's slot;
    rank [B]: its index among its class's rows in batch order). `slots` must be at least the number of distinct
    labels (min(B, number of classes) always is)."""
    b, device = labels.shape[0], labels.device
    ordered, order = torch.sort(labels, stable=True)  # [B]
    first = torch.ones(b, dtype=torch.bool, device=device)  # [B] the first sorted row of each class
    first[1:] = ordered[1:] != ordered[:-1]
    slot = torch.cumsum(first, 0) - 1  # [B] slot of each sorted row
    pos = torch.arange(b, device=device)
    start = torch.cummax(torch.where(first, pos, 0), 0).values  # [B] where the sorted row's class begins
    inv = torch.empty_like(slot).scatter_(0, order, slot)
    rank = torch.empty_like(slot).scatter_(0, order, pos - start)
    classes = torch.full((slots,), -1, dtype=labels.dtype, device=device).scatter_(0, slot, ordered)
    return classes, inv, rank


def similarity_matrix(bank: Tensor) -> Tensor:
    """[..., M, D] -> [..., M, M] cosine similarities computed in float64 from the rows' values: exactly
    symmetric, diagonal 1 (0 for a zero row), on the SIMILARITY_GRID."""
    bank = bank.double()
    unit = unit_rows(bank)
    return _on_grid(unit @ unit.transpose(-1, -2), bank.norm(dim=-1) > COSINE_EPS)


def adaptive_keep_mask(sim: Tensor, valid: Tensor, size: int, rounds: int) -> Tensor:
    """Batched self-adaptive pruning. sim [K, M, M] (`similarity_matrix` of each bank) with valid [K, M]
    -> alive [K, M]: each bank keeps min(#valid, size) rows. Invalid rows must have zero similarity.

    `rounds` is a bound on the removals any bank needs (a push of b rows into banks held at <= size needs at
    most b), so the loop runs a fixed number of times and never reads a count back from the device; a round
    changes nothing in a bank that is already small enough. `sim` is used in place and restored."""
    k, m = valid.shape
    score = torch.where(valid, sim.sum(dim=-1), -torch.inf)  # [K, M] similarity vectors; -inf: not a row
    excess = valid.sum(1) - size  # [K] removals each bank needs
    scale = -(excess[None] > torch.arange(rounds, device=sim.device)[:, None]).to(score.dtype)  # [R, K]
    # A removal subtracts the removed row's column from every sum (exact on the grid). With the diagonal
    # raised to REMOVED the same subtraction also sinks the removed row's own sum below any live row's, so a
    # round is four operations. scale -1: bank k removes in round r; 0: it is done (0 · REMOVED = 0)
    diagonal = sim.diagonal(dim1=-2, dim2=-1)  # [K, M] a view
    kept_diagonal = diagonal.clone()
    diagonal.fill_(REMOVED)
    columns = sim.view(k * m, m)  # row i of bank k (= its column, symmetric) at k·M + i
    first = torch.arange(k, device=sim.device) * m  # [K]
    for r_scale in scale[..., None].unbind(0):  # [K, 1] each
        i = score.argmax(dim=1)  # [K] the first maximal index: ties remove the oldest row
        score.addcmul_(columns.index_select(0, first + i), r_scale)
    diagonal.copy_(kept_diagonal)
    return score > -REMOVED / 2


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
    return adaptive_keep_mask(similarity_matrix(bank[None]), valid, size, m - size)[0].nonzero().squeeze(1)


def plan_push(banks: Tensor, counts: Tensor, gram: Tensor, rows: Tensor, labels: Tensor, policy: str,
              most: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The state a push leaves in the banks it touches, not yet written: a function of fixed shapes with no
    host reads, so that torch.compile can make one graph of it (`MemoryBank.compile`).

    banks [C + 1, N, D] (row C: the spare, which takes rows not pushed), counts [C + 1], gram [C + 1, N, N] (the
    cached similarities; adaptive only), rows [B, D] (rounded to the banks' dtype, in the compute dtype),
    labels [B] -> (dest [S]: the bank row of each slot, kept [S, N, D]: its rows, count [S], gram [S, N, N] or
    None for fifo). `most` (R): a bound on the rows any one class has in the batch (B when unknown): each slot
    has room for R new rows, and the adaptive rule runs R rounds (`adaptive_keep_mask`: a push into a bank held
    at <= N removes at most as many rows as arrive). The spare's rows beyond R share its last position.

    All classes of the batch are handled at once. Each of S = min(B, C + 1) slots holds one class: its N held
    rows at candidate positions 0..N-1 (valid below its count), then its new rows at N + their rank among the
    class's rows of the batch, so position order is insertion order (W = N + R candidates):
      1. lay out the slots: held counts, arriving counts, the valid candidates [S, W];
      2. mark the rows each bank keeps: the newest N (fifo) or the adaptive rule on the candidates' similarity
         matrix, whose held block comes from the cache (adaptive);
      3. compact the kept rows to the front, in order; the rows left over are zero;
      4. (adaptive) the kept rows' similarity matrix, the next push's cache."""
    # 1. slots [S]; candidates [S, W]
    b, size, spare = labels.shape[0], banks.shape[1], banks.shape[0] - 1
    classes, inv, rank = class_slots(labels, min(b, spare + 1))  # [S], [B], [B]
    dest = torch.where(classes >= 0, classes, spare)  # [S] the bank row each slot reads and writes
    s = classes.shape[0]
    held = torch.where(classes >= 0, counts[dest], 0)  # [S] rows held now
    arriving = torch.zeros_like(held).index_add_(0, inv, torch.ones_like(inv)).clamp_max(most)  # [S]
    rank = rank.clamp_max(most - 1)  # [B] changes only the spare's rows (rejected ones), which nothing reads
    pos = torch.arange(size + most, device=labels.device)[None]  # [1, W]
    valid = (pos < held[:, None]) | ((pos >= size) & (pos < size + arriving[:, None]))  # [S, W]
    old = banks[dest].to(rows.dtype)  # [S, N, D] rows beyond a count are zero (invariant)
    # 2. alive [S, W]
    if policy == "fifo":
        alive = valid & (torch.cumsum(valid, 1) > (held + arriving - size)[:, None])  # all but the oldest excess
    else:
        sim = _candidate_similarities(old, rows, gram[dest], inv, rank, most)  # [S, W, W]
        sim.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)  # stale cache beyond the counts
        alive = adaptive_keep_mask(sim, valid, size, most)
    # 3. survivors to the front, order kept; the slots left over read a zero row. Sources, flat: the held rows
    # (slot k's row p at k·N + p), then the batch's rows, then one zero row
    table = torch.cat([old.reshape(s * size, -1), rows, rows.new_zeros(1, rows.shape[1])])  # [S·N + B + 1, D]
    at_new = torch.full((s, most), s * size + b, dtype=torch.long, device=labels.device)  # [S, R]
    at_new[inv, rank] = s * size + torch.arange(b, device=labels.device)
    slot = torch.arange(s, device=labels.device)[:, None]  # [S, 1]
    source = torch.cat([slot * size + pos[:, :size], at_new], 1)  # [S, W]
    keep = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :size]  # [S, N] candidate positions
    count = alive.sum(1)  # [S]
    filled = pos[:, :size] < count[:, None]  # [S, N]
    kept = table[torch.where(filled, torch.gather(source, 1, keep), s * size + b)].to(banks.dtype)  # [S, N, D]
    if policy == "fifo":
        return dest, kept, count, None
    # 4. the kept rows' similarities, for the next push (two gathers: faster than one 3-index lookup)
    sim = torch.gather(sim, 1, keep[..., None].expand(-1, -1, sim.shape[-1]))  # [S, N, W]
    return dest, kept, count, torch.gather(sim, 2, keep[:, None, :].expand(-1, size, -1))


def _candidate_similarities(old: Tensor, rows: Tensor, cached: Tensor, inv: Tensor, rank: Tensor,
                            most: int) -> Tensor:
    """similarity_matrix of each slot's candidates [S, W, W] (W = N + R: held rows, then new rows at N + rank,
    rank < R), the held block taken from the cache [S, N, N]. In float64, like `similarity_matrix`: a cached similarity
    and a fresh one of the same two rows then land on the same grid point, so a new copy of a held row ties
    with it exactly (in float32 they differ by ~1e-7)."""
    (s, size, _), b = old.shape, rows.shape[0]
    old, new = old.double(), rows.double()  # [S, N, D], [B, D]
    unit_new = unit_rows(new)
    old_norms, new_norms = old.norm(dim=-1), new.norm(dim=-1)  # [S, N], [B]
    sim = old.new_zeros(s + 1, size + most, size + most)  # slot S: a sink for pairs of rows of different slots
    sim[:s, :size, :size] = cached  # on the grid, symmetric, its diagonal set
    col = size + rank  # [B] each new row's position in its slot
    # held row p of slot k vs each new row of k: (held · unit(new)) / |held|, as in similarity_matrix; the held
    # row comes first, so this is the (earlier, later) value, mirrored
    cross = (old @ unit_new.T) / old_norms.clamp_min(COSINE_EPS)[..., None]  # [S, N, B]
    own = _to_grid(cross[inv, :, torch.arange(b, device=rows.device)])  # [B, N]
    sim[inv, :size, col] = own
    sim[inv, col, :size] = own
    # new row i vs new row j of the same slot: the (earlier, later) value, mirrored; the diagonal 1 (0 for a zero
    # row); pairs of different slots land in the sink
    pair = (new @ unit_new.T) / new_norms.clamp_min(COSINE_EPS)[:, None]  # [B, B]
    pair = torch.where(rank[:, None] < rank[None, :], pair, pair.T)
    pair.diagonal().copy_(new_norms > COSINE_EPS)
    into = torch.where(inv[:, None] == inv[None, :], inv[:, None], s)  # [B, B]
    sim[into, col[:, None], col[None, :]] = _to_grid(pair)
    return sim[:s]


POLICIES = ("adaptive", "fifo")  # the policies a MemoryBank prunes with ("none" = no banks at all)


class MemoryBank:
    """Banks of up to `size` rows of dimension `dim` for each of `num_classes` classes, in one tensor.

    Rows of a class are kept in insertion order (oldest first); `bank[c]` is class c's [n, D] view. The
    adaptive policy also keeps each bank's similarity matrix, so a push computes only the new rows'
    similarities ([n + B_c] × B_c dot products instead of (n + B_c)²). Size: C·N·D rows in `dtype`
    plus C·N² float64 similarities.

    A push never reads anything back from the device: counts live on the bank's device, the batch's classes
    take fixed slots (`class_slots`), every shape depends on the batch size (or the caller's bound on its
    largest class) alone, and the adaptive rule runs a fixed number of rounds. One extra class row (index C,
    "spare") receives what empty slots and rejected rows write, so writes need no masks; it is never read as a
    class.
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
        self.size, self.policy, self.spare = size, policy, num_classes
        gram_size = size if policy == "adaptive" else 0
        self._rows = torch.zeros(num_classes + 1, size, dim, device=device, dtype=dtype)  # [C + 1, N, D]
        self._counts = torch.zeros(num_classes + 1, dtype=torch.long, device=device)  # [C + 1]
        self._gram = torch.zeros(num_classes + 1, gram_size, gram_size, device=device, dtype=torch.float64)
        self.rows, self.counts, self.gram = self._rows[:-1], self._counts[:-1], self._gram[:-1]  # the classes' views
        # optional: gathers a push's rows (and labels) from every process, so all hold the same banks
        self.sync: Callable[[Tensor], Tensor] | None = None
        self._plan, self.compiled = plan_push, False

    def __getitem__(self, c: int) -> Tensor:
        return self.rows[c, : int(self.counts[c])]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def compile(self, mode: str | None = None) -> None:
        """Run each push's work (`plan_push`) through torch.compile: one graph per batch size; with mode
        "reduce-overhead" a CUDA graph, so that a push is a few launches instead of a few hundred. The banks are
        marked as static addresses (a CUDA graph reads them in place instead of copying them in), and a push
        always makes room for B new rows per class and runs B rounds (one graph, not one per `most`): the same
        selections."""
        for state in (self._rows, self._counts, self._gram, self.rows, self.counts, self.gram):
            torch._dynamo.mark_static_address(state)  # the loss terms read the classes' views
        self._plan, self.compiled = torch.compile(plan_push, mode=mode, dynamic=False), True

    @torch.no_grad()
    def push(self, rows: Tensor, labels: Tensor, accept: Tensor | None = None, most: int | None = None) -> None:
        """Append each class's rows in batch order, then shrink that class's bank to `size` (`plan_push`).
        `accept` [B] (optional, bool): only those rows are pushed. `most` (optional): the most rows any one
        class has in `labels`, if the caller knows it without asking the device (the training loop counts the
        labels on the host before they cross); each class then has room for that many new rows instead of B and
        the adaptive rule runs that many rounds. It must not be less than the true count (rows not accepted need
        not count: they all go to the spare row, which is never read); it is ignored with `sync` (other
        processes' rows arrive too)."""
        compute = torch.promote_types(self.rows.dtype, torch.float32)  # half-precision banks: computed in fp32
        rows = rows.detach().flatten(1).to(self.rows.dtype).to(compute)  # [B, D] rounded to the storage dtype
        labels = labels.to(self._rows.device)
        if accept is not None:  # rejected rows go to the spare row
            labels = torch.where(accept.to(labels.device), labels, self.spare)
        if self.sync is not None:
            rows, labels = self.sync(rows), self.sync(labels)  # every process's rows, in process order
        if labels.numel() == 0:
            return
        b = labels.shape[0]
        most = b if most is None or self.sync is not None or self.compiled else max(1, min(most, b))
        dest, kept, count, gram = self._plan(self._rows, self._counts, self._gram, rows, labels, self.policy, most)
        self._rows[dest] = kept
        self._counts[dest] = count
        if gram is not None:
            self._gram[dest] = gram

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
        valid = torch.arange(self.size, device=self.counts.device)[None] < self.counts[:, None]  # [C, N]
        pairs = valid[:, :, None] & valid[:, None, :]  # [C, N, N]
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
