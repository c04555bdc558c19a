"""Cell polygons as ASAP XML and DSA JSON, the annotation formats MONAI Label's QuPath and DSA clients speak.

Both directions:

- **out** (inference): :func:`cells_to_asap` / :func:`cells_to_dsa` write one polygon per cell, in the
  pixel frame of the image that was segmented (x right, y down; pixel ``(row, col)`` covers
  ``[col, col + 1) x [row, row + 1)``, QuPath's frame), along the cell's pixel edges
  (:func:`~mmcs_monai.outlines.cell_polygon`), cells filtered by region and area with :func:`region_cells`;
- **in** (a submitted label): :func:`asap_to_labels` reads an ASAP XML document, QuPath's "Submit label"
  (``ASAP_Annotations/Annotations/Annotation/Coordinates/Coordinate[@X, @Y]``, one ``Annotation`` per object),
  and rasterises each polygon as one instance id at the image's size (a pixel is in a polygon when its centre
  is), within :class:`AsapLimits`.

A mask written out and read back is the same mask (largest piece of each cell, holes filled), also after
QuPath's ``(int)`` cast of the coordinates it submits: the vertices are whole numbers.

No MONAI Label import here: the label app and the tests share it.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mmcs_monai.outlines import cell_polygon

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
        rows, cols = np.nonzero(mask)  # centroid in QuPath's frame: pixel (r, c) is centred at (c + 0.5, r + 0.5)
        cy = rows.mean() + 0.5 + box[0].start + offset[1]
        cx = cols.mean() + 0.5 + box[1].start + offset[0]
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


class AsapTooLarge(AsapError):
    """An ASAP XML document over one of :class:`AsapLimits` (the server answers 413)."""


@dataclass(frozen=True)
class AsapLimits:
    """What one ASAP XML label may hold, so that no upload holds the server for long.

    Attributes:
        max_polygons: ``Annotation`` elements with 3 or more coordinates.
        max_vertices: ``Coordinate`` elements, all annotations together.
        max_crossings: polygon edges x pixel rows they cross, all polygons together (the rasteriser's work).
        max_coverage: pixels painted, as a multiple of the image's pixels (overlapping polygons count
            each time).
    """

    max_polygons: int = 100_000
    max_vertices: int = 1_000_000
    max_crossings: int = 20_000_000
    max_coverage: float = 4.0


# coordinates further out than this are refused: no 2D image here is that large, and the arithmetic stays exact
MAX_COORDINATE = 1e7
_CHUNK = 1 << 16  # bytes fed to the XML parser at a time: other threads run between chunks


def _number(value: str | None, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AsapError(f"{what} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise AsapError(f"{what} is {value!r}, not a finite number")
    if abs(number) > MAX_COORDINATE:
        raise AsapError(f"{what} is {value!r}, beyond +-{MAX_COORDINATE:g} pixels")
    return number


def _polygon(number: int, coordinates: list[dict[str, str]]) -> np.ndarray:
    """One ``Annotation``'s ``Coordinate`` attributes as ``[n, 2]`` (x, y), ordered by ``Order`` when all have one."""
    points = np.empty((len(coordinates), 2), dtype=np.float64)
    for i, attrib in enumerate(coordinates):
        where = f"Annotation {number}, Coordinate {i + 1}"
        points[i] = _number(attrib.get("X"), f"{where}: X"), _number(attrib.get("Y"), f"{where}: Y")
    if coordinates and all("Order" in a for a in coordinates):
        order = []
        for i, attrib in enumerate(coordinates):
            value = _number(attrib["Order"], f"Annotation {number}, Coordinate {i + 1}: Order")
            if value != int(value):
                raise AsapError(f"Annotation {number}, Coordinate {i + 1}: Order is {attrib['Order']!r}, not a whole number")
            order.append(int(value))
        points = points[np.argsort(order, kind="stable")]
    return points


