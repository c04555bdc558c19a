"""The ``mmcs`` command: help text, diameters, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from conftest import disk_labels
from mmcs_monai import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmcs_monai.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run_cli("--help")
    text = result.stdout + result.stderr
    for command in ("train", "infer", "evaluate", "diameter"):
        assert command in text


def test_diameter_of_label_files_and_folder(tmp_path):
    small = disk_labels(shape=(80, 80), centers=((20, 20), (55, 55)), radii=(6, 6))
    large = disk_labels(shape=(80, 80), centers=((20, 20), (55, 55)), radii=(12, 12))
    tifffile.imwrite(tmp_path / "s.tif", small)
    tifffile.imwrite(tmp_path / "l.tif", large)
    result = cli.diameter(str(tmp_path))
    expected = [2 * np.sqrt((lbl == 1).sum() / np.pi) for lbl in (large, small)]
    assert result[str(tmp_path / "l.tif")] == pytest.approx(expected[0], abs=0.01)
    assert result["mean"] == pytest.approx(np.mean(expected), abs=0.01)
    out = run_cli("diameter", str(tmp_path / "s.tif"))
    assert f"{expected[1]:.2f}" in out.stdout


def test_bad_bundle_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a bundle folder"):
        cli.train(bundle_root=str(tmp_path))
