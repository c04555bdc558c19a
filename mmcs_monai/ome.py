"""OME-TIFF and OME-Zarr (NGFF) input: pixel size and channel names from the metadata, OME-Zarr read lazily.

The entry points that know every input format: :func:`read_image` (an image in memory, float32 [C, H, W]),
:func:`open_regions` (a large image read a window at a time, :class:`~mmcs_monai.io.ImageRegions`), :func:`image_info`
(pixel size in micrometres and channel names) and :func:`is_image` (files, and ``.zarr`` folders). Plain TIFF, PNG,
JPEG, NIfTI and ``.npy`` go to :mod:`mmcs_monai.io`; this module adds:

- OME-TIFF (Bio-Formats exports, ``tifffile``'s ``ome=True``): the OME-XML is read by ``tifffile``
  (``TiffFile.ome_metadata``, ``tifffile.xml2dict``), the pixels of series 0 as :mod:`mmcs_monai.io` reads any TIFF.
  ImageJ TIFFs give their pixel size too (``spacing``/resolution in microns).
- OME-Zarr (NGFF 0.4 with zarr v2 and 0.5 with zarr v3): ``multiscales`` level 0 opened with ``zarr``, read one
  window at a time (only the chunks a window touches), channel names from ``omero``, pixel size from level 0's
  ``scale`` with the axes' units.

Every problem is an :class:`~mmcs_monai.io.InputError` naming the file: metadata that disagrees with the pixels, a
zarr without ``multiscales``, a 3D stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcs_monai import io
from mmcs_monai.io import ImageRegions, InputError

ZARR_SUFFIXES = (".zarr",)

# micrometres per unit, for the units OME and NGFF spell lengths in
_UNIT_MICROMETRES = {
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "å": 1e-4,
    "angstrom": 1e-4,
}


@dataclass(frozen=True)
class ImageInfo:
    """What an image's metadata says.

    Attributes:
        pixel_size: micrometres per pixel (the x size; y where only it is given), or None when the file has none.
        channel_names: one name per channel in the order :func:`read_image` returns them, or None when unnamed.
        kind: ``"ome-tiff"``, ``"ome-zarr"``, ``"imagej"`` or ``"plain"``.
    """

    pixel_size: float | None = None
    channel_names: tuple[str, ...] | None = None
    kind: str = "plain"


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a ``.zarr`` folder (``image.ome.zarr``, ``slide.zarr``)."""
    path = Path(path)
    return path.name.lower().endswith(ZARR_SUFFIXES) and path.is_dir()


def is_image(path: str | os.PathLike) -> bool:
    """An input :func:`read_image` takes: an image file (:func:`mmcs_monai.io.is_image_file`) or an OME-Zarr folder."""
    path = Path(path)
    return (is_zarr(path) and not path.name.startswith(".")) or io.is_image_file(path)


def _micrometres(value, unit, path, what) -> float | None:
    if value is None:
        return None
    unit = "µm" if unit in (None, "") else str(unit).strip().lower()
    if unit not in _UNIT_MICROMETRES:
        raise InputError(path, f"{what} unit {unit!r} is not a length unit this reader knows")
    size = float(value) * _UNIT_MICROMETRES[unit]
    if not size > 0:
        raise InputError(path, f"{what} {value} {unit} is not positive")
    return size


# ------------------------------------------------------------------------------------------ OME-TIFF
def _tiff_info(path: Path) -> ImageInfo:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                return _ome_tiff_info(path, tif, tifffile.xml2dict(tif.ome_metadata))
            if tif.is_imagej:
                return _imagej_info(path, tif)
    except InputError:
        raise
    except Exception as err:
        raise InputError(path, f"cannot be read as a TIFF image ({type(err).__name__}: {err})") from err
    return ImageInfo()


