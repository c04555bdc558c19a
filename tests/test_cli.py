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


@pytest.mark.parametrize(
    "args, line",
    [
        (["infer", "/nonexistent", "OUT"], "mmcs: error: /nonexistent: data list not found"),
        (["infer", "IMAGES", "OUT", "--model", "MISSING.pt"], "mmcs: error: MISSING.pt: model file not found"),
        (["infer", "IMAGES", "OUT", "--model", "EMPTY.pt"], "mmcs: error: EMPTY.pt: model file is empty"),
        (["infer", "IMAGES", "OUT", "--model", "TINY", "--diameter", "nuclei"], "mmcs: error: diameter 'nuclei': not a number"),
        (["infer", "IMAGES", "OUT", "--model", "TINY", "--precision", "fp64"], "mmcs: error: precision must be one of"),
        (["train", "--bundle_root", "OUT"], "mmcs: error: OUT: not a bundle folder"),
    ],
)
def test_mistakes_exit_2_with_one_line(tmp_path, tiny_model, args, line):
    """A wrong path, an unreadable model, a bad option value or an unknown subset: status 2, one line on stderr."""
    (tmp_path / "EMPTY.pt").write_bytes(b"")
    (tmp_path / "out").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    from helpers import SAMPLE_IMAGES

    first = sorted(SAMPLE_IMAGES.glob("*.tif"))[0]
    (images / first.name).write_bytes(first.read_bytes())
    names = {"IMAGES": str(images), "OUT": str(tmp_path / "out"), "MISSING.pt": str(tmp_path / "MISSING.pt")}
    names.update({"EMPTY.pt": str(tmp_path / "EMPTY.pt"), "TINY": str(tiny_model)})
    args = [names.get(a, a) for a in args]
    line = line.replace("MISSING.pt", names["MISSING.pt"]).replace("EMPTY.pt", names["EMPTY.pt"]).replace("OUT", names["OUT"])
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("mmcs: error:")]
    assert len(errors) == 1 and errors[0].startswith(line), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    verbose = run_cli(*args, "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


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
