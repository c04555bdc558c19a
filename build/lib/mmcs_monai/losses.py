"""Cellpose training loss: flow regression plus cell-probability classification."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CellposeLoss", "SemiSupervisedLoss"]


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
            raise ValueError(f"pred and target must both be [B, 3, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}.")
        return self.per_sample(pred, target).mean()

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each sample, float [B]; their mean equals ``forward`` (samples have equal size)."""
        if pred.shape != target.shape or pred.ndim < 3 or pred.shape[1] != 3:
            raise ValueError(f"pred and target must both be [B, 3, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}.")
        target = target.to(pred.dtype)
        flow_loss = F.mse_loss(pred[:, :2], self.flow_scale * target[:, :2], reduction="none").flatten(1).mean(1) / 2.0
        inside = (target[:, 2] > self.cellprob_threshold).to(pred.dtype)
        prob_loss = F.binary_cross_entropy_with_logits(pred[:, 2], inside, reduction="none").flatten(1).mean(1)
        return flow_loss + prob_loss


class SemiSupervisedLoss(nn.Module):
    """MMCS loss on mixed batches: ``(1 - w) * L(labelled samples) + w * L(unlabelled samples)``.

    ``L`` is :class:`CellposeLoss` (mean over the samples of each group); unlabelled targets are
    the teacher's pseudo flows and cell probabilities. A group absent from the batch contributes 0
    and the other keeps its own weight. ``w`` is set by ``engines.semi.UnlabelledWeightHandler``.

    Args:
        w: weight of the unlabelled term (paper: 0.4 without extra data, 0.05 with it).

    Call: ``loss(pred [B, 3, H, W], target [B, 4, H, W])``, where target channel 3 is the
    per-sample ``labelled`` flag (1 labelled, 0 unlabelled) broadcast over the image, as
    ``engines.PrepareFlowBatch(flag_key="labelled")`` builds it. ``last_terms`` holds the two
    group losses of the last call (floats) for logging.
    """

    def __init__(self, w: float = 0.4, flow_scale: float = 5.0) -> None:
        super().__init__()
        self.w = float(w)
        self.base = CellposeLoss(flow_scale=flow_scale)
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != 4 or target.shape[1] != 4:
            raise ValueError(f"target must be [B, 4, H, W] with the labelled flag last, got {tuple(target.shape)}")
        labelled = target[:, 3, 0, 0] > 0.5
        losses = self.base.per_sample(pred, target[:, :3])
        total = pred.new_zeros(())
        self.last_terms = {}
        for name, group, weight in (("labelled", labelled, 1.0 - self.w), ("unlabelled", ~labelled, self.w)):
            if group.any():
                term = losses[group].mean()
                self.last_terms[name] = float(term.detach())
                total = total + weight * term
        return total
