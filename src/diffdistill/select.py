"""Pure: pick k representative points of a class from its feature rows (coreset baselines and the modes of
mode guidance / prototype starts). Euclidean distance; ties go to the lowest index.

- `herding` (Welling 2009, as in iCaRL): greedy without repeats; each step adds the point that brings the
  mean of the chosen points closest to the mean of all points.
- `kcenter`: greedy k-center; first the point nearest the mean, then each step the point farthest from its
  nearest chosen point.
- `kmeans`: Lloyd's algorithm from a seeded k-means++ start; `nearest` maps centroids to real points.
- `herd_slots`: herding with one pick per slot among that slot's candidates (the sample stage's
  `sample.candidates`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _check(x: Tensor, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected points [N, D], got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k = {k} points requested from {x.shape[0]}")


def _argmin(values: Tensor) -> int:
    """Index of the smallest value; the lowest index among exact ties (torch.argmin does not promise it)."""
    return int((values == values.min()).nonzero()[0, 0])


def herding(x: Tensor, k: int, target: Tensor | None = None) -> Tensor:
    """Indices [k] of x [N, D] in selection order; the running mean tracks `target` [D] (default: x's mean)."""
    _check(x, k)
    x = x.double()
    mu = x.mean(0) if target is None else target.double().to(x.device)  # [D]
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for step in range(1, k + 1):
        # distance of the new mean (total + x_i) / step to mu, for every candidate i
        dist = ((total + x) / step - mu).pow(2).sum(1).masked_fill(taken, float("inf"))  # [N]
        i = _argmin(dist)
        chosen.append(i)
        taken[i] = True
        total += x[i]
    return torch.tensor(chosen, dtype=torch.long)


def herd_slots(x: Tensor, target: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Per slot the index of the candidate kept [S], for candidates x [S, K, D]: slot i keeps the candidate that
    brings the mean of the kept points of slots 0..i closest to `target` [D] (so a slot's pick depends on the
    slots before it only: the first j picks are the same for any S ≥ j). `allowed` [S, K] (bool): a slot
    with any allowed candidate picks among those. Ties go to the lowest index."""
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"expected candidates [S, K, D] with K >= 1, got shape {tuple(x.shape)}")
    x, mu = x.double(), target.double().to(x.device)
    total, picks = torch.zeros_like(mu), []
    for i, row in enumerate(x):  # row [K, D]
        dist = ((total + row) / (i + 1) - mu).pow(2).sum(1)  # [K]
        if allowed is not None and allowed[i].any():
            dist = dist.masked_fill(~allowed[i].to(dist.device), float("inf"))
        j = _argmin(dist)
        picks.append(j)
        total += row[j]
    return torch.tensor(picks, dtype=torch.long)


def kcenter(x: Tensor, k: int) -> Tensor:
    """Indices [k] of x [N, D] in selection order."""
    _check(x, k)
    x = x.double()
    first = _argmin((x - x.mean(0)).pow(2).sum(1))
    chosen = [first]
    nearest = (x - x[first]).pow(2).sum(1)  # [N] squared distance to the nearest chosen point
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    taken[first] = True
    for _ in range(k - 1):
        i = _argmin((-nearest).masked_fill(taken, float("inf")))  # farthest untaken point; lowest index on ties
        chosen.append(i)
        taken[i] = True
        nearest = torch.minimum(nearest, (x - x[i]).pow(2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)


def _sq_distances(x: Tensor, c: Tensor) -> Tensor:
    """[N, k] squared distances, as matrix products in float64: no atomics and no TF32, so a device gives
    the same assignment every time (cdist and index_add_ do not promise that on a GPU)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0)


def kmeans(x: Tensor, k: int, seed: int, iters: int = 100) -> tuple[Tensor, Tensor]:
    """(centroids [k, D], assignment [N]) of x [N, D]: k-means++ start drawn from `seed`, then Lloyd
    iterations until the assignment stops changing (at most `iters`). Runs on x's device in float64
    (deterministic there); an empty cluster keeps its centroid. Centroids come back in x's dtype."""
    _check(x, k)
    gen = torch.Generator().manual_seed(seed)
    xd = x.double()
    n = xd.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    picked = [first]
    d2 = (xd - xd[first]).pow(2).sum(1)  # [N] squared distance to the nearest picked point
    for _ in range(k - 1):
        weights = d2.clamp_min(0).cpu()
        if weights.sum() > 0:
            i = int(torch.multinomial(weights, 1, generator=gen))
        else:  # every point coincides with a picked one: the lowest-index point not picked yet
            i = next(j for j in range(n) if j not in picked)
        picked.append(i)
        d2 = torch.minimum(d2, (xd - xd[i]).pow(2).sum(1))
    c = xd[picked]  # [k, D]
    assign = torch.full((n,), -1, dtype=torch.long, device=xd.device)
    for _ in range(iters):
        new = _sq_distances(xd, c).argmin(1)  # [N]
        if torch.equal(new, assign):
            break
        assign = new
        onehot = torch.nn.functional.one_hot(assign, k).to(xd.dtype)  # [N, k]
        counts = onehot.sum(0)  # [k]
        c = torch.where(counts[:, None] > 0, (onehot.T @ xd) / counts.clamp_min(1)[:, None], c)
    return c.to(x.dtype), assign


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """For each centroid [k, D] the index of its nearest point of x [N, D] (ties: lowest index); a point
    already taken by an earlier centroid is skipped, so the k indices are distinct."""
    d = _sq_distances(centroids.double(), x.double())  # [k, N]
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    out = []
    for row in d:
        i = _argmin(row.masked_fill(taken, float("inf")))
        out.append(i)
        taken[i] = True
    return torch.tensor(out, dtype=torch.long)


def _random(x: Tensor, k: int, seed: int) -> Tensor:
    _check(x, k)
    return torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]


# name -> (points [N, D], k, seed) -> k distinct row indices
SELECTORS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "random": _random,
    "herding": lambda x, k, seed: herding(x, k),
    "kcenter": lambda x, k, seed: kcenter(x, k),
    "kmeans": lambda x, k, seed: nearest(x, kmeans(x, k, seed)[0]),
}
# selections whose first k of a larger selection are the selection for k (one set serves every IPC)
PREFIX_STABLE = ("herding", "kcenter")
