"""How diverse and how representative a sample set is, measured against real data in a feature space.
Pure functions of feature tensors [N, F] (no I/O), and the fidelity goal, of plain numbers.

- diversity: mean pairwise cosine distance 1 − cos(f_i, f_j) over pairs i < j inside a set.
- precision / recall (Kynkäänniemi et al. 2019): each real point's ball reaches its k-th nearest real
  neighbour; precision = share of fake points inside some real ball. Recall swaps the roles (balls of
  the fake points, share of real points inside one).
- density / coverage (Naeem et al. 2020): density = Σ_fake #(real balls containing it) / (k · #fake),
  ~1 when fake matches real, can exceed 1; coverage = share of real balls that contain a fake point.
- mean distance (representativeness): ‖mean(fake) − mean(real)‖₂.
- a fake point that is a real point of the reference (a random real subset, a real-image coreset, a copied
  train image: its nearest real point within SAME_POINT × that point's radius) is not credited with that
  point's ball, nor that real point with the fake point's ball, which each would otherwise lie in by
  construction (precision 1.0 for any real subset). The other balls keep their radii; a duplicate of the
  image in the real set keeps its own.
- DD-Ranking scores (accuracies as fractions): IOR = acc_distilled − acc_random_real,
  HLR = acc_full − acc_distilled, LRS = (e^(λ·IOR − (1−λ)·HLR) − e^−1) / (e − e^−1), λ = 0.5.
- fidelity goal: the share (%) of samples a classifier trained on real images should assign their class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# what the check, the training loop and the report call a good generator
FIDELITY_GOAL = 97.0


def fidelity_goal(real_accuracy: float | None) -> float:
    """FIDELITY_GOAL, or the classifier's own accuracy on real val images where that is lower (a classifier that
    misses that share of real images cannot show that a generator falls short of them)."""
    return FIDELITY_GOAL if real_accuracy is None else min(FIDELITY_GOAL, real_accuracy)


def goal_number(goal: float) -> str:
    """97.0 -> '97', 93.44 -> '93.4': a goal as the terminal and report.md print it."""
    return f"{goal:.1f}".removesuffix(".0")


def diversity(x: Tensor) -> float | None:
    """Mean pairwise cosine distance of the rows of x [N, F]; None for fewer than two rows."""
    n = x.shape[0]
    if n < 2:
        return None
    unit = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T
    return float((n * (n - 1) - (sim.sum() - sim.diagonal().sum())) / (n * (n - 1)))


def knn_radii(x: Tensor, k: int) -> Tensor:
    """[N] distance from each row to its k-th nearest other row."""
    d = torch.cdist(x.double(), x.double())
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


# a fake point whose nearest real point lies within this share of that point's k-NN radius is that real image
# (module doc): features of one image computed in another batch differ by rounding only
SAME_POINT = 1e-3
# a point on a ball's edge (a k-th neighbour) is inside it, whichever way two distance computations round
EDGE = 1e-9


def _fake_to_real(real: Tensor, fake: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """(distances [M, N] with each fake point's own real point, if it is one, at inf; inside [M, N]: fake i lies in
    real j's ball, None where the real set has k or fewer points). Only the nearest real point can be a fake
    point's own: a duplicate of it in the real set keeps its ball."""
    d = torch.cdist(fake.double(), real.double())  # [M, N]
    radii = knn_radii(real, k) if len(real) > k else None
    if len(fake) and len(real):
        near, at = d.min(1)  # [M]
        own = near <= SAME_POINT * (radii[at] if radii is not None else 0.0)
        d[own, at[own]] = math.inf
    return d, (d <= radii[None] * (1 + EDGE) if radii is not None else None)


def _ball_scores(real: Tensor, fake: Tensor, k: int) -> dict[str, float | None]:
    """precision, recall, density and coverage of `fake` against `real` (module doc); None where a set has no
    k-th neighbour (k or fewer rows)."""
    d, inside = _fake_to_real(real, fake, k)
    recall = float((d <= knn_radii(fake, k)[:, None] * (1 + EDGE)).any(0).double().mean()) if len(fake) > k else None
    if inside is None:
        return {"precision": None, "recall": recall, "density": None, "coverage": None}
    return {"precision": float(inside.any(1).double().mean()), "recall": recall,
            "density": float(inside.sum() / (k * len(fake))), "coverage": float(inside.any(0).double().mean())}


def precision_recall(real: Tensor, fake: Tensor, k: int) -> tuple[float | None, float | None]:
    """Improved precision and recall; None where a set has no k-th neighbour (fewer than k + 1 rows)."""
    scores = _ball_scores(real, fake, k)
    return scores["precision"], scores["recall"]


def density_coverage(real: Tensor, fake: Tensor, k: int) -> tuple[float | None, float | None]:
    scores = _ball_scores(real, fake, k)
    return scores["density"], scores["coverage"]


def mean_distance(real: Tensor, fake: Tensor) -> float:
    return float((fake.double().mean(0) - real.double().mean(0)).norm())


def set_metrics(real: Tensor, fake: Tensor, k: int) -> dict[str, float | None]:
    return {"diversity": diversity(fake), **_ball_scores(real, fake, k), "mean_distance": mean_distance(real, fake)}


def per_class_metrics(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, classes: list[str],
                      k: int) -> dict:
    """`set_metrics` inside each class, and their mean over classes ("overall"; None values skipped)."""
    per_class = {name: set_metrics(real[real_labels == c], fake[fake_labels == c], k) for c, name in enumerate(classes)}
    keys = next(iter(per_class.values())).keys()
    overall = {}
    for key in keys:
        vals = [m[key] for m in per_class.values() if m[key] is not None]
        overall[key] = sum(vals) / len(vals) if vals else None
    return {"overall": overall, "per_class": per_class}


def dd_ranking(distilled: list[float], random_real: list[float], full: list[float] | None,
               weight: float = 0.5) -> dict:
    """IOR, HLR and LRS per seed (accuracies in %, paired by seed index) and their means, in %."""
    out: dict = {"ior": [round(d - r, 2) for d, r in zip(distilled, random_real)]}
    if full:
        out["hlr"] = [round(f - d, 2) for f, d in zip(full, distilled)]
        alphas = [weight * i / 100 - (1 - weight) * h / 100 for i, h in zip(out["ior"], out["hlr"])]
        out["lrs"] = [round(100 * (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)), 2) for a in alphas]
    for key in list(out):
        vals = out[key]
        out[f"{key}_mean"] = round(sum(vals) / len(vals), 2)
    out["weight"] = weight
    return out


def spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, min, max) of a few values (one value: std 0)."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std, min(values), max(values)
