"""Tests of mmcs_monai.flows: labels -> flows -> labels, against Cellpose 3 where it is installed."""

import csv

import numpy as np
import pytest
import torch

from helpers import disk_labels, require_module
from mmcs_monai.flows import (
    MaskSettings,
    fill_holes_and_remove_small_masks,
    flow_error,
    flows_to_masks,
    labels_to_flows,
    remove_bad_flow_masks,
)
from mmcs_monai.metrics import f1_score

N_DEV = 8  # real label images used against Cellpose (kept small: the file must run in < 60 s)

# Cellpose's get_masks_torch builds a sparse tensor and torch warns about it; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _cellprob(labels):
    return np.where(labels > 0, 10.0, -10.0).astype(np.float32)


def _inside_cosine(a, b, labels):
    """Mean cosine of flow vectors a, b [2, H, W] over the cell pixels of labels.

    The flows are unit vectors or 0 (sources of symmetric cells); two zero vectors count as 1.
    """
    m = labels > 0
    a, b = a[:, m], b[:, m]
    both_zero = ~a.any(0) & ~b.any(0)
    return float(np.where(both_zero, 1.0, (a * b).sum(0)).mean())


@pytest.fixture(scope="module")
def dev_val_labels(dev_data):
    import tifffile

    with open(dev_data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    # every k-th row: a spread over modalities and sizes, deterministic
    rows = rows[:: max(1, len(rows) // N_DEV)][:N_DEV]
    return [tifffile.imread(dev_data / r["label"]).astype(np.int32) for r in rows]


# ---------------------------------------------------------------------------------------------
# labels -> flows, synthetic
# ---------------------------------------------------------------------------------------------


def test_disc_flows_point_to_centre_unit_inside_zero_outside():
    centers, radii = ((30, 30), (60, 64), (25, 70)), (10, 14, 8)
    labels = disk_labels(centers=centers, radii=radii)
    flows = labels_to_flows(labels)
    assert isinstance(flows, np.ndarray) and flows.dtype == np.float32 and flows.shape == (2, *labels.shape)

    inside = labels > 0
    norm = np.sqrt((flows**2).sum(0))
    assert not flows[:, ~inside].any()
    # unit vectors, except at the heat source of a symmetric cell (zero gradient, as in Cellpose)
    assert (norm[inside] == 0).sum() <= len(centers)
    np.testing.assert_allclose(norm[inside & (norm > 0)], 1.0, atol=1e-5)

    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    for i, (cy, cx) in enumerate(centers, start=1):
        m = (labels == i) & ((yy - cy) ** 2 + (xx - cx) ** 2 > 0)
        dot = flows[0, m] * (cy - yy[m]) + flows[1, m] * (cx - xx[m])
        assert (dot > 0).mean() > 0.95


def test_non_consecutive_ids_give_the_same_flows():
    labels = disk_labels()
    sparse = np.where(labels > 0, labels.astype(np.int64) * 1000 + 7, 0)
    np.testing.assert_array_equal(labels_to_flows(sparse), labels_to_flows(labels))


def test_touching_cells_do_not_leak():
    # two halves of one square: each half's flows must converge inside that half
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:20] = 1
    labels[10:30, 20:30] = 2
    flows = labels_to_flows(labels)
    # at the shared edge, the flows of each cell point back into the cell (away from the other)
    assert (flows[1, 12:28, 19] < 0).all() and (flows[1, 12:28, 20] > 0).all()


def test_empty_and_single_pixel_labels():
    empty = np.zeros((17, 23), np.uint16)
    flows = labels_to_flows(empty)
    assert flows.shape == (2, 17, 23) and not flows.any()
    assert labels_to_flows(np.zeros((0, 5), np.int32)).shape == (2, 0, 5)

    dot = np.zeros((9, 9), np.int32)
    dot[4, 4] = 3
    assert not labels_to_flows(dot).any()  # no gradient in a one-pixel cell


def test_torch_in_torch_out():
    labels = torch.from_numpy(disk_labels().astype(np.int64))
    flows = labels_to_flows(labels)
    assert isinstance(flows, torch.Tensor)
    assert flows.dtype == torch.float32 and flows.device == labels.device and flows.shape == (2, *labels.shape)
    np.testing.assert_array_equal(flows.numpy(), labels_to_flows(labels.numpy()))

    masks = flows_to_masks(5 * flows, torch.from_numpy(_cellprob(labels.numpy())))
    assert isinstance(masks, torch.Tensor) and masks.dtype == torch.int32 and masks.device == labels.device


def test_labels_to_flows_matches_cellpose_on_discs():
    dynamics = require_module("cellpose.dynamics")
    labels = disk_labels(shape=(80, 100), centers=((20, 20), (40, 50), (60, 80), (22, 62)), radii=(9, 15, 11, 6))
    ref = dynamics.masks_to_flows(labels.astype(np.int64), device=torch.device("cpu"))
    assert _inside_cosine(labels_to_flows(labels), ref, labels) > 0.999


# ---------------------------------------------------------------------------------------------
# flows -> masks, synthetic
# ---------------------------------------------------------------------------------------------


def test_round_trip_discs_numpy():
    labels = disk_labels()
    masks = flows_to_masks(5 * labels_to_flows(labels), _cellprob(labels))
    assert isinstance(masks, np.ndarray) and masks.dtype == np.int32
    assert masks.max() == 3 and set(np.unique(masks)) == {0, 1, 2, 3}  # consecutive ids
    assert f1_score(labels, masks)["f1"] == 1.0
    # each mask is exactly one disc
    for i in range(1, 4):
        assert len(np.unique(labels[masks == i])) == 1


def test_flows_to_masks_empty():
    flows = np.zeros((2, 20, 30), np.float32)
    masks = flows_to_masks(flows, np.full((20, 30), -5.0, np.float32))
    assert masks.shape == (20, 30) and masks.dtype == np.int32 and not masks.any()
    # cell pixels but no convergence (zero flows, each pixel its own bin) -> no seed, no mask
    assert not flows_to_masks(flows, np.full((20, 30), 5.0, np.float32)).any()


def test_flow_threshold_removes_mask_with_scrambled_flows():
    labels = disk_labels()
    flows = 5 * labels_to_flows(labels)
    # rotate the flows of disc 2 by 70 degrees: the pixels still spiral into one mask, but its
    # flows no longer match that mask (error 2 - 2 cos 70 ~ 1.3 > 0.4)
    a = np.deg2rad(70)
    m = labels == 2
    dy, dx = flows[0, m], flows[1, m]
    flows[0, m], flows[1, m] = np.cos(a) * dy + np.sin(a) * dx, -np.sin(a) * dy + np.cos(a) * dx
    prob = _cellprob(labels)

    kept = flows_to_masks(flows, prob, flow_threshold=None)
    assert kept.max() == 3  # without QC the spiralling disc is still found
    qc = flows_to_masks(flows, prob, flow_threshold=0.4)
    assert qc.max() == 2
    assert not qc[labels == 2].any() and (qc[(labels == 1) | (labels == 3)] > 0).all()

    err, _ = flow_error(kept, flows)
    bad = np.unique(kept[labels == 2])
    assert err[bad[bad > 0] - 1].min() > 1.0 and np.delete(err, bad[bad > 0] - 1).max() < 0.05
    assert not remove_bad_flow_masks(kept, flows, threshold=0.4)[labels == 2].any()


def test_masks_follow_the_flow_threshold_given():
    """Four discs whose flows are turned by 0, 25, 50 and 70 degrees: each mask's flow error is about
    2 - 2 cos(angle) (0, 0.19, 0.71, 1.32), so a threshold between two of them keeps the discs below it."""
    centers = ((30, 30), (30, 90), (90, 30), (90, 90))
    labels = disk_labels((120, 120), centers, (14, 14, 14, 14))
    flows = 5 * labels_to_flows(labels)
    angles = dict(zip((1, 2, 3, 4), np.deg2rad([0, 25, 50, 70])))
    for cell, a in angles.items():
        m = labels == cell
        dy, dx = flows[0, m], flows[1, m]
        flows[0, m], flows[1, m] = np.cos(a) * dy + np.sin(a) * dx, -np.sin(a) * dy + np.cos(a) * dx
    output = np.concatenate([flows, _cellprob(labels)[None]])
    errors = {cell: 2 - 2 * np.cos(a) for cell, a in angles.items()}
    for threshold in (0.1, 0.45, 1.0, 3.0):
        expected = {cell for cell, e in errors.items() if e <= threshold}
        for masks in (MaskSettings(flow_threshold=threshold).masks(output), flows_to_masks(flows, output[2], flow_threshold=threshold)):
            kept = {cell for cell in angles if (masks[labels == cell] > 0).mean() > 0.9}
            assert kept == expected and masks.max() == len(expected), (threshold, kept)


def test_fill_holes_and_remove_small_masks():
    labels = np.zeros((30, 30), np.int32)
    labels[5:15, 5:15] = 4
    labels[8:11, 8:11] = 0  # hole -> filled
    labels[20:23, 20:23] = 9  # 9 px < min_size -> removed
    labels[0:6, 20:30] = 5
    labels[0:2, 24:26] = 0  # notch open to the image border -> not a hole
    out = fill_holes_and_remove_small_masks(labels, min_size=15)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 1, 2}
    assert (out[5:15, 5:15] == 1).all()
    assert not out[20:23, 20:23].any()
    assert not out[0:2, 24:26].any()


# ---------------------------------------------------------------------------------------------
# real data, against Cellpose
# ---------------------------------------------------------------------------------------------


def test_labels_to_flows_matches_cellpose_on_dev_labels(dev_val_labels):
    dynamics = require_module("cellpose.dynamics")
    cosines = []
    for labels in dev_val_labels:
        ref = dynamics.masks_to_flows(labels, device=torch.device("cpu"))
        cosines.append(_inside_cosine(labels_to_flows(labels), ref, labels))
    assert min(cosines) >= 0.98, cosines


def test_round_trip_on_dev_labels(dev_val_labels):
    f1 = [f1_score(labels, flows_to_masks(5 * labels_to_flows(labels), _cellprob(labels)))["f1"] for labels in dev_val_labels]
    assert np.mean(f1) >= 0.98, f1


def test_flows_to_masks_matches_cellpose_on_dev_labels(dev_val_labels):
    dynamics = require_module("cellpose.dynamics")
    for labels in dev_val_labels[:4]:
        flows = (5 * dynamics.masks_to_flows(labels, device=torch.device("cpu"))).astype(np.float32)
        prob = _cellprob(labels)
        ref = dynamics.compute_masks(flows, prob, niter=200, flow_threshold=0.4, min_size=15, device=torch.device("cpu"))
        assert f1_score(ref, flows_to_masks(flows, prob))["f1"] >= 0.98
