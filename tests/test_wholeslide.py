"""Whole-slide inference: blocks, ownership of cells crossing borders, unique ids, outputs."""

import csv

import numpy as np
import pytest
import tifffile
from skimage.measure import regionprops

from helpers import OracleNet, disk_labels
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_labels
from mmcs_monai.metrics import f1_score
from mmcs_monai.wholeslide import Block, LabelCanvas, SlideSegmenter, assemble_slide_labels, owned_cells, paste_block, plan_blocks


def test_block_cores_partition_the_image():
    blocks = plan_blocks((250, 310), block_size=100, halo=20)
    cover = np.zeros((250, 310), int)
    for b in blocks:
        y0, y1, x0, x1 = b.core
        cover[y0:y1, x0:x1] += 1
        wy0, wy1, wx0, wx1 = b.window
        assert (wy0, wx0) == (max(y0 - 20, 0), max(x0 - 20, 0)) and (wy1, wx1) == (min(y1 + 20, 250), min(x1 + 20, 310))
    assert len(blocks) == 3 * 4 and (cover == 1).all()


def test_a_cell_belongs_to_the_block_holding_its_centroid():
    masks = np.zeros((60, 60), np.int32)
    masks[10:20, 25:40] = 5  # centroid x 32: in the core (x >= 30)
    masks[40:50, 20:34] = 9  # centroid x 26.5: left of the core, the neighbour owns it
    block = Block(0, core=(0, 60, 30, 60), window=(0, 60, 0, 60))
    owned = owned_cells(masks, block)
    assert set(np.unique(owned)) == {0, 1} and (owned[10:20, 25:40] == 1).all() and (owned[40:50] == 0).all()
    assert owned_cells(masks, block, margin=4)[45, 25] == 2  # within 4 px of the core: kept too


def test_paste_core_wins_halo_only_fills_background(tmp_path):
    canvas = LabelCanvas(tmp_path / "c.u32", (10, 20))
    left = Block(0, core=(0, 10, 0, 10), window=(0, 10, 0, 14))
    right = Block(1, core=(0, 10, 10, 20), window=(0, 10, 6, 20))
    cell_a = np.zeros((10, 14), np.int32)
    cell_a[2:6, 7:13] = 1  # reaches 3 px into the right block's core
    next_id, _ = paste_block(canvas, left, cell_a, 1)
    cell_b = np.zeros((10, 14), np.int32)
    cell_b[2:6, 5:9] = 1  # the right block's own cell over columns 11..14 (window starts at 6)
    cell_b[8, 0:2] = 1  # and a halo pixel on background in the left core
    cell_b[0, 0:3] = 2  # a copy of a cell the left block already wrote: dropped
    out = np.asarray(canvas.rows(0, 10))
    out[0, 6:9] = 7
    assert paste_block(canvas, right, cell_b, next_id) == (3, 1)
    out = np.asarray(canvas.rows(0, 10))
    assert (out[2:6, 7:11] == 1).all() and (out[2:6, 11:15] == 2).all() and (out[8, 6:8] == 2).all()
    assert (out[0, 6:9] == 7).all() and out.max() == 7


