"""Cell outlines as GeoJSON, the shape format QuPath and other MONAI Label clients import.

Polygons come from :mod:`mmcs_monai.outlines` (pixel edges, QuPath's frame: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``) and features from :func:`mmcs_monai.exports.cell_feature`, the same ones
``mmcs infer --formats geojson`` writes. Each cell is one ``Feature`` with a ``Polygon`` (exterior ring, closed) and
``properties`` ``{"id": label id, "area": pixels, "objectType": "detection", "classification": ...}``.
"""

from __future__ import annotations

import numpy as np

from mmcs_monai.exports import cell_feature
from mmcs_monai.outlines import cell_outlines, cell_polygon, outline_rings, ring_area


def masks_to_geojson(labels: np.ndarray, classification: str = "cell") -> dict:
    """A GeoJSON ``FeatureCollection`` with one polygon per cell of ``labels``.

    Args:
        labels: ``[H, W]`` int instance labels, 0 background.
        classification: the class name given to every cell (QuPath's ``classification``).

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}``, cells in increasing label id.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {labels.shape}")
    features = []
    for index, ring, box in cell_outlines(labels):
        area = int((labels[box] == index).sum())
        feature = cell_feature(index, ring, classification=classification)
        feature["properties"].update(id=index, area=area)
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}


__all__ = ["cell_polygon", "masks_to_geojson", "outline_rings", "ring_area"]
