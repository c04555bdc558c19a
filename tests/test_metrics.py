"""CellSeg F1: matching, border removal, empty images and the ignite metric."""

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from helpers import BUNDLE, disk_labels, require_module
from mmcs_monai.metrics import F1Metric, f1_score, match_instances, remove_border_cells


def _disc_iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def _strips(spans, width=40):
    """Labels [3, width]: instance i+1 covers columns [start, stop) on all 3 rows (IoUs are 1D ratios)."""
    lab = np.zeros((3, width), np.int32)
    for i, (start, stop) in enumerate(spans, start=1):
        lab[:, start:stop] = i
    return lab


@pytest.fixture
def three_discs_case():
    gt = disk_labels()  # discs at (30,30) r10, (60,64) r14, (25,70) r8
    # disc 1 exact, disc 2 shifted by 2 px (IoU > 0.5), disc 3 shifted far (IoU < 0.5), one extra disc
    pred = disk_labels(centers=((30, 30), (62, 64), (25, 77), (80, 15)), radii=(10, 14, 8, 6))
    return gt, pred


def test_three_discs(three_discs_case):
    gt, pred = three_discs_case
    assert _disc_iou(gt == 2, pred == 2) > 0.5 and _disc_iou(gt == 3, pred == 3) < 0.5
    assert match_instances(gt, pred) == (2, 2, 1)
    s = f1_score(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)
    assert s["precision"] == pytest.approx(2 / 4) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # 4/7


def test_optimal_beats_greedy():
    # GT A=[0,10), B=[10,20); pred Q=[0,3), P=[3,14).
    # IoU(A,P)=7/11, IoU(A,Q)=0.3, IoU(B,P)=4/17, IoU(B,Q)=0. At threshold 0.2 greedy (best IoU first) takes
    # A-P and then nothing else matches (tp=1); the optimal matching is A-Q, B-P (tp=2). Maximising the IoU
    # sum alone would also pick A-P (0.636 > 0.3 + 0.235).
    gt = _strips([(0, 10), (10, 20)])
    pred = _strips([(3, 14), (0, 3)])
    assert match_instances(gt, pred, iou_threshold=0.2) == (2, 0, 0)
    assert match_instances(gt, pred, iou_threshold=0.5) == (1, 1, 1)


def test_non_consecutive_ids_and_dtypes(three_discs_case):
    gt, pred = three_discs_case
    gt2 = np.select([gt == 1, gt == 2, gt == 3], [7, 1000, 42], 0).astype(np.int64)
    pred2 = np.select([pred == k for k in (1, 2, 3, 4)], [5, 3, 99999, 12], 0).astype(np.uint32)
    assert match_instances(gt2, pred2) == (2, 2, 1)
    assert match_instances(torch.from_numpy(gt2), pred2.astype(np.float32)) == (2, 2, 1)


def test_fully_labelled_image():
    gt = np.ones((4, 4), np.int32)
    gt[:, 2:] = 2  # no background pixel at all
    assert match_instances(gt, gt + 10) == (2, 0, 0)


def test_remove_border_cells():
    lab = np.zeros((20, 20), np.uint16)
    lab[1, 5:8] = 4  # touches the 2-px frame (row 1)
    lab[5:8, 5:8] = 9  # interior
    lab[10:12, 17:20] = 2  # touches the 1-px frame too (column 19)
    lab[14:17, 14:17] = 30  # interior, last pixel at 16 < 18
    out = remove_border_cells(lab, border=2)
    assert out.dtype == lab.dtype and lab[1, 5] == 4  # input untouched
    expected = np.zeros_like(lab)
    expected[5:8, 5:8] = 1
    expected[14:17, 14:17] = 2
    np.testing.assert_array_equal(out, expected)
    assert np.unique(remove_border_cells(lab, border=1)).tolist() == [0, 1, 2, 3]  # only the row-1 cell survives
    assert np.unique(remove_border_cells(lab, border=0)).tolist() == [0, 1, 2, 3, 4]


def test_f1_with_border():
    gt = np.zeros((20, 20), np.int32)
    gt[0:4, 5:9] = 1  # at the edge: ignored with border=2
    gt[8:12, 8:12] = 2
    pred = np.zeros_like(gt)
    pred[8:12, 8:12] = 5  # only the interior cell predicted
    assert f1_score(gt, pred)["f1"] == pytest.approx(2 / 3)
    assert f1_score(gt, pred, border=2) == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_empty_cases(discs):
    empty = np.zeros_like(discs)
    assert f1_score(empty, empty) == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    assert f1_score(empty, empty, empty_f1=0.0)["f1"] == 0.0  # the official CellSeg script's value
    s = f1_score(discs, empty)
    assert (s["f1"], s["precision"], s["recall"], s["tp"], s["fp"], s["fn"]) == (0.0, 0.0, 0.0, 0, 0, 3)
    s = f1_score(empty, discs)
    assert (s["f1"], s["tp"], s["fp"], s["fn"]) == (0.0, 0, 3, 0)
    assert match_instances(discs, np.roll(discs, 40, axis=1)) == (0, 3, 3)


