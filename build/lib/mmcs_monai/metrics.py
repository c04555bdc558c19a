"""Instance-segmentation F1 as in the NeurIPS 2022 Cell Segmentation challenge (CellSeg).

The challenge script (``JunMa11/NeurIPS-CellSeg/baseline/compute_metric.py``) removes cells touching a 2-pixel
image frame, matches ground-truth and predicted instances one-to-one so that the number of pairs with
IoU >= 0.5 is maximal (Hungarian algorithm), and scores each image with ``F1 = 2 TP / (2 TP + FP + FN)``;
the challenge ranks by the mean of the per-image F1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from scipy.optimize import linear_sum_assignment

__all__ = ["match_instances", "remove_border_cells", "f1_score", "F1Metric"]

# above this many (gt + 1) x (pred + 1) label pairs the dense bincount table would be too large; use np.unique
_MAX_DENSE_PAIRS = 1 << 24


def _as_label_array(labels, name: str = "labels") -> np.ndarray:
    """Instance labels as a numpy integer array (0 = background); float input must hold integral values."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{name}: expected integer instance labels, got dtype {labels.dtype} with non-integers.")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name}: instance labels must be non-negative (0 = background).")
    return labels


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map ids to 0..n (0 stays background, order kept): returns (flat int64 indices, n instances)."""
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    if ids.size and ids[0] == 0:
        return inverse.astype(np.int64), ids.size - 1
    return inverse.astype(np.int64) + 1, ids.size  # no background pixel at all


def _overlaps(gt: np.ndarray, n_gt: int, pred: np.ndarray, n_pred: int) -> tuple[np.ndarray, ...]:
    """Sparse contingency table of two relabelled (flat) label images.

    Returns ``(gi, pj, inter)``: for every pair of instances that share pixels (background excluded),
    1-based indices ``gi``, ``pj`` and the shared pixel count ``inter``.
    """
    width = n_pred + 1
    codes = gt * width + pred
    if (n_gt + 1) * width <= _MAX_DENSE_PAIRS:
        counts = np.bincount(codes, minlength=(n_gt + 1) * width)
        pairs = np.flatnonzero(counts)
        inter = counts[pairs]
    else:
        pairs, inter = np.unique(codes, return_counts=True)
    gi, pj = np.divmod(pairs, width)
    keep = (gi > 0) & (pj > 0)
    return gi[keep], pj[keep], inter[keep]


def match_instances(gt, pred, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """Optimal one-to-one matching of ground-truth and predicted instances.

    The matching maximises the number of pairs with IoU >= ``iou_threshold`` (ties broken by the larger
    total IoU), like the CellSeg/Cellpose/StarDist ``_true_positive``. For thresholds > 0.5 each instance has
    at most one candidate and any matching is optimal; below 0.5 a greedy matching can miss pairs.

    Args:
        gt: ground-truth instance labels ``[H, W]`` (any N-d shape) int, 0 = background; ids need not be
            consecutive.
        pred: predicted instance labels, same shape.
        iou_threshold: minimum IoU for a match, in (0, 1].

    Returns:
        ``(tp, fp, fn)``: matched pairs, unmatched predictions, unmatched ground-truth instances.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    gt, pred = _as_label_array(gt, "gt"), _as_label_array(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}.")
    gt_idx, n_gt = _relabel(gt)
    pred_idx, n_pred = _relabel(pred)
    if n_gt == 0 or n_pred == 0:
        return 0, n_pred, n_gt

    gi, pj, inter = _overlaps(gt_idx, n_gt, pred_idx, n_pred)
    area_gt = np.bincount(gt_idx, minlength=n_gt + 1)
    area_pred = np.bincount(pred_idx, minlength=n_pred + 1)
    iou = inter / (area_gt[gi] + area_pred[pj] - inter)
    ok = iou >= iou_threshold
    gi, pj, iou = gi[ok], pj[ok], iou[ok]
    if gi.size == 0:
        return 0, n_pred, n_gt

    # assignment only over instances that have a candidate; rows/cols re-indexed compactly
    rows, r = np.unique(gi, return_inverse=True)
    cols, c = np.unique(pj, return_inverse=True)
    n_min = min(rows.size, cols.size)
    score = np.zeros((rows.size, cols.size))
    # 1 per valid pair dominates: the IoU bonus sums to at most n_min / (2 n_min) = 0.5 over any matching
    score[r, c] = 1.0 + iou / (2.0 * n_min)
    ri, ci = linear_sum_assignment(score, maximize=True)
    tp = int(np.count_nonzero(score[ri, ci] > 0))
    return tp, n_pred - tp, n_gt - tp


def remove_border_cells(labels, border: int = 2) -> np.ndarray:
    """Drop instances touching the image frame of width ``border`` pixels; relabel the rest 1..n.

    The CellSeg evaluation does this with ``border=2`` because cut cells are annotated inconsistently.

    Args:
        labels: instance labels ``[H, W]`` (any N-d) int, 0 = background.
        border: frame width in pixels on every side; 0 only relabels.

    Returns:
        relabelled copy, same shape and dtype (ids consecutive, in the order of the original ids).
    """
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}.")
    labels = _as_label_array(labels)
    if border > 0 and labels.size:
        frame = np.ones(labels.shape, dtype=bool)
        frame[tuple(slice(border, max(border, n - border)) for n in labels.shape)] = False
        touching = np.unique(labels[frame])
        labels = np.where(np.isin(labels, touching[touching > 0]), 0, labels)
    flat, _ = _relabel(labels)
    return flat.reshape(labels.shape).astype(labels.dtype, copy=False)


