"""Readers, writers and their errors."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from mmcs_monai import io


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


def test_write_labels_and_overlay_round_trip(tmp_path, discs):
    path = io.write_labels(tmp_path / "out" / "m.tif", discs)
    np.testing.assert_array_equal(tifffile.imread(path), discs)
    assert tifffile.imread(path).dtype == np.uint16
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
