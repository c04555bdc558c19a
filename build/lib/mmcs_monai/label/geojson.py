"""Cell outlines as GeoJSON, the shape format QuPath and other MONAI Label clients import.

Coordinates are pixel coordinates of the image, x to the right and y down (QuPath's convention), with
pixel centres at integer values; each cell is one ``Feature`` with a ``Polygon`` (exterior ring, closed)
and ``properties`` ``{"id": label id, "area": pixels, "objectType": "detection", "classification": ...}``.

The polygon follows the cell's outer boundary (marching squares on the cell's binary mask at level 0.5,
then straight runs merged with at most 0.5 px deviation), so rasterising it back gives the mask up to
boundary pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours


def cell_polygon(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """Exterior ring ``[[x, y], ...]`` (closed: first point repeated last) of the largest outline in ``mask``.

    Args:
        mask: ``[h, w]`` bool, one cell (a crop of the label image).
        offset: (row, col) of the crop's top-left pixel in the whole image.
    """
    padded = np.pad(mask.astype(np.uint8), 1)  # closed contours for cells touching the crop's edge
    contours = find_contours(padded, 0.5)
    # straight runs of the half-pixel outline collapse to their end points (at most 0.5 px off the outline)
    ring = approximate_polygon(max(contours, key=len), tolerance=0.5)
    rows = ring[:, 0] - 1 + offset[0]
    cols = ring[:, 1] - 1 + offset[1]
    points = [[round(float(c), 2), round(float(r), 2)] for r, c in zip(rows, cols)]
    if points[0] != points[-1]:
        points.append(points[0])
    return points


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
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [cell_polygon(mask, (box[0].start, box[1].start))]},
                "properties": {
                    "id": index,
                    "area": int(mask.sum()),
                    "objectType": "detection",
                    "classification": {"name": classification},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
