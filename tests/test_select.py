"""Coreset selection on hand-made point sets whose answers are worked out in the comments."""

import pytest
import torch

from diffdistill.select import SELECTORS, herd_slots, herding, kcenter, kmeans, nearest

LINE = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25


def test_herding_follows_the_running_mean():
    # step 1: |x - 3.25| smallest at x=2; step 2: (2 + x)/2 nearest 3.25 wants x=4.5 -> 1 (1.5 off) beats
    # 0 (2.25) and 10 (2.75); step 3: (3 + x)/3 wants 6.75 -> 10 (4.33, 1.08 off) beats 0 (1.0, 2.25 off)
    assert herding(LINE, 3).tolist() == [2, 1, 3]
    assert herding(LINE, 4).tolist() == [2, 1, 3, 0]  # without repeats


def test_kcenter_starts_at_the_mean_then_takes_the_farthest():
    # first: nearest the mean 3.25 -> 2; farthest from {2}: 10; then distances to {2, 10}: 0 -> 2, 1 -> 1
    assert kcenter(LINE, 3).tolist() == [2, 3, 0]


def test_ties_go_to_the_lowest_index():
    sym = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])  # mean 0; pairs equally far
    assert herding(sym, 1).tolist() == [0]
    # first: (−1, 0) and (1, 0) are both 1 from the mean -> 0; then (0, 3) and (0, −3) are both √10 from it
    # (farther than (1, 0) at 2) -> 2
    assert kcenter(sym, 2).tolist() == [0, 2]


def test_kmeans_finds_two_separated_clusters_and_is_seeded():
    x = torch.tensor([[0.0], [1.0], [2.0], [8.0], [12.0]])
    c, assign = kmeans(x, 2, seed=3)
    assert sorted(c.squeeze(1).tolist()) == [1.0, 10.0]
    assert assign[:3].unique().numel() == 1 and assign[3:].unique().numel() == 1 and assign[0] != assign[3]
    c2, assign2 = kmeans(x, 2, seed=3)
    assert torch.equal(c, c2) and torch.equal(assign, assign2)
    # the real point nearest each centroid: 1 (index 1); 8 and 12 are both 2 from 10 -> the lower index, 3
    picks = nearest(x, c)
    assert sorted(picks.tolist()) == [1, 3]


def test_kmeans_with_k_equal_n_returns_every_point():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    c, assign = kmeans(x, 6, seed=0)
    assert sorted(assign.tolist()) == list(range(6))
    assert sorted(nearest(x, c).tolist()) == list(range(6))


def test_every_selector_returns_k_distinct_rows():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    for name, fn in SELECTORS.items():
        idx = fn(x, 7, 0)
        assert idx.dtype == torch.long and len(set(idx.tolist())) == 7, name


@pytest.mark.parametrize("fn", [lambda x, k: herding(x, k), lambda x, k: kcenter(x, k),
                                lambda x, k: kmeans(x, k, 0)])
def test_asking_for_more_points_than_there_are_fails(fn):
    with pytest.raises(ValueError, match="k = 5 points requested from 4"):
        fn(LINE, 5)


def test_identical_points_are_still_picked_once_each():
    same = torch.zeros(3, 2)  # every distance 0: k-center and k-means++ must not return a point twice
    assert kcenter(same, 3).tolist() == [0, 1, 2]
    c, assign = kmeans(same, 3, seed=0)
    assert c.shape == (3, 2) and sorted(nearest(same, c).tolist()) == [0, 1, 2]


def test_herding_toward_a_target_mean():
    x = torch.tensor([[0.0, 0], [10, 0], [0, 10]])
    assert herding(x, 1).tolist() == [0]  # default: x's own mean (10/3, 10/3) is nearest (0, 0)
    assert herding(x, 3, target=torch.tensor([3.0, 2])).tolist() == [0, 1, 2]  # (3,2): A, then A+B = (5,0)
    assert herding(x, 1, target=torch.tensor([1.0, 9])).tolist() == [2]


