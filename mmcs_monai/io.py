"""Readers and writers for microscopy images and instance labels, with input validation.

Every reader here raises :class:`InputError` whose message starts with the file's path and says what
is wrong, so a user with a folder of thousands of files knows which one to fix. Every writer writes
to a temporary file beside the target and renames it, so an interrupted run never leaves a half
written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz", ".npy")

# Refuse images whose pixel count would not fit in memory as float32 on a laptop; whole-slide
# images take the tiled path instead.
MAX_PIXELS = 1 << 31


class InputError(ValueError):
    """A file that cannot be used, with the path and the reason in the message."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _decode(path: Path) -> np.ndarray:
    suffix = _suffix(path)
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel

        # NIfTI stores x first; transpose the two spatial axes so rows are y like every other format.
        data = np.asarray(nibabel.load(str(path)).dataobj)
        return np.swapaxes(data, 0, 1) if data.ndim >= 2 else data
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read any supported file into a numpy array exactly as stored (no conversion).

    Raises:
        InputError: missing, empty or undecodable file, or an unsupported suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    if _suffix(path) not in IMAGE_SUFFIXES:
        raise InputError(path, f"unsupported file type {_suffix(path)!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        data = _decode(path)
    except Exception as err:  # decoders raise many different types for broken bytes
        raise InputError(path, f"cannot be decoded as an image ({type(err).__name__}: {err})") from err
    if data.size == 0:
        raise InputError(path, f"image has no pixels (shape {data.shape})")
    return data


def _to_yxc(path: Path, data: np.ndarray) -> np.ndarray:
    """Bring a decoded array to [H, W, C] with the channel axis last.

    Channel axes are recognised as a small (<= 4) leading or trailing axis; 3D stacks are refused
    rather than silently flattened.
    """
    data = np.squeeze(data) if data.ndim > 2 else data
    if data.ndim == 2:
        return data[..., None]
    if data.ndim == 3:
        if data.shape[-1] <= 4:
            return data
        if data.shape[0] <= 4:
            return np.moveaxis(data, 0, -1)
    raise InputError(
        path,
        f"expected a 2D image with at most 4 channels, got shape {data.shape} "
        "(3D stacks and time series: save the plane to segment as its own file)",
    )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D microscopy image as float32 [C, H, W] (channel first, as MONAI expects).

    Grey images give C=1, RGB C=3, RGBA drops alpha (C=3); 8/16-bit integers and floats are
    accepted and converted to float32 without rescaling (normalisation happens later).

    Raises:
        InputError: file problems, non-2D data, fewer than 2 pixels per side, NaN/inf values.
    """
    path = Path(path)
    data = _to_yxc(path, read_array(path))
    if data.shape[-1] == 4:
        data = data[..., :3]  # RGBA: alpha carries no signal
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InputError(path, f"unsupported pixel type {data.dtype}")
    h, w = data.shape[:2]
    if min(h, w) < 2:
        raise InputError(path, f"image is too small to segment ({h} x {w} pixels)")
    if h * w > MAX_PIXELS:
        raise InputError(path, f"image has {h * w} pixels, more than {MAX_PIXELS}; use tiled inference")
    image = np.moveaxis(data, -1, 0).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputError(path, "image contains NaN or infinite values")
    return np.ascontiguousarray(image)


def read_labels(path: str | os.PathLike, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an instance label image as int32 [H, W] (0 = background).

    Float labels are accepted when every value is a whole number. Ids need not be consecutive.

    Args:
        path: label file.
        image_shape: (H, W) of the matching image; a mismatch raises.

    Raises:
        InputError: file problems, more than one channel, negative or fractional ids, shape mismatch.
    """
    path = Path(path)
    data = np.squeeze(read_array(path))
    if data.ndim != 2:
        raise InputError(path, f"labels must be a 2D instance image, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.all(data == np.round(data)):
            raise InputError(path, "labels are float with non-integer or NaN values; save instance ids as integers")
    elif not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        raise InputError(path, f"unsupported label type {data.dtype}")
    if data.min() < 0:
        raise InputError(path, f"labels contain negative ids (min {data.min()})")
    if data.max() > np.iinfo(np.int32).max:
        raise InputError(path, f"label id {data.max()} is too large")
    if image_shape is not None and tuple(data.shape) != tuple(image_shape):
        raise InputError(path, f"labels are {tuple(data.shape)} but the image is {tuple(image_shape)}")
    return data.astype(np.int32)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write instance labels [H, W] as a compressed TIFF (uint16, or uint32 past 65535 ids), atomically."""
    import tifffile

    labels = np.asarray(labels)
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    return path


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """Map an image [C, H, W] (any range) to uint8 RGB [H, W, 3] for people to look at (1-99 percentiles)."""
    image = np.asarray(image, np.float32)
    grey_or_rgb = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, axis=0)
    lo, hi = np.percentile(grey_or_rgb, (1, 99))
    scaled = np.clip((grey_or_rgb - lo) / max(hi - lo, 1e-6), 0, 1)
    return (np.moveaxis(scaled, 0, -1) * 255).astype(np.uint8)


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, color=(255, 40, 40)) -> Path:
    """Write a PNG of the image [C, H, W] with the outlines of ``labels`` [H, W] drawn on it, atomically."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    rgb = to_display_rgb(image)
    rgb[find_boundaries(np.asarray(labels), mode="inner")] = color
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def masks_filename(stem: str) -> str:
    """Name of the label TIFF written for an image with this id/stem."""
    return f"{stem}_masks.tif"


def overlay_filename(stem: str) -> str:
    """Name of the outline overlay PNG written for an image with this id/stem."""
    return f"{stem}_overlay.png"


def is_image_file(path: str | os.PathLike) -> bool:
    """True for names with a supported image suffix (hidden files excluded)."""
    path = Path(path)
    return path.is_file() and not path.name.startswith(".") and _suffix(path) in IMAGE_SUFFIXES
