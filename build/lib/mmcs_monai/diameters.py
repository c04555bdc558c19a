"""Cell diameters from instance labels: the one place the project measures cell size.

A cell's diameter is the diameter of the disc with the same area (``2 * sqrt(area / pi)``, in
pixels); an image's diameter is the median over its cells, as in Cellpose, so a few merged or
fragmented cells do not move it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mmcs_monai.io import read_labels

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


def item_diameter(item: Mapping[str, Any]) -> float:
    """Cell diameter (pixels) of one data-list item: its explicit ``diameter``, else the median of its labels.

    Returns 0.0 for unlabelled items without a ``diameter`` and for labels without cells.
    """
    if item.get("diameter"):
        return float(item["diameter"])
    if item.get("label"):
        return median_diameter(read_labels(item["label"]))
    return 0.0


def datalist_diameters(items: Iterable[Mapping[str, Any]]) -> tuple[float, dict[str, float]]:
    """The self-adaptive diameters of a labelled data list: the overall mean and one mean per subset.

    Each item's diameter is :func:`item_diameter`; a subset's diameter is the mean over its images
    (``subset`` key, ``"default"`` when absent), the overall one the mean over all images. Images
    without cells are left out of both; subsets with no measurable image get no entry.

    Returns:
        ``(mean, {subset: mean})`` in pixels; ``mean`` is 0.0 when nothing could be measured.
    """
    per_subset: dict[str, list[float]] = {}
    for item in items:
        per_subset.setdefault(str(item.get("subset") or "default"), []).append(item_diameter(item))
    subsets = {name: mean_of_diameters(values) for name, values in sorted(per_subset.items())}
    overall = mean_of_diameters(d for values in per_subset.values() for d in values)
    return overall, {name: d for name, d in subsets.items() if d > 0}


def with_subset_diameters(items: list[Mapping[str, Any]], subsets: Mapping[str, float]) -> list[dict]:
    """Copies of ``items`` whose ``diameter`` is their subset's mean (explicit ``diameter`` entries win).

    Training then resizes every image of a subset by the same factor, so the cells keep the size
    variation they have within the subset (the paper's self-adaptive diameter), rather than each
    image being normalised to exactly the target size.
    """
    out = []
    for item in items:
        item = dict(item)
        subset = str(item.get("subset") or "default")
        if not item.get("diameter") and subsets.get(subset):
            item["diameter"] = float(subsets[subset])
        out.append(item)
    return out


DIAMETER_MODES = ("image", "subset")


def training_datalist(items: list[Mapping[str, Any]], subsets: Mapping[str, float], diameter_mode: str = "image") -> list[dict]:
    """The training items for a ``diameter_mode``: ``image`` (each image resized by its own median cell
    diameter) leaves them as they are; ``subset`` gives each the mean of its subset
    (:func:`with_subset_diameters`, the paper's self-adaptive diameter).

    Raises:
        ValueError: an unknown mode (a typo must not silently train per image).
    """
    if diameter_mode not in DIAMETER_MODES:
        raise ValueError(f"diameter_mode {diameter_mode!r}: use one of {', '.join(DIAMETER_MODES)}")
    return with_subset_diameters(items, subsets) if diameter_mode == "subset" else [dict(i) for i in items]
