"""Shared fixtures: the dev data set when it is there, and small synthetic label images."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcs_monai.networks import CPnet

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = Path(os.environ.get("MMCS_DEV_DATA", REPO.parent / "shared" / "data" / "dev"))


# A small CPnet (nbase [2, 8, 16, 32]) trained on the sample data, so tests that need real cells have them;
# tests/data/README.md says how it was made.
TINY_MODEL = REPO / "tests" / "data" / "tiny_cpnet.pt"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Path of the small trained model (finds most sample nuclei)."""
    assert TINY_MODEL.is_file(), f"{TINY_MODEL} is missing (see tests/data/README.md)"
    return TINY_MODEL


def environment_python(extra: str) -> Path:
    """Python of the separate environment for the ``extra`` (``deploy``, ``label``): ``MMCS_<EXTRA>_PYTHON``, else
    ``~/.venvs/mmcs-<extra>``. Missing, the calling test is skipped, or failed when ``MMCS_REQUIRE_<EXTRA>=1``
    (``scripts/test.sh`` sets it, so CI cannot pass those tests by skipping them)."""
    name = extra.upper()
    python = Path(os.environ.get(f"MMCS_{name}_PYTHON", Path.home() / ".venvs" / f"mmcs-{extra}" / "bin" / "python"))
    if not python.is_file():
        message = f"{extra} environment not found at {python}: MMCS_VENV=~/.venvs/mmcs-{extra} bash scripts/setup_env.sh {extra}"
        if os.environ.get(f"MMCS_REQUIRE_{name}") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


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


class RecordingNet(torch.nn.Module):
    """A stand-in network that records the sizes it is called with and returns x-coordinate ramps."""

    def __init__(self, diam_mean=30.0, diam_labels=15.0):
        super().__init__()
        self.diam_mean = torch.nn.Parameter(torch.tensor([diam_mean]), requires_grad=False)
        self.diam_labels = torch.nn.Parameter(torch.tensor([diam_labels]), requires_grad=False)
        self.seen = []
        self.subset_diameters = {}

    # the real network's subset-diameter table
    set_subset_diameters = CPnet.set_subset_diameters
    diameter_for = CPnet.diameter_for

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return x[:, :1].repeat(1, 3, 1, 1)


class OracleNet(RecordingNet):
    """Stand-in network that returns perfect outputs for a binary disc image at any scale."""

    def forward(self, x):
        from skimage.measure import label

        from mmcs_monai.flows import labels_to_flows

        self.seen.append(tuple(x.shape[-2:]))
        outs = []
        for image in x[:, 0].float():
            labels = label(image.numpy() > 0.5)
            flows = torch.as_tensor(labels_to_flows(labels)) * 5
            outs.append(torch.cat([flows, torch.where(torch.as_tensor(labels > 0), 10.0, -10.0)[None]]))
        return torch.stack(outs)
