import math

import pytest
import torch

from diffdistill.metrics import (
    dd_ranking,
    density_coverage,
    diversity,
    knn_radii,
    mean_distance,
    per_class_metrics,
    precision_recall,
    set_metrics,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_diversity_is_the_mean_pairwise_cosine_distance():
    # pairs: (a, b) cos 0 -> 1; (a, c) cos -1 -> 2; (b, c) cos 0 -> 1
    assert diversity(t([[1, 0], [0, 1], [-1, 0]])) == pytest.approx(4 / 3)
    assert diversity(t([[2, 0], [5, 0]])) == pytest.approx(0.0)  # same direction, any length
    assert diversity(t([[1, 0]])) is None


def test_knn_precision_recall_density_coverage_on_points_with_known_answers():
    real = t([[0], [1], [2], [3]])  # k = 1: every real ball has radius 1
    fake = t([[0.5], [10]])
    assert knn_radii(real, 1).tolist() == [1, 1, 1, 1]
    precision, recall = precision_recall(real, fake, 1)
    assert precision == 0.5  # 0.5 is inside the balls of 0 and 1; 10 is in none
    assert recall == 1.0  # the fake balls have radius 9.5: they reach every real point
    density, coverage = density_coverage(real, fake, 1)
    assert density == pytest.approx(2 / (1 * 2))  # 0.5 sits in two real balls, 10 in none
    assert coverage == 0.5  # the balls of 0 and 1 contain a fake point
    assert precision_recall(real, t([[0.5]]), 1) == (1.0, None)  # one fake point: no fake ball


def test_a_real_point_is_scored_as_if_left_out_of_the_reference():
    real = t([[0], [2], [3]])  # k = 1: radii 2, 1, 1
    for fake in (t([[0]]), t([[1e-9]])):  # the real image 0 (or its features read again, off by rounding)
        assert precision_recall(real, fake, 1)[0] == 0.0  # not in its own ball; 2 and 3 lie > 1 away
        assert density_coverage(real, fake, 1) == (0.0, 0.0)
    assert precision_recall(real, t([[0.01]]), 1)[0] == 1.0  # a point near it, not it: inside its ball
    assert density_coverage(real, t([[2.5]]), 1) == (2.0, pytest.approx(2 / 3))  # in the balls of 2 and 3
    # recall: real 0 lies only in the ball of the fake point that is real 0 (fake radii 5, 1, 1): not credited
    assert precision_recall(real, t([[0], [5], [6]]), 1)[1] == pytest.approx(2 / 3)
    # an image the real set holds twice: a copy of it is left out of one copy's ball, not the other's
    assert precision_recall(t([[0], [0], [3]]), t([[0]]), 1)[0] == 1.0


def test_set_metrics_is_the_parts_together():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 8, generator=g), torch.randn(12, 8, generator=g)
    fake[:3] = real[:3]  # some of them real points
    m = set_metrics(real, fake, 3)
    assert (m["precision"], m["recall"]) == precision_recall(real, fake, 3)
    assert (m["density"], m["coverage"]) == density_coverage(real, fake, 3)
    assert m["diversity"] == diversity(fake) and m["mean_distance"] == mean_distance(real, fake)


def test_a_copy_of_the_reference_is_scored_without_its_own_balls_and_mean_distance():
    """The rule by brute force: point i counts in the balls of the other points (radii of the whole set)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    k, d = 3, torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    radii = d.sort(1).values[:, k]  # the k-th nearest other point (the 0th is itself)
    inside = [[j for j in range(30) if j != i and d[i, j] <= radii[j]] for i in range(30)]  # balls of others
    precision, recall = precision_recall(x, x, k)
    assert precision == sum(map(bool, inside)) / 30 and recall == precision  # the same set both ways
    assert precision < 1.0  # without leaving out, a copy scores 1.0 by construction
    density, coverage = density_coverage(x, x, k)
    assert density == pytest.approx(sum(map(len, inside)) / (k * 30))
    assert coverage == len({j for row in inside for j in row}) / 30
    assert mean_distance(t([[0, 0], [2, 0]]), t([[1, 1]])) == pytest.approx(1.0)


def test_per_class_metrics_and_overall_mean():
    real, real_y = t([[0, 1], [0, 2], [0, 3], [5, 0], [6, 0], [7, 0]]), torch.tensor([0, 0, 0, 1, 1, 1])
    fake, fake_y = t([[0, 2.5], [6.2, 0], [0, 100]]), torch.tensor([0, 1, 0])
    m = per_class_metrics(real, real_y, fake, fake_y, ["a", "b"], 1)
    assert m["per_class"]["a"]["precision"] == 0.5 and m["per_class"]["b"]["precision"] == 1.0
    assert m["overall"]["precision"] == 0.75
    assert m["per_class"]["b"]["diversity"] is None and m["overall"]["diversity"] == 0.0  # one class only


def test_dd_ranking_scores():
    out = dd_ranking([60.0, 62.0], [50.0, 50.0], [90.0, 90.0])
    assert out["ior"] == [10.0, 12.0] and out["hlr"] == [30.0, 28.0]
    alpha = 0.5 * 0.10 - 0.5 * 0.30
    assert out["lrs"][0] == round(100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1)), 2)
    assert out["ior_mean"] == 11.0
    perfect = dd_ranking([100.0], [0.0], [100.0])  # IOR 1, HLR 0 -> alpha 0.5
    assert perfect["lrs"][0] == round(100 * (math.exp(0.5) - math.exp(-1)) / (math.e - math.exp(-1)), 2)
    assert "lrs" not in dd_ranking([60.0], [50.0], None)
