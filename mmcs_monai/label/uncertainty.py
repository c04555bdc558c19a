"""How unsure a model is about an image, from test-time-augmentation (TTA) disagreement.

The image is segmented four times: as it is, flipped left-right, flipped up-down and both. Each
prediction is flipped back (a flip along W negates dX, along H negates dY) and turned into masks.
A model that knows an image segments it the same way every time; the cells it is unsure of appear in
some variants and not others, or with other borders. The score is::

    score = 1 - mean_k F1@0.5(masks_identity, masks_k)      k = the three flips

in [0, 1], with F1 the evaluation's one-to-one instance matching (:func:`mmcs_monai.metrics.f1_score`).
When no variant finds any cell the score is 1: a model that sees nothing in an image (a new modality, cells
at a size it was not trained for) has the most to learn from its label. ``prob_std``, the mean over
pixels of the standard deviation of the cell probability across the variants, is reported too and breaks
ties.

No MONAI Label import here: the label app's scoring method and ``experiments/active_learning/run.py`` share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import CellInferer
from mmcs_monai.metrics import f1_score

# (dims flipped, flow channel negated per flipped dim): W flips negate dX (channel 1), H flips dY (channel 0)
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
_NEGATED_CHANNEL = {-1: 1, -2: 0}


def unflip_flows(flows: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Undo an image flip on network outputs ``[B, 3, H, W]`` (dY, dX, cellprob): flip back and negate the
    flow component along each flipped axis."""
    if not dims:
        return flows
    flows = torch.flip(flows, dims).clone()
    for dim in dims:
        flows[:, _NEGATED_CHANNEL[dim]] *= -1
    return flows


def tta_flows(image: torch.Tensor, network: torch.nn.Module, inferer: CellInferer, diameter=None) -> torch.Tensor:
    """Flows of ``image`` ``[1, 2, H, W]`` float32 under each flip in :data:`FLIPS`, flipped back:
    ``[len(FLIPS), 3, H, W]`` float32.

    The diameter (``diameter``, else the inferer's; ``auto`` is searched once, on the unflipped image) is the
    same for every flip: the variants differ by orientation only, and one size search costs more than the
    four predictions.
    """
    first, used = inferer.predict(image, network, diameter=diameter)
    outputs = [first]
    for dims in FLIPS[1:]:
        outputs.append(unflip_flows(inferer.predict(torch.flip(image, dims), network, diameter=used[0])[0], dims))
    return torch.cat(outputs)


def tta_uncertainty(flows: torch.Tensor | np.ndarray, mask_settings: MaskSettings | None = None) -> dict:
    """Uncertainty of one image from its TTA predictions.

    Args:
        flows: ``[K, 3, H, W]`` float (dY, dX, cellprob logit), K >= 2, prediction 0 the unaugmented one.
        mask_settings: flows -> masks thresholds (default :class:`~mmcs_monai.flows.MaskSettings`()).

    Returns:
        dict: ``score`` (1 - mean F1 of the variants' masks against prediction 0; 1.0 when no variant
        finds a cell), ``mask_agreement`` (that mean F1), ``prob_std`` (float), ``cells`` (count in
        prediction 0).
    """
    flows = torch.as_tensor(flows, dtype=torch.float32)
    if flows.ndim != 4 or flows.shape[0] < 2 or flows.shape[1] != 3:
        raise ValueError(f"flows must be [K >= 2, 3, H, W], got {tuple(flows.shape)}")
    settings = mask_settings or MaskSettings()
    masks = [settings.masks(f.numpy()) for f in flows]
    prob_std = float(torch.sigmoid(flows[:, 2]).std(dim=0, unbiased=False).mean())
    cells = int(masks[0].max())
    if all(m.max() == 0 for m in masks):
        return {"score": 1.0, "mask_agreement": 0.0, "prob_std": prob_std, "cells": 0}
    agreement = float(np.mean([f1_score(masks[0], m)["f1"] for m in masks[1:]]))
    return {"score": 1.0 - agreement, "mask_agreement": agreement, "prob_std": prob_std, "cells": cells}


def image_uncertainty(
    image: torch.Tensor, network: torch.nn.Module, inferer: CellInferer, diameter=None, mask_settings: MaskSettings | None = None
) -> dict:
    """:func:`tta_uncertainty` of ``image`` ``[2, H, W]`` (or ``[1, 2, H, W]``) float32 under ``network``."""
    image = torch.as_tensor(image, dtype=torch.float32)
    image = image[None] if image.ndim == 3 else image
    device = next(iter(network.parameters()), torch.empty(0)).device
    return tta_uncertainty(tta_flows(image.to(device), network, inferer, diameter).cpu(), mask_settings)


def rank_by_uncertainty(scores: Mapping[str, Mapping]) -> list[str]:
    """Image ids, most uncertain first: by ``score``, then ``prob_std``; ties keep id order."""
    return sorted(scores, key=lambda i: (-float(scores[i]["score"]), -float(scores[i].get("prob_std", 0.0)), i))
