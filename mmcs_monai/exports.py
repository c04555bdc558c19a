"""Cell outputs for the tools analysts open: GeoJSON for QuPath, ImageJ ROI sets for Fiji, NGFF labels for napari.

``mmcs infer`` and ``mmcs infer-slide`` write them with ``--formats`` (:data:`~mmcs_monai.options.OUTPUT_FORMATS`);
:class:`CellExporter` writes every chosen format from a label image read a band of rows at a time, so a whole slide
never holds more than a band (plus its tallest cell) and its features in memory:

- **GeoJSON** (``<stem>_cells.geojson``): a ``FeatureCollection`` streamed feature by feature, in full-resolution
  pixel coordinates (x right, y down, pixel-corner vertices: :mod:`mmcs_monai.outlines`), one ``Polygon`` per cell
  with ``properties`` ``objectType`` (``"detection"``, what QuPath 0.4 and later import as detection objects:
  *File > Import objects* or drag and drop), ``name`` (``cell <id>``), ``classification`` and ``measurements``
  (area and equivalent diameter in px, and in µm where the pixel size is known; the mean intensity of every
  channel, named by the image's channel names).
- **ImageJ ROI set** (``<stem>_rois.zip``, ``roifile``): one polygon ROI per cell, named ``cell-<id>``, the same
  pixel-corner polygons (ImageJ's frame): Fiji's ROI Manager opens it.
- **NGFF labels** (``ome-zarr``'s metadata writers, arrays by ``zarr``): ``labels/<name>`` with ``image-label``
  metadata and a nearest-neighbour pyramid, into the input OME-Zarr when the input is one, else into a new
  ``<stem>_masks.ome.zarr``.

Every writer is atomic: GeoJSON and ROI sets are written to a temporary file that is renamed when complete; NGFF
labels are built in a temporary folder that is renamed into ``labels/`` when complete, then listed in
``labels``' metadata.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from mmcs_monai.io import InputError, atomic_path
from mmcs_monai.outlines import cell_outlines

OBJECT_TYPE = "detection"
CLASSIFICATION = "cell"
NGFF_LABEL_NAME = "mmcs"


def geojson_filename(stem: str) -> str:
    return f"{stem}_cells.geojson"


def roi_filename(stem: str) -> str:
    return f"{stem}_rois.zip"


def zarr_filename(stem: str) -> str:
    return f"{stem}_masks.ome.zarr"


def cell_feature(cell_id: int, ring, measurements: dict | None = None, classification: str | None = CLASSIFICATION) -> dict:
    """One GeoJSON ``Feature`` as QuPath 0.4+ reads it: ``Polygon`` ``ring`` (closed ``[[x, y], ...]``) and
    ``properties`` ``objectType`` ``"detection"``, ``name`` ``"cell <id>"``, ``classification`` ``{"name": ...}``
    (left out for None) and ``measurements`` (a name -> number map; non-finite values left out)."""
    properties: dict = {"objectType": OBJECT_TYPE, "name": f"cell {cell_id}"}
    if classification:
        properties["classification"] = {"name": classification}
    if measurements:
        properties["measurements"] = {k: v for k, v in measurements.items() if v is not None and math.isfinite(v)}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}


def cell_measurements(
    labels: np.ndarray, image: np.ndarray | None, ids, channel_names=None, pixel_size: float | None = None
) -> dict[int, dict[str, float]]:
    """Measurements of cells ``ids`` of ``labels`` ([h, w] int), each cell whole inside it: ``Area px^2``,
    ``Diameter px`` (of the circle of the same area), ``Area µm^2`` and ``Diameter µm`` (with ``pixel_size``,
    µm per pixel), and ``<channel>: Mean`` for every channel of ``image`` ([C, h, w], raw intensities), named by
    ``channel_names`` (default ``Channel 1``...)."""
    labels = np.asarray(labels)
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    top = max(int(labels.max(initial=0)), max(ids)) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=top)
    means = []
    if image is not None:
        image = np.asarray(image, np.float64).reshape(len(image), -1)
        names = (
            list(channel_names) if channel_names and len(channel_names) == len(image) else [f"Channel {c + 1}" for c in range(len(image))]
        )
        for name, channel in zip(names, image):
            means.append((f"{name}: Mean", np.bincount(flat, channel, minlength=top)))
    out = {}
    for i in ids:
        a = float(area[i])
        values = {"Area px^2": a, "Diameter px": 2.0 * math.sqrt(a / math.pi)}
        if pixel_size:
            values["Area µm^2"] = a * pixel_size**2
            values["Diameter µm"] = values["Diameter px"] * pixel_size
        for name, sums in means:
            values[name] = float(sums[i] / a) if a else float("nan")
        out[i] = values
    return out


# ------------------------------------------------------------------------------------------ streaming writers
class GeoJSONWriter:
    """A GeoJSON ``FeatureCollection`` written one feature (line) at a time into a temporary file, renamed onto
    ``path`` by :meth:`close` (nothing under ``path`` if the run fails). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, classification: str | None = CLASSIFICATION):
        self.path = Path(path)
        self.classification = classification
        self.count = 0
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))
        self._file.write('{"type": "FeatureCollection", "features": [\n')

    def add(self, cell_id: int, ring, measurements: dict | None = None) -> None:
        if self.count:
            self._file.write(",\n")
        self._file.write(
            json.dumps(cell_feature(cell_id, ring, measurements, self.classification), ensure_ascii=False, separators=(",", ":"))
        )
        self.count += 1

    def close(self) -> None:
        self._file.write("\n]}\n")
        self._stack.close()

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


