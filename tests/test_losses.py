"""CellposeLoss against Cellpose 3's _loss_fn_seg and a numpy computation."""

import numpy as np
import pytest
import torch

from helpers import require_module
from mmcs_monai.losses import CellposeLoss


def _example(seed=0, b=2, h=16, w=20):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(b, 3, h, w)).astype(np.float32) * 3
    angle = rng.uniform(0, 2 * np.pi, size=(b, h, w))
    inside = rng.random((b, h, w)) > 0.4
    flows = np.stack([np.sin(angle), np.cos(angle)], 1) * inside[:, None]  # unit vectors in cells, 0 outside
    target = np.concatenate([flows, inside[:, None]], 1).astype(np.float32)
    return pred, target


def _numpy_loss(pred, target):
    p = pred.astype(np.float64)
    t = target.astype(np.float64)
    mse = np.mean((p[:, :2] - 5.0 * t[:, :2]) ** 2) / 2.0
    z, y = p[:, 2], (t[:, 2] > 0.5).astype(np.float64)
    bce = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))  # stable BCE with logits
    return mse + bce


def test_matches_numpy():
    pred, target = _example()
    loss = CellposeLoss()(torch.from_numpy(pred), torch.from_numpy(target))
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), _numpy_loss(pred, target), rtol=1e-5)


def test_matches_cellpose_loss_fn_seg():
    train = require_module("cellpose.train")
    pred, target = _example(seed=3)
    # Cellpose's labels are (cell probability, dY, dX); our target is (dY, dX, cell probability)
    lbl = np.ascontiguousarray(target[:, [2, 0, 1]])
    ref = train._loss_fn_seg(lbl, torch.from_numpy(pred), torch.device("cpu"))
    ours = CellposeLoss()(torch.from_numpy(pred), torch.from_numpy(target))
    assert abs(ours.item() - ref.item()) < 1e-5


def test_soft_cellprob_is_thresholded_and_grad_flows():
    pred, target = _example(seed=5)
    soft = target.copy()
    soft[:, 2] = np.where(target[:, 2] > 0.5, 0.8, 0.2)
    p = torch.from_numpy(pred).requires_grad_(True)
    loss = CellposeLoss()(p, torch.from_numpy(soft))
    np.testing.assert_allclose(loss.item(), _numpy_loss(pred, target), rtol=1e-5)
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_shape_error():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        CellposeLoss()(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
