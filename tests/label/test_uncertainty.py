"""TTA uncertainty: flips undone exactly, 0 for a flip-equivariant model, F1 against the evaluation's matcher."""

import numpy as np
import pytest
import torch

from helpers import OracleNet, RecordingNet, disk_labels
from mmcs_monai.flows import flows_to_masks, labels_to_flows
from mmcs_monai.inference import CellInferer
from mmcs_monai.label.uncertainty import FLIPS, image_uncertainty, rank_by_uncertainty, tta_flows, tta_uncertainty, unflip_flows
from mmcs_monai.metrics import f1_score


def perfect_flows(labels: np.ndarray) -> torch.Tensor:
    flows = torch.as_tensor(labels_to_flows(labels)) * 5
    return torch.cat([flows, torch.where(torch.as_tensor(labels > 0), 10.0, -10.0)[None]])


@pytest.mark.parametrize("dims", FLIPS)
def test_unflip_inverts_the_flows_of_a_flipped_image(dims):
    labels = disk_labels()
    flipped_labels = np.flip(labels, [d + 2 for d in dims]).copy() if dims else labels
    # the flows of the flipped image, flipped back, are the flows of the image
    restored = unflip_flows(perfect_flows(flipped_labels)[None], dims)[0]
    assert torch.allclose(restored, perfect_flows(labels), atol=1e-5)


def test_equivariant_model_is_certain():
    image = torch.as_tensor(disk_labels() > 0, dtype=torch.float32)[None].repeat(2, 1, 1)
    net = OracleNet(diam_mean=30.0, diam_labels=30.0)  # segments whatever it sees, in any orientation
    result = image_uncertainty(image, net, CellInferer(precision="fp32"))
    assert result["score"] == pytest.approx(0.0) and result["mask_agreement"] == pytest.approx(1.0)
    assert result["cells"] == 3 and result["prob_std"] == pytest.approx(0.0, abs=1e-6)
    assert len(net.seen) == len(FLIPS)


def test_score_is_one_minus_mean_f1_of_the_variants():
    labels = disk_labels()
    fewer = labels.copy()
    fewer[fewer == 2] = 0  # one variant misses a cell
    flows = torch.stack([perfect_flows(labels), perfect_flows(labels), perfect_flows(fewer)])
    result = tta_uncertainty(flows)
    masks = [flows_to_masks(f[:2].numpy(), f[2].numpy()) for f in flows]
    expected = 1 - np.mean([f1_score(masks[0], m)["f1"] for m in masks[1:]])
    assert result["score"] == pytest.approx(expected) and 0 < result["score"] < 1
    assert result["cells"] == 3 and result["prob_std"] > 0


def test_nothing_found_is_most_uncertain():
    empty = torch.zeros(3, 3, 64, 64)
    empty[:, 2] = -10.0
    assert tta_uncertainty(empty)["score"] == 1.0 and tta_uncertainty(empty)["cells"] == 0
    with pytest.raises(ValueError, match="K >= 2"):
        tta_uncertainty(torch.zeros(1, 3, 8, 8))


def test_tta_flows_shape_and_identity_first():
    """Prediction 0 is the unaugmented image (the score's reference); the others are the flips, undone."""
    image = torch.rand(1, 2, 40, 56)
    inferer = CellInferer(precision="fp32", diameter=30.0)
    flows = tta_flows(image, RecordingNet(), inferer)
    assert flows.shape == (len(FLIPS), 3, 40, 56) and flows.dtype == torch.float32
    # RecordingNet is not flip-equivariant (it returns the image's first channel as dY, dX and cellprob), so
    # a flipped-then-undone prediction differs from the plain one in the flow signs: the order shows
    plain = inferer(image, RecordingNet(), diameter=None)
    assert torch.equal(flows[0], plain[0])
    expected_signs = {(): (1, 1), (-1,): (1, -1), (-2,): (-1, 1), (-2, -1): (-1, -1)}
    for k, dims in enumerate(FLIPS):
        signs = expected_signs[dims]
        for channel in (0, 1):
            torch.testing.assert_close(flows[k, channel], signs[channel] * plain[0, channel])
        torch.testing.assert_close(flows[k, 2], plain[0, 2])
    assert FLIPS[0] == () and len(set(FLIPS)) == 4


def test_auto_diameter_is_searched_once_for_all_flips():
    """With ``auto``, the size search runs on the unflipped image only; the flips are segmented at its result."""
    labels = disk_labels()
    image = torch.as_tensor(labels > 0, dtype=torch.float32)[None, None].repeat(1, 2, 1, 1)
    inferer = CellInferer(precision="fp32", diameter="auto")
    one = OracleNet(diam_mean=30.0, diam_labels=30.0)
    _, used = inferer.predict(image, one)  # a search, then the prediction at its result
    net = OracleNet(diam_mean=30.0, diam_labels=30.0)
    flows = tta_flows(image, net, inferer)
    assert len(net.seen) == len(one.seen) + len(FLIPS) - 1  # one search and four predictions
    assert set(net.seen[len(one.seen) - 1 :]) == {one.seen[-1]}  # all four at the searched size
    # the same flows as when the searched diameter is given
    torch.testing.assert_close(flows, tta_flows(image, OracleNet(diam_mean=30.0, diam_labels=30.0), inferer, diameter=used[0]))


def test_ranking_by_score_then_probability_spread():
    scores = {"a": {"score": 0.2, "prob_std": 0.1}, "b": {"score": 0.5, "prob_std": 0.0}, "c": {"score": 0.5, "prob_std": 0.3}}
    assert rank_by_uncertainty(scores) == ["c", "b", "a"]
