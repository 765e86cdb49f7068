"""How diverse and how representative a sample set is, measured against real data in a feature space.
Pure functions of feature tensors [N, F] (no I/O).

- diversity: mean pairwise cosine distance 1 − cos(f_i, f_j) over pairs i < j inside a set.
- precision / recall (Kynkäänniemi et al. 2019): each real point's ball reaches its k-th nearest real
  neighbour; precision = share of fake points inside some real ball. Recall swaps the roles (balls of
  the fake points, share of real points inside one).
- density / coverage (Naeem et al. 2020): density = Σ_fake #(real balls containing it) / (k · #fake),
  ~1 when fake matches real, can exceed 1; coverage = share of real balls that contain a fake point.
- mean distance (representativeness): ‖mean(fake) − mean(real)‖₂.
- a fake point that is a real point of the reference (a random real subset, a real-image coreset, a copied
  train image: distance ≤ SAME_POINT × that real point's radius) is scored as if that real point were left
  out: it is not credited with its own ball (nor is the real point with the fake point's), which it would
  otherwise lie in by construction (precision 1.0 for any real subset).
- DD-Ranking scores (accuracies as fractions): IOR = acc_distilled − acc_random_real,
  HLR = acc_full − acc_distilled, LRS = (e^(λ·IOR − (1−λ)·HLR) − e^−1) / (e − e^−1), λ = 0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def diversity(x: Tensor) -> float | None:
    """Mean pairwise cosine distance of the rows of x [N, F]; None for fewer than two rows."""
    n = x.shape[0]
    if n < 2:
        return None
    unit = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T
    return float((n * (n - 1) - (sim.sum() - sim.diagonal().sum())) / (n * (n - 1)))


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [M, N] in float64, summed directly (not through a matrix product, whose rounding
    would make d(a, b) differ from d(b, a) and put a k-th neighbour on either side of its own ball's edge)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: Tensor, k: int) -> Tensor:
    """[N] distance from each row to its k-th nearest other row."""
    d = _cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


# relative to a real point's k-NN radius: a fake point this close to it is that real point (module doc)
SAME_POINT = 1e-6


def _distances(real: Tensor, fake: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """(fake-to-real distances [M, N] with the pairs of a fake point and the real point it is set to inf, the real
    points' k-NN radii [N] or None where there are k or fewer)."""
    d = _cdist(fake, real)  # [M, N]
    radii = knn_radii(real, k) if len(real) > k else None
    same = d <= SAME_POINT * radii[None] if radii is not None else d == 0
    return d.masked_fill(same, math.inf), radii


def precision_recall(real: Tensor, fake: Tensor, k: int) -> tuple[float | None, float | None]:
    """Improved precision and recall; None where a set has no k-th neighbour (fewer than k + 1 rows)."""
    d, radii = _distances(real, fake, k)
    precision = float((d <= radii[None]).any(1).double().mean()) if radii is not None else None
    recall = float((d <= knn_radii(fake, k)[:, None]).any(0).double().mean()) if len(fake) > k else None
    return precision, recall


def density_coverage(real: Tensor, fake: Tensor, k: int) -> tuple[float | None, float | None]:
    d, radii = _distances(real, fake, k)
    if radii is None:
        return None, None
    inside = d <= radii[None]  # [M, N]
    return float(inside.sum() / (k * len(fake))), float(inside.any(0).double().mean())


def mean_distance(real: Tensor, fake: Tensor) -> float:
    return float((fake.double().mean(0) - real.double().mean(0)).norm())


def set_metrics(real: Tensor, fake: Tensor, k: int) -> dict[str, float | None]:
    precision, recall = precision_recall(real, fake, k)
    density, coverage = density_coverage(real, fake, k)
    return {"diversity": diversity(fake), "precision": precision, "recall": recall, "density": density,
            "coverage": coverage, "mean_distance": mean_distance(real, fake)}


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
