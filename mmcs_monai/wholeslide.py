"""Whole-slide inference: images of any size, segmented block by block with bounded memory.

The slide is cut into blocks (``block_size`` pixels at network scale). Each block is read from disk
with a halo around it; :class:`~mmcs_monai.inference.CellInferer` predicts its flows (its sliding
window blends tiles of up to 224 px with Gaussian weights) and :func:`~mmcs_monai.flows.flows_to_masks`
builds masks over the whole window. A cell belongs to the block whose core holds its centroid, so
a cell crossing a block border is segmented once, by a block that saw it whole with context on
both sides, and gets one id; the core is grown by half a diameter for this test so a cell on a
border is never lost between two blocks, and a cell already labelled by an earlier block is not
pasted twice. Owned cells go into a label file on disk: inside its own core a block's cells win,
in its halo they only fill background, so the result depends on nothing but the block grid. A last
streaming pass makes the ids consecutive, measures each cell and writes a tiled, compressed label
TIFF and, optionally, a CSV table of cells. Under ``torchrun`` the ranks share out the blocks and
rank 0 pastes them in block order, so the output is the single-process one.

Memory is bounded by the block size: the network never sees more than one window at a time, the
intensity range is measured once on a sample of windows, and labels live in a file that is mapped
a band of rows at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcs_monai.cells import finalize_labels, write_cell_table
from mmcs_monai.distributed import barrier, broadcast_object, get_rank, is_distributed, is_main_process, shard
from mmcs_monai.exports import CellExporter
from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import ESTIMATED_DIAMETERS, CellInferer
from mmcs_monai.io import ImageRegions, InputError, atomic_path
from mmcs_monai.ome import ImageInfo, open_regions, resolve_channel
from mmcs_monai.options import DEFAULT_FORMATS, parse_channels, parse_formats, parse_micrometres, parse_pixel_size
from mmcs_monai.reporting import Progress
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms.array import StackNucleusChannel, percentile_bounds, scale_to_bounds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """One block of a slide: ``core`` is what it owns, ``window`` the core plus halo it reads.

    Both are ``(y0, y1, x0, x1)`` in slide pixels, end exclusive.
    """

    index: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


def plan_blocks(shape: tuple[int, int], block_size: int, halo: int) -> list[Block]:
    """Cover an image of ``shape`` (H, W) with blocks of at most ``block_size`` px plus ``halo`` px, row-major."""
    h, w = shape
    block_size = max(int(block_size), 1)
    blocks = []
    for y0 in range(0, h, block_size):
        for x0 in range(0, w, block_size):
            y1, x1 = min(y0 + block_size, h), min(x0 + block_size, w)
            window = (max(y0 - halo, 0), min(y1 + halo, h), max(x0 - halo, 0), min(x1 + halo, w))
            blocks.append(Block(len(blocks), (y0, y1, x0, x1), window))
    return blocks


class LabelCanvas:
    """An uint32 label image [H, W] in a file, mapped a band of rows at a time (bounded memory)."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path = Path(path)
        self.shape = shape
        with open(self.path, "wb") as f:
            f.truncate(shape[0] * shape[1] * 4)  # sparse zeros

    def rows(self, y0: int, y1: int, mode: str = "r+") -> np.memmap:
        """Rows ``y0:y1`` as a writable memory map; drop the reference to release it."""
        return np.memmap(self.path, np.uint32, mode, offset=y0 * self.shape[1] * 4, shape=(y1 - y0, self.shape[1]))

    def bands(self, height: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """``(y0, rows)`` read-only bands of ``height`` rows, top to bottom."""
        for y0 in range(0, self.shape[0], height):
            yield y0, self.rows(y0, min(y0 + height, self.shape[0]), mode="r")


@dataclass
class SlideResult:
    """What :meth:`SlideSegmenter.__call__` did: the outputs, the cell count and the timing."""

    labels_path: Path
    table_path: Path | None
    shape: tuple[int, int]
    cells: int
    blocks: int
    diameter: float
    seconds: float
    block_px: int  # block core side, image pixels
    halo: int  # context around each block, image pixels
    border_copies: int = 0  # cells on a block border kept by both blocks; the second copy was dropped
    compiled: bool = False  # the network was asked to run compiled (it falls back to eager where it cannot)
    pixel_size: float | None = None  # micrometres per pixel (metadata or the option), None when unknown
    outputs: tuple = ()  # every file and folder written (labels TIFF, table, GeoJSON, ROI set, NGFF labels)

    @property
    def diameter_um(self) -> float | None:
        """The diameter used in micrometres, where the pixel size is known."""
        return self.diameter * self.pixel_size if self.pixel_size else None


class SlideSegmenter:
    """Segment a whole-slide (or any large) image block by block; see the module docstring.

    Args:
        network: a CPnet in eval mode (on its device).
        inferer: the per-window inferer (default: tiles of up to 224 px fitted to the window, 10% overlap,
            auto precision, ``compile="auto"``: the network is compiled for a slide of at least
            :data:`~mmcs_monai.precision.AUTO_COMPILE_MEGAPIXELS` for its precision).
        block_size: block side in pixels at network scale (input pixels = this / zoom); bounds memory.
        halo: context around each block in input pixels; default ``max(64, 4 * diameter)``. Cells larger
            than the halo can be cut at block borders.
        diameter: cell diameter in the slide (pixels), a stored subset name, None (the model's mean) or
            ``"auto"`` (measured on a central crop of ``auto_crop`` pixels, then used for every block).
        cyto_channel, nucleus_channel: channel choice as in :class:`StackNucleusChannel`.
        channels: or the channels by index or by the names in the image's OME metadata
            (:func:`~mmcs_monai.options.parse_channels`: ``"DAPI"``, ``"cyto,DAPI"``, ``"0,2"``): the channel to
            segment (cytoplasm, or a nuclear stain alone), then the nucleus channel.
        pixel_size: micrometres per pixel, overriding the image's metadata (needed for a diameter in µm, ``"12um"``,
            when the file has none).
        formats: outputs (:data:`~mmcs_monai.options.OUTPUT_FORMATS`: ``tif``, ``geojson``, ``roi``, ``zarr``;
            :mod:`mmcs_monai.exports`), written from the label canvas a band at a time.
        mask_settings: flows -> masks thresholds (default :class:`~mmcs_monai.flows.MaskSettings`()).
        intensity_samples: number of windows (spread over the slide) whose pixels set the 1-99
            percentile intensity range used for every block.

    Call: ``segmenter(image_path, labels_path, table_path=None) -> SlideResult``; writes a tiled
    zlib-compressed label TIFF (uint16, or uint32 past 65,535 cells; ids 1..N) and, when
    ``table_path`` is given, a CSV with :data:`CELL_TABLE_COLUMNS` (slide pixels, bbox end exclusive).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: CellInferer | None = None,
        block_size: int = 2048,
        halo: int | None = None,
        diameter: float | str | None = None,
        cyto_channel: int | None = None,
        nucleus_channel: int | None = None,
        mask_settings: MaskSettings | None = None,
        intensity_samples: int = 64,
        auto_crop: int = 1024,
        channels=None,
        pixel_size: float | str | None = None,
        formats=DEFAULT_FORMATS,
    ):
        self.network = network
        self.channels = parse_channels(channels)
        if self.channels is not None and (cyto_channel is not None or nucleus_channel is not None):
            raise ValueError("give channels or cyto_channel/nucleus_channel, not both")
        self.pixel_size = parse_pixel_size(pixel_size)
        self.formats = parse_formats(formats)
        self.block_size = block_size
        self.halo = halo
        self.diameter = diameter
        self.stack = StackNucleusChannel(cyto_channel, nucleus_channel)
        self.segmenter = CellSegmenter(network, inferer or CellInferer(), mask_settings)
        self.intensity_samples = intensity_samples
        self.auto_crop = auto_crop

    # ------------------------------------------------------------------ steps
    def read_window(self, regions: ImageRegions, window, bounds) -> np.ndarray:
        """Network input for a window: float32 [2, h, w], scaled with the slide's intensity bounds."""
        y0, y1, x0, x1 = window
        return scale_to_bounds(self.stack(regions.read(y0, y1, x0, x1)), *bounds)

    def intensity_bounds(self, regions: ImageRegions, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """1st and 99th percentile per input channel, from up to ``intensity_samples`` windows on a grid."""
        h, w = regions.shape
        per_side = max(1, int(math.sqrt(self.intensity_samples)))
        ys = np.unique(np.linspace(0, max(h - size, 0), per_side).astype(int))
        xs = np.unique(np.linspace(0, max(w - size, 0), per_side).astype(int))
        samples = [self.stack(regions.read(y, min(y + size, h), x, min(x + size, w))) for y in ys for x in xs]
        return percentile_bounds(np.concatenate([s.reshape(2, -1) for s in samples], axis=1))

    def for_image(self, path, regions: ImageRegions) -> SlideSegmenter:
        """This segmenter, or a copy for one image: channels named in ``channels`` found in its metadata, and a
        diameter in µm turned into pixels with its pixel size. Raises :class:`InputError` naming the file."""
        info = getattr(regions, "info", None)
        pixel_size = self.pixel_size or (info.pixel_size if info is not None else None)
        slide = copy.copy(self)
        slide.pixel_size = pixel_size
        if self.channels is not None:
            picked = [resolve_channel(path, c, info or ImageInfo(), regions.channels) for c in self.channels]
            slide.stack = StackNucleusChannel(picked[0], picked[1] if len(picked) > 1 else None)
        micrometres = parse_micrometres(self.diameter)
        if micrometres is not None:
            if not pixel_size:
                raise InputError(
                    path, f"diameter {self.diameter!r} is in micrometres but the image has no pixel size in its metadata; give --pixel_size"
                )
            slide.diameter = micrometres / pixel_size
        return slide

    def slide_diameter(self, regions: ImageRegions, bounds, segmenter: CellSegmenter | None = None) -> float:
        """The diameter (pixels) every block is segmented at (:meth:`CellSegmenter.diameter_for`, with ``segmenter``,
        default this slide segmenter's own); ``auto`` is measured on a central crop."""
        diameter = "stored" if self.diameter is None else self.diameter
        crop = None
        if diameter in ESTIMATED_DIAMETERS:  # only an estimate reads the crop
            h, w = regions.shape
            cy, cx, half = h // 2, w // 2, self.auto_crop // 2
            window = (max(cy - half, 0), min(cy + half, h), max(cx - half, 0), min(cx + half, w))
            crop = self.read_window(regions, window, bounds)
        return (segmenter or self.segmenter).diameter_for(crop, diameter)

    def segment_block(
        self, regions: ImageRegions, block: Block, bounds, diameter: float, segmenter: CellSegmenter | None = None
    ) -> np.ndarray:
        """Cells owned by ``block``: int32 [window h, window w], ids 1..n (consecutive), 0 elsewhere."""
        segmenter = segmenter or self.segmenter
        masks = segmenter(self.read_window(regions, block.window, bounds), diameter=diameter).masks
        return owned_cells(masks, block, margin=0.5 * diameter)

    def segmenter_for(self, shape: tuple[int, int]) -> CellSegmenter:
        """The segmenter of one slide of ``shape`` (H, W): ``compile="auto"`` decided by its size
        (:meth:`CellSegmenter.for_workload`), so a large slide runs every block, and the diameter estimate,
        through the one compiled network. A new object per slide: this one is never changed by a call."""
        return self.segmenter.for_workload(megapixels=shape[0] * shape[1] / 1e6)

    # ------------------------------------------------------------------ whole slide
    def __call__(self, image_path, labels_path, table_path=None) -> SlideResult:
        """Segment ``image_path``; ``labels_path`` is the label TIFF (written with ``tif`` in ``formats``), and its
        folder and the image's name place the other formats' outputs (``<stem>_cells.geojson``...)."""
        with open_regions(image_path) as regions:
            return self.for_image(image_path, regions)._segment(image_path, regions, Path(labels_path), table_path)

    def _segment(self, image_path, regions: ImageRegions, labels_path: Path, table_path) -> SlideResult:
        start = time.perf_counter()
        segmenter = self.segmenter_for(regions.shape)
        # under torchrun rank 0 measures the intensity range and the diameter, and every rank uses them
        bounds, diameter = self.intensity_bounds(regions), None
        if is_main_process():
            diameter = self.slide_diameter(regions, bounds, segmenter)
        diameter = broadcast_object(diameter)
        zoom = segmenter.zoom_for(diameter)
        halo = self.halo if self.halo is not None else max(64, int(math.ceil(4 * diameter)))
        block_px = max(int(self.block_size / zoom), 2 * halo)
        blocks = plan_blocks(regions.shape, block_px, halo)
        logger.info(
            "%s: %d x %d px, diameter %.1f px, %d blocks of %d px + %d px halo",
            image_path,
            *regions.shape,
            diameter,
            len(blocks),
            block_px,
            halo,
        )
        labels_path.parent.mkdir(parents=True, exist_ok=True)
        block_files = None
        if is_distributed():
            block_files = self._segment_shard(regions, blocks, bounds, diameter, labels_path, segmenter)
            owned_blocks = (np.load(block_files / f"block_{block.index}.npy").astype(np.int32) for block in blocks)
        else:
            owned_blocks = (self.segment_block(regions, block, bounds, diameter, segmenter) for block in blocks)
        try:
            cells, copies = 0, 0
            if is_main_process():
                exporter = self.exporter(image_path, regions, labels_path.parent)
                cells, copies = assemble_slide_labels(
                    regions.shape,
                    blocks,
                    owned_blocks,
                    labels_path if "tif" in self.formats else None,
                    table_path,
                    exporter=exporter,
                    image_rows=lambda y0, y1: regions.read(y0, y1, 0, regions.shape[1]),
                )
            cells, copies = broadcast_object((cells, copies))
        finally:
            if block_files is not None and is_main_process():
                shutil.rmtree(block_files, ignore_errors=True)
        outputs = [labels_path] if "tif" in self.formats else []
        outputs += [Path(table_path)] if table_path else []
        outputs += self.exporter(image_path, regions, labels_path.parent).paths()
        return SlideResult(
            labels_path if "tif" in self.formats else None,
            Path(table_path) if table_path else None,
            regions.shape,
            cells,
            len(blocks),
            diameter,
            time.perf_counter() - start,
            block_px,
            halo,
            copies,
            segmenter.compiles,
            self.pixel_size,
            tuple(outputs),
        )

    def exporter(self, image_path, regions: ImageRegions, output_dir: Path) -> CellExporter:
        """The writer of this slide's GeoJSON, ROI set and NGFF labels (those in ``formats``); NGFF labels go into the
        input when it is an OME-Zarr."""
        from mmcs_monai.io import image_stem

        info = getattr(regions, "info", None)
        zarr_image = getattr(regions, "image", None)
        options = {}
        if zarr_image is not None:
            dataset = zarr_image.attrs["multiscales"][0]["datasets"][0]
            scales = [t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"]
            options = {"zarr_image": regions.path, "zarr_axes": zarr_image.axes, "zarr_scale": scales[0] if scales else None}
        names = info.channel_names if info is not None else None
        return CellExporter(output_dir, image_stem(image_path), self.formats, names, self.pixel_size, **options)

    def _segment_shard(self, regions, blocks, bounds, diameter, labels_path: Path, segmenter: CellSegmenter) -> Path:
        """Distributed: each rank segments every world-size-th block into ``block_<index>.npy`` in a scratch
        folder beside the output (returned once every rank is done); rank 0 pastes them in block order.

        The result is the single-process one: the same blocks, pasted by rank 0 in the same order.
        The output folder must be visible to every rank (one node, or a shared file system).
        """
        folder = Path(broadcast_object(str(labels_path.parent / f".{labels_path.name}.blocks.{os.getpid()}")))
        folder.mkdir(parents=True, exist_ok=True)
        mine = shard(blocks)
        with Progress(len(mine), f"rank {get_rank()}: segmenting blocks", "block", logger) as progress:
            for block in mine:
                owned = self.segment_block(regions, block, bounds, diameter, segmenter)
                dtype = np.uint16 if owned.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
                with atomic_path(folder / f"block_{block.index}.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, owned.astype(dtype))
                progress.step(f"rank {get_rank()}: block {block.index + 1} of {len(blocks)} segmented")
        barrier()
        return folder


def assemble_slide_labels(shape, blocks, owned_blocks, labels_path, table_path=None, exporter=None, image_rows=None) -> tuple[int, int]:
    """Paste the blocks' owned cells in block order, renumber, write the label TIFF (and the cell table, and the
    formats of ``exporter``, a :class:`~mmcs_monai.exports.CellExporter`, a band at a time from the canvas).

    Args:
        shape: (height, width) of the slide.
        blocks: the :class:`Block` plan, in index order.
        owned_blocks: for each block, its owned cells (:func:`owned_cells`: int [window h, window w], ids 1..n).
        labels_path: the label TIFF to write (uint16, or uint32 past 65,535 cells), atomically; None: none (the
            scratch canvas goes beside ``table_path``, else in the exporter's folder).
        table_path: optional per-cell CSV.
        exporter: optional writer of GeoJSON / ROI set / NGFF labels; ``image_rows(y0, y1)`` gives the raw image
            rows [C, h, W] for its mean intensities.

    Returns:
        ``(cells, copies dropped)``.
    """
    where = Path(labels_path) if labels_path else Path(table_path) if table_path else Path(exporter.output_dir) / "slide"
    where.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{where.name}.", suffix=".u32", dir=where.parent)
    os.close(fd)
    try:
        canvas = LabelCanvas(Path(scratch), shape)
        next_id, copies = 1, 0
        with Progress(len(blocks), "segmenting blocks", "block", logger) as progress:
            for block, owned in zip(blocks, owned_blocks):
                next_id, dropped = paste_block(canvas, block, owned, next_id)
                copies += dropped
                progress.step(f"block {block.index + 1}: {next_id - 1} cells so far")
        lut, table = finalize_labels(canvas)
        if labels_path:
            write_label_tiff(labels_path, canvas, lut)
        if table_path is not None:
            write_cell_table(table_path, table)
        if exporter is not None and exporter.wanted:
            exporter.write(shape, lambda y0, y1: lut[np.asarray(canvas.rows(y0, y1, mode="r"))], table, image_rows)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return len(table["id"]), copies


def owned_cells(masks: np.ndarray, block: Block, margin: float = 0.0) -> np.ndarray:
    """Keep the cells of ``masks`` (window [h, w]) whose centroid lies in the block's core grown by ``margin`` px.

    The margin makes sure a cell on a border is kept by at least one of the two blocks even when
    their versions of it have centroids a pixel apart; :func:`paste_block` drops the second copy.

    Returns:
        int32 [h, w] with the kept cells numbered 1..n, 0 elsewhere.
    """
    masks = np.asarray(masks)
    n = int(masks.max())
    if n == 0:
        return np.zeros(masks.shape, np.int32)
    wy0, _, wx0, _ = block.window
    cy0, cy1, cx0, cx1 = block.core
    yy, xx = np.nonzero(masks)
    ids = masks[yy, xx]
    area = np.bincount(ids, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre_y = np.bincount(ids, yy, minlength=n + 1) / area + wy0
        centre_x = np.bincount(ids, xx, minlength=n + 1) / area + wx0
    keep = (area > 0) & (centre_y >= cy0 - margin) & (centre_y < cy1 + margin)
    keep &= (centre_x >= cx0 - margin) & (centre_x < cx1 + margin)
    keep[0] = False
    new_ids = np.zeros(n + 1, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[masks]


def paste_block(canvas: LabelCanvas, block: Block, owned: np.ndarray, next_id: int, duplicate_fraction: float = 0.5) -> tuple[int, int]:
    """Write a block's owned cells into the canvas with ids from ``next_id`` on.

    A cell more than ``duplicate_fraction`` of which is already labelled is a copy of a cell an
    earlier block kept (a cell on a border, seen by both): it is dropped. Inside the block's core
    its cells overwrite what a neighbour's halo put there; in the halo they only fill background.
    The result depends on the block grid only (blocks are pasted in index order).

    Returns:
        ``(next free id, number of copies dropped)``.
    """
    n = int(owned.max())
    if n == 0:
        return next_id, 0
    wy0, wy1, wx0, wx1 = block.window
    cy0, cy1, cx0, cx1 = block.core
    view = canvas.rows(wy0, wy1)
    region = view[:, wx0:wx1]
    cells = owned > 0
    ids = owned[cells]
    area = np.bincount(ids, minlength=n + 1)
    already = np.bincount(ids[region[cells] > 0], minlength=n + 1)
    keep = (area > 0) & (already <= duplicate_fraction * area)
    keep[0] = False
    new_ids = np.zeros(n + 1, np.uint32)
    new_ids[keep] = np.arange(next_id, next_id + int(keep.sum()), dtype=np.uint32)
    local = new_ids[owned]
    in_core = np.zeros(cells.shape, bool)
    in_core[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0] = True
    write = (local > 0) & (in_core | (region == 0))
    region[write] = local[write]
    view.flush()
    del view
    return next_id + int(keep.sum()), int((area[1:] > 0).sum() - keep.sum())


def write_label_tiff(path, canvas: LabelCanvas, lut: np.ndarray, tile: int = 512) -> Path:
    """Write the canvas through ``lut`` as a tiled, zlib-compressed TIFF (uint16 or uint32), atomically."""
    import tifffile

    dtype = np.uint16 if lut.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    h, w = canvas.shape

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, h, tile):
            rows = canvas.rows(y0, min(y0 + tile, h), mode="r")
            for x0 in range(0, w, tile):
                out = np.zeros((tile, tile), dtype)
                part = lut[np.asarray(rows[:, x0 : x0 + tile])]
                out[: part.shape[0], : part.shape[1]] = part
                yield out
            del rows

    path = Path(path)
    with atomic_path(path) as tmp:
        big = h * w * np.dtype(dtype).itemsize > 2**31
        tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=dtype, tile=(tile, tile), compression="zlib", bigtiff=big)
    return path
