"""Cell polygons: each polygon, rasterised back, is its cell (checked with skimage's rasteriser)."""

import numpy as np
import pytest
from skimage.draw import polygon2mask

from helpers import disk_labels
from mmcs_monai.label.geojson import masks_to_geojson


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def rasterise(feature, shape) -> np.ndarray:
    ring = np.asarray(feature["geometry"]["coordinates"][0])  # [[x, y], ...]
    # QuPath's frame: pixel (r, c) covers [c, c + 1) x [r, r + 1), its centre is (c + 0.5, r + 0.5); skimage
    # puts centres at whole numbers, so the ring moves by half a pixel
    return polygon2mask(shape, ring[:, ::-1] - 0.5)


def test_one_closed_polygon_per_cell_matching_its_mask():
    labels = disk_labels()
    labels[0:6, 40:60] = 7  # a cell on the image border, and ids that are not consecutive
    collection = masks_to_geojson(labels)
    assert collection["type"] == "FeatureCollection"
    ids = [f["properties"]["id"] for f in collection["features"]]
    assert ids == sorted(set(np.unique(labels)) - {0})
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        cell = labels == feature["properties"]["id"]
        assert feature["properties"]["area"] == cell.sum()
        assert iou(rasterise(feature, labels.shape), cell) == 1.0  # the outline runs along the cell's pixel edges


def test_coordinates_are_x_right_y_down():
    labels = np.zeros((50, 80), np.int32)
    labels[10:20, 60:75] = 1  # wide box in the upper right
    ring = np.asarray(masks_to_geojson(labels)["features"][0]["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 60 and ring[:, 0].max() == 75  # x spans the columns 60-74, edges 60 to 75
    assert ring[:, 1].min() == 10 and ring[:, 1].max() == 20  # y spans the rows


def test_empty_and_wrong_shape():
    assert masks_to_geojson(np.zeros((8, 8), np.int32))["features"] == []
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        masks_to_geojson(np.zeros((2, 8, 8), np.int32))
