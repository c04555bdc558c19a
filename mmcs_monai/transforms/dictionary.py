"""Dictionary twins of ``array.py``: each ``...d`` transform wraps its array transform."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, Randomizable

from mmcs_monai.cells import measure_cells, write_cell_table
from mmcs_monai.diameters import DEFAULT_TARGET_DIAMETER
from mmcs_monai.exports import CellExporter
from mmcs_monai.io import InputError, image_stem, masks_filename, overlay_filename, write_labels, write_overlay
from mmcs_monai.ome import ImageInfo, is_zarr, resolve_channel
from mmcs_monai.ome import read_image as read_image_and_info
from mmcs_monai.options import DEFAULT_FORMATS, parse_channels, parse_formats, parse_micrometres, parse_pixel_size
from mmcs_monai.transforms.array import (
    CellDiameter,
    FlowsToMasks,
    LabelsToFlows,
    LoadMicroscopyImage,
    NormalizePercentile,
    RandCellAffine,
    StackNucleusChannel,
)

__all__ = [
    "LoadMicroscopyd",
    "StackNucleusChanneld",
    "DiameterInPixelsd",
    "NormalizePercentiled",
    "LabelsToFlowsd",
    "CellDiameterd",
    "RandCellAffined",
    "FlowsToMasksd",
    "SaveCellOutputsd",
    "AttachPseudoTargetd",
    "inference_preprocessing",
]


class LoadMicroscopyd(MapTransform):
    """Load ``image`` (float32 [C, H, W]) and ``label`` (int32 [1, H, W]) from the paths in the dict.

    The source paths are kept under ``<key>_file`` for error messages and output names, and the
    label's size is checked against the image's. The image's metadata goes under ``<key>_pixel_size`` (micrometres
    per pixel, NaN when the file has none) and ``<key>_channel_names`` (a tuple, or None).

    Args:
        keys: image key first, then label keys.
        label_keys: which of ``keys`` hold instance labels.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_keys: KeysCollection = ("label",),
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set([label_keys] if isinstance(label_keys, str) else label_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_hw = None
        for key in self.key_iterator(d):
            path = d[key]
            is_label = key in self.label_keys
            if is_label:
                array = LoadMicroscopyImage(is_label=True)(path)
            else:
                array, info = LoadMicroscopyImage(with_info=True)(path)
                d[f"{key}_pixel_size"] = float(info.pixel_size) if info.pixel_size else float("nan")
                d[f"{key}_channel_names"] = info.channel_names
            if image_hw is None:
                image_hw = array.shape[-2:]
            elif array.shape[-2:] != image_hw:
                raise InputError(path, f"is {tuple(array.shape[-2:])} but its image is {tuple(image_hw)}")
            d[f"{key}_file"] = str(path)
            d[key] = array
        return d


class StackNucleusChanneld(MapTransform):
    """Dictionary :class:`StackNucleusChannel`. A per-item ``nucleus_channel`` entry overrides the default.

    ``channels`` (:func:`~mmcs_monai.options.parse_channels`: ``"DAPI"``, ``"cyto,DAPI"``, ``"0,2"``) names the channel
    to segment and, optionally, the nucleus channel, by index or by the names in the image's metadata
    (``<key>_channel_names``, from :class:`LoadMicroscopyd`); an unknown name is an error naming the file and
    listing its channels. Give it or ``cyto_channel``/``nucleus_channel``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        cyto_channel: int | None = None,
        nucleus_channel: int | None = None,
        nucleus_channel_key: str = "nucleus_channel",
        allow_missing_keys: bool = False,
        channels=None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.channels = parse_channels(channels)
        if self.channels is not None and (cyto_channel is not None or nucleus_channel is not None):
            raise ValueError("give channels or cyto_channel/nucleus_channel, not both")
        self.stacker = StackNucleusChannel(cyto_channel, nucleus_channel)
        self.nucleus_channel_key = nucleus_channel_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d.get(f"{key}_file", key)
            try:
                if self.channels is not None:
                    info = ImageInfo(channel_names=d.get(f"{key}_channel_names"))
                    picked = [resolve_channel(path, c, info, len(d[key])) for c in self.channels]
                    d[key] = self.stacker(d[key], picked[0], picked[1] if len(picked) > 1 else None)
                else:
                    d[key] = self.stacker(d[key], nucleus_channel=d.get(self.nucleus_channel_key))
            except ValueError as err:
                if isinstance(err, InputError):
                    raise
                raise InputError(path, str(err)) from err
        return d


class DiameterInPixelsd(MapTransform):
    """Each image's pixel size, and a diameter given in micrometres turned into pixels with it.

    Sets ``pixel_size_um`` (micrometres per pixel: ``pixel_size`` when given, else the image's metadata
    ``<key>_pixel_size``; NaN when neither) and, when ``diameter`` is in micrometres (``"12um"``), ``diameter_px``
    (``12 / pixel size``), which :class:`~mmcs_monai.engines.PrepareImageBatch` hands to the inferer.

    Raises:
        InputError: a diameter in micrometres for an image without a pixel size (naming the file).
    """

    def __init__(self, keys: KeysCollection = "image", diameter=None, pixel_size=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.micrometres = parse_micrometres(diameter)
        self.diameter = diameter
        self.pixel_size = parse_pixel_size(pixel_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            size = self.pixel_size or d.get(f"{key}_pixel_size")
            size = float(size) if size is not None and size == size else float("nan")
            d["pixel_size_um"] = size
            if self.micrometres is not None:
                if not size == size:
                    raise InputError(
                        d.get(f"{key}_file", key),
                        f"diameter {self.diameter!r} is in micrometres but the image has no pixel size in its metadata; give --pixel_size",
                    )
                d["diameter_px"] = self.micrometres / size
        return d


class NormalizePercentiled(MapTransform):
    """Dictionary :class:`NormalizePercentile`."""

    def __init__(self, keys: KeysCollection = "image", lower: float = 1.0, upper: float = 99.0, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizePercentile(lower, upper)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


def inference_preprocessing(keys: KeysCollection = "image", cyto_channel: int | None = None, nucleus_channel: int | None = None) -> Compose:
    """Load ``keys`` (``image``, and ``label`` when scoring), make ``image`` [cytoplasm, nucleus] and scale it to
    its 1-99 percentiles: ``{"image": path} -> {"image": float32 [2, H, W], ...}``.

    The evaluation sweep, ``mmcs export`` and the Deploy app use it; the bundle configs list the same
    three transforms.
    """
    return Compose(
        [
            LoadMicroscopyd(keys=keys),
            StackNucleusChanneld(keys="image", cyto_channel=cyto_channel, nucleus_channel=nucleus_channel),
            NormalizePercentiled(keys="image"),
        ]
    )


class LabelsToFlowsd(MapTransform):
    """Dictionary :class:`LabelsToFlows`: ``label`` int [1, H, W] -> ``flows`` float32 [3, H, W].

    Deterministic, so MONAI's CacheDataset/PersistentDataset cache its result and an epoch never
    recomputes flows.
    """

    def __init__(self, keys: KeysCollection = "label", output_key: str = "flows", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.converter = LabelsToFlows()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.converter(d[key])
        return d


class CellDiameterd(MapTransform):
    """Store the median cell diameter (pixels) of ``label`` under ``output_key``.

    An explicit diameter already in the dict (from the data list, or a per-subset mean) is kept.
    """

    def __init__(self, keys: KeysCollection = "label", output_key: str = "diameter", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.measure = CellDiameter()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d.get(self.output_key) in (None, 0, 0.0):
                d[self.output_key] = self.measure(d[key])
        return d


class RandCellAffined(Randomizable, MapTransform):
    """Dictionary :class:`RandCellAffine`: one random zoom/rotation/flip/crop applied to all keys.

    Args:
        keys: keys to warp.
        kinds: per key ``"image"``, ``"label"`` or ``"flows"`` (see :class:`RandCellAffine`);
            default: ``"flows"`` for keys named flows/pseudo_flows, ``"label"`` for label, else image.
        diameter_key: key of the item's cell diameter (pixels); zoom brings it to ``target_diameter``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "flows"),
        kinds: Sequence[str] | None = None,
        spatial_size: int | Sequence[int] = 224,
        target_diameter: float = DEFAULT_TARGET_DIAMETER,
        scale_range: float = 0.5,
        rotate: bool = True,
        flip: bool = True,
        diameter_key: str = "diameter",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.kinds = list(kinds) if kinds is not None else [self._default_kind(k) for k in self.keys]
        if len(self.kinds) != len(self.keys):
            raise ValueError("kinds must give one entry per key")
        self.affine = RandCellAffine(spatial_size, target_diameter, scale_range, rotate, flip)
        self.diameter_key = diameter_key

    @staticmethod
    def _default_kind(key: Hashable) -> str:
        name = str(key)
        return "flows" if "flows" in name else "label" if "label" in name else "image"

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.affine.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.affine.randomize()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        present = [(k, kind) for k, kind in zip(self.keys, self.kinds) if k in d or not self.allow_missing_keys]
        self.randomize()
        warped = self.affine([d[k] for k, _ in present], [kind for _, kind in present], float(d.get(self.diameter_key) or 0.0), False)
        for (key, _), value in zip(present, warped):
            d[key] = value
        return d


class FlowsToMasksd(MapTransform):
    """Dictionary :class:`FlowsToMasks`: ``pred`` [3, H, W] -> ``output_key`` int32 [1, H, W]."""

    def __init__(self, keys: KeysCollection = "pred", output_key: str = "masks", allow_missing_keys=False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.converter = FlowsToMasks(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.converter(d[key])
        return d


class SaveCellOutputsd(MapTransform):
    """Write ``<id>_masks.tif`` (uint16 labels), ``<id>_overlay.png`` (outlines on the image) and, with
    ``table=True``, ``<id>_cells.csv`` (one row per cell: id, centroid, area, bbox; ids as in the masks), and the
    other ``formats`` (:mod:`mmcs_monai.exports`: ``<id>_cells.geojson``, ``<id>_rois.zip``, NGFF labels into an
    input OME-Zarr or ``<id>_masks.ome.zarr``); ``tif`` not in ``formats``: no label TIFF.

    The overlay and the GeoJSON's mean intensities use the image as stored (``image_file`` read again: an RGB
    image keeps its colours, intensities are raw), not the network's normalised input.

    Masks are stored at the input image's size: ``FlowsToMasksd`` runs on flows already resized back.

    Files are written atomically into ``output_dir``; the output names come from the item's ``id``
    (or the stem of ``image_file``).

    Args:
        keys: the masks key (int [1, H, W]).
        image_key: the image to draw outlines on ([C, H, W]); None skips the overlay.
        output_dir: destination folder.
        overlay: write the overlay PNG.
        table: write the per-cell CSV (cells renumbered 1..N first, so the table's ids are the mask's).
        formats: :data:`~mmcs_monai.options.OUTPUT_FORMATS` to write (default ``tif``).
    """

    def __init__(
        self,
        keys: KeysCollection = "masks",
        output_dir: str = "./outputs",
        image_key: str | None = "image",
        overlay: bool = True,
        table: bool = False,
        allow_missing_keys=False,
        formats=DEFAULT_FORMATS,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.overlay = overlay
        self.table = table
        self.formats = parse_formats(formats)

    @staticmethod
    def output_stem(d: Mapping[Hashable, object]) -> str:
        if d.get("id"):
            return str(d["id"])
        return image_stem(str(d.get("image_file", "image")))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        stem = self.output_stem(d)
        for key in self.key_iterator(d):
            masks = np.asarray(d[key]).reshape(np.asarray(d[key]).shape[-2:])
            if self.table:
                lut, cells = measure_cells(masks)
                masks = lut[masks]
                d[f"{key}_table_file"] = str(write_cell_table(self.output_dir / f"{stem}_cells.csv", cells))
            if "tif" in self.formats:
                d[f"{key}_file"] = str(write_labels(self.output_dir / masks_filename(stem), masks))
            wanted = any(f in self.formats for f in ("geojson", "roi", "zarr"))
            raw = self.stored_image(d) if wanted or self.overlay else None
            if wanted:
                self.exporter(d, stem, raw[1] if raw is not None else None).write_array(masks, raw[0] if raw is not None else None)
            if self.overlay and self.image_key and self.image_key in d:
                image = raw[0] if raw is not None else np.asarray(torch.as_tensor(d[self.image_key]).cpu())
                write_overlay(self.output_dir / overlay_filename(stem), image, masks)
        return d

    @staticmethod
    def stored_image(d: Mapping[Hashable, object]):
        """The image as stored and its :class:`~mmcs_monai.ome.ImageInfo`, read again from ``image_file`` (None without one)."""
        path = d.get("image_file")
        if not isinstance(path, str) or not path:
            return None
        return read_image_and_info(path)

    def exporter(self, d: Mapping[Hashable, object], stem: str, info: ImageInfo | None = None) -> CellExporter:
        """The writer of this item's GeoJSON / ROI set / NGFF labels (those in ``formats``); ``info``: the image's
        metadata (channel names for the measurements)."""
        path = d.get("image_file")
        size = d.get("pixel_size_um")
        size = float(size) if size is not None and float(size) == float(size) else None
        options = {}
        if "zarr" in self.formats and isinstance(path, str) and is_zarr(path):
            from mmcs_monai.ome import open_regions

            with open_regions(path) as regions:
                dataset = regions.image.attrs["multiscales"][0]["datasets"][0]
                scales = [t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"]
                options = {"zarr_image": path, "zarr_axes": regions.image.axes, "zarr_scale": scales[0] if scales else None}
        names = info.channel_names if info is not None else None
        return CellExporter(self.output_dir, stem, self.formats, names, size, **options)


class AttachPseudoTargetd(MapTransform):
    """Put an unlabelled image's current pseudo target and its diameter into the item.

    Reads ``store.target(id)`` (float32 [3, H, W]: unit flows and cell probability at the image's own
    size) into ``output_key`` and ``store.diameter(id)`` into ``diameter_key``, so the random spatial
    transform that follows warps image and target together and rotates the flow vectors.
    Runs after the cached (deterministic) transforms, so every epoch sees the latest ensemble; with
    DataLoader worker processes, each epoch's workers see the store as it was when they started.

    Args:
        store: an ``engines.semi.PseudoLabelStore``.
    """

    def __init__(self, store, keys: KeysCollection = "id", output_key: str = "flows", diameter_key: str = "diameter"):
        super().__init__(keys)
        self.store = store
        self.output_key = output_key
        self.diameter_key = diameter_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image_id = str(d[key])
            if image_id not in self.store:
                raise KeyError(f"no pseudo label for unlabelled image {image_id!r}; was the store filled?")
            d[self.output_key] = self.store.target(image_id)
            d[self.diameter_key] = self.store.diameter(image_id)
        return d
