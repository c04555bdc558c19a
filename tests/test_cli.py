"""The ``mmcs`` command: help text, diameters, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from helpers import disk_labels, subprocess_env
from mmcs_monai import cli


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mmcs_monai.cli", *args], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )


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
    from mmcs_monai.io import InputError

    with pytest.raises(InputError, match="not a bundle folder"):
        cli.train(bundle_root=str(tmp_path))


def test_diameter_sweep_command_prints_a_row_per_diameter(tmp_path):
    import torch

    from mmcs_monai.networks import CPnet

    labels = disk_labels(shape=(64, 64), centers=((20, 20), (45, 45)), radii=(8, 8))
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", (labels > 0).astype(np.uint8) * 255)
    tifffile.imwrite(tmp_path / "labels" / "a.tif", labels)
    torch.save(CPnet(nbase=(2, 8, 16)).state_dict(), tmp_path / "model.pt")
    result = run_cli(
        "diameter-sweep",
        str(tmp_path),
        "--model",
        str(tmp_path / "model.pt"),
        "--diameters",
        "12,stored",
        "--precision",
        "fp32",
        "--output",
        str(tmp_path / "sweep.csv"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| diameter | overall | default |" and lines[2].startswith("| 12 | ") and lines[3].startswith("| stored | ")
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 3


def test_infer_slide_command_writes_tiled_labels_and_cell_table(tmp_path):
    import torch

    from mmcs_monai.cells import CELL_TABLE_COLUMNS
    from mmcs_monai.networks import CPnet

    image = np.zeros((400, 300), np.uint8)
    image[::7] = 200
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(128, 128), compression="zlib")
    torch.save(CPnet(nbase=(2, 8, 16)).state_dict(), tmp_path / "model.pt")
    result = run_cli(
        "infer-slide",
        str(tmp_path / "slide.tif"),
        str(tmp_path / "out"),
        "--model",
        str(tmp_path / "model.pt"),
        "--block_size",
        "160",
        "--halo",
        "16",
        "--precision",
        "fp32",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "blocks" in result.stdout and "slide_masks.tif" in result.stdout
    with tifffile.TiffFile(tmp_path / "out" / "slide_masks.tif") as tif:
        assert tif.pages[0].shape == (400, 300) and tif.pages[0].is_tiled
    header = (tmp_path / "out" / "slide_cells.csv").read_text().splitlines()[0]
    assert header == ",".join(CELL_TABLE_COLUMNS)
    missing = run_cli("infer-slide", str(tmp_path / "nope.tif"), str(tmp_path / "out"), "--model", str(tmp_path / "model.pt"))
    assert missing.returncode != 0 and "nope.tif: file not found" in missing.stderr


def test_child_processes_run_this_checkout(tmp_path):
    """Every subprocess test imports the package from this repository, not an installed copy elsewhere."""
    import subprocess
    import sys

    from helpers import REPO

    code = "import mmcs_monai, pathlib; print(pathlib.Path(mmcs_monai.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), check=True)
    assert out.stdout.strip() == str(REPO / "mmcs_monai" / "__init__.py")