def parse_asap(text: bytes | str, limits: AsapLimits | None = None) -> tuple[list[np.ndarray], int]:
    """The polygons of an ASAP XML document, in document order: ``[n_i, 2]`` float64 ``(x, y)`` each.

    The document is parsed in chunks (the server keeps answering others meanwhile) and refused as soon as it
    passes ``limits``. ``Annotation`` elements with fewer than 3 coordinates (points, lines) are skipped and
    counted; coordinates are ordered by their ``Order`` attribute when every one has it.

    Returns:
        ``(polygons, skipped)``.

    Raises:
        AsapError: not well-formed XML, entity declarations, not ``ASAP_Annotations``, or a coordinate or
            ``Order`` that is not a finite number (or is beyond :data:`MAX_COORDINATE`).
        AsapTooLarge: more polygons or vertices than ``limits`` allow.
    """
    limits = limits or AsapLimits()
    data = text.encode() if isinstance(text, str) else bytes(text)
    if b"<!ENTITY" in data:
        raise AsapError("entity declarations are not accepted in a label")
    parser = ET.XMLPullParser(events=("start", "end"))
    polygons: list[np.ndarray] = []
    skipped = vertices = annotations = 0
    path: list[str] = []
    current: list[dict[str, str]] | None = None
    try:
        for offset in range(0, max(len(data), 1), _CHUNK):
            parser.feed(data[offset : offset + _CHUNK])
            for event, element in parser.read_events():
                if event == "start":
                    if not path and element.tag != "ASAP_Annotations":
                        raise AsapError(f"root element is <{element.tag}>, expected <ASAP_Annotations>")
                    path.append(element.tag)
                    if element.tag == "Annotation":
                        current = []
                    elif element.tag == "Coordinate" and path[-3:-1] == ["Annotation", "Coordinates"] and current is not None:
                        vertices += 1
                        if vertices > limits.max_vertices:
                            raise AsapTooLarge(
                                f"more than {limits.max_vertices} vertices (conf max_label_vertices): split the label or simplify the outlines"
                            )
                        current.append(dict(element.attrib))
                    continue
                path.pop()
                if element.tag == "Annotation" and current is not None:
                    annotations += 1
                    if len(current) >= 3:
                        if len(polygons) >= limits.max_polygons:
                            raise AsapTooLarge(
                                f"more than {limits.max_polygons} polygons (conf max_label_polygons): submit fewer at a time"
                            )
                        polygons.append(_polygon(annotations, current))
                    else:
                        skipped += 1
                    current = None
                    element.clear()
        parser.close()
    except ET.ParseError as err:
        raise AsapError(f"not well-formed XML ({err})") from err
    return polygons, skipped


def _row_crossings(polygons: Sequence[np.ndarray], height: int) -> tuple[np.ndarray, ...]:
    """Every polygon edge that crosses a pixel-row centre line ``y = row + 0.5`` in ``[0, height)``.

    Returns ``(polygon index, x0, y0, slope dx/dy, first row, row count)`` per edge (edges crossing no row
    are left out). An edge holds the rows with ``ymin <= row + 0.5 < ymax`` (half-open: a vertex on a centre
    line counts once).
    """
    owner = np.repeat(np.arange(len(polygons)), [len(p) for p in polygons])
    start = np.concatenate(polygons)
    end = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    ymin, ymax = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    first = np.clip(np.ceil(ymin - 0.5), 0, height).astype(np.int64)
    stop = np.clip(np.ceil(ymax - 0.5), 0, height).astype(np.int64)
    keep = stop > first
    dy = end[keep, 1] - start[keep, 1]
    slope = (end[keep, 0] - start[keep, 0]) / dy
    return owner[keep], start[keep, 0], start[keep, 1], slope, first[keep], (stop - first)[keep]


