"""A wheel install works away from the checkout: the bundle travels as package data (its recipes too), ``mmcs infer``
finds it."""

import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import REPO, SAMPLE_IMAGES

pytestmark = pytest.mark.slow


def test_wheel_install_segments_the_sample_images_from_another_folder(tmp_path, tiny_model):
    # built from a copy of the tracked files (what a clone holds), so the build leaves nothing in the checkout
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    wheel = next(wheels.glob("mmcs_monai-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as archive:  # the napari plugin's manifest and the entry point napari finds it by
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "mmcs_monai/napari/napari.yaml" in names and "mmcs-monai = mmcs_monai.napari:napari.yaml" in entry_points
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    )
    site = site.stdout.strip()
    # the dependencies (torch, monai...) from this environment, but not its editable mmcs_monai: a .pth line adds
    # the folder to sys.path without running that folder's own .pth files (where the editable finder lives)
    (tmp_path / "venv_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (tmp_path / "venv_site.pth").rename(f"{site}/dependencies.pth")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import mmcs_monai, mmcs_monai.workflows as w; print(mmcs_monai.__file__); print(w.default_bundle_root())"],
        cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    package, bundle = where.stdout.split()
    assert package.startswith(site) and bundle == f"{site}/mmcs_monai/bundle"  # not the checkout
    # a user recipe by name (mmcs train --recipe finetune): the installed bundle's, from any folder
    recipe = subprocess.run(
        [python, "-c", "from mmcs_monai.workflows import resolve_recipe; print(resolve_recipe('finetune'))"],
        cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert recipe.stdout.strip() == f"{bundle}/configs/recipes/finetune.json"
    # the installed bundle's own sample images, segmented with the library's default configs
    result = subprocess.run(
        [python, "-m", "mmcs_monai.cli", "infer", f"{bundle}/sample_data/images", "out", "--model", str(tiny_model)],
        cwd=elsewhere, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    masks = sorted(p.name for p in (elsewhere / "out").glob("*_masks.tif"))
    assert masks == sorted(f"{p.stem}_masks.tif" for p in SAMPLE_IMAGES.glob("*.tif"))
