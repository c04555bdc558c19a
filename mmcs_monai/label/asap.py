"""Cell polygons as ASAP XML and DSA JSON, the annotation formats MONAI Label's QuPath and DSA clients speak.

Both directions:

- **out** (inference): :func:`cells_to_asap` / :func:`cells_to_dsa` write one polygon per cell, in the
  pixel frame of the image that was segmented (x right, y down), cells filtered by region and area with
  :func:`region_cells`;
- **in** (a submitted label): :func:`asap_to_labels` reads an ASAP XML document, QuPath's "Submit label"
  (``ASAP_Annotations/Annotations/Annotation/Coordinates/Coordinate[@X, @Y]``, one ``Annotation`` per object),
  and rasterises each polygon as one instance id at the image's size.

No MONAI Label import here: the label app and the tests share it.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from mmcs_monai.label.geojson import cell_polygon

CELL_CLASS = "cell"
CELL_COLOR = "#F4FA58"


@dataclass(frozen=True)
class CellOutline:
    """One cell's outline: ``points`` ``[[x, y], ...]`` (closed ring, pixels), its label ``id`` and pixel ``area``."""

    id: int
    points: list[list[float]]
    area: int


def polygon_area(points: Sequence[Sequence[float]]) -> float:
    """Area (pixels^2) enclosed by the ring ``points`` ``[[x, y], ...]`` (shoelace formula; open or closed ring)."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def region_cells(
    labels: np.ndarray, region: tuple[int, int, int, int] | None = None, min_poly_area: float = 0.0, offset: tuple[int, int] = (0, 0)
) -> list[CellOutline]:
    """Outlines of the cells of ``labels`` whose centroid lies in ``region``, polygon area >= ``min_poly_area``.

    Args:
        labels: ``[H, W]`` int instance labels (0 background).
        region: ``(x, y, w, h)`` in the frame of ``offset`` (None: every cell).
        min_poly_area: smallest polygon area kept, pixels^2 (MONAI Label's ``min_poly_area``).
        offset: ``(x, y)`` of ``labels``' top-left pixel in the output frame (a crop of a larger image).

    Returns:
        outlines in increasing label id, points in the output frame.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {labels.shape}")
    outlines = []
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False))
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        mask = labels[box] == index
        rows, cols = np.nonzero(mask)
        cy = rows.mean() + box[0].start + offset[1]
        cx = cols.mean() + box[1].start + offset[0]
        if region is not None:
            x, y, w, h = region
            if not (x <= cx < x + w and y <= cy < y + h):
                continue
        points = cell_polygon(mask, (box[0].start + offset[1], box[1].start + offset[0]))
        if polygon_area(points) < min_poly_area:
            continue
        outlines.append(CellOutline(index, points, int(mask.sum())))
    return outlines