def _modes(z: torch.Tensor, k: int, overrides: list[str]):
    """The sample stage's Modes of one class whose real "latents" are the rows of z [n, D] (as [n, D, 1, 1])."""
    from types import SimpleNamespace

    from diffdistill.config import build_config
    from diffdistill.stages.sample import Modes

    modes = Modes.__new__(Modes)
    modes.real = SimpleNamespace(of_class=lambda c: z[:, :, None, None])
    modes.cfg = build_config({}, overrides)
    modes.classes, modes.k, modes.cached = ["a"], k, {}
    return modes


def test_modes_come_in_herding_order_so_ipc_1_gets_the_mode_nearest_the_class_mean():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0], [10, 0], [0, 10]])
    z = torch.cat([centers[i] + 0.1 * torch.randn(n, 2, generator=g) for i, n in enumerate((50, 30, 20))])
    for seed in range(4):  # whatever k-means++ picks first
        got = _modes(z, 3, [f"seed={seed}"]).of_class(0).flatten(1)
        assert torch.allclose(got, centers, atol=0.1), seed  # mean (3, 2): A nearest; then A+B = (5, 0); then C


def test_medoid_modes_are_distinct_train_points_nearest_the_centroids_in_herding_order(monkeypatch):
    """With fixed centroids (k-means' order 9.3, 9.1, 1.2): medoids are train points, each the one nearest its
    centroid or, when an earlier centroid took it, the next nearest (9.1's nearest, 9, went to 9.3: 10); then
    herding order toward the class mean 4.5 (1 first: |1 - 4.5| = 3.5; then (1 + 9) / 2 = 5 beats 5.5)."""
    from diffdistill.stages import sample

    z = torch.tensor([[0.0], [1.0], [2.0], [5.0], [9.0], [10.0]])  # mean 4.5
    monkeypatch.setattr(sample, "kmeans", lambda x, k, seed: (torch.tensor([[9.3], [9.1], [1.2]]), None))
    # centroids herd 1.2, then (1.2 + 9.1) / 2 = 5.15 beats (1.2 + 9.3) / 2 = 5.25, then 9.3
    for kind, want in (("centroid", [1.2, 9.1, 9.3]), ("medoid", [1.0, 9.0, 10.0])):
        got = _modes(z, 3, [f"sample.prototype={kind}"]).of_class(0).flatten().tolist()
        assert got == pytest.approx(want), kind


def test_herd_slots_picks_one_candidate_per_slot_toward_the_target():
    """Slot 0 keeps the candidate nearest the target; slot 1 the one that brings the mean of the two kept points
    closest to it (hand-computed on a line); a slot's allowed candidates win over nearer ones it is not allowed,
    a slot with none allowed picks among all; the picks of the first slots do not depend on later slots."""
    x = torch.tensor([[[3.0], [1.0], [-1.5]], [[3.0], [1.0], [-1.5]]])  # [S=2, K=3, D=1], target 0
    target = torch.zeros(1)
    # slot 0: |3|, |1|, |-1.5| -> 1; slot 1: |1 + 3| / 2, |1 + 1| / 2, |1 - 1.5| / 2 -> 2
    assert herd_slots(x, target).tolist() == [1, 2]
    allowed = torch.tensor([[True, False, True], [False, False, False]])
    # slot 0 among {0, 2}: -1.5; slot 1 none allowed, so all: |-1.5 + 3|, |-1.5 + 1|, |-1.5 - 1.5| -> 1
    assert herd_slots(x, target, allowed).tolist() == [2, 1]
    assert herd_slots(x[:1], target, allowed[:1]).tolist() == [2]
    assert herd_slots(torch.zeros(2, 3, 4), torch.zeros(4)).tolist() == [0, 0]  # exact ties: the lowest index
    with pytest.raises(ValueError, match="candidates"):
        herd_slots(torch.zeros(3, 4), torch.zeros(4))
