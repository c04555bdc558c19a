"""Cell diameters from labels, checked against the disc formula."""

import numpy as np
import pytest

from conftest import disk_labels
from mmcs_monai.diameters import (
    cell_areas,
    equivalent_diameters,
    mean_of_diameters,
    median_diameter,
    scale_to_target,
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