class RoiSetWriter:
    """An ImageJ ROI set (zip of ``.roi`` files, ``roifile``): one polygon ROI per cell, named ``cell-<id>``, written
    into a temporary zip renamed onto ``path`` by :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._zip = self._stack.enter_context(zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED))

    def add(self, cell_id: int, ring, measurements: dict | None = None) -> None:
        from roifile import ROI_TYPE, ImagejRoi

        name = f"cell-{cell_id}"
        roi = ImagejRoi.frompoints(np.asarray(ring[:-1], dtype=np.float64), name=name)
        roi.roitype = ROI_TYPE.POLYGON
        self._zip.writestr(f"{name}.roi", roi.tobytes())
        self.count += 1

    def close(self) -> None:
        self._stack.close()

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _ngff_format(zarr_format: int):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if zarr_format == 2 else FormatV05()


class NgffLabelsWriter:
    """NGFF labels ``labels/<name>`` (``image-label``, a nearest-neighbour pyramid of ``levels`` levels, factor 2)
    written a band of rows at a time.

    Into the OME-Zarr ``target`` when ``image_axes`` is given (the image's axes: the labels take them without ``c``,
    and level 0's scale), else into a new OME-Zarr ``target`` holding only the labels (zarr v3, NGFF 0.5). The label
    group is built in a temporary folder and renamed into place by :meth:`close`; an earlier ``labels/<name>`` is
    replaced.

    Args:
        target: the OME-Zarr folder.
        shape: (H, W) of the image.
        dtype: label dtype (uint16, or uint32 past 65,535 cells).
        pixel_size: µm per pixel, for a new OME-Zarr's scale.
        image_axes / image_scale: the input OME-Zarr's level-0 axes (names) and scale.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        shape: tuple[int, int],
        dtype=np.uint32,
        name: str = NGFF_LABEL_NAME,
        pixel_size: float | None = None,
        image_axes: tuple[str, ...] | None = None,
        image_scale: list[float] | None = None,
        chunk: int = 1024,
        levels: int | None = None,
    ):
        try:
            import zarr
        except ImportError as err:
            raise InputError(target, "NGFF labels need zarr and ome-zarr: pip install 'mmcs-monai[ome]'") from err
        self.target, self.name, self.shape, self.dtype = Path(target), name, tuple(shape), np.dtype(dtype)
        self.into_image = image_axes is not None
        if self.into_image:
            root = zarr.open_group(str(self.target), mode="r+")
            zarr_format = root.metadata.zarr_format
            root.require_group("labels")
            keep = [i for i, a in enumerate(image_axes) if a != "c"]
            self.axes = [image_axes[i] for i in keep]
            scale = [float(image_scale[i]) for i in keep] if image_scale else [1.0] * len(keep)
            self._tmp = self.target / "labels" / f".{name}.tmp-{os.getpid()}"  # renamed to labels/<name>
            self._build = self._tmp
        else:
            zarr_format = 3
            self.axes = ["y", "x"]
            scale = [pixel_size or 1.0] * 2
            self._tmp = self.target.with_name(f".{self.target.name}.tmp-{os.getpid()}")  # renamed to the target
            self._build = self._tmp / "labels" / name
        self.fmt = _ngff_format(zarr_format)
        if levels is None:
            levels = 1
            while levels < 5 and min(self.shape) // 2**levels >= 256:
                levels += 1
        self.levels = levels
        shutil.rmtree(self._tmp, ignore_errors=True)
        if not self.into_image:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            zarr.open_group(str(self._tmp), mode="w", zarr_format=zarr_format).require_group("labels")
        group = zarr.open_group(str(self._build), mode="w", zarr_format=zarr_format)
        self._arrays, datasets = [], []
        yx = self.axes.index("y"), self.axes.index("x")
        for level in range(levels):
            f = 2**level
            full = [1] * len(self.axes)
            full[yx[0]], full[yx[1]] = -(-self.shape[0] // f), -(-self.shape[1] // f)
            chunks = [1] * len(self.axes)
            chunks[yx[0]], chunks[yx[1]] = min(chunk, full[yx[0]]), min(chunk, full[yx[1]])
            self._arrays.append(group.create_array(str(level), shape=tuple(full), chunks=tuple(chunks), dtype=self.dtype, fill_value=0))
            level_scale = list(scale)
            level_scale[yx[0]] *= f
            level_scale[yx[1]] *= f
            datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": level_scale}]})
        axes = [{"name": a, "type": "space" if a in "zyx" else "time" if a == "t" else "channel"} for a in self.axes]
        if not self.into_image and pixel_size:
            for a in axes:
                a["unit"] = "micrometer"
        if self.into_image and image_axes is not None:
            units = {}
            try:
                ngff = dict(root.attrs)
                ngff = ngff.get("ome", ngff)
                units = {a["name"]: a.get("unit") for a in ngff["multiscales"][0]["axes"] if isinstance(a, dict)}
            except Exception:
                pass
            for a in axes:
                if units.get(a["name"]):
                    a["unit"] = units[a["name"]]
        from ome_zarr.writer import write_multiscales_metadata

        write_multiscales_metadata(group, datasets, fmt=self.fmt, axes=axes, name=name)
        self._group = group
        self._yx = yx

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Rows ``y0:y0 + len(rows)`` of the label image ([h, W] ids, final numbering)."""
        rows = np.asarray(rows)
        for level, array in enumerate(self._arrays):
            f = 2**level
            first = (-y0) % f
            part = rows[first::f, ::f].astype(self.dtype, copy=False)
            if not part.size:
                continue
            start = (y0 + first) // f
            index = [0] * len(self.axes)
            index[self._yx[0]] = slice(start, start + part.shape[0])
            index[self._yx[1]] = slice(0, part.shape[1])
            array[tuple(index)] = part

    def close(self) -> None:
        """Put the labels in place (a rename) and list them in ``labels``' metadata."""
        import zarr
        from ome_zarr.writer import add_metadata, get_metadata, write_label_metadata

        labels_dir = self.target / "labels" if self.into_image else self._tmp / "labels"
        final = labels_dir / self.name if self.into_image else self.target
        if self.into_image:
            old = labels_dir / f".{self.name}.old-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(self._tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        labels = zarr.open_group(str(labels_dir), mode="r+")
        listed = [n for n in get_metadata(labels).get("labels", []) if n != self.name]
        add_metadata(labels, {"labels": listed}, fmt=self.fmt)
        write_label_metadata(labels, self.name, fmt=self.fmt)
        if not self.into_image:
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            if final.exists():
                os.replace(final, old)
            os.replace(self._tmp, final)
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ all formats, band by band
class CellExporter:
    """Write the per-cell formats chosen (``geojson``, ``roi``, ``zarr``) for one image, a band of rows at a time.

    Args:
        output_dir / stem: where ``<stem>_cells.geojson``, ``<stem>_rois.zip`` and ``<stem>_masks.ome.zarr`` go.
        formats: the chosen formats (others in it, like ``tif``, are not this class's).
        channel_names / pixel_size: for the measurements (names of the image's channels; µm per pixel).
        zarr_image: the input OME-Zarr (the NGFF labels go into it), with ``zarr_axes``/``zarr_scale`` (level 0's).
        label_name: the NGFF label group's name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        stem: str,
        formats,
        channel_names=None,
        pixel_size: float | None = None,
        zarr_image: str | os.PathLike | None = None,
        zarr_axes: tuple[str, ...] | None = None,
        zarr_scale: list[float] | None = None,
        label_name: str = NGFF_LABEL_NAME,
    ):
        self.output_dir, self.stem, self.formats = Path(output_dir), stem, tuple(formats)
        self.channel_names, self.pixel_size = channel_names, pixel_size
        self.zarr_image, self.zarr_axes, self.zarr_scale, self.label_name = zarr_image, zarr_axes, zarr_scale, label_name

    @property
    def wanted(self) -> bool:
        return any(f in self.formats for f in ("geojson", "roi", "zarr"))

    def paths(self) -> list[Path]:
        """The files and folders :meth:`write` writes."""
        out = []
        if "geojson" in self.formats:
            out.append(self.output_dir / geojson_filename(self.stem))
        if "roi" in self.formats:
            out.append(self.output_dir / roi_filename(self.stem))
        if "zarr" in self.formats:
            out.append(
                Path(self.zarr_image) / "labels" / self.label_name if self.zarr_image else self.output_dir / zarr_filename(self.stem)
            )
        return out

    def write(
        self,
        shape: tuple[int, int],
        rows: Callable[[int, int], np.ndarray],
        bboxes: dict[str, np.ndarray] | None = None,
        image_rows: Callable[[int, int], np.ndarray] | None = None,
        band: int = 1024,
    ) -> list[Path]:
        """Write every chosen format.

        Args:
            shape: (H, W) of the label image.
            rows: ``rows(y0, y1)`` -> int [y1 - y0, W], the final ids (1..N) of those rows.
            bboxes: the cells table's ``id``, ``bbox_y0`` and ``bbox_y1`` (:func:`mmcs_monai.cells.finalize_labels`):
                a cell is outlined with the band holding its top row, reading down to its bottom row. None: found
                here (an image in memory, ids kept as they are).
            image_rows: ``image_rows(y0, y1)`` -> raw image rows [C, y1 - y0, W] for the mean intensities (None: none).
            band: rows per band (memory: a band plus the tallest cell).

        Returns:
            the paths written.
        """
        if not self.wanted:
            return []
        h, w = shape
        if bboxes is None:  # an image in memory: its own ids, whatever their numbering
            from scipy import ndimage

            found = [(i, box) for i, box in enumerate(ndimage.find_objects(np.asarray(rows(0, h)).astype(np.int64)), start=1) if box]
            bboxes = {"id": [i for i, _ in found], "bbox_y0": [b[0].start for _, b in found], "bbox_y1": [b[0].stop for _, b in found]}
        ids, tops, bottoms = (np.asarray(bboxes[k], np.int64) for k in ("id", "bbox_y0", "bbox_y1"))
        writers = []
        try:
            if "geojson" in self.formats:
                writers.append(GeoJSONWriter(self.output_dir / geojson_filename(self.stem)))
            if "roi" in self.formats:
                writers.append(RoiSetWriter(self.output_dir / roi_filename(self.stem)))
            ngff = None
            if "zarr" in self.formats:
                dtype = np.uint16 if (ids.max(initial=0) <= np.iinfo(np.uint16).max) else np.uint32
                if self.zarr_image:
                    ngff = NgffLabelsWriter(
                        self.zarr_image, shape, dtype, self.label_name, self.pixel_size, self.zarr_axes, self.zarr_scale
                    )
                else:
                    ngff = NgffLabelsWriter(self.output_dir / zarr_filename(self.stem), shape, dtype, self.label_name, self.pixel_size)
            outline_writers = [wr for wr in writers if not isinstance(wr, NgffLabelsWriter)]
            for y0 in range(0, h, band):
                y1 = min(y0 + band, h)
                mine = (tops >= y0) & (tops < y1)
                end = max(y1, int(bottoms[mine].max(initial=y1)))
                labels = np.asarray(rows(y0, end))
                if ngff is not None:
                    ngff.write_rows(y0, labels[: y1 - y0])
                if not outline_writers or not mine.any():
                    continue
                cell_ids = ids[mine]
                image = image_rows(y0, end) if image_rows is not None else None
                values = (
                    cell_measurements(labels, image, cell_ids, self.channel_names, self.pixel_size) if "geojson" in self.formats else {}
                )
                for cell_id, ring, _ in cell_outlines(labels, (y0, 0), cell_ids):
                    for writer in outline_writers:
                        writer.add(cell_id, ring, values.get(cell_id))
            if ngff is not None:
                writers.append(ngff)
                ngff = None
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            if ngff is not None:
                ngff.abort()
            raise
        return self.paths()

    def write_array(self, labels: np.ndarray, image: np.ndarray | None = None) -> list[Path]:
        """:meth:`write` for a label image in memory (``[H, W]`` int, any ids) and its raw image ([C, H, W])."""
        labels = np.asarray(labels)
        image_rows = (lambda y0, y1: image[:, y0:y1]) if image is not None else None
        return self.write(labels.shape, lambda y0, y1: labels[y0:y1], None, image_rows)


def export_cells(output_dir, stem: str, labels: np.ndarray, formats, image: np.ndarray | None = None, **options) -> list[Path]:
    """:class:`CellExporter` for a label image in memory (``[H, W]`` int, ids 1..N) and its raw image ([C, H, W])."""
    return CellExporter(output_dir, stem, formats, **options).write_array(labels, image)


__all__ = [
    "CellExporter",
    "GeoJSONWriter",
    "NgffLabelsWriter",
    "RoiSetWriter",
    "cell_feature",
    "cell_measurements",
    "export_cells",
    "geojson_filename",
    "roi_filename",
    "zarr_filename",
]
