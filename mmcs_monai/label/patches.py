"""Where in an image to label next: a coarse map of the model's uncertainty and the patch that covers most of it.

QuPath's "Next sample" asks for a box of ``patch_size`` pixels to annotate. Scoring stores, per image, the
test-time-augmentation spread of the cell probability averaged over blocks of ``grid_px`` pixels
(:func:`uncertainty_grid`); the strategy answers with the patch whose blocks sum highest
(:func:`uncertain_window`), or the image's centre when no map is stored.

No MONAI Label import here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MAX_GRID = 32  # blocks per side of the stored map, at most


def uncertainty_grid(flows: torch.Tensor | np.ndarray, max_blocks: int = MAX_GRID) -> dict:
    """Block-averaged spread of the cell probability across TTA predictions.

    Args:
        flows: ``[K, 3, H, W]`` float (dY, dX, cellprob logit), K >= 2 variants of one image.
        max_blocks: blocks per side, at most (the block is square, ``grid_px`` pixels).

    Returns:
        ``{"grid": [[float]] (rows x cols, 4 decimals), "grid_px": block side in pixels, "shape": [H, W]}``.
    """
    flows = torch.as_tensor(flows, dtype=torch.float32)
    if flows.ndim != 4 or flows.shape[0] < 2 or flows.shape[1] != 3:
        raise ValueError(f"flows must be [K >= 2, 3, H, W], got {tuple(flows.shape)}")
    height, width = flows.shape[-2:]
    spread = torch.sigmoid(flows[:, 2]).std(dim=0, unbiased=False)[None, None]
    block = max(1, math.ceil(max(height, width) / max_blocks))
    grid = torch.nn.functional.avg_pool2d(spread, block, stride=block, ceil_mode=True, count_include_pad=False)[0, 0]
    return {"grid": np.round(grid.numpy().astype(np.float64), 4).tolist(), "grid_px": block, "shape": [int(height), int(width)]}


def centred_window(patch_size: Sequence[int], image_size: Sequence[int]) -> list[int]:
    """``[x, y, w, h]`` of a ``patch_size`` (w, h) box in the middle of an ``image_size`` (w, h) image, clipped."""
    width, height = (int(v) for v in image_size)
    w, h = min(int(patch_size[0]), width), min(int(patch_size[1]), height)
    return [(width - w) // 2, (height - h) // 2, w, h]


def uncertain_window(entry: dict | None, patch_size: Sequence[int], image_size: Sequence[int]) -> list[int]:
    """``[x, y, w, h]`` of the ``patch_size`` box, inside the image, over the most uncertain blocks.

    Args:
        entry: a stored score with ``grid`` and ``grid_px`` (:func:`uncertainty_grid`); None or without a
            map: the centred box.
        patch_size: (w, h) pixels asked for (QuPath's ``patch_size``); values <= 0 mean the whole image.
        image_size: (w, h) of the image.
    """
    width, height = (int(v) for v in image_size)
    pw, ph = (int(v) if int(v) > 0 else big for v, big in zip(patch_size, (width, height)))
    pw, ph = min(pw, width), min(ph, height)
    if not entry or "grid" not in entry or (pw == width and ph == height):
        return centred_window((pw, ph), (width, height))
    grid = np.asarray(entry["grid"], dtype=np.float64)
    block = int(entry["grid_px"])
    kh, kw = max(1, min(grid.shape[0], round(ph / block))), max(1, min(grid.shape[1], round(pw / block)))
    summed = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = summed[kh:, kw:] - summed[:-kh, kw:] - summed[kh:, :-kw] + summed[:-kh, :-kw]
    row, col = np.unravel_index(int(np.argmax(windows)), windows.shape)
    x = min(int(col) * block, width - pw)
    y = min(int(row) * block, height - ph)
    return [x, y, pw, ph]
