"""Hostile inputs: whatever bytes or arrays arrive, the loaders and transforms either handle them
correctly or raise InputError naming the file. Property-based (hypothesis) plus hand-made files."""

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mmcs_monai.flows import labels_to_flows
from mmcs_monai.io import InputError, open_regions, read_image, read_labels
from mmcs_monai.transforms import NormalizePercentile, RandCellAffine, StackNucleusChannel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # tifffile notes on future layouts
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_])
SHAPES = st.one_of(
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
    st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6)),
    st.tuples(st.integers(1, 6), st.integers(1, 24), st.integers(1, 24)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)),
)


@st.composite
def any_array(draw):
    dtype = draw(DTYPES)
    shape = draw(SHAPES)
    floats = np.issubdtype(dtype, np.floating)
    elements = st.floats(allow_nan=True, allow_infinity=True, width=32) if floats else None
    return draw(arrays(dtype, shape, elements=elements))


def _expected_image_outcome(data: np.ndarray):
    """What read_image must do with ``data``: an error substring, or the channel count."""
    squeezed = np.squeeze(data) if data.ndim > 2 else data
    if squeezed.ndim == 2:
        yxc = squeezed[..., None]
    elif squeezed.ndim == 3 and squeezed.shape[-1] <= 4:
        yxc = squeezed
    elif squeezed.ndim == 3 and squeezed.shape[0] <= 4:
        yxc = np.moveaxis(squeezed, 0, -1)
    else:
        return "expected a 2D image"
    h, w, c = yxc.shape
    if min(h, w) < 2:
        return "too small"
    kept = yxc[..., :3]  # a 4th channel is alpha and dropped: its values do not matter
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(kept).all():
        return "NaN or infinite"
    return min(c, 3)


@FAST
@given(data=any_array(), suffix=st.sampled_from([".tif", ".npy"]))
# found by hypothesis: infinity only in the alpha channel of an RGBA image (dropped, so accepted)
@example(data=np.pad(np.full((2, 2, 1), np.inf, np.float32), ((0, 0), (0, 0), (3, 0))), suffix=".tif")
# and the same infinity in a kept channel: an error
@example(data=np.pad(np.full((2, 2, 1), np.inf, np.float32), ((0, 0), (0, 0), (0, 3))), suffix=".tif")
def test_read_image_handles_or_names_the_problem(tmp_path, data, suffix):
    path = tmp_path / f"img{suffix}"
    if suffix == ".npy":
        np.save(path, data)
    else:
        tifffile.imwrite(path, data)
    expected = _expected_image_outcome(tifffile.imread(path) if suffix == ".tif" else data)
    if isinstance(expected, str):
        with pytest.raises(InputError, match=expected) as err:
            read_image(path)
        assert str(path) in str(err.value)
    else:
        image = read_image(path)
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[0] == expected
        assert np.isfinite(image).all()


def _expected_labels_outcome(data: np.ndarray):
    """What read_labels must do with ``data`` (as stored): an error substring, or None for "accepted"."""
    squeezed = np.squeeze(data)
    if squeezed.ndim != 2:
        return "2D instance image"
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.all(data == np.round(data)):
            return "non-integer or NaN"
    if squeezed.size and squeezed.min() < 0:
        return "negative ids"
    if squeezed.size and squeezed.max() > 2**31 - 1:
        return "too large"
    return None


@FAST
@given(data=any_array())
def test_read_labels_handles_or_names_the_problem(tmp_path, data):
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, data)
    stored = tifffile.imread(path)
    expected = _expected_labels_outcome(stored)
    if expected is not None:
        with pytest.raises(InputError, match=expected) as err:
            read_labels(path)
        assert str(path) in str(err.value)
        return
    # every valid label file (8-bit, 16-bit, bool, whole-number floats) is accepted, exactly, as int32
    labels = read_labels(path)
    assert labels.dtype == np.int32 and labels.ndim == 2
    np.testing.assert_array_equal(labels, np.squeeze(stored).astype(np.int64))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.bool_, np.float32])
def test_read_labels_accepts_common_label_files(tmp_path, dtype):
    labels = np.zeros((20, 30), dtype)
    labels[2:6, 3:9] = 1
    if dtype != np.bool_:
        labels[10:15, 20:25] = 7
    for suffix in (".tif", ".png") if dtype in (np.uint8, np.uint16, np.bool_) else (".tif",):
        path = tmp_path / f"lbl_{np.dtype(dtype).name}{suffix}"
        if suffix == ".png":
            from PIL import Image

            Image.fromarray(labels.astype(np.uint8) if dtype == np.bool_ else labels).save(path)
        else:
            tifffile.imwrite(path, labels)
        out = read_labels(path, image_shape=(20, 30))
        assert out.dtype == np.int32 and np.array_equal(out, labels.astype(np.int32)), path.name


