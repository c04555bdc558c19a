"""Diversity-aware picks: a batch covers every style cluster where top-k takes one; style vectors match CPnet's."""

import numpy as np
import pytest
import torch

from experiments.active_learning.diversity import image_style, pick_diverse, select_by_clusters, select_diverse, style_distances
from mmcs_monai.inference import CellInferer
from mmcs_monai.networks import CPnet
from tests.helpers import disk_labels  # the experiments are not on the suite's path: run from the repository root


def two_clusters(n_a=6, n_b=6, seed=0):
    """Unit styles in two tight clusters (A around e0, B around e1); every A image scores above every B image."""
    rng = np.random.default_rng(seed)
    a = np.eye(8)[0] + 0.01 * rng.standard_normal((n_a, 8))
    b = np.eye(8)[1] + 0.01 * rng.standard_normal((n_b, 8))
    styles = np.concatenate([a, b])
    styles /= np.linalg.norm(styles, axis=1, keepdims=True)
    scores = np.concatenate([np.linspace(0.9, 0.8, n_a), np.linspace(0.5, 0.4, n_b)])
    return scores, styles


def test_top_k_takes_one_cluster_the_diverse_picks_cover_both():
    scores, styles = two_clusters()
    top = select_diverse(scores, styles, 4, weight=0.0)
    assert top == [0, 1, 2, 3]  # plain top-k: all from cluster A
    diverse = select_diverse(scores, styles, 4, weight=1.0)
    assert diverse[0] == 0  # nothing to be far from yet: the most uncertain first
    assert {i < 6 for i in diverse} == {True, False}
    assert diverse[1] == 6  # the best image of the other cluster, not A's second best
    clusters = select_by_clusters(scores, styles, 2)
    assert sorted(clusters) == [0, 6]  # the most uncertain image of each cluster


def test_labelled_images_push_picks_away():
    scores, styles = two_clusters()
    # cluster A is labelled already: the first pick goes to B despite A's higher scores
    reference = styles[:2] + 0.0
    assert select_diverse(scores[2:], styles[2:], 1, weight=1.0, reference=reference) == [4]  # index 4 of the rest = image 6


def test_one_at_a_time_equals_one_batch():
    rng = np.random.default_rng(3)
    scores, styles = rng.random(20), rng.standard_normal((20, 5))
    reference = rng.standard_normal((3, 5))
    batch = select_diverse(scores, styles, 5, weight=0.7, reference=reference)
    single, ref, left = [], reference, list(range(20))
    for _ in range(5):  # a server's strategy: one image per request, handed-out images join the reference
        i = left[select_diverse(scores[left], styles[left], 1, weight=0.7, reference=ref)[0]]
        single.append(i)
        left.remove(i)
        ref = np.concatenate([ref, styles[i : i + 1]])
    assert single == batch


def test_large_weight_is_farthest_first():
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    styles = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    scores = np.zeros(12)
    scores[0] = 0.01
    picks = select_diverse(scores, styles, 2, weight=1e6)
    assert picks == [0, 6]  # the opposite point of the circle


def test_ties_and_bounds():
    scores, styles = np.ones(4), np.tile(np.eye(3)[0], (4, 1))  # equal everything
    assert select_diverse(scores, styles, 3) == [0, 1, 2]
    assert sorted(select_diverse(scores, styles, 10)) == [0, 1, 2, 3]  # k > N: every candidate once
    assert select_diverse(scores, styles, 0) == []
    assert sorted(select_by_clusters(scores, styles, 3)) == [0, 1, 2]  # one non-empty cluster: filled by score
    with pytest.raises(ValueError, match="styles must be"):
        select_diverse(scores, styles[:3], 2)
    with pytest.raises(ValueError, match="weight"):
        select_diverse(scores, styles, 2, weight=-1)


def test_style_distances_are_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    d = style_distances(a, np.array([[3.0, 0.0], [-1.0, 0.0]]))
    assert np.allclose(d, [[0.0, 2.0], [1.0, 1.0]])


def test_pick_diverse_by_id():
    scores, styles = two_clusters(3, 3)
    ids = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]
    by_id_scores = dict(zip(ids, scores))
    by_id_styles = {i: list(s) for i, s in zip(ids, styles)}
    by_id_scores["unstyled"] = 1.0  # no style yet: not a candidate
    assert pick_diverse(by_id_scores, by_id_styles, 2) == ["a0", "b0"]
    assert pick_diverse(by_id_scores, by_id_styles, 1, labelled_styles=styles[:1]) == ["b0"]
    assert pick_diverse({}, by_id_styles, 2) == []


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return CPnet(nbase=[2, 8, 16, 32], diam_mean=30.0).eval()


def disks_image(shape=(96, 96)) -> torch.Tensor:
    image = torch.as_tensor(disk_labels(shape) > 0, dtype=torch.float32)
    return torch.stack([image, 0.5 * image])


def test_image_style_is_cpnets_style(small_net):
    image = disks_image((70, 90))
    style = image_style(image, small_net, CellInferer(precision="fp32"))
    _, expected = small_net.forward_with_style(image[None])
    assert style.shape == (32,) and style.dtype == np.float32
    assert np.allclose(style, expected[0].detach().numpy(), atol=1e-5)
    assert np.linalg.norm(style) == pytest.approx(1.0, abs=1e-5)


def test_image_style_tiles_and_scale(small_net):
    image = disks_image((96, 96)).repeat(1, 2, 2)  # 192 x 192 of the same pattern
    whole = image_style(image, small_net, CellInferer(precision="fp32"), tile=1024)
    tiled = image_style(image, small_net, CellInferer(precision="fp32"), tile=64)  # 3 x 3 tiles
    assert np.linalg.norm(tiled) == pytest.approx(1.0, abs=1e-5)
    assert float(whole @ tiled) > 0.95  # a homogeneous image looks the same whole or tiled
    # half the diameter: the image is shrunk by 2 first, as the inferer shrinks it
    half = image_style(image, small_net, CellInferer(precision="fp32"), diameter=60.0)
    _, expected = small_net.forward_with_style(torch.nn.functional.interpolate(image[None], size=(96, 96), mode="bilinear"))
    assert np.allclose(half, expected[0].detach().numpy(), atol=1e-5)


def test_image_style_keeps_the_mode_and_refuses_exports(small_net):
    small_net.train()
    image_style(disks_image(), small_net)
    assert small_net.training
    with pytest.raises(TypeError, match="no CPnet encoder"):
        image_style(disks_image(), torch.nn.Conv2d(2, 3, 1))
    with pytest.raises(ValueError, match="image must be"):
        image_style(torch.zeros(2, 2, 2, 16, 16), small_net)
