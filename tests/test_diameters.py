"""Cell diameters from labels, checked against the disc formula."""

import numpy as np
import pytest

from helpers import disk_labels
from mmcs_monai.diameters import (
    cell_areas,
    datalist_diameters,
    equivalent_diameters,
    item_diameter,
    mean_of_diameters,
    median_diameter,
    scale_to_target,
    with_subset_diameters,
)


def test_equivalent_diameter_of_discs():
    labels = disk_labels(shape=(200, 200), centers=((50, 50), (140, 60), (100, 150)), radii=(10, 20, 30))
    areas = cell_areas(labels)
    np.testing.assert_allclose(equivalent_diameters(areas), [20, 40, 60], rtol=0.03)
    assert median_diameter(labels) == pytest.approx(40, rel=0.03)


def test_non_consecutive_ids_and_empty():
    labels = np.zeros((10, 10), np.int32)
    labels[:2, :2] = 7
    labels[5:9, 5:9] = 30
    np.testing.assert_array_equal(cell_areas(labels), [4, 16])
    assert median_diameter(np.zeros((5, 5), np.uint16)) == 0.0


def test_mean_ignores_images_without_cells_and_scale():
    assert mean_of_diameters([10.0, 0.0, 20.0]) == 15.0
    assert mean_of_diameters([0.0]) == 0.0
    assert scale_to_target(15.0, 30.0) == 2.0
    assert scale_to_target(0.0, 30.0) == 1.0


def _two_subsets(tmp_path, n_small=2, n_large=2):
    """Labelled items of two subsets whose cells differ 4x in diameter (radius 4 vs 16 px)."""
    import tifffile

    items = []
    for subset, radius, shape, n in (("small", 4, (64, 64), n_small), ("large", 16, (128, 128), n_large)):
        for k in range(n):
            centers = ((shape[0] // 4, shape[1] // 4 + k), (shape[0] * 3 // 4, shape[1] * 3 // 4))
            labels = disk_labels(shape=shape, centers=centers, radii=(radius, radius))
            path = tmp_path / f"{subset}{k}.tif"
            tifffile.imwrite(path, labels)
            items.append({"image": str(path), "label": str(path), "subset": subset})
    return items


def test_datalist_diameters_per_subset(tmp_path):
    # 3 small-cell images, 1 large: the overall mean is over images, not over subset means
    items = _two_subsets(tmp_path, n_small=3, n_large=1) + [{"image": "unlabelled.tif", "subset": "small"}]
    mean, subsets = datalist_diameters(items)
    # hand values: the disc of radius r drawn by disk_labels has this many pixels; diameter 2 sqrt(area / pi)
    small = 2 * np.sqrt((disk_labels(shape=(64, 64), centers=((32, 32),), radii=(4,)) > 0).sum() / np.pi)
    large = 2 * np.sqrt((disk_labels(shape=(128, 128), centers=((64, 64),), radii=(16,)) > 0).sum() / np.pi)
    assert subsets == pytest.approx({"small": small, "large": large})
    assert mean == pytest.approx((3 * small + large) / 4) and mean != pytest.approx((small + large) / 2)
    # an explicit diameter in the data list wins over the labels
    assert item_diameter({"label": items[0]["label"], "diameter": 50}) == 50.0


def test_with_subset_diameters_assigns_the_subset_mean(tmp_path):
    items = _two_subsets(tmp_path)
    items.append({"image": "x.tif", "label": items[0]["label"], "subset": "small", "diameter": 11.0})
    items.append({"image": "y.tif", "subset": "unknown"})
    _, subsets = datalist_diameters(items[:4])
    out = with_subset_diameters(items, subsets)
    assert [o.get("diameter") for o in out] == [subsets["small"]] * 2 + [subsets["large"]] * 2 + [11.0, None]
    assert "diameter" not in items[0]  # inputs untouched


def test_training_datalist_by_mode_and_a_typo_is_an_error(tmp_path):
    from mmcs_monai.diameters import training_datalist

    items = _two_subsets(tmp_path)
    subsets = {"small": 8.0, "large": 32.0}
    assert [i.get("diameter") for i in training_datalist(items, subsets, "image")] == [None] * 4
    assert [i["diameter"] for i in training_datalist(items, subsets, "subset")] == [8.0, 8.0, 32.0, 32.0]
    with pytest.raises(ValueError, match="diameter_mode 'subsets': use one of image, subset"):
        training_datalist(items, subsets, "subsets")