def cells_to_asap(cells: Sequence[CellOutline], class_name: str = CELL_CLASS, color: str = CELL_COLOR) -> str:
    """ASAP XML (UTF-8 text with declaration): one ``Annotation`` (``Type="Polygon"``) per cell, in order."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    for cell in cells:
        annotation = ET.SubElement(
            annotations, "Annotation", {"Name": class_name, "Type": "Polygon", "PartOfGroup": class_name, "Color": color}
        )
        coordinates = ET.SubElement(annotation, "Coordinates")
        ring = cell.points[:-1] if len(cell.points) > 1 and cell.points[0] == cell.points[-1] else cell.points
        for order, (x, y) in enumerate(ring):
            ET.SubElement(coordinates, "Coordinate", {"Order": str(order), "X": f"{x:g}", "Y": f"{y:g}"})
    groups = ET.SubElement(root, "AnnotationGroups")
    group = ET.SubElement(groups, "Group", {"Name": class_name, "PartOfGroup": "None", "Color": color})
    ET.SubElement(group, "Attributes")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def cells_to_dsa(cells: Sequence[CellOutline], name: str, class_name: str = CELL_CLASS, color: str = CELL_COLOR) -> str:
    """DSA (Digital Slide Archive) annotation JSON: ``{"name", "elements": [closed polylines]}``."""
    elements = []
    for cell in cells:
        ring = cell.points[:-1] if len(cell.points) > 1 and cell.points[0] == cell.points[-1] else cell.points
        elements.append(
            {
                "type": "polyline",
                "closed": True,
                "points": [[x, y, 0] for x, y in ring],
                "fillColor": "rgba(244, 250, 88, 0.25)",
                "lineColor": color,
                "lineWidth": 1,
                "label": {"value": class_name},
                "group": class_name,
            }
        )
    return json.dumps({"name": name, "description": f"{len(elements)} cells (mmcs-monai)", "elements": elements})


class AsapError(ValueError):
    """An ASAP XML document that cannot be used as a label; the text says what is wrong with it."""


def parse_asap(text: bytes | str) -> list[np.ndarray]:
    """The polygons of an ASAP XML document, in document order: ``[n_i, 2]`` float64 ``(x, y)`` each.

    ``Annotation`` elements with fewer than 3 coordinates (points, lines) are skipped; coordinates are
    ordered by their ``Order`` attribute when every one has it.

    Raises:
        AsapError: not well-formed XML, not ``ASAP_Annotations``, or a coordinate that is not a number.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise AsapError(f"not well-formed XML ({err})") from err
    if root.tag != "ASAP_Annotations":
        raise AsapError(f"root element is <{root.tag}>, expected <ASAP_Annotations>")
    polygons = []
    for number, annotation in enumerate(root.iter("Annotation"), start=1):
        coordinates = annotation.findall("./Coordinates/Coordinate")
        try:
            points = [(float(c.attrib["X"]), float(c.attrib["Y"])) for c in coordinates]
            if all("Order" in c.attrib for c in coordinates):
                order = [int(float(c.attrib["Order"])) for c in coordinates]
                points = [p for _, p in sorted(zip(order, points), key=lambda pair: pair[0])]
        except (KeyError, ValueError) as err:
            raise AsapError(f"Annotation {number}: a Coordinate without numeric X and Y ({err})") from err
        if len(points) >= 3:
            polygons.append(np.asarray(points, dtype=np.float64))
    return polygons


def polygons_to_labels(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons as instance ids 1..N in order (``[H, W]`` int32; a later polygon wins overlaps).

    A pixel belongs to a polygon when its centre (integer coordinates) lies inside it; polygons (partly)
    outside ``shape`` are clipped. Ids are renumbered so that only polygons with pixels left get one.
    """
    labels = np.zeros(shape, dtype=np.int32)
    for index, points in enumerate(polygons, start=1):
        rows, cols = fill_polygon(points[:, 1], points[:, 0], shape=shape)
        if len(rows) == 0:  # thinner than a pixel: its rounded vertices
            rows = np.clip(np.round(points[:, 1]).astype(int), 0, shape[0] - 1)
            cols = np.clip(np.round(points[:, 0]).astype(int), 0, shape[1] - 1)
        labels[rows, cols] = index
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(len(polygons) + 1, dtype=np.int32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lookup[labels]


def asap_to_labels(text: bytes | str, shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """An ASAP XML label as instance labels ``[H, W]`` int32 at ``shape``, with what was done.

    Returns:
        ``(labels, info)`` with ``info`` ``{"format": "asap", "polygons": n read, "cells": ids written,
        "outside": polygons with no pixel in the image or covered by later ones}``.

    Raises:
        AsapError: see :func:`parse_asap`; also when no polygon is found.
    """
    polygons = parse_asap(text)
    if not polygons:
        raise AsapError("no polygon in the document (each Annotation needs 3 or more Coordinates)")
    labels = polygons_to_labels(polygons, shape)
    cells = int(labels.max())
    return labels, {"format": "asap", "polygons": len(polygons), "cells": cells, "outside": len(polygons) - cells}