@FAST
@given(payload=st.binary(min_size=0, max_size=300), suffix=st.sampled_from([".tif", ".png", ".jpg", ".npy", ".nii.gz"]))
def test_random_bytes_with_an_image_name_are_a_clear_error(tmp_path, payload, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(payload)
    with pytest.raises(InputError) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_truncated_files_are_a_clear_error(tmp_path):
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    for suffix, write in ((".tif", lambda p: tifffile.imwrite(p, image, compression="zlib")), (".npy", lambda p: np.save(p, image))):
        full = tmp_path / f"full{suffix}"
        write(full)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(InputError, match="cut"):
            read_image(cut)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(InputError, match="cut.png"):
        read_image(tmp_path / "cut.png")


@FAST
@given(
    image=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 20), st.integers(2, 20)), elements=st.floats(-1e6, 1e6, width=32))
)
def test_channel_stacking_and_normalisation_stay_finite(image):
    stacked = StackNucleusChannel(nucleus_channel=image.shape[0] - 1 if image.shape[0] > 1 else None)(image)
    out = NormalizePercentile()(stacked)
    assert out.shape == (2, *image.shape[1:]) and out.dtype == np.float32 and np.isfinite(out).all()


@FAST
@given(labels=arrays(np.int32, st.tuples(st.integers(2, 24), st.integers(2, 24)), elements=st.integers(0, 5)))
@example(labels=np.array([[1, 1, 1, 1, 1, 1, 0, 1, 1, 1]] * 3, np.int32))  # one id in two pieces (found by CI)
def test_flows_of_any_labels_are_unit_vectors_inside_cells_and_zero_outside(labels):
    flows = np.asarray(labels_to_flows(labels))
    assert flows.shape == (2, *labels.shape) and np.isfinite(flows).all()
    norms = np.sqrt((flows**2).sum(0))
    assert (norms[labels == 0] == 0).all()
    # inside cells: unit vectors, or 0 where the heat gradient vanishes (the source of a symmetric piece)
    inside = norms[labels > 0]
    assert (np.isclose(inside, 1.0, atol=1e-4) | (inside == 0)).all()
    from skimage.measure import label as connected

    for i in np.unique(labels[labels > 0]):
        pieces = connected(labels == i, connectivity=1)
        # a cell in one piece of 9 px or more has a gradient almost everywhere (an id split into several
        # pieces is diffused from one source, as in Cellpose, so its other pieces may stay at zero)
        if pieces.max() == 1 and (pieces == 1).sum() >= 9:
            assert (norms[pieces == 1] > 0.5).mean() > 0.5


@FAST
@given(diameter=st.one_of(st.just(0.0), st.floats(0.1, 500.0)), size=st.integers(2, 40))
def test_spatial_augmentation_survives_any_diameter(diameter, size):
    image = np.random.default_rng(1).random((2, size, size + 3)).astype(np.float32)
    flows = np.zeros((3, size, size + 3), np.float32)
    out_image, out_flows = RandCellAffine(spatial_size=32)([image, flows], ["image", "flows"], diameter)
    assert tuple(out_image.shape) == (2, 32, 32) and tuple(out_flows.shape) == (3, 32, 32)
    assert np.isfinite(np.asarray(out_image)).all() and np.isfinite(np.asarray(out_flows)).all()


@FAST
@given(y0=st.integers(0, 99), x0=st.integers(0, 119), h=st.integers(1, 100), w=st.integers(1, 120), tile=st.sampled_from([16, 32, 48]))
def test_any_region_of_a_tiled_tiff_equals_the_full_read(tmp_path, y0, x0, h, w, tile):
    path = tmp_path / f"tiled{tile}.tif"
    if not path.exists():
        tifffile.imwrite(path, np.arange(100 * 120, dtype=np.uint16).reshape(100, 120), tile=(tile, tile), compression="zlib")
    y1, x1 = min(y0 + h, 100), min(x0 + w, 120)
    with open_regions(path) as regions:
        region = regions.read(y0, y1, x0, x1)
    np.testing.assert_array_equal(region[0], np.arange(100 * 120).reshape(100, 120)[y0:y1, x0:x1])
