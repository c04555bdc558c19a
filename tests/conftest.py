"""Fixtures; the helpers they use (and tests import) are in ``helpers.py``."""

from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_MODEL, disk_labels, require_dev_data


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Path of the small trained model (finds most sample nuclei)."""
    assert TINY_MODEL.is_file(), f"{TINY_MODEL} is missing (see tests/data/README.md)"
    return TINY_MODEL


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """Root of ``../shared/data/dev``: skipped where absent, failed there under ``MMCS_REQUIRE_DEV_DATA=1``."""
    return require_dev_data()


@pytest.fixture
def discs() -> np.ndarray:
    return disk_labels()
