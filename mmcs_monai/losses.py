"""Cellpose training loss: flow regression plus cell-probability classification."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CellposeLoss"]


class CellposeLoss(nn.Module):
    """Loss of Cellpose 3 (``cellpose.train._loss_fn_seg``), with MONAI-style (pred, target) channel order.

    ``loss = MSE(pred[:, :2], flow_scale * target[:, :2]) / 2 + BCEWithLogits(pred[:, 2], target[:, 2] > 0.5)``

    Both terms are means over all elements (batch, channels and pixels). Cellpose's own function takes
    labels ordered (cell probability, dY, dX); here the target uses the network's output order instead.

    Args:
        flow_scale: factor applied to the unit target flows; Cellpose trains the network to predict 5x flows.
        cellprob_threshold: target cell probability above which a pixel counts as inside a cell.
    """

    def __init__(self, flow_scale: float = 5.0, cellprob_threshold: float = 0.5) -> None:
        super().__init__()
        self.flow_scale = float(flow_scale)
        self.cellprob_threshold = float(cellprob_threshold)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: network output ``[B, 3, H, W]`` float: (dY, dX, cell-probability logit).
            target: ``[B, 3, H, W]``: (dY, dX) unit flow vectors (zero on background) and the cell
                probability in {0, 1} (values in [0, 1] are thresholded).

        Returns:
            scalar loss tensor (float, same dtype as ``pred``).
        """
        if pred.shape != target.shape or pred.ndim < 3 or pred.shape[1] != 3:
            raise ValueError(
                f"pred and target must both be [B, 3, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        target = target.to(pred.dtype)
        flow_loss = F.mse_loss(pred[:, :2], self.flow_scale * target[:, :2]) / 2.0
        inside = (target[:, 2] > self.cellprob_threshold).to(pred.dtype)
        prob_loss = F.binary_cross_entropy_with_logits(pred[:, 2], inside)
        return flow_loss + prob_loss
