"""The MONAI Deploy app, run for real in its own environment (``bash scripts/setup_env.sh deploy``).

The deploy environment's python comes from ``MMCS_DEPLOY_PYTHON`` (default ``~/.venvs/mmcs-deploy``).
Without it these tests are skipped, unless ``MMCS_REQUIRE_DEPLOY=1`` (set by ``scripts/test.sh``, so CI
cannot pass them by skipping).
"""

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.measure import regionprops

from helpers import environment_python, subprocess_env
from mmcs_monai import cli
from mmcs_monai.io import read_labels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
SAMPLE_IMAGES = BUNDLE / "sample_data" / "images"
APP = REPO / "mmcs_monai" / "deploy" / "app.py"


@pytest.fixture(scope="module")
def deploy_python() -> str:
    return str(environment_python("deploy"))


def run_app(python, *args, env=None, module=False):
    command = [python, "-m", "mmcs_monai.deploy"] if module else [python, str(APP)]
    environment = subprocess_env(**(env or {}))
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=environment, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ts"
    cli.export(model=str(tiny_model), output=str(path))
    return path


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same cells, whatever their ids."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def test_same_cells_helper_sees_renumbering_and_differences():
    a = np.array([[1, 1, 0], [2, 2, 0]])
    assert same_cells(a, np.where(a == 1, 7, np.where(a == 2, 3, 0)))
    assert not same_cells(a, np.where(a > 0, 1, 0))  # merged
    assert not same_cells(a, np.array([[1, 1, 0], [2, 0, 0]]))  # pixel lost


def test_app_masks_equal_mmcs_infer_and_tables_match_masks(deploy_python, tiny_model, exported, tmp_path):
    """At the model's stored diameter (the app's default, ``auto``, runs in the bad-image test below): three
    segmentations of the twelve sample images stay within the time a test may take."""
    reference = tmp_path / "mmcs_infer"
    cli.infer(str(SAMPLE_IMAGES), str(reference), model=str(tiny_model), precision="fp32", overlay=False, diameter="stored")
    from_ts = tmp_path / "mmcs_infer_ts"
    cli.infer(str(SAMPLE_IMAGES), str(from_ts), model=str(exported), precision="fp32", overlay=False, diameter="stored")
    out = tmp_path / "app"
    result = run_app(
        deploy_python, "-i", SAMPLE_IMAGES, "-o", out, "-m", exported, env={"MMCS_DIAMETER": "stored", "MMCS_PRECISION": "fp32"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    images = sorted(SAMPLE_IMAGES.glob("*.tif"))
    total_cells = 0
    for image in images:
        stem = image.stem
        expected = read_labels(reference / f"{stem}_masks.tif")
        got = read_labels(out / f"{stem}_masks.tif")
        assert same_cells(got, expected), stem
        assert same_cells(read_labels(from_ts / f"{stem}_masks.tif"), expected), stem
        # ids 1..N, and the table is the masks' own measurement
        ids = np.unique(got[got > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        with open(out / f"{stem}_cells.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        props = regionprops(got)
        assert [int(r["id"]) for r in rows] == [p.label for p in props]
        for row, prop in zip(rows, props):
            assert int(row["area"]) == prop.area
            assert float(row["centroid_y"]) == pytest.approx(prop.centroid[0], abs=0.01)
            assert float(row["centroid_x"]) == pytest.approx(prop.centroid[1], abs=0.01)
            assert [int(row[k]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")] == list(prop.bbox)
        total_cells += len(ids)
    assert total_cells > 10 * len(images)  # the model finds cells: the comparison is not of empty images
    assert not (out / "bad_samples.csv").exists()


def test_app_skips_and_reports_bad_images(deploy_python, exported, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    good = sorted(SAMPLE_IMAGES.glob("*.tif"))[:2]
    for path in good:
        shutil.copy(path, images / path.name)
    (images / "corrupt.tif").write_bytes(b"II*\x00" + b"\x07" * 64)
    (images / "empty.png").write_bytes(b"")
    tifffile.imwrite(images / "nan.tif", np.full((40, 40), np.nan, np.float32))
    out = tmp_path / "out"
    result = run_app(deploy_python, "-i", images, "-o", out, "-m", exported, module=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*_masks.tif")) == sorted(f"{p.stem}_masks.tif" for p in good)
    with open(out / "bad_samples.csv", newline="") as f:
        bad = {Path(r["file"]).name: r["problem"] for r in csv.DictReader(f)}
    assert set(bad) == {"corrupt.tif", "empty.png", "nan.tif"}
    assert "empty" in bad["empty.png"].lower() and "nan" in bad["nan.tif"].lower()


def test_app_takes_one_file_and_the_diameter_setting(deploy_python, exported, tmp_path):
    image = sorted(SAMPLE_IMAGES.glob("*.tif"))[0]
    out = tmp_path / "out"
    result = run_app(deploy_python, "-i", image, "-o", out, "-m", exported, env={"MMCS_DIAMETER": "fluorescence_nuclei (grey)"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in sorted(out.iterdir())] == [f"{image.stem}_cells.csv", f"{image.stem}_masks.tif", "segmentation_summary.csv"]
    summary = (out / "segmentation_summary.csv").read_text().splitlines()
    cells = int(tifffile.imread(out / f"{image.stem}_masks.tif").max())
    assert (
        summary[0] == "id,image,cells,diameter_px,diameter_um,pixel_size_um"
        and len(summary) == 2
        and summary[1].split(",")[2] == str(cells)
    )
    result = run_app(deploy_python, "-i", image, "-o", tmp_path / "out2", "-m", exported, env={"MMCS_DIAMETER": "no such subset"})
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "'no such subset'" in text and "stored subsets: " in text and "fluorescence_nuclei (grey)" in text


@pytest.mark.parametrize("content, problem", [(b"not a model at all", "not a TorchScript model"), (b"", "model file is empty")])
def test_corrupt_model_is_a_clear_error(deploy_python, tmp_path, content, problem):
    model = tmp_path / "model.ts"
    model.write_bytes(content)
    result = run_app(deploy_python, "-i", SAMPLE_IMAGES, "-o", tmp_path / "out", "-m", model)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and problem in text and str(model) in text
    assert not list((tmp_path / "out").glob("*_masks.tif"))


def test_missing_model_is_a_clear_error(deploy_python, tmp_path):
    model = tmp_path / "nowhere.ts"
    result = run_app(deploy_python, "-i", SAMPLE_IMAGES, "-o", tmp_path / "out", "-m", model)
    assert result.returncode != 0 and str(model) in result.stdout + result.stderr
