"""The label server's datastore: MONAI Label's local datastore with checked uploads and atomic writes.

What it adds to :class:`monailabel.datastore.local.LocalDatastore`:

- **Uploads are checked before anything is written.** Image ids and label tags must be file names without a
  folder (any letters, spaces and brackets; no ``/``, ``\\``, control characters, leading ``.``); a label
  must decode as a 2D integer instance image of its image's size; an image must decode as a 2D microscopy
  image; anything over ``max_upload_bytes`` is refused, and so is an image whose header declares more than
  ``max_image_pixels`` (read before anything is decoded). ASAP XML labels are bounded by
  :class:`~mmcs_monai.label.asap.AsapLimits`. Refusals are :class:`UploadRejected`, an HTTP error whose
  text names the image and the problem, so the client sees 400 / 404 / 413 instead of a server error.
- **A second upload replaces the first.** An image uploaded again under its id (QuPath's "Submit label" of a
  patch, twice) is kept when the bytes are the same and replaced when not (its labels stay when its size is
  unchanged); a label uploaded again replaces the previous one.
- **Labels are stored as TIFF** (uint16/uint32 ids) whatever format was uploaded: an instance image, a
  binary mask (split into cells by connected components) or QuPath's ASAP XML polygons (rasterised).
- **Nothing is half written.** Images, labels and ``datastore_v2.json`` are written to a temporary file
  and renamed.
- **Several processes share it.** Training and scoring run in their own processes (MONAI Label starts
  them); every change re-reads ``datastore_v2.json`` under the file lock before writing, so a score
  written by the scoring process does not erase a label the server saved meanwhile.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from scipy import ndimage

from mmcs_monai.io import InputError, atomic_path, read_image, read_labels, write_labels
from mmcs_monai.label.asap import AsapError, AsapLimits, AsapTooLarge, asap_to_labels

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = ("*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg")
LABEL_SUFFIX = ".tif"
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: about 1 GB of float32 network input and flows
MAX_NAME_BYTES = 200  # UTF-8 bytes of an image id or tag (the file name adds its extension)
# refused anywhere in a name: folder separators and control / format characters (NUL, newlines, bidi marks)
_BAD_CHARACTERS = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


class UploadRejected(HTTPException):
    """An upload or request the datastore refuses; FastAPI turns it into an HTTP error with ``detail``."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(status_code=status_code, detail=detail)