def polygons_to_labels(polygons: Sequence[np.ndarray], shape: tuple[int, int], limits: AsapLimits | None = None) -> np.ndarray:
    """Rasterise polygons as instance ids 1..N in order (``[H, W]`` int32; a later polygon wins overlaps).

    Coordinates are in QuPath's pixel frame: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``
    and belongs to a polygon when its centre ``(col + 0.5, row + 0.5)`` lies inside (even-odd rule; a centre
    on a left or top edge is inside, on a right or bottom edge outside). Polygons (partly) outside ``shape``
    are clipped. Ids are renumbered so that only polygons with pixels left get one.

    Scanline fill, vectorised and done in batches, so that a polygon of a million vertices costs about as
    much as a million small ones and other threads run between batches.

    Raises:
        AsapTooLarge: the work passes ``limits.max_crossings`` or ``limits.max_coverage``.
    """
    limits = limits or AsapLimits()
    height, width = (int(v) for v in shape)
    labels = np.zeros(height * width, dtype=np.int32)
    if len(polygons):
        owner, x0, y0, slope, first, count = _row_crossings(polygons, height)
        total = int(count.sum())
        if total > limits.max_crossings:
            raise AsapTooLarge(
                f"the polygons cross pixel rows {total} times, more than {limits.max_crossings}: they are too large or too jagged"
            )
        budget = int(limits.max_coverage * height * width) + 1
        painted = 0
        # bands of rows holding about a million crossings each (all polygons: overlaps resolve by id anyway)
        per_row = np.zeros(height + 1, dtype=np.int64)
        np.add.at(per_row, first, 1)
        np.add.at(per_row, first + count, -1)
        cumulative = np.cumsum(np.cumsum(per_row)[:height])
        cuts = np.unique(np.searchsorted(cumulative, np.arange(1 << 20, total, 1 << 20), side="left"))
        bands = zip(np.concatenate([[0], cuts + 1]), np.concatenate([cuts + 1, [height]]))
        for top, bottom in bands:
            lo, hi = np.maximum(first, top), np.minimum(first + count, bottom)
            inside = hi > lo
            painted += _paint(labels, width, owner[inside], x0[inside], y0[inside], slope[inside], lo[inside], (hi - lo)[inside])
            if painted > budget:
                raise AsapTooLarge(
                    f"the polygons cover the image more than {limits.max_coverage:g} times over (overlapping or image-sized polygons)"
                )
    labels = labels.reshape(height, width)
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(polygons) + 1))
    present = present[present > 0]
    lookup = np.zeros(len(polygons) + 1, dtype=np.int32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lookup[labels]


def _paint(labels: np.ndarray, width: int, owner, x0, y0, slope, first, count) -> int:
    """Fill the spans between pairs of row crossings of whole polygons into flat ``labels``; pixels painted."""
    if not len(owner):
        return 0
    edge = np.repeat(np.arange(len(owner)), count)
    row = np.repeat(first, count) + (np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count))
    x = x0[edge] + (row + 0.5 - y0[edge]) * slope[edge]
    polygon = owner[edge]
    order = np.lexsort((x, row, polygon))
    x, row, polygon = x[order], row[order], polygon[order]
    # crossings pair up along each row of each polygon: (in, out), (in, out) ... (even-odd rule)
    start = np.clip(np.ceil(x[0::2] - 0.5), 0, width).astype(np.int64)
    stop = np.clip(np.ceil(x[1::2] - 0.5), 0, width).astype(np.int64)
    row, ids = row[0::2], polygon[0::2].astype(np.int32) + 1
    keep = stop > start
    start, stop, row, ids = start[keep], stop[keep], row[keep], ids[keep]
    lengths = stop - start
    painted = int(lengths.sum())
    chunk = 1 << 22  # pixels written at a time
    ends = np.cumsum(lengths)
    lo = 0
    while lo < len(lengths):
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + chunk, side="right"))
        hi = max(hi, lo + 1)
        part = lengths[lo:hi]
        offsets = np.arange(int(part.sum())) - np.repeat(np.cumsum(part) - part, part)
        index = np.repeat(row[lo:hi] * width + start[lo:hi], part) + offsets
        # a later polygon has a larger id: the largest id at a pixel is the last polygon drawn there
        np.maximum.at(labels, index, np.repeat(ids[lo:hi], part))
        lo = hi
    return painted


def asap_to_labels(text: bytes | str, shape: tuple[int, int], limits: AsapLimits | None = None) -> tuple[np.ndarray, dict]:
    """An ASAP XML label as instance labels ``[H, W]`` int32 at ``shape``, with what was done.

    Returns:
        ``(labels, info)`` with ``info`` ``{"format": "asap", "polygons": n read, "cells": ids written,
        "outside": polygons with no pixel in the image (outside it, thinner than a pixel, or covered by
        later ones), "skipped": annotations with fewer than 3 coordinates}``.

    Raises:
        AsapError: see :func:`parse_asap`; also when no polygon is found, or none covers a pixel of the image.
        AsapTooLarge: over ``limits``.
    """
    polygons, skipped = parse_asap(text, limits)
    if not polygons:
        raise AsapError("no polygon in the document (each Annotation needs 3 or more Coordinates)")
    labels = polygons_to_labels(polygons, shape, limits)
    cells = int(labels.max())
    if cells == 0:
        raise AsapError(
            f"none of the {len(polygons)} polygons covers a pixel of the {shape[1]} x {shape[0]} image: "
            "coordinates must be image (or patch) pixels, x right, y down"
        )
    info = {"format": "asap", "polygons": len(polygons), "cells": cells, "outside": len(polygons) - cells}
    return labels, {**info, **({"skipped": skipped} if skipped else {})}