def _ome_tiff_info(path: Path, tif, ome: dict) -> ImageInfo:
    images = ome.get("OME", {}).get("Image")
    image = images[0] if isinstance(images, list) else images
    pixels = (image or {}).get("Pixels")
    if not pixels:
        raise InputError(path, "OME metadata has no Image/Pixels element")
    series = tif.series[0]
    if getattr(series, "kind", "ome") != "ome":
        raise InputError(path, "OME metadata disagrees with the pixels (tifffile could not map the OME-XML onto the file's pages)")
    size_x, size_y, size_c = int(pixels.get("SizeX", 0)), int(pixels.get("SizeY", 0)), int(pixels.get("SizeC", 1))
    axes, shape = series.axes, series.shape
    found = {a: n for a, n in zip(axes, shape)}
    channels = found.get("C", 1) * found.get("S", 1)
    if (found.get("Y"), found.get("X")) != (size_y, size_x) or channels != size_c:
        raise InputError(
            path,
            f"OME metadata disagrees with the pixels: it says {size_c} channel(s) of {size_y} x {size_x} px, "
            f"the file holds {shape} ({axes})",
        )
    size = _micrometres(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"), path, "PhysicalSizeX")
    if size is None:
        size = _micrometres(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"), path, "PhysicalSizeY")
    listed = pixels.get("Channel") or []
    listed = listed if isinstance(listed, list) else [listed]
    names = None
    if "S" not in found and listed and all(c.get("Name") not in (None, "") for c in listed):
        names = tuple(str(c["Name"]) for c in listed)
        if len(names) != channels:
            raise InputError(path, f"OME metadata names {len(names)} channel(s) but the pixels have {channels}")
    return ImageInfo(size, names, "ome-tiff")


def _imagej_info(path: Path, tif) -> ImageInfo:
    page = tif.pages.first
    unit = str((tif.imagej_metadata or {}).get("unit", "")).replace("\\u00B5", "µ")
    resolution = page.tags.get("XResolution")
    if resolution is None or unit.lower() not in _UNIT_MICROMETRES:
        return ImageInfo(kind="imagej")
    numerator, denominator = resolution.value
    if not numerator:
        return ImageInfo(kind="imagej")
    return ImageInfo(_micrometres(denominator / numerator, unit, path, "ImageJ pixel width"), None, "imagej")


# ------------------------------------------------------------------------------------------ OME-Zarr
@dataclass(frozen=True)
class _ZarrImage:
    array: object  # zarr.Array, level 0
    axes: tuple[str, ...]
    info: ImageInfo
    attrs: dict  # the NGFF metadata (the "ome" block of 0.5, the group attributes of 0.4)


def _open_zarr(path: Path) -> _ZarrImage:
    try:
        import zarr
    except ImportError as err:
        raise InputError(path, "reading OME-Zarr needs zarr and ome-zarr: pip install 'mmcs-monai[ome]'") from err
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:
        raise InputError(path, f"cannot be opened as a zarr group ({type(err).__name__}: {err})") from err
    ngff = attrs.get("ome", attrs)
    multiscales = ngff.get("multiscales")
    if not multiscales:
        raise InputError(
            path, "zarr group has no NGFF 'multiscales' metadata: not an OME-Zarr image (write it with ome-zarr or bioformats2raw)"
        )
    scale0 = multiscales[0]
    axes_meta = scale0.get("axes") or [{"name": a} for a in ("t", "c", "z", "y", "x")[-len(group[scale0["datasets"][0]["path"]].shape) :]]
    axes = tuple((a["name"] if isinstance(a, dict) else str(a)).lower() for a in axes_meta)
    try:
        dataset = scale0["datasets"][0]
        array = group[dataset["path"]]
    except Exception as err:
        raise InputError(path, f"multiscales level 0 cannot be opened ({type(err).__name__}: {err})") from err
    if len(axes) != array.ndim or "y" not in axes or "x" not in axes:
        raise InputError(path, f"NGFF axes {list(axes)} disagree with level 0's shape {tuple(array.shape)}")
    for axis, size in zip(axes, array.shape):
        if axis in ("t", "z") and size > 1:
            raise InputError(
                path, f"OME-Zarr has {size} {axis} planes {tuple(array.shape)} {list(axes)}; save the plane to segment as its own image"
            )
    size = None
    scales = [t for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"]
    if scales:
        units = {(a["name"] if isinstance(a, dict) else a).lower(): (a.get("unit") if isinstance(a, dict) else None) for a in axes_meta}
        scale = scales[0].get("scale", [])
        if len(scale) == len(axes):
            x_scale = scale[axes.index("x")]
            if units.get("x"):  # a scale without a unit is in no length: not a pixel size
                size = _micrometres(x_scale, units["x"], path, "NGFF x scale")
    channels = array.shape[axes.index("c")] if "c" in axes else 1
    names = None
    omero = ngff.get("omero") or attrs.get("omero") or {}
    listed = omero.get("channels") or []
    if listed:
        if len(listed) != channels:
            raise InputError(path, f"OME-Zarr 'omero' metadata names {len(listed)} channel(s) but level 0 has {channels}")
        if all(c.get("label") not in (None, "") for c in listed):
            names = tuple(str(c["label"]) for c in listed)
    return _ZarrImage(array, axes, ImageInfo(size, names, "ome-zarr"), ngff)


class ZarrRegions(ImageRegions):
    """Regions of an OME-Zarr's level 0, read a window at a time (only the chunks it touches are decoded)."""

    def __init__(self, path: Path, image: _ZarrImage):
        axes, shape = image.axes, image.array.shape
        channels = shape[axes.index("c")] if "c" in axes else 1
        super().__init__(path, (int(shape[axes.index("y")]), int(shape[axes.index("x")])), channels, np.dtype(image.array.dtype))
        self.image = image
        self.info = image.info

    def _read(self, y0, y1, x0, x1):
        index = []
        for axis in self.image.axes:
            index.append(slice(y0, y1) if axis == "y" else slice(x0, x1) if axis == "x" else slice(None) if axis == "c" else 0)
        block = np.asarray(self.image.array[tuple(index)])
        kept = [a for a in self.image.axes if a in ("c", "y", "x")]
        block = np.transpose(block, [kept.index(a) for a in ("c", "y", "x") if a in kept])
        return block if "c" in kept else block[None]


# ------------------------------------------------------------------------------------------ entry points
def image_info(path: str | os.PathLike) -> ImageInfo:
    """Pixel size (micrometres) and channel names of an image (:class:`ImageInfo`; empty for formats without them).

    Raises:
        InputError: OME metadata that disagrees with the pixels, a zarr without ``multiscales``, unreadable files.
    """
    path = Path(path)
    if is_zarr(path):
        return _open_zarr(path).info
    if path.is_file() and io._suffix(path) in (".tif", ".tiff") and path.stat().st_size > 0:
        return _tiff_info(path)
    return ImageInfo()


def open_regions(path: str | os.PathLike) -> ImageRegions:
    """:func:`mmcs_monai.io.open_regions` for every input, OME-Zarr included; the result's ``info`` is its
    :class:`ImageInfo`."""
    path = Path(path)
    if is_zarr(path):
        regions = ZarrRegions(path, _open_zarr(path))
        if min(regions.shape) < 2:
            raise InputError(path, f"image is too small to segment ({regions.shape[0]} x {regions.shape[1]} pixels)")
        return regions
    info = image_info(path)
    regions = io.open_regions(path)
    if info.channel_names is not None and len(info.channel_names) != regions.channels:
        info = ImageInfo(info.pixel_size, None, info.kind)  # RGBA's alpha dropped, more than 3 channels: names no longer match
    regions.info = info
    return regions


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """An image as float32 [C, H, W] (:func:`mmcs_monai.io.read_image`; OME-Zarr level 0 too) and its :class:`ImageInfo`.

    Raises:
        InputError: as :func:`mmcs_monai.io.read_image`, and as :func:`image_info`.
    """
    path = Path(path)
    if is_zarr(path):
        with open_regions(path) as regions:
            h, w = regions.shape
            if h * w > io.MAX_PIXELS:
                raise InputError(
                    path, f"image has {h * w} pixels, more than {io.MAX_PIXELS}; segment it with `mmcs infer-slide` (block by block)"
                )
            return np.ascontiguousarray(regions.read(0, h, 0, w)), regions.info
    info = image_info(path)
    image = io.read_image(path)
    if info.channel_names is not None and len(info.channel_names) != image.shape[0]:
        info = ImageInfo(info.pixel_size, None, info.kind)
    return image, info


def resolve_channel(path, choice: int | str, info: ImageInfo, channels: int) -> int:
    """The index of channel ``choice`` (an index, or a name from the image's metadata) in an image of ``channels`` channels.

    Raises:
        InputError: an index out of range, or a name the image does not have (the message lists its names).
    """
    if isinstance(choice, (int, np.integer)):
        if not 0 <= int(choice) < channels:
            raise InputError(path, f"channel {choice} but the image has {channels} channel(s)")
        return int(choice)
    names = info.channel_names or ()
    if choice in names:
        return names.index(choice)
    lowered = [n.lower() for n in names]
    if str(choice).lower() in lowered:
        return lowered.index(str(choice).lower())
    known = ", ".join(repr(n) for n in names) if names else "none (the file names no channels; give an index)"
    raise InputError(path, f"no channel named {choice!r}; its channels: {known}")


__all__ = ["ImageInfo", "ZarrRegions", "image_info", "is_image", "is_zarr", "open_regions", "read_image", "resolve_channel"]