def test_slide_label_file_holds_every_id_past_65535(tmp_path):
    """70,000 cells of 2 x 2 px assembled from 8 blocks: the label file holds 70,000 distinct ids, one per cell
    (uint32: uint16 would wrap them at 65,535), and reads back whole; the cell table has a row for each."""
    height, width = 400, 700
    yy, xx = np.mgrid[:height, :width]
    cells = (yy // 2) * (width // 2) + xx // 2 + 1  # 200 x 350 = 70,000 cells
    blocks = plan_blocks((height, width), block_size=200, halo=4)
    owned = (owned_cells(cells[b.window[0] : b.window[1], b.window[2] : b.window[3]], b) for b in blocks)
    n, copies = assemble_slide_labels((height, width), blocks, owned, tmp_path / "slide_masks.tif", tmp_path / "cells.csv")
    assert (n, copies) == (70_000, 0)
    written = tifffile.imread(tmp_path / "slide_masks.tif")
    assert written.dtype == np.uint32 and written.max() == 70_000
    back = read_labels(tmp_path / "slide_masks.tif")
    # one id per cell, each cell one id: the (cell, id) pairs are as many as the cells
    pairs = np.unique(cells.astype(np.int64) * 100_000 + back, return_counts=True)
    assert len(np.unique(back)) == 70_000 and pairs[0].size == 70_000 and (pairs[1] == 4).all()
    with open(tmp_path / "cells.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 70_000


def _straddling_slide(tmp_path, shape=(300, 300)):
    # discs on a grid that puts 20 of them across the 100-px block borders (rows/columns 100 and 200)
    centers = [(y, x) for y in (30, 100, 170, 200, 260) for x in (30, 70, 100, 140, 200, 240, 275)]
    labels = disk_labels(shape=shape, centers=centers, radii=[9] * len(centers))
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, (labels > 0).astype(np.uint8) * 200, tile=(64, 64), compression="zlib")
    return path, labels


def test_slide_cells_across_block_borders_are_whole_with_unique_ids(tmp_path):
    path, labels = _straddling_slide(tmp_path)
    net = OracleNet(diam_mean=30.0, diam_labels=30.0)
    # one network tile per window, so the oracle sees each window whole
    segmenter = SlideSegmenter(net, CellInferer(roi_size=256, precision="fp32"), block_size=100, halo=24)
    result = segmenter(path, tmp_path / "out" / "slide_masks.tif", tmp_path / "out" / "cells.csv")
    out = tifffile.imread(result.labels_path)
    crossing = sum(1 for c in regionprops(labels) if any(c.bbox[a] < edge <= c.bbox[a + 2] - 1 for a in (0, 1) for edge in (100, 200)))
    assert crossing >= 20  # the test really has cells on block borders
    assert result.blocks == 9 and result.cells == labels.max()
    assert f1_score(labels, out)["f1"] == 1.0
    assert sorted(np.unique(out))[1:] == list(range(1, labels.max() + 1))  # ids 1..N, each once
    # no ground-truth cell is covered by two output ids
    for cell in regionprops(labels):
        assert len(np.unique(out[tuple(cell.coords.T)])) == 1
    # the table agrees with skimage's measurements of the written labels
    with open(result.table_path) as f:
        rows = {int(r["id"]): r for r in csv.DictReader(f)}
    for cell in regionprops(out):
        row = rows[cell.label]
        assert int(row["area"]) == cell.area
        assert float(row["centroid_y"]) == pytest.approx(cell.centroid[0], abs=0.01)
        assert float(row["centroid_x"]) == pytest.approx(cell.centroid[1], abs=0.01)
        assert tuple(int(row[k]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")) == cell.bbox
    with tifffile.TiffFile(result.labels_path) as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].compression == 8  # zlib

    # ids follow the blocks in row-major order. A cell near a border may be kept by either neighbour
    # (ownership margin), so only cells far inside one core say which block wrote them
    def inside(c):
        return all(min(abs(v - e) for e in (100, 200)) > 30 for v in c.centroid)

    cells = [c for c in sorted(regionprops(out), key=lambda c: c.label) if inside(c)]
    owner = [int(c.centroid[0] // 100) * 3 + int(c.centroid[1] // 100) for c in cells]
    assert len(set(owner)) >= 6 and owner == sorted(owner)


class RecordingInferer(CellInferer):
    """The library inferer, recording the [H, W] of every input it is handed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs = []
        self.estimated = []

    def predict(self, inputs, network, *args, **kwargs):
        self.inputs.append(tuple(inputs.shape[-2:]))
        return super().predict(inputs, network, *args, **kwargs)

    def estimate_diameter(self, image, network, *args, **kwargs):
        self.estimated.append(tuple(image.shape[-2:]))
        return super().estimate_diameter(image, network, *args, **kwargs)


def test_network_never_sees_more_than_one_window(tmp_path):
    path, labels = _straddling_slide(tmp_path)
    net = OracleNet(diam_mean=30.0, diam_labels=15.0)  # zoom 2: windows are 2x larger at network scale
    inferer = RecordingInferer(roi_size=128, precision="fp32")
    result = SlideSegmenter(net, inferer, block_size=100, halo=16)(path, tmp_path / "m.tif")
    # block_size is in network pixels: 100 at zoom 2 is 50 image pixels, so 6 x 6 blocks, each read with its halo
    assert result.blocks == len(inferer.inputs) == 36
    assert max(max(s) for s in inferer.inputs) <= 50 + 2 * 16 < labels.shape[0]
    assert max(max(s) for s in net.seen) <= 128
    assert not (tmp_path / "m.tif").with_suffix(".u32").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_slide_auto_diameter_measures_a_central_crop(tmp_path):
    # large cells (r 12) in the central 120 px, many small ones (r 5) around them: only the crop decides
    big = [(150 + dy, 150 + dx) for dy in (-28, 28) for dx in (-28, 28)]
    small = [(y, x) for y in range(15, 300, 30) for x in range(15, 300, 30) if max(abs(y - 150), abs(x - 150)) > 75]
    labels = disk_labels(shape=(300, 300), centers=big + small, radii=[12] * len(big) + [5] * len(small))
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, (labels > 0).astype(np.uint8) * 200, tile=(64, 64))
    net = OracleNet(diam_mean=30.0, diam_labels=6.0)  # the stored diameter is the small cells'
    inferer = RecordingInferer(roi_size=512, precision="fp32")
    segmenter = SlideSegmenter(net, inferer, block_size=400, halo=32, diameter="auto", auto_crop=120)
    result = segmenter(path, tmp_path / "m.tif", None)
    assert inferer.estimated == [(120, 120)]  # estimated once, on the crop, not the slide
    assert all(shape != (120, 120) for shape in inferer.inputs)  # and the crop is not segmented for nothing
    assert result.diameter == pytest.approx(2 * np.sqrt((labels == 1).sum() / np.pi), rel=0.1)
    assert result.table_path is None and tifffile.imread(tmp_path / "m.tif").max() > 0
