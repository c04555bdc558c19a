"""What the napari widget does, without Qt: layer data -> network input, segmentation in steps, training sets.

The widget (:mod:`._widget`) is a thin form over these functions, so each is testable without a viewer:

- :func:`layer_channels`: an image layer's data as the float32 [C, H, W] array :func:`~mmcs_monai.io.read_image` makes
  of the same image read from a file (grey C=1, RGB C=3, RGBA without alpha, a [C, H, W] stack of up to 4
  channels);
- :func:`network_input`: the same two transforms ``mmcs infer`` applies after reading (``StackNucleusChannel``,
  ``NormalizePercentile``), so the masks equal ``mmcs infer``'s at the same settings;
- :func:`segment_steps`: :class:`~mmcs_monai.segmentation.CellSegmenter` run in two steps (the diameter, then the
  masks), yielding progress, cancellable between and inside network calls;
- :func:`write_training_set`: corrected label layers and their images as a data-list folder (``images/``,
  ``labels/`` and ``datalist.json``), each file written atomically.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcs_monai.io import InputError, atomic_path, write_labels
from mmcs_monai.segmentation import CellSegmenter, Segmentation
from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel

# channels a [C, H, W] layer may have (read_image's limit for a file)
MAX_CHANNELS = 4


class Cancelled(Exception):
    """Raised inside a network call when the user cancelled the work."""


def layer_channels(data, rgb: bool, name: str = "layer") -> np.ndarray:
    """An image layer's data as float32 [C, H, W], as :func:`~mmcs_monai.io.read_image` reads the same image from a file.

    Args:
        data: the layer's data (numpy, dask or any array-like): [H, W] grey, [H, W, 3|4] with ``rgb`` (alpha is
            dropped), or [C, H, W] with C <= 4 channels along the first axis.
        rgb: the layer's ``rgb`` flag (napari sets it for [H, W, 3|4] data).
        name: the layer's name, for the message.

    Raises:
        InputError: (naming the layer) data that is not a 2D image, more than 4 channels, too small, or not finite.
    """
    array = np.asarray(data)
    if rgb:
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise InputError(name, f"RGB layer with shape {array.shape}: expected [H, W, 3 or 4]")
        array = np.moveaxis(array[..., :3], -1, 0)
    elif array.ndim == 2:
        array = array[None]
    elif array.ndim != 3 or array.shape[0] > MAX_CHANNELS:
        raise InputError(
            name,
            f"image of shape {array.shape}: give a 2D image, RGB, or up to {MAX_CHANNELS} channels along the first axis "
            "(a 3D stack or time series: take the plane to segment as its own layer)",
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(name, f"unsupported pixel type {array.dtype}")
    if min(array.shape[-2:]) < 2:
        raise InputError(name, f"image is too small to segment ({array.shape[-2]} x {array.shape[-1]} pixels)")
    image = np.ascontiguousarray(array.astype(np.float32))
    if not np.isfinite(image).all():
        raise InputError(name, "image contains NaN or infinite values")
    return image


def stack_planes(
    channels: np.ndarray, cyto_channel: int | None = None, nucleus_channel: int | None = None, name: str = "layer"
) -> np.ndarray:
    """The network's two planes [cytoplasm, nucleus] (float32 [2, H, W], not yet scaled) of ``channels`` [C, H, W]:
    ``StackNucleusChannel`` (cytoplasm: ``cyto_channel``, else the mean of the channels other than the nucleus;
    nucleus: ``nucleus_channel``, else zeros).

    Raises:
        InputError: a channel index the image does not have (naming ``name``).
    """
    try:
        return StackNucleusChannel(cyto_channel, nucleus_channel)(channels)
    except ValueError as err:
        raise InputError(name, str(err)) from None


def network_input(
    channels: np.ndarray, cyto_channel: int | None = None, nucleus_channel: int | None = None, name: str = "layer"
) -> np.ndarray:
    """float32 [2, H, W] in [0, 1] at the 1st/99th percentiles: what ``mmcs infer`` feeds the network for the same
    image and channel options (``inference.json``'s ``StackNucleusChanneld`` then ``NormalizePercentiled``)."""
    return NormalizePercentile()(stack_planes(channels, cyto_channel, nucleus_channel, name))


def parse_diameter(text: str | float | None) -> float | str:
    """The diameter option typed in the widget: a number of pixels (float), or a name (``auto``, ``stored``,
    ``refine``, a subset the model stored); empty means ``auto``.

    Raises:
        ValueError: a number that is not positive.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return "auto"
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        text = text.strip()
        try:
            value = float(text)
        except ValueError:
            return text
    if not value > 0:
        raise ValueError(f"diameter must be positive (pixels), got {text}")
    return value


@contextmanager
def cancellable(network: torch.nn.Module, cancel: threading.Event) -> Iterator[None]:
    """Within: every forward call of ``network`` first raises :class:`Cancelled` once ``cancel`` is set, so a long
    segmentation (the ``auto`` search, many tiles) stops within one network call of the request. A TorchScript
    network takes no hooks: it stops between steps only."""
    handle = None
    if not isinstance(network, torch.jit.ScriptModule):

        def check(_module, _inputs):
            if cancel.is_set():
                raise Cancelled()

        handle = network.register_forward_pre_hook(check)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def segment_steps(
    segmenter: CellSegmenter, image: np.ndarray, diameter: float | str, cancel: threading.Event | None = None
) -> Iterator[tuple[int, str]]:
    """Segment ``image`` (float32 [2, H, W], :func:`network_input`) with ``segmenter`` at ``diameter``, in two steps.

    A generator: yields ``(percent done, what runs next)`` and returns the :class:`Segmentation` (``masks`` int32
    [H, W], ``diameter`` in pixels), or None when ``cancel`` was set. Step 1 is :meth:`CellSegmenter.diameter_for`
    (the ``auto`` search, or the number/stored/subset value), step 2 segments at that diameter: the masks equal
    ``segmenter(image, diameter)``.
    """
    cancel = cancel or threading.Event()
    try:
        with cancellable(segmenter.network, cancel):
            yield 5, f"diameter ({diameter})"
            used = segmenter.diameter_for(image, diameter)
            if cancel.is_set():
                return None
            yield 50, f"segmenting at diameter {used:.1f} px"
            segmentation: Segmentation = segmenter(image, diameter=used)
            yield 100, f"{segmentation.cells} cells"
    except Cancelled:
        return None
    return None if cancel.is_set() else segmentation


@dataclass(frozen=True)
class TrainingImage:
    """One image of a training set: ``planes`` float32 [1 or 2, H, W] (cytoplasm, and the nucleus when there is one,
    not yet scaled: :func:`stack_planes`), its ``labels`` (int [H, W] instance ids, 0 background; None for an
    unlabelled image) and a file ``name`` (no folder, no extension)."""

    name: str
    planes: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_channels(
        cls,
        name: str,
        channels: np.ndarray,
        cyto_channel: int | None = None,
        nucleus_channel: int | None = None,
        labels: np.ndarray | None = None,
    ) -> TrainingImage:
        """The planes ``mmcs infer`` would make of ``channels`` [C, H, W] with these channel options: the nucleus plane
        is kept only when a nucleus channel is given (a zero plane is what the pipeline adds without one)."""
        planes = stack_planes(channels, cyto_channel, nucleus_channel, name)
        return cls(name, planes if nucleus_channel is not None else planes[:1], labels)


def safe_name(name: str) -> str:
    """``name`` as a file name: letters, digits, ``-``, ``_``, ``.``; anything else becomes ``_``."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "image"


def write_training_set(images: Sequence[TrainingImage], folder: str | os.PathLike) -> Path:
    """Write ``images`` as a data list the library reads: ``folder/images/<name>.tif`` (float32 [H, W, C] planes),
    ``folder/labels/<name>.tif`` (instance labels, for those that have them) and ``folder/datalist.json`` (rows with
    ``image``, ``label``, ``id`` and ``nucleus_channel``: 1 where a nucleus plane was written). Every file is
    written to a temporary name and renamed. Returns the data list's path.

    Raises:
        InputError: no images, a label layer without any cell, labels whose shape is not the image's, or two
            images with the same name.
    """
    import tifffile

    if not images:
        raise InputError(folder, "no images to write")
    folder = Path(folder)
    rows, seen = [], set()
    for item in images:
        name = safe_name(item.name)
        if name in seen:
            raise InputError(item.name, "two images of the training set have this name")
        seen.add(name)
        if item.labels is not None:
            labels = np.asarray(item.labels)
            if labels.shape != item.planes.shape[-2:]:
                raise InputError(item.name, f"labels of shape {labels.shape} do not match the image ({item.planes.shape[-2:]})")
            if not labels.any():
                raise InputError(item.name, "the labels layer is empty: paint or keep some cells before fine-tuning")
        image_path = folder / "images" / f"{name}.tif"
        with atomic_path(image_path) as tmp:
            tifffile.imwrite(tmp, np.moveaxis(item.planes.astype(np.float32), 0, -1), photometric="minisblack", compression="zlib")
        row = {"image": f"images/{name}.tif", "id": name, "nucleus_channel": 1 if len(item.planes) == 2 else None}
        if item.labels is not None:
            write_labels(folder / "labels" / f"{name}.tif", np.asarray(item.labels).astype(np.int64))
            row["label"] = f"labels/{name}.tif"
        rows.append(row)
    datalist = folder / "datalist.json"
    with atomic_path(datalist) as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    return datalist


__all__ = [
    "Cancelled",
    "TrainingImage",
    "cancellable",
    "layer_channels",
    "network_input",
    "parse_diameter",
    "safe_name",
    "segment_steps",
    "stack_planes",
    "write_training_set",
]
