"""Cell outlines: one polygon per cell of an instance label image, along the cells' pixel edges.

The one home of masks -> polygons: the GeoJSON and ImageJ ROI exports (:mod:`mmcs_monai.exports`) and the label
server's GeoJSON and ASAP answers (:mod:`mmcs_monai.label`) all outline cells here.

Coordinates are pixel coordinates of the image, x to the right and y down, in QuPath's (and ImageJ's) convention:
pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so its centre is at ``(col + 0.5, row + 0.5)``.
A polygon runs along the pixel edges of the cell's outer boundary (vertices at whole numbers, only where the outline
turns), so a pixel is inside it exactly when it belongs to the cell: rasterising it back (a pixel is in when its
centre is) gives the mask again. A cell in several pieces is outlined by its largest piece; holes are filled.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

# direction of a boundary edge: 0 east (+x), 1 south (+y), 2 west, 3 north; the cell lies on its right
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))


def outline_rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Every boundary ring of ``mask`` along pixel edges, ``[(x, y), ...]`` (open), in the frame of ``mask``.

    Outer rings run clockwise on screen (the cell on the right), holes the other way; two pixels touching
    only at a corner belong to different rings (4-connectivity).
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = padded[1:-1, 1:-1]
    exposed = (
        inner & ~padded[:-2, 1:-1],  # top: (c, r) -> (c + 1, r), east
        inner & ~padded[1:-1, 2:],  # right: (c + 1, r) -> (c + 1, r + 1), south
        inner & ~padded[2:, 1:-1],  # bottom: (c + 1, r + 1) -> (c, r + 1), west
        inner & ~padded[1:-1, :-2],  # left: (c, r + 1) -> (c, r), north
    )
    start_corner = ((0, 0), (1, 0), (1, 1), (0, 1))  # (dx, dy) of each edge's start from the pixel's corner
    outgoing: dict[tuple[int, int], list[int]] = {}
    edges: list[tuple[int, int, int]] = []  # (x, y, direction) of each edge's start
    for direction, side in enumerate(exposed):
        rows, cols = np.nonzero(side)
        dx, dy = start_corner[direction]
        for x, y in zip((cols + dx).tolist(), (rows + dy).tolist()):
            outgoing.setdefault((x, y), []).append(len(edges))
            edges.append((x, y, direction))
    used = [False] * len(edges)
    rings = []
    for first in range(len(edges)):
        if used[first]:
            continue
        ring = []
        edge = first
        while not used[edge]:
            used[edge] = True
            x, y, direction = edges[edge]
            ring.append((x, y, direction))
            ex, ey = x + _STEP[direction][0], y + _STEP[direction][1]
            # at a corner shared by two diagonal pixels, turn right first: the ring keeps to its own pixel
            edge = min(outgoing[(ex, ey)], key=lambda e: (edges[e][2] - direction - 1) % 4)
        # keep the corners where the direction changes
        rings.append([(x, y) for i, (x, y, d) in enumerate(ring) if d != ring[i - 1][2]])
    return rings


def ring_area(ring) -> float:
    """Signed area of an open ring ``[(x, y), ...]`` (positive: clockwise on screen, y down)."""
    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0


def cell_polygon(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[int]]:
    """Exterior ring ``[[x, y], ...]`` (closed: first point repeated last) of the largest piece of ``mask``.

    Args:
        mask: ``[h, w]`` bool, one cell (a crop of the label image), with at least one pixel.
        offset: (row, col) of the crop's top-left pixel in the whole image.

    Returns:
        whole-number vertices on pixel corners (QuPath's frame, see the module docstring).
    """
    rings = outline_rings(mask)
    if not rings:
        raise ValueError("mask has no pixel")
    ring = max(rings, key=ring_area)
    points = [[int(x + offset[1]), int(y + offset[0])] for x, y in ring]
    points.append(points[0])
    return points


def cell_outlines(
    labels: np.ndarray, offset: tuple[int, int] = (0, 0), ids=None
) -> Iterator[tuple[int, list[list[int]], tuple[slice, slice]]]:
    """Each cell's outline, in increasing id: ``(id, ring, box)``.

    Args:
        labels: ``[h, w]`` int instance labels (0 background), or a band / crop of a larger image.
        offset: (row, col) of ``labels``' top-left pixel in the whole image; rings are in whole-image pixels.
        ids: outline only these ids (any iterable of ints; default every id present).

    Returns:
        ring: closed ``[[x, y], ...]`` (:func:`cell_polygon`); box: the cell's bounding box in ``labels`` (slices).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {labels.shape}")
    wanted = None if ids is None else set(int(i) for i in ids)
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if box is None or (wanted is not None and index not in wanted):
            continue
        mask = labels[box] == index
        yield index, cell_polygon(mask, (box[0].start + offset[0], box[1].start + offset[1])), box


__all__ = ["cell_outlines", "cell_polygon", "outline_rings", "ring_area"]