def plain_name(value: Any, what: str) -> str:
    """``value`` if it is a plain file name: any letters, digits, spaces and punctuation (``my cells (1)``,
    ``Zellkerne-ä``), but no folder separator, control character, leading ``.`` or space, trailing space, and
    at most :data:`MAX_NAME_BYTES` UTF-8 bytes; else :class:`UploadRejected` 400."""
    ok = isinstance(value, str) and value and value == value.strip() and not value.startswith(".")
    ok = ok and not _BAD_CHARACTERS.search(value) and len(value.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
    if not ok:
        raise UploadRejected(
            400,
            f"{what} {value!r} refused: use a plain name (no '/', '\\', control characters, leading '.' or spaces; "
            f"at most {MAX_NAME_BYTES} bytes)",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UploadRejected(400, f"{what} {value!r} refused: not valid Unicode text") from None
    return value


def declared_size(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(height, width, values)`` an image file's header declares, read without decoding its pixels
    (``values``: samples of every plane and channel); None when neither tifffile nor PIL can read the header.

    TIFF: the first page's size, times its samples and the number of pages (counted up to 5: more is not a 2D
    image). PNG / JPEG / others: PIL's lazy open.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                pages = 1
                while pages < 5:
                    try:
                        if tif.pages[pages] is None:
                            break
                    except (IndexError, KeyError):
                        break
                    pages += 1
                height, width = int(page.imagelength), int(page.imagewidth)
                return height, width, height * width * max(int(page.samplesperpixel), 1) * pages
        except Exception:  # not a TIFF after all: PIL may know it, else the decoder reports the problem
            pass
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            return height, width, height * width * len(image.getbands())
    except Image.DecompressionBombError:
        return 1 << 40, 1 << 40, 1 << 62  # PIL itself refuses the size: more than any budget
    except Exception:
        return None


def check_pixels(path: str | os.PathLike, what: str, max_pixels: int) -> tuple[int, int] | None:
    """``(H, W)`` the header of ``path`` declares, after checking it against ``max_pixels`` (413 if over).

    Also 413 when the file holds more than 4 values per pixel (a stack of planes). None: unknown header (the
    decoder will say what is wrong).
    """
    size = declared_size(path)
    if size is None:
        return None
    height, width, values = size
    if height * width > max_pixels or values > 4 * max_pixels:
        raise UploadRejected(
            413,
            f"{what} refused: {width} x {height} pixels ({height * width / 2**20:.1f} MPix, {values} values), more than this "
            f"server's limit of {max_pixels / 2**20:g} MPix (conf max_image_mpix); segment large images with `mmcs infer-slide`",
        )
    return height, width


class CellDatastore(LocalDatastore):
    """Local datastore of 2D microscopy images (TIFF, PNG, JPEG) and their instance labels.

    Args:
        datastore_path: the studies folder (images at its top level, labels in ``labels/<tag>/``).
        max_upload_bytes: largest image or label file accepted.
        max_image_pixels: largest image (height x width) read, checked on the header before decoding.
        asap_limits: what one ASAP XML label may hold.
        extensions: image file patterns.
        auto_reload: watch the folder for images and labels added by hand.
        read_only: never write.
    """

    def __init__(
        self,
        datastore_path: str,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        extensions=IMAGE_PATTERNS,
        auto_reload: bool = False,
        read_only: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        asap_limits: AsapLimits | None = None,
    ):
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.asap_limits = asap_limits or AsapLimits()
        super().__init__(datastore_path, extensions=list(extensions), auto_reload=auto_reload, read_only=read_only)

    # ------------------------------------------------------------------ shared state across processes
    def _reload_unlocked(self) -> None:
        """Re-read ``datastore_v2.json`` if another process wrote it (the caller holds the lock)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            with open(path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(path).st_mtime

    def reload(self) -> None:
        """Bring this process's view up to date with the file (other processes may have written it)."""
        with FileLock(self._lock_file):
            self._reload_unlocked()

    @contextmanager
    def _change(self) -> Iterator[None]:
        """Lock, re-read, let the caller change ``self._datastore``, write the file atomically."""
        with FileLock(self._lock_file):
            self._reload_unlocked()
            yield
            self._update_datastore_file(lock=False)

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            with atomic_path(self._datastore_config_path) as tmp:
                tmp.write_text(text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    # ------------------------------------------------------------------ checks
    def _check_size(self, path: str, what: str) -> None:
        size = os.path.getsize(path)
        if size > self.max_upload_bytes:
            raise UploadRejected(
                413, f"{what} refused: {size} bytes, more than this server's limit of {self.max_upload_bytes} bytes (conf max_upload_mb)"
            )

    def _known_image(self, image_id: Any) -> str:
        image_id = plain_name(image_id, "image id")
        if image_id not in self._datastore.objects:
            self.reload()
        if image_id not in self._datastore.objects:
            raise UploadRejected(404, f"image {image_id!r} is not in the datastore")
        return image_id

    def check_pixels(self, path: str | os.PathLike, what: str) -> tuple[int, int] | None:
        """:func:`check_pixels` against this datastore's ``max_image_pixels``."""
        return check_pixels(path, what, self.max_image_pixels)

    def image_shape(self, image_id: str) -> tuple[int, int]:
        """(H, W) of a datastore image, from its header (decoded only when the header cannot be read).

        Raises:
            UploadRejected: 413 when the image is over ``max_image_pixels``; 400 when it cannot be read.
        """
        path = self.get_image_uri(image_id)
        shape = self.check_pixels(path, f"image {image_id!r}")
        if shape is not None:
            return shape
        try:
            return tuple(read_image(path).shape[-2:])
        except InputError as err:
            raise UploadRejected(400, f"image {image_id!r} cannot be read: {err.problem}") from err

    def read_label_upload(self, label_filename: str, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
        """An uploaded label file as ``[H, W]`` int32 instance ids at its image's size, and how it was read.

        - ``.xml``: ASAP XML polygons (QuPath's "Submit label"), each rasterised as one cell
          (:func:`~mmcs_monai.label.asap.asap_to_labels`); ``{"format": "asap", "polygons", "cells", "outside"}``.
        - an image with one non-zero value (a binary 0/1 or 0/255 mask, Slicer's habit): split into cells by
          connected components (4-connected); ``{"format": "binary", "converted": "..."}``.
        - any other image: instance ids as they are; ``{"format": "instances"}``.

        Raises:
            UploadRejected: 400 with the problem (undecodable, wrong size, bad XML, no polygon).
        """
        shape = self.image_shape(image_id)
        if label_filename.lower().endswith(".xml"):
            try:
                return asap_to_labels(Path(label_filename).read_bytes(), shape, self.asap_limits)
            except AsapError as err:
                status = 413 if isinstance(err, AsapTooLarge) else 400
                raise UploadRejected(status, f"ASAP XML label for image {image_id!r} refused: {err}") from err
        declared = self.check_pixels(label_filename, f"label for image {image_id!r}")
        if declared is not None and tuple(declared) != tuple(shape):
            raise UploadRejected(400, f"label for image {image_id!r} refused: labels are {tuple(declared)} but the image is {tuple(shape)}")
        try:
            labels = read_labels(label_filename, shape)
        except InputError as err:
            raise UploadRejected(400, f"label for image {image_id!r} refused: {err.problem}") from err
        values = np.unique(labels)
        values = values[values > 0]
        if len(values) == 1:
            split, count = ndimage.label(labels > 0)
            if count > 1:
                note = f"binary mask (value {int(values[0])}) split into {count} cells by connected components"
                logger.info("label for %s: %s", image_id, note)
                return split.astype(np.int32), {"format": "binary", "converted": note}
        return labels, {"format": "instances"}

    # ------------------------------------------------------------------ writes
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check ``label_filename`` against its image, then store it as ``labels/<tag>/<image_id>.tif``.

        Raises:
            UploadRejected: 400 (bad id/tag, undecodable file, not an instance image, wrong size),
                404 (no such image), 413 (too large).
        """
        image_id = self._known_image(image_id)
        tag = plain_name(label_tag, "label tag")
        self._check_size(label_filename, f"label for image {image_id!r}")
        labels, conversion = self.read_label_upload(label_filename, image_id)

        label_dir = Path(self._datastore.label_path(tag))
        name = image_id + LABEL_SUFFIX
        with self._change():
            obj = self._datastore.objects[image_id]
            write_labels(label_dir / name, labels)
            previous = obj.labels.get(tag)
            if previous is not None and previous.ext != LABEL_SUFFIX:  # e.g. a PNG label added by hand
                (label_dir / (image_id + previous.ext)).unlink(missing_ok=True)
            cells = int(np.count_nonzero(np.unique(labels)))
            info = {**(label_info or {}), "ts": int(time.time()), "name": name, "cells": cells, **conversion}
            obj.labels[tag] = DataModel(info=info, ext=LABEL_SUFFIX)
        logger.info("label saved: %s (%s, %d cells)", image_id, tag, info["cells"])
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Check ``image_filename`` (size, pixels, decodes as a 2D image), then copy it into the studies folder.

        An id that exists already: the same bytes change nothing; other bytes replace the image (and drop its
        uncertainty score); its labels are kept when the size is unchanged, removed otherwise.

        Raises:
            UploadRejected: 400 (bad id, unsupported type, undecodable), 413 (too large).
        """
        derived, ext = self._to_id(os.path.basename(image_filename))
        image_id = plain_name(image_id or derived, "image id")
        ext = ext.lower()  # the folder is listed with lower-case patterns
        if f"*{ext}" not in self._extensions:
            raise UploadRejected(400, f"image {image_id!r} refused: unsupported file type {ext!r}; use {', '.join(self._extensions)}")
        self._check_size(image_filename, f"image {image_id!r}")
        self.check_pixels(image_filename, f"image {image_id!r}")
        try:
            shape = tuple(read_image(image_filename).shape[-2:])
        except InputError as err:
            raise UploadRejected(400, f"image {image_id!r} refused: {err.problem}") from err
        name = image_id + ext
        with self._change():
            previous = self._datastore.objects.get(image_id)
            old_path = Path(self._datastore.image_path()) / (image_id + previous.image.ext) if previous else None
            if old_path is not None and old_path.is_file() and filecmp.cmp(old_path, image_filename, shallow=False):
                logger.info("image %s uploaded again, unchanged", image_id)
                return image_id
            old_shape = self.image_shape(image_id) if old_path is not None and old_path.is_file() else None
            with atomic_path(Path(self._datastore.image_path()) / name) as tmp:
                shutil.copyfile(image_filename, tmp)
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            labels = dict(previous.labels) if previous is not None else {}
            if previous is not None:
                if previous.image.ext != ext:
                    old_path.unlink(missing_ok=True)
                if old_shape != shape:
                    for tag, label in labels.items():
                        (Path(self._datastore.label_path(tag)) / (image_id + label.ext)).unlink(missing_ok=True)
                    labels = {}
                logger.info("image %s replaced (%s)", image_id, "labels kept" if labels else "no label kept")
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext), labels=labels)
        return image_id

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self.update_image_infos({image_id: info})

    def update_image_infos(self, infos: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge ``infos[id]`` into each image's info in one locked write (unknown ids are skipped)."""
        with self._change():
            for image_id, info in infos.items():
                obj = self._datastore.objects.get(image_id)
                if obj is None:
                    logger.warning("image %s vanished before its info was written", image_id)
                    continue
                obj.image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._change():
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise UploadRejected(404, f"no {label_tag!r} label for image {label_id!r}")
            label.info.update(info)

    # reads that other processes' writes (scores, trained-on labels) must show up in
    def get_image_info(self, image_id: str) -> dict[str, Any]:
        self.reload()
        return super().get_image_info(image_id)

    def json(self):
        self.reload()
        return super().json()

    def status(self) -> dict[str, Any]:
        self.reload()
        return super().status()

    def list_images(self) -> list[str]:
        self.reload()
        return super().list_images()

    def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
        self.reload()
        return super().get_unlabeled_images(label_tag, labels)

    # ------------------------------------------------------------------ training views
    def labelled_items(self, tag: str = "final") -> list[dict[str, str]]:
        """``[{"id", "image", "label"}, ...]`` for images with a ``tag`` label, absolute paths, by id."""
        self.reload()
        items = []
        for image_id in sorted(self._datastore.filter_by_tag(tag)):
            obj = self._datastore.objects[image_id]
            items.append(
                {
                    "id": image_id,
                    "image": self.get_image_uri(image_id),
                    "label": os.path.realpath(os.path.join(self._datastore.label_path(tag), image_id + obj.labels[tag].ext)),
                }
            )
        return items

    def unlabelled_items(self, tag: str = "final") -> list[dict[str, str]]:
        """``[{"id", "image"}, ...]`` for images without a ``tag`` label, by id."""
        return [{"id": i, "image": self.get_image_uri(i)} for i in sorted(self.get_unlabeled_images(tag))]
