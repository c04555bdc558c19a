"""Shared fixtures: the dev data set when it is there, and small synthetic label images."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = Path(os.environ.get("MMCS_DEV_DATA", REPO.parent / "shared" / "data" / "dev"))


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """Root of ``../shared/data/dev``; tests that need it are skipped where it is absent."""
    if not (DEV_DATA / "manifest.csv").is_file():
        pytest.skip(f"dev data not found at {DEV_DATA}")
    return DEV_DATA


def disk_labels(shape=(96, 96), centers=((30, 30), (60, 64), (25, 70)), radii=(10, 14, 8)) -> np.ndarray:
    """Instance labels [H, W] uint16 of non-overlapping discs, ids 1..n in the order given."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, ((cy, cx), r) in enumerate(zip(centers, radii), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = i
    return labels


@pytest.fixture
def discs() -> np.ndarray:
    return disk_labels()
