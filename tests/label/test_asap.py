"""ASAP XML labels in and out (``mmcs_monai.label.asap``), in the main environment: no server, no monailabel.

Expectations are independent of the rasteriser: pixel sets drawn by hand or from a formula, in QuPath's frame
(pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; a pixel belongs to a polygon when its
centre does). Images are not square, so a swap of x and y shows.
"""

import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from helpers import disk_labels
from mmcs_monai.label.asap import AsapError, AsapLimits, AsapTooLarge, asap_to_labels, cells_to_asap, parse_asap, region_cells


def asap(polygons, order=True, **attributes) -> str:
    """An ASAP XML document as QuPath's ``SubmitLabel`` writes it (coordinates given as strings or numbers)."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations", {"Name": "", "Description": "", "X": "0", "Y": "0", "W": "0", "H": "0"})
    for points in polygons:
        annotation = ET.SubElement(annotations, "Annotation", {"Name": "cell", "Type": "Polygon", "PartOfGroup": "cell"})
        coordinates = ET.SubElement(annotation, "Coordinates")
        for i, (x, y) in enumerate(points):
            attrib = {"X": str(x), "Y": str(y), **({"Order": str(i)} if order else {}), **attributes}
            ET.SubElement(coordinates, "Coordinate", attrib)
    ET.SubElement(ET.SubElement(root, "AnnotationGroups"), "Group", {"Name": "cell", "PartOfGroup": "None", "Color": "#ff0000"})
    return '<?xml version="1.0" encoding="UTF-8" standalone="no"?>' + ET.tostring(root, encoding="unicode")


def rectangle(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_rectangles_cover_their_pixels_in_order_and_the_last_one_is_kept():
    # H 20, W 50: the last box lies at x >= 30, which as a row would be outside the image
    shape = (20, 50)
    boxes = [rectangle(2, 3, 6, 5), rectangle(10, 10, 13, 18), rectangle(30, 1, 45, 4)]
    labels, info = asap_to_labels(asap(boxes), shape)
    expected = np.zeros(shape, np.int32)
    expected[3:5, 2:6] = 1  # rows 3-4, columns 2-5
    expected[10:18, 10:13] = 2
    expected[1:4, 30:45] = 3
    assert np.array_equal(labels, expected)
    assert info == {"format": "asap", "polygons": 3, "cells": 3, "outside": 0}


def test_a_triangle_holds_the_pixels_whose_centre_is_inside():
    shape = (12, 9)
    labels, _ = asap_to_labels(asap([[(0, 0), (5.5, 0), (0, 5.5)]]), shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    expected = (cols + 0.5) + (rows + 0.5) < 5.5  # x + y < 5.5, no centre on the edge
    assert np.array_equal(labels > 0, expected)
    assert (labels[expected] == 1).all()


def test_a_later_polygon_wins_overlaps_and_coordinates_follow_order():
    shape = (10, 16)
    first, second = rectangle(1, 1, 8, 8), rectangle(5, 2, 12, 6)
    root = ET.fromstring(asap([first, [second[i] for i in (2, 0, 3, 1)]]))  # the second written out of order...
    for coordinate, order in zip(list(root.iter("Coordinates"))[1], (2, 0, 3, 1)):
        coordinate.set("Order", str(order))  # ...with the Order attribute that puts it right
    labels, info = asap_to_labels(ET.tostring(root), shape)
    expected = np.zeros(shape, np.int32)
    expected[1:8, 1:8] = 1
    expected[2:6, 5:12] = 2
    assert np.array_equal(labels, expected) and info["cells"] == 2


def test_polygons_outside_the_image_are_counted_not_stored():
    shape = (20, 30)
    inside, outside, far = rectangle(2, 2, 6, 6), rectangle(40, 2, 50, 8), rectangle(1e6, 1e6, 1e6 + 5, 1e6 + 5)
    labels, info = asap_to_labels(asap([inside, outside, far]), shape)
    assert labels.max() == 1 and (labels > 0).sum() == 16
    assert info["polygons"] == 3 and info["cells"] == 1 and info["outside"] == 2
    partly = rectangle(25, 15, 40, 40)  # clipped to the image
    labels, _ = asap_to_labels(asap([partly]), shape)
    assert (labels > 0).sum() == 5 * 5
    with pytest.raises(AsapError, match="none of the 1 polygons covers a pixel of the 30 x 20 image"):
        asap_to_labels(asap([outside]), shape)


def test_points_and_lines_are_skipped_and_counted():
    labels, info = asap_to_labels(asap([[(1, 1)], [(1, 1), (5, 5)], rectangle(0, 0, 3, 3)]), (8, 8))
    assert info["cells"] == 1 and info["skipped"] == 2


@pytest.mark.parametrize(
    "value, words",
    [
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("-inf", "not a finite number"),
        ("1e308", "beyond"),
        ("x", "not a number"),
    ],
)
def test_coordinates_that_are_not_finite_pixels_are_refused(value, words):
    with pytest.raises(AsapError, match=words) as error:
        asap_to_labels(asap([rectangle(1, 1, 4, 4), [(1, 1), (value, 2), (3, 3)]]), (8, 8))
    assert "Annotation 2, Coordinate 2: X" in str(error.value)


@pytest.mark.parametrize("order, words", [("inf", "not a finite number"), ("nan", "not a finite number"), ("1.5", "not a whole number")])
def test_an_order_that_is_not_a_whole_number_is_refused(order, words):
    with pytest.raises(AsapError, match=words):
        asap_to_labels(asap([rectangle(1, 1, 4, 4)], order=False, Order=order), (8, 8))


def test_limits_refuse_before_the_work():
    many = [rectangle(i % 40, i // 40, i % 40 + 1, i // 40 + 1) for i in range(120)]
    with pytest.raises(AsapTooLarge, match="more than 100 polygons"):
        parse_asap(asap(many), AsapLimits(max_polygons=100))
    with pytest.raises(AsapTooLarge, match="more than 400 vertices"):
        parse_asap(asap(many), AsapLimits(max_vertices=400))
    jagged = [(x, 0 if x % 2 else 99) for x in range(0, 60)] + [(59, 100), (0, 100)]  # every edge spans the image
    with pytest.raises(AsapTooLarge, match="cross pixel rows"):
        asap_to_labels(asap([jagged]), (100, 60), AsapLimits(max_crossings=1000))
    with pytest.raises(AsapTooLarge, match="cover the image more than 2 times"):
        asap_to_labels(asap([rectangle(0, 0, 60, 100)] * 3), (100, 60), AsapLimits(max_coverage=2))
    with pytest.raises(AsapError, match="entity"):
        parse_asap('<!DOCTYPE a [<!ENTITY x "y">]><ASAP_Annotations/>')
    with pytest.raises(AsapError, match="expected <ASAP_Annotations>"):
        parse_asap("<Other/>")


def test_a_polygon_of_many_vertices_is_a_disc():
    angles = np.linspace(0, 2 * np.pi, 50_000, endpoint=False)
    circle = np.stack([60 + 40 * np.cos(angles), 50 + 40 * np.sin(angles)], axis=1)
    labels, _ = asap_to_labels(asap([circle.round(4).tolist()], order=False), (100, 130))
    rows, cols = np.mgrid[:100, :130]
    expected = (cols + 0.5 - 60) ** 2 + (rows + 0.5 - 50) ** 2 < 40**2
    assert (labels > 0).sum() == pytest.approx(expected.sum(), abs=8)
    assert ((labels > 0) != expected).sum() <= 8  # only pixels whose centre is within the polygon's chords of the circle


def blobs(shape=(70, 110), seed=0) -> np.ndarray:
    """Discs and irregular cells, some touching each other and the border, on a non-square image."""
    labels = disk_labels(shape, centers=((20, 20), (45, 60), (20, 95), (60, 100)), radii=(9, 14, 7, 12)).astype(np.int32)
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for index, (cy, cx) in enumerate([(50, 20), (10, 55), (65, 45)], start=5):
        radius = 6 + 3 * np.sin(np.arctan2(rows - cy, cols - cx) * rng.integers(2, 5))
        labels[((rows - cy) ** 2 + (cols - cx) ** 2 < radius**2) & (labels == 0)] = index
    labels[30:34, 20:50] = 8  # a thin bar touching cell 1's neighbourhood
    return labels


def qupath_submission(xml: str) -> str:
    """What QuPath sends back for proposals accepted unchanged: each coordinate cast with Java's ``(int)``."""
    root = ET.fromstring(xml)
    for coordinate in root.iter("Coordinate"):
        for axis in ("X", "Y"):
            coordinate.set(axis, str(int(float(coordinate.get(axis)))))
    return ET.tostring(root, encoding="unicode")


def test_masks_to_asap_to_labels_round_trip():
    labels = blobs()
    xml = cells_to_asap(region_cells(labels))
    for document in (xml, qupath_submission(xml)):
        back, info = asap_to_labels(document, labels.shape)
        assert info["cells"] == len(np.unique(labels)) - 1
        for index in np.unique(labels)[1:]:
            cell = labels == index
            # ids are renumbered in order: the k-th cell written is id k
            got = back == (np.unique(labels)[1:].tolist().index(index) + 1)
            iou = (cell & got).sum() / (cell | got).sum()
            assert iou >= 0.98, (index, iou)


def test_outlines_are_in_qupaths_pixel_frame():
    labels = np.zeros((6, 9), np.int32)
    labels[2:4, 5:8] = 1  # rows 2-3, columns 5-7: the square from (5, 2) to (8, 4)
    (cell,) = region_cells(labels)
    assert sorted(map(tuple, cell.points[:-1])) == [(5, 2), (5, 4), (8, 2), (8, 4)]
    assert cell.points[0] == cell.points[-1] and cell.area == 6


def test_no_monai_label_needed():
    assert "monailabel" not in sys.modules