def _scores(tp: int, fp: int, fn: int, empty_f1: float) -> tuple[float, float, float]:
    """(precision, recall, f1); 0/0 is 0 except when there is nothing at all (``empty_f1`` for all three)."""
    if tp + fp + fn == 0:
        return float(empty_f1), float(empty_f1), float(empty_f1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2.0 * tp / (2.0 * tp + fp + fn)


def f1_score(gt, pred, iou_threshold: float = 0.5, border: int = 0, empty_f1: float = 1.0) -> dict:
    """Per-image instance F1 (CellSeg protocol when ``border=2``).

    ``F1 = 2 TP / (2 TP + FP + FN)``, the harmonic mean of precision ``TP / (TP + FP)`` and recall
    ``TP / (TP + FN)``.

    Empty images: when exactly one of ``gt``/``pred`` is empty, F1 = precision = recall = 0. When both are
    empty (after border removal) there is no error to count and this returns ``empty_f1`` (default 1.0, a
    perfect score). The official CellSeg script instead gives 0 whenever TP = 0, including this case (pass
    ``empty_f1=0.0`` to reproduce it); the challenge images all contain cells, so rankings are unaffected.
    (That script also reports FN = 0 when the prediction is empty; here FN is the number of GT cells.)

    Args:
        gt: ground-truth instance labels ``[H, W]`` int (0 = background).
        pred: predicted instance labels ``[H, W]`` int.
        iou_threshold: minimum IoU for a match (0.5 in CellSeg).
        border: when > 0, first drop cells touching a frame this wide from both images (2 in CellSeg).
        empty_f1: score when neither image has an instance.

    Returns:
        dict with ``f1``, ``precision``, ``recall`` (floats) and ``tp``, ``fp``, ``fn`` (ints).
    """
    if border > 0:
        gt, pred = remove_border_cells(gt, border), remove_border_cells(pred, border)
    tp, fp, fn = match_instances(gt, pred, iou_threshold)
    precision, recall, f1 = _scores(tp, fp, fn, empty_f1)
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def _split_batch(batch, name: str) -> list[np.ndarray]:
    """A batch of instance masks as a list of 2D arrays.

    Accepts a tensor/array ``[B, 1, H, W]``, ``[B, H, W]`` or ``[H, W]`` (one image), or a list/tuple of
    per-image ``[1, H, W]`` / ``[H, W]`` tensors or arrays (decollated MONAI batches).
    """
    if isinstance(batch, (list, tuple)):
        images = []
        for i, item in enumerate(batch):
            arr = _as_label_array(item, f"{name}[{i}]")
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 2:
                raise ValueError(f"{name}[{i}]: expected [1, H, W] or [H, W] instance masks, got {arr.shape}.")
            images.append(arr)
        return images
    arr = _as_label_array(batch, name)
    if arr.ndim == 4 and arr.shape[1] == 1:
        return list(arr[:, 0])
    if arr.ndim == 3:
        return list(arr)
    if arr.ndim == 2:
        return [arr]
    raise ValueError(f"{name}: expected [B, 1, H, W], [B, H, W] or a list of masks, got shape {arr.shape}.")


class F1Metric(Metric):
    """Ignite metric: mean per-image instance F1 over an epoch (the CellSeg ranking score).

    ``update((y_pred, y))`` takes batches of predicted and ground-truth instance masks, see
    :func:`_split_batch` for the accepted layouts; with MONAI evaluators use e.g.
    ``output_transform=monai.handlers.from_engine(["pred", "label"])``. ``compute()`` returns the mean F1
    (float); :meth:`compute_details` adds precision, recall and F1 from the summed TP/FP/FN.
    Sums and counts are all-reduced across processes, so it works under ``ignite.distributed``.

    Args:
        iou_threshold, border, empty_f1: as in :func:`f1_score` (CellSeg: 0.5, 2, -).
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``.
        device: device for the distributed reduction.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        border: int = 0,
        empty_f1: float = 1.0,
        output_transform=lambda x: x,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        self.iou_threshold = float(iou_threshold)
        self.border = int(border)
        self.empty_f1 = float(empty_f1)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._f1_sum = 0.0
        self._num_images = 0
        self._tp = 0
        self._fp = 0
        self._fn = 0

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        y_pred, y = output[0], output[1]
        preds, gts = _split_batch(y_pred, "y_pred"), _split_batch(y, "y")
        if len(preds) != len(gts):
            raise ValueError(f"y_pred has {len(preds)} images but y has {len(gts)}.")
        for pred, gt in zip(preds, gts):
            s = f1_score(gt, pred, self.iou_threshold, self.border, self.empty_f1)
            self._f1_sum += s["f1"]
            self._num_images += 1
            self._tp += s["tp"]
            self._fp += s["fp"]
            self._fn += s["fn"]

    @sync_all_reduce("_f1_sum", "_num_images")
    def compute(self) -> float:
        if self._num_images == 0:
            raise NotComputableError("F1Metric needs at least one image before it can be computed.")
        return float(self._f1_sum) / float(self._num_images)

    @sync_all_reduce("_f1_sum", "_num_images", "_tp", "_fp", "_fn")
    def compute_details(self) -> dict:
        """Epoch summary: ``mean_f1`` (per-image mean), aggregate ``precision``/``recall``/``f1`` from the
        summed counts, and ``tp``, ``fp``, ``fn``, ``num_images`` (ints)."""
        if self._num_images == 0:
            raise NotComputableError("F1Metric needs at least one image before it can be computed.")
        tp, fp, fn = int(self._tp), int(self._fp), int(self._fn)
        precision, recall, f1 = _scores(tp, fp, fn, self.empty_f1)
        return {
            "mean_f1": float(self._f1_sum) / float(self._num_images),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "num_images": int(self._num_images),
        }
