"""Cell outputs for QuPath, Fiji and napari (mmcs_monai/exports.py): every format rasterised back by code of this
test (skimage's polygon fill, a pixel in when its centre is) gives the masks again; ome-zarr's reader opens the NGFF
labels; writers leave nothing under the final name when they fail."""

import json

import numpy as np
import pytest
import roifile
from skimage.draw import polygon2mask

from helpers import OracleNet, disk_labels
from mmcs_monai.exports import CellExporter, GeoJSONWriter, export_cells
from mmcs_monai.inference import CellInferer
from mmcs_monai.metrics import f1_score
from mmcs_monai.wholeslide import SlideSegmenter


def rasterise(rings_with_ids, shape) -> np.ndarray:
    """Our own rasteriser: each ring ([[x, y], ...], pixel-corner coordinates: pixel (r, c) covers [c, c+1) x [r, r+1))
    filled with its id; skimage puts pixel centres on whole numbers, so the ring moves by half a pixel."""
    out = np.zeros(shape, np.int32)
    for cell_id, ring in rings_with_ids:
        ring = np.asarray(ring, np.float64)
        out[polygon2mask(shape, ring[:, ::-1] - 0.5)] = cell_id
    return out


def geojson_cells(path):
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def roi_cells(path):
    return [(int(r.name.split("-")[1]), r.coordinates()) for r in roifile.roiread(path)]