def test_against_cellpose_average_precision(three_discs_case):
    metrics = require_module("cellpose.metrics")
    rng = np.random.default_rng(0)
    cases = [three_discs_case, (_strips([(0, 10), (10, 20)]), _strips([(3, 14), (0, 3)]))]
    for _ in range(3):  # random disc layouts against jittered copies
        centers = [tuple(rng.integers(10, 86, 2)) for _ in range(6)]
        gt = disk_labels(centers=centers, radii=[8] * 6)
        jitter = [(cy + rng.integers(-5, 6), cx + rng.integers(-5, 6)) for cy, cx in centers]
        cases.append((gt, disk_labels(centers=jitter, radii=list(rng.integers(5, 11, 6)))))
    for gt, pred in cases:
        for th in (0.2, 0.5, 0.75):
            _, tp, fp, fn = metrics.average_precision(gt.astype(np.int32), pred.astype(np.int32), threshold=[th])
            assert match_instances(gt, pred, th) == (int(tp[0]), int(fp[0]), int(fn[0]))


def test_f1_metric_engine(three_discs_case, discs):
    gt, pred = three_discs_case
    empty = np.zeros_like(gt)
    # batch 1: tensors [B, 1, H, W]; batch 2: decollated list of per-image [1, H, W] / [H, W] masks
    batches = [
        (torch.from_numpy(np.stack([pred, gt])[:, None].astype(np.int32)), torch.from_numpy(np.stack([gt, gt])[:, None].astype(np.int32))),
        ([torch.from_numpy(empty[None].astype(np.int32)), discs], [torch.from_numpy(gt[None].astype(np.int32)), discs]),
    ]
    per_image = [4 / 7, 1.0, 0.0, 1.0]

    engine = Engine(lambda e, batch: batch)
    metric = F1Metric()
    metric.attach(engine, "f1")
    state = engine.run(batches, max_epochs=1)
    assert state.metrics["f1"] == pytest.approx(np.mean(per_image))
    d = metric.compute_details()
    tp, fp, fn = 2 + 3 + 0 + 3, 2 + 0 + 0 + 0, 1 + 0 + 3 + 0
    assert (d["tp"], d["fp"], d["fn"], d["num_images"]) == (tp, fp, fn, 4)
    assert d["mean_f1"] == pytest.approx(np.mean(per_image))
    assert d["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert d["precision"] == pytest.approx(tp / (tp + fp)) and d["recall"] == pytest.approx(tp / (tp + fn))


def test_f1_metric_dict_output_transform(three_discs_case):
    gt, pred = three_discs_case
    # MONAI evaluators decollate into a list of dicts; from_engine(["pred", "label"]) builds the two lists
    from monai.handlers import from_engine

    engine = Engine(
        lambda e, batch: [{"pred": torch.from_numpy(pred[None].astype(np.float32)), "label": torch.from_numpy(gt[None].astype(np.float32))}]
    )
    metric = F1Metric(output_transform=from_engine(["pred", "label"]))
    metric.attach(engine, "f1")
    assert engine.run([0, 1], max_epochs=1).metrics["f1"] == pytest.approx(4 / 7)


def test_f1_metric_needs_data():
    from ignite.exceptions import NotComputableError

    with pytest.raises(NotComputableError):
        F1Metric().compute()


@pytest.mark.parametrize(
    ("configs", "key"),
    [
        (["train.json"], "validate#key_metric#val_f1"),
        (["train.json", "semi.json"], "validate_teacher#evaluator#key_val_metric#val_f1_teacher"),
    ],
)
def test_validation_f1_of_the_bundle_matches_at_iou_one_half(configs, key):
    """The F1 that validation computes (and that picks ``model.pt``) is CellSeg's: a match needs IoU >= 0.5.
    Two 20 x 20 squares, predicted 7 px off (IoU 13/27 = 0.48: no match) and 6 px off (14/26 = 0.54: a
    match): TP 1, FP 1, FN 1, F1 0.5 (at IoU 0.3 it would be 1.0, at 0.6 0.0)."""
    from monai.bundle import ConfigParser

    gt, pred = np.zeros((60, 70), np.int32), np.zeros((60, 70), np.int32)
    gt[10:30, 5:25], pred[10:30, 12:32] = 1, 1
    gt[35:55, 40:60], pred[35:55, 46:66] = 2, 2
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in configs])
    metric = parser.get_parsed_content(key)
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "f1")
    batch = {"masks": [torch.as_tensor(pred)[None]], "label": [torch.as_tensor(gt)[None]]}
    assert engine.run([batch], max_epochs=1).metrics["f1"] == pytest.approx(0.5)
