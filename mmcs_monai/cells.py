"""Per-cell measurements of instance labels and the cells table (CSV): id, centroid, area, bounding box.

One home for both the whole-slide path (labels streamed from a canvas on disk, a band at a time) and
per-image outputs (``SaveCellOutputsd``, the Deploy app's writer).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

from mmcs_monai.io import atomic_path

CELL_TABLE_COLUMNS = ("id", "centroid_y", "centroid_x", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")


class LabelBands(Protocol):
    """A label image read a band of rows at a time: ``shape`` (H, W) and ``bands(height)`` -> (y0, rows)."""

    shape: tuple[int, int]

    def bands(self, height: int = 1024) -> Iterator[tuple[int, np.ndarray]]: ...


def finalize_labels(canvas: LabelBands, band: int = 1024) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One streaming pass: the lookup table to consecutive ids and each cell's measurements.

    Returns:
        ``(lut, table)``: ``lut[old_id]`` is the final id (0 for ids no pixel kept) and ``table`` maps
        each of :data:`CELL_TABLE_COLUMNS` to an array over cells 1..N.
    """
    width = canvas.shape[1]
    size = 1
    area = np.zeros(1, np.int64)
    sums_y = np.zeros(1)
    sums_x = np.zeros(1)
    bbox = np.zeros((1, 4), np.int64)
    for y0, rows in canvas.bands(band):
        ids = np.asarray(rows)
        top = int(ids.max())
        if top == 0:
            continue
        if top + 1 > size:  # grow the per-id arrays
            grow = top + 1 - size
            area = np.concatenate([area, np.zeros(grow, np.int64)])
            sums_y, sums_x = np.concatenate([sums_y, np.zeros(grow)]), np.concatenate([sums_x, np.zeros(grow)])
            bbox = np.concatenate([bbox, np.tile([[np.iinfo(np.int64).max, np.iinfo(np.int64).max, -1, -1]], (grow, 1))])
            size = top + 1
        flat = ids.ravel()
        area[: top + 1] += np.bincount(flat, minlength=top + 1)
        row_index = np.repeat(np.arange(y0, y0 + ids.shape[0], dtype=np.float64), width)
        col_index = np.tile(np.arange(width, dtype=np.float64), ids.shape[0])
        sums_y[: top + 1] += np.bincount(flat, row_index, minlength=top + 1)
        sums_x[: top + 1] += np.bincount(flat, col_index, minlength=top + 1)
        for label, found in enumerate(ndimage.find_objects(ids), start=1):
            if found is not None:
                ys, xs = found
                box = bbox[label]
                box[0] = min(box[0], y0 + ys.start)
                box[1] = min(box[1], xs.start)
                box[2] = max(box[2], y0 + ys.stop)
                box[3] = max(box[3], xs.stop)
        del rows
    present = np.flatnonzero(area[1:]) + 1
    lut = np.zeros(size, np.uint32)
    lut[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    table = {
        "id": np.arange(1, present.size + 1),
        "centroid_y": sums_y[present] / area[present],
        "centroid_x": sums_x[present] / area[present],
        "area": area[present],
        "bbox_y0": bbox[present, 0],
        "bbox_x0": bbox[present, 1],
        "bbox_y1": bbox[present, 2],
        "bbox_x1": bbox[present, 3],
    }
    return lut, table


class _ArrayCanvas:
    """An in-memory label image seen through :class:`LabelCanvas`'s ``shape``/``bands`` interface."""

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels)
        self.shape = self.labels.shape

    def bands(self, height: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        for y0 in range(0, self.shape[0], height):
            yield y0, self.labels[y0 : y0 + height]


def measure_cells(labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`finalize_labels` for a label image in memory (``[H, W]`` int): ``(lut, table)``.

    ``lut[labels]`` renumbers the cells 1..N in the order of the table's ``id`` column.
    """
    return finalize_labels(_ArrayCanvas(labels))


def write_cell_table(path, table: dict[str, np.ndarray]) -> Path:
    """Write the per-cell table (:data:`CELL_TABLE_COLUMNS`) as CSV, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CELL_TABLE_COLUMNS)
        columns = [table[c] for c in CELL_TABLE_COLUMNS]
        for row in zip(*columns):
            writer.writerow([f"{v:.2f}" if isinstance(v, float) else int(v) for v in row])
    return path


# One row per segmented image: what the command line, the bundle and the Deploy app report.
SEGMENTATION_SUMMARY = "segmentation_summary.csv"
SEGMENTATION_SUMMARY_COLUMNS = ("id", "image", "cells", "diameter_px", "diameter_um", "pixel_size_um")


def read_segmentation_summary(path) -> dict[str, dict[str, str]]:
    """Rows of an existing ``segmentation_summary.csv`` by image id (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def write_segmentation_summary(path, rows) -> Path:
    """Write ``rows`` (dicts with :data:`SEGMENTATION_SUMMARY_COLUMNS`: image id, image file, number of cells,
    the cell diameter in pixels it was segmented at, and in micrometres with the pixel size where it is known; empty
    otherwise) as CSV, sorted by id, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(SEGMENTATION_SUMMARY_COLUMNS), extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: str(r["id"])))
    return path
