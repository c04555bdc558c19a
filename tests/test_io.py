"""Readers, writers and their errors."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from mmcs_monai import io
from mmcs_monai.io import InputError, open_regions, read_image


def test_read_image_grey_rgb_rgba_16bit_float(tmp_path):
    grey = (np.arange(20 * 30) % 255).reshape(20, 30).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 1] = 7
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "u16.tif", grey.astype(np.uint16) * 200)
    np.save(tmp_path / "float.npy", grey.astype(np.float64) / 3)

    g = io.read_image(tmp_path / "grey.tif")
    assert g.shape == (1, 20, 30) and g.dtype == np.float32
    np.testing.assert_array_equal(g[0], grey)
    c = io.read_image(tmp_path / "rgba.png")
    assert c.shape == (3, 20, 30) and c[1].max() == 7  # alpha dropped
    assert io.read_image(tmp_path / "u16.tif").max() == int(grey.max()) * 200
    np.testing.assert_allclose(io.read_image(tmp_path / "float.npy")[0], grey / 3, rtol=1e-6)


def test_read_image_channel_first_tiff(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (2, 16, 24), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cf.tif", img)
    np.testing.assert_array_equal(io.read_image(tmp_path / "cf.tif"), img)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not a tiff"), "cannot be decoded"),
        (lambda p: tifffile.imwrite(p, np.zeros((5, 8, 8, 8), np.uint8)), "2D image"),
        (lambda p: tifffile.imwrite(p, np.zeros((1, 9), np.uint8)), "too small"),
        (lambda p: tifffile.imwrite(p, np.full((8, 8), np.nan, np.float32)), "NaN"),
    ],
)
def test_read_image_errors_name_file_and_problem(tmp_path, make, problem):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(io.InputError) as err:
        io.read_image(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_read_image_missing_and_unsupported(tmp_path):
    with pytest.raises(io.InputError, match="not found"):
        io.read_image(tmp_path / "nope.tif")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(io.InputError, match="unsupported file type"):
        io.read_image(tmp_path / "x.txt")


def test_read_labels_checks(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.array([[0, 3], [3, 9]], np.float32))
    np.testing.assert_array_equal(io.read_labels(tmp_path / "ok.tif"), [[0, 3], [3, 9]])
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0, 0.5], [1, 1]], np.float32))
    with pytest.raises(io.InputError, match="non-integer"):
        io.read_labels(tmp_path / "frac.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -1], [1, 1]], np.int16))
    with pytest.raises(io.InputError, match="negative"):
        io.read_labels(tmp_path / "neg.tif")
    with pytest.raises(io.InputError, match="image is"):
        io.read_labels(tmp_path / "ok.tif", image_shape=(3, 3))
    tifffile.imwrite(tmp_path / "huge.tif", np.array([[0, 4_000_000_000], [1, 1]], np.uint32))
    with pytest.raises(io.InputError, match="huge.tif: label id 4000000000 is too large"):
        io.read_labels(tmp_path / "huge.tif")
    tifffile.imwrite(tmp_path / "sparse_ids.tif", np.array([[0, 70000], [2_000_000, 2_000_000]], np.uint32))
    np.testing.assert_array_equal(io.read_labels(tmp_path / "sparse_ids.tif"), [[0, 70000], [2_000_000, 2_000_000]])


def test_write_labels_and_overlay_round_trip(tmp_path, discs):
    path = io.write_labels(tmp_path / "out" / "m.tif", discs)
    np.testing.assert_array_equal(tifffile.imread(path), discs)
    assert tifffile.imread(path).dtype == np.uint16
    many = np.arange(280 * 250, dtype=np.int32).reshape(280, 250) + 1  # 70,000 ids: past uint16
    np.testing.assert_array_equal(io.read_labels(io.write_labels(tmp_path / "many.tif", many)), many)
    (tmp_path / "many.tif").unlink()
    image = np.random.default_rng(0).random((1, *discs.shape)).astype(np.float32)
    png = io.write_overlay(tmp_path / "out" / "o.png", image, discs)
    rgb = np.asarray(Image.open(png))
    assert rgb.shape == (*discs.shape, 3)
    # outline pixels are red, background pixels grey
    edge = np.argwhere(discs == 1)[0]
    assert tuple(rgb[tuple(edge)]) == (255, 40, 40)
    assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.tif", "o.png"]  # no temp files left


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ region reading (whole slides)
_RNG = np.random.default_rng(0)
_RGB = (_RNG.random((300, 420, 3)) * 255).astype(np.uint8)
_GREY = (_RNG.random((300, 420)) * 60000).astype(np.uint16)
_TIFF_LAYOUTS = {
    "tiled_rgb_zlib": lambda p: tifffile.imwrite(p, _RGB, tile=(64, 128), compression="zlib", photometric="rgb"),
    "strips_grey_lzw": lambda p: tifffile.imwrite(p, _GREY, rowsperstrip=37, compression="lzw"),
    "uncompressed_grey": lambda p: tifffile.imwrite(p, _GREY),
    "planar_rgb": lambda p: tifffile.imwrite(
        p, np.moveaxis(_RGB, -1, 0), photometric="rgb", planarconfig="separate", tile=(64, 64), compression="zlib"
    ),
    "page_per_channel": lambda p: tifffile.imwrite(
        p, np.stack([_GREY, _GREY // 3]), photometric="minisblack", tile=(128, 128), compression="zlib"
    ),
}


@pytest.mark.parametrize("layout", sorted(_TIFF_LAYOUTS))
def test_tiff_regions_equal_the_full_read(tmp_path, layout):
    path = tmp_path / f"{layout}.tif"
    _TIFF_LAYOUTS[layout](path)
    full = read_image(path)
    with open_regions(path) as regions:
        assert regions.shape == (300, 420) and regions.channels == full.shape[0]
        for y0, y1, x0, x1 in ((0, 300, 0, 420), (61, 250, 127, 129), (299, 300, 5, 419)):
            np.testing.assert_array_equal(regions.read(y0, y1, x0, x1), full[:, y0:y1, x0:x1])
        with pytest.raises(ValueError, match="outside"):
            regions.read(0, 301, 0, 10)


def test_pyramidal_tiff_reads_full_resolution_and_npy_is_memory_mapped(tmp_path):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_RGB, tile=(128, 128), compression="zlib", photometric="rgb", subifds=1)
        tif.write(_RGB[::2, ::2], tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1)
    with open_regions(path) as regions:
        np.testing.assert_array_equal(regions.read(10, 200, 30, 400), np.moveaxis(_RGB, -1, 0)[:, 10:200, 30:400])
    np.save(tmp_path / "a.npy", _GREY)
    with open_regions(tmp_path / "a.npy") as regions:
        assert isinstance(regions.yxc, np.memmap)
        np.testing.assert_array_equal(regions.read(3, 9, 0, 420)[0], _GREY[3:9])


def test_region_reader_errors_name_the_file(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((12, 40, 40), np.uint8))
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    for path, problem in ((stack, "3D stacks"), (empty, "empty"), (junk, "cannot be read"), (tmp_path / "no.tif", "not found")):
        with pytest.raises(InputError, match=problem) as err:
            open_regions(path)
        assert str(path) in str(err.value)
    nan = np.ones((50, 60), np.float32)
    nan[40, 50] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan, tile=(16, 16))
    with open_regions(tmp_path / "nan.tif") as regions:
        regions.read(0, 16, 0, 16)  # the clean part reads
        with pytest.raises(InputError, match="NaN.*rows 32:50"):
            regions.read(32, 50, 32, 60)


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("a.tif", "a"),
        ("cells.v2.png", "cells.v2"),
        ("scan.nii.gz", "scan"),
        ("SLIDE.OME.TIFF", "SLIDE"),
        ("x/slide.ome.tif", "slide"),
        ("my cells (1).tif", "my cells (1)"),
    ],
)
def test_image_stem_drops_the_whole_extension(name, stem):
    assert io.image_stem(name) == stem
