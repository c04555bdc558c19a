"""Readers and writers for microscopy images and instance labels, with input validation.

Every reader here raises :class:`InputError` whose message starts with the file's path and says what
is wrong, so a user with a folder of thousands of files knows which one to fix. Every writer writes
to a temporary file beside the target and renames it, so an interrupted run never leaves a half
written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions behind it (each one's ``__cause__``, else its ``__context__``), outermost first,
    each once. MONAI's config evaluation and ``Compose`` wrap the error a user can act on (an :class:`InputError`,
    a bad option value) in a ``RuntimeError``: callers look for it here."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


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
        raise InputError(path, f"image has {h * w} pixels, more than {MAX_PIXELS}; segment it with `mmcs infer-slide` (block by block)")
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


# extensions of more than one part, longest first: the stem drops all of it
_COMPOUND_EXTENSIONS = (".ome.tiff", ".ome.tif", ".ome.zarr", ".nii.gz")


def image_stem(path: str | os.PathLike) -> str:
    """An image file's name without its extension: the id of its outputs (``<stem>_masks.tif``) and of its
    label file in a folder pair. ``a.tif`` -> ``a``; ``cells.v2.png`` -> ``cells.v2``; ``scan.nii.gz``,
    ``slide.ome.tif`` -> ``scan``, ``slide`` (compound extensions, any case)."""
    name = Path(path).name
    for extension in _COMPOUND_EXTENSIONS:
        if name.lower().endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return Path(name).stem


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


# ---------------------------------------------------------------------------------------------
# Region reading for images too large to load at once (whole-slide images).


class ImageRegions:
    """Read rectangular regions of a 2D image without loading all of it where the format allows.

    Tiled or stripped TIFF (any compression tifffile decodes, pyramids read at full resolution)
    decodes only the tiles/strips a region touches; uncompressed TIFF and ``.npy`` are memory
    mapped; other formats are read whole (they are rarely that large). Use :func:`open_regions`.

    Attributes:
        path: the file.
        shape: ``(H, W)`` in pixels.
        channels: number of channels C (alpha dropped).
        dtype: the stored pixel type.

    ``read(y0, y1, x0, x1)`` returns float32 [C, y1 - y0, x1 - x0]; NaN/inf raise :class:`InputError`.
    """

    def __init__(self, path: Path, shape: tuple[int, int], channels: int, dtype: np.dtype):
        self.path = path
        self.shape = shape
        self.channels = channels
        self.dtype = np.dtype(dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        h, w = self.shape
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"{self.path}: region [{y0}:{y1}, {x0}:{x1}] is outside the {h} x {w} image")
        region = np.asarray(self._read(y0, y1, x0, x1), np.float32)
        if not np.isfinite(region).all():
            raise InputError(self.path, f"NaN or infinite values in region rows {y0}:{y1}, columns {x0}:{x1}")
        return region

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:  # [C, h, w], any dtype
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageRegions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ArrayRegions(ImageRegions):
    """Regions of an array already [H, W, C] (in memory or memory mapped)."""

    def __init__(self, path: Path, yxc: np.ndarray):
        super().__init__(path, tuple(yxc.shape[:2]), min(yxc.shape[2], 3), yxc.dtype)
        self.yxc = yxc

    def _read(self, y0, y1, x0, x1):
        return np.moveaxis(np.asarray(self.yxc[y0:y1, x0:x1, : self.channels]), -1, 0)


class _TiffRegions(ImageRegions):
    """Regions of a tiled or stripped TIFF page (or one page per channel), decoding only what is needed."""

    def __init__(self, path: Path, tif, pages: list):
        first = pages[0]
        samples = first.samplesperpixel if len(pages) == 1 else len(pages)
        super().__init__(path, (int(first.imagelength), int(first.imagewidth)), min(samples, 3), first.dtype)
        self.tif = tif
        self.pages = pages[: self.channels]
        self.planar = first.planarconfig == 2 and first.samplesperpixel > 1
        if first.is_tiled:
            self.chunk = (int(first.tilelength), int(first.tilewidth))
        else:
            self.chunk = (int(min(first.rowsperstrip or self.shape[0], self.shape[0])), self.shape[1])

    def _read(self, y0, y1, x0, x1):
        out = np.empty((self.channels, y1 - y0, x1 - x0), self.pages[0].dtype)
        th, tw = self.chunk
        rows_of_chunks = -(-self.shape[0] // th)
        cols_of_chunks = -(-self.shape[1] // tw)
        fh = self.tif.filehandle
        for page_index, page in enumerate(self.pages):
            planes = range(self.channels) if (self.planar and len(self.pages) == 1) else [None]
            for plane in planes:
                for cy in range(y0 // th, (y1 - 1) // th + 1):
                    for cx in range(x0 // tw, (x1 - 1) // tw + 1):
                        index = cy * cols_of_chunks + cx + (plane or 0) * rows_of_chunks * cols_of_chunks
                        fh.seek(page.dataoffsets[index])
                        data = fh.read(page.databytecounts[index])
                        chunk = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
                        chunk = chunk.reshape(chunk.shape[-3:])  # [th, tw, samples]
                        ty, tx = cy * th, cx * tw
                        sy0, sy1 = max(y0, ty), min(y1, ty + th, self.shape[0])
                        sx0, sx1 = max(x0, tx), min(x1, tx + tw, self.shape[1])
                        block = chunk[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
                        target = out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
                        if plane is not None:
                            target[plane] = block[..., 0]
                        elif len(self.pages) > 1:
                            target[page_index] = block[..., 0]
                        else:
                            target[:] = np.moveaxis(block[..., : self.channels], -1, 0)
        return out

    def close(self) -> None:
        self.tif.close()


def _open_tiff_regions(path: Path) -> ImageRegions:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:
        raise InputError(path, f"cannot be read as a TIFF image ({type(err).__name__}: {err})") from err
    try:
        series = tif.series[0]
        pages = [p for p in series.levels[0].pages if p is not None]
        pages = [p if isinstance(p, tifffile.TiffPage) else p.aspage() for p in pages]
        first = pages[0]
        if first.imagedepth > 1 or first.samplesperpixel > 4 or len(pages) > 4:
            raise InputError(
                path,
                f"expected a 2D image with at most 4 channels, got series shape {series.shape} ({series.axes}); "
                "3D stacks and time series: save the plane to segment as its own file",
            )
        if len(pages) > 1 and any(p.shape != first.shape or p.samplesperpixel != 1 for p in pages):
            raise InputError(path, f"pages of different shapes in series {series.shape} ({series.axes})")
        if first.is_memmappable and len(pages) == 1 and first.planarconfig != 2:
            yxc = tifffile.memmap(path, page=first.index, mode="r")
            tif.close()
            return _ArrayRegions(path, yxc[..., None] if yxc.ndim == 2 else yxc)
        if first.dtype is None or first.compression not in tifffile.TIFF.DECOMPRESSORS:
            raise InputError(path, f"TIFF compression {first.compression!r} cannot be decoded here")
        return _TiffRegions(path, tif, pages)
    except InputError:
        tif.close()
        raise
    except Exception as err:
        tif.close()
        raise InputError(path, f"cannot be read as a TIFF image ({type(err).__name__}: {err})") from err


def open_regions(path: str | os.PathLike) -> ImageRegions:
    """Open an image for reading by regions (see :class:`ImageRegions`).

    Raises:
        InputError: missing, empty, undecodable, not 2D, too small, or an unsupported pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    suffix = _suffix(path)
    if suffix in (".tif", ".tiff"):
        regions = _open_tiff_regions(path)
    elif suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise InputError(path, f"cannot be read as a .npy array ({type(err).__name__}: {err})") from err
        regions = _ArrayRegions(path, _to_yxc(path, data))
    else:
        regions = _ArrayRegions(path, _to_yxc(path, read_array(path)))
    if not (np.issubdtype(regions.dtype, np.integer) or np.issubdtype(regions.dtype, np.floating) or regions.dtype == bool):
        regions.close()
        raise InputError(path, f"unsupported pixel type {regions.dtype}")
    if min(regions.shape) < 2:
        regions.close()
        raise InputError(path, f"image is too small to segment ({regions.shape[0]} x {regions.shape[1]} pixels)")
    return regions