def grid_labels(shape=(300, 400), spacing=25, seed=0):
    """Discs and odd shapes: a border cell, a cell touching another, a concave cell."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    k = 1
    for y in range(8, shape[0], spacing):
        for x in range(8, shape[1], spacing):
            r = rng.integers(4, 13)
            labels[((yy - y) ** 2 + (xx - x) ** 2 < r * r) & (labels == 0)] = k
            k += 1
    labels[0:5, 150:190] = k  # on the image border, cutting the tops off discs
    labels[labels == labels[108, 208]] = 0
    labels[98:119, 198:202] = k + 1
    labels[115:119, 198:216] = k + 1  # an L where that disc was: concave
    return labels


def test_geojson_and_roi_rasterise_back_to_the_masks(tmp_path):
    labels = grid_labels()
    image = np.stack([labels * 2.0 + 1, np.full(labels.shape, 7.0)]).astype(np.float32)
    paths = export_cells(tmp_path, "a", labels, ("tif", "geojson", "roi"), image=image, channel_names=["DAPI", "GFP"], pixel_size=0.5)
    assert [p.name for p in paths] == ["a_cells.geojson", "a_rois.zip"]
    features = geojson_cells(tmp_path / "a_cells.geojson")
    ids = [int(f["properties"]["name"].split()[1]) for f in features]
    back = rasterise([(i, f["geometry"]["coordinates"][0]) for i, f in zip(ids, features)], labels.shape)
    assert np.array_equal(back, labels)  # ids kept too: stronger than F1 1.0
    assert f1_score(labels, back)["f1"] == 1.0
    first = features[0]["properties"]
    assert first["objectType"] == "detection" and first["classification"] == {"name": "cell"}
    area = (labels == ids[0]).sum()
    m = first["measurements"]
    assert m["Area px^2"] == area and m["Area µm^2"] == pytest.approx(area * 0.25)
    assert m["Diameter µm"] == pytest.approx(2 * np.sqrt(area / np.pi) * 0.5)
    assert m["DAPI: Mean"] == pytest.approx(ids[0] * 2 + 1) and m["GFP: Mean"] == pytest.approx(7.0)
    rois = roi_cells(tmp_path / "a_rois.zip")
    assert len(rois) == len(np.unique(labels)) - 1
    assert np.array_equal(rasterise(rois, labels.shape), labels)


def test_ngff_labels_in_a_new_ome_zarr_open_with_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    labels = grid_labels((600, 560))
    export_cells(tmp_path, "a", labels, ("zarr",), pixel_size=0.5)
    nodes = list(Reader(parse_url(str(tmp_path / "a_masks.ome.zarr" / "labels" / "mmcs")))())
    label_node = next(n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs))
    assert np.array_equal(np.asarray(label_node.data[0]), labels)
    assert np.array_equal(np.asarray(label_node.data[1]), labels[::2, ::2])  # nearest-neighbour pyramid
    assert label_node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 0.5]


def test_slide_streaming_outlines_each_cell_once_across_bands(tmp_path):
    """As a slide writes them: final ids and the cells table (bounding boxes) from the streaming pass, bands of 37 rows,
    so cells start on band edges (row 0, the border cell) and cross them; every cell comes out once and whole."""
    from mmcs_monai.cells import measure_cells

    labels = grid_labels()
    lut, table = measure_cells(labels)
    final = lut[labels]
    reads = []

    def rows(y0, y1):
        reads.append(y1 - y0)
        return final[y0:y1]

    CellExporter(tmp_path, "s", ("geojson", "roi")).write(final.shape, rows, table, band=37)
    features = geojson_cells(tmp_path / "s_cells.geojson")
    ids = [int(f["properties"]["name"].split()[1]) for f in features]
    assert sorted(ids) == list(range(1, int(final.max()) + 1))  # each once
    assert np.array_equal(rasterise([(i, f["geometry"]["coordinates"][0]) for i, f in zip(ids, features)], final.shape), final)
    assert np.array_equal(rasterise(roi_cells(tmp_path / "s_rois.zip"), final.shape), final)
    assert max(reads) <= 37 + 26  # a band plus the tallest cell starting in it, never the image


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    writer = GeoJSONWriter(tmp_path / "x.geojson")
    writer.add(1, [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    exporter = CellExporter(tmp_path, "b", ("geojson", "roi", "zarr"))

    def broken(y0, y1):
        if y0 > 0:
            raise RuntimeError("disk gone")
        return grid_labels()[y0:y1]

    with pytest.raises(RuntimeError, match="disk gone"):
        exporter.write((300, 400), broken, band=100, bboxes={"id": np.array([1]), "bbox_y0": np.array([0]), "bbox_y1": np.array([5])})
    assert list(tmp_path.iterdir()) == []


def ome_zarr_slide(path, labels, pixel_size=0.5, names=("autofluorescence", "DAPI")):
    """A 2-channel OME-Zarr (NGFF 0.5) written by ome-zarr: channel 1 holds the cells."""
    import zarr
    from ome_zarr.writer import write_image

    image = np.stack([np.full(labels.shape, 3, np.uint16), (labels > 0).astype(np.uint16) * 200])
    root = zarr.open_group(str(path), mode="w")
    write_image(
        image,
        root,
        axes="cyx",
        axes_units={"y": "micrometer", "x": "micrometer"},
        scale_factors=(2,),
        scale={"c": 1.0, "y": pixel_size, "x": pixel_size},
        storage_options={"chunks": (1, 64, 64)},
        omero={"channels": [{"label": n, "color": "FFFFFF", "window": {"min": 0, "max": 255, "start": 0, "end": 255}} for n in names]},
    )
    return path


def test_ome_zarr_slide_gets_ngff_labels_geojson_and_rois_equal_to_its_cells(tmp_path):
    """infer-slide on an OME-Zarr, channel by name, diameter in µm: labels written back into the input (ome-zarr's
    reader finds them beside the image), GeoJSON and ROI set rasterise back to the same cells, across 9 blocks."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    centers = [(y, x) for y in (30, 100, 170, 200, 260) for x in (30, 70, 100, 140, 200, 240, 275)]
    labels = disk_labels(shape=(300, 300), centers=centers, radii=[9] * len(centers))
    slide = ome_zarr_slide(tmp_path / "slide.ome.zarr", labels)
    segmenter = SlideSegmenter(
        OracleNet(diam_mean=30.0, diam_labels=30.0),
        CellInferer(roi_size=256, precision="fp32"),
        block_size=100,
        halo=24,
        diameter="15um",  # 30 px at 0.5 µm per pixel
        channels="DAPI",
        formats="tif,geojson,roi,zarr",
    )
    result = segmenter(slide, tmp_path / "out" / "slide_masks.tif")
    assert result.diameter == pytest.approx(30.0) and result.pixel_size == 0.5 and result.diameter_um == pytest.approx(15.0)
    assert result.blocks == 9 and result.cells == labels.max()
    nodes = list(Reader(parse_url(str(slide)))())
    label_nodes = [n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs)]
    written = np.asarray(label_nodes[0].data[0])
    assert written.shape == (300, 300) and f1_score(labels, written)["f1"] == 1.0
    import tifffile

    assert np.array_equal(written, tifffile.imread(result.labels_path))
    features = geojson_cells(tmp_path / "out" / "slide_cells.geojson")
    back = rasterise([(int(f["properties"]["name"].split()[1]), f["geometry"]["coordinates"][0]) for f in features], labels.shape)
    assert np.array_equal(back, written)
    assert {f["properties"]["measurements"]["DAPI: Mean"] for f in features} == {200.0}
    assert np.array_equal(rasterise(roi_cells(tmp_path / "out" / "slide_rois.zip"), labels.shape), written)
