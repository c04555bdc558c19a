"""Cell diameters from instance labels: the one place the project measures cell size.

A cell's diameter is the diameter of the disc with the same area (``2 * sqrt(area / pi)``, in
pixels); an image's diameter is the median over its cells, as in Cellpose, so a few merged or
fragmented cells do not move it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

# Network input scale: images are resized so their median cell diameter becomes this many pixels.
DEFAULT_TARGET_DIAMETER = 30.0


def cell_areas(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pixel counts of each instance in ``labels`` (any shape, 0 = background), as int64 [n_cells]."""
    flat = torch.as_tensor(labels).reshape(-1).cpu().numpy().astype(np.int64, copy=False)
    counts = np.bincount(flat)[1:]
    return counts[counts > 0]


def equivalent_diameters(areas: np.ndarray) -> np.ndarray:
    """Diameter (pixels, float64) of the disc with each given area (pixels)."""
    return 2.0 * np.sqrt(np.asarray(areas, np.float64) / np.pi)


def median_diameter(labels: np.ndarray | torch.Tensor) -> float:
    """Median equivalent diameter (pixels) of the cells in ``labels``; 0.0 when there are none."""
    areas = cell_areas(labels)
    return float(np.median(equivalent_diameters(areas))) if areas.size else 0.0


def mean_of_diameters(diameters: Iterable[float]) -> float:
    """Mean of per-image diameters, ignoring images without cells (diameter 0); 0.0 if none are left."""
    values = np.asarray([d for d in diameters if d > 0], np.float64)
    return float(values.mean()) if values.size else 0.0


def scale_to_target(diameter: float, target: float = DEFAULT_TARGET_DIAMETER) -> float:
    """Zoom factor that brings cells of ``diameter`` pixels to ``target`` pixels (1.0 when unknown)."""
    return float(target / diameter) if diameter and diameter > 0 else 1.0
