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
from mmcs_monai.io import InputError, image_stem, masks_filename, overlay_filename, write_labels, write_overlay
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
    label's size is checked against the image's.

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
            array = LoadMicroscopyImage(is_label=is_label)(path)
            if image_hw is None:
                image_hw = array.shape[-2:]
            elif array.shape[-2:] != image_hw:
                raise InputError(path, f"is {tuple(array.shape[-2:])} but its image is {tuple(image_hw)}")
            d[f"{key}_file"] = str(path)
            d[key] = array
        return d


class StackNucleusChanneld(MapTransform):
    """Dictionary :class:`StackNucleusChannel`. A per-item ``nucleus_channel`` entry overrides the default."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        cyto_channel: int | None = None,
        nucleus_channel: int | None = None,
        nucleus_channel_key: str = "nucleus_channel",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.stacker = StackNucleusChannel(cyto_channel, nucleus_channel)
        self.nucleus_channel_key = nucleus_channel_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.stacker(d[key], nucleus_channel=d.get(self.nucleus_channel_key))
            except ValueError as err:
                raise InputError(d.get(f"{key}_file", key), str(err)) from err
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
    ``table=True``, ``<id>_cells.csv`` (one row per cell: id, centroid, area, bbox; ids as in the masks).

    Masks are stored at the input image's size: ``FlowsToMasksd`` runs on flows already resized back.

    Files are written atomically into ``output_dir``; the output names come from the item's ``id``
    (or the stem of ``image_file``).

    Args:
        keys: the masks key (int [1, H, W]).
        image_key: the image to draw outlines on ([C, H, W]); None skips the overlay.
        output_dir: destination folder.
        overlay: write the overlay PNG.
        table: write the per-cell CSV (cells renumbered 1..N first, so the table's ids are the mask's).
    """

    def __init__(
        self,
        keys: KeysCollection = "masks",
        output_dir: str = "./outputs",
        image_key: str | None = "image",
        overlay: bool = True,
        table: bool = False,
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.overlay = overlay
        self.table = table

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
            d[f"{key}_file"] = str(write_labels(self.output_dir / masks_filename(stem), masks))
            if self.overlay and self.image_key and self.image_key in d:
                image = np.asarray(torch.as_tensor(d[self.image_key]).cpu())
                write_overlay(self.output_dir / overlay_filename(stem), image, masks)
        return d


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
