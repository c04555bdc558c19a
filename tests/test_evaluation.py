"""Diameter sweep: F1 per inference diameter, with a network whose outputs are known."""

import numpy as np
import pytest
import tifffile

from helpers import OracleNet, disk_labels
from mmcs_monai.evaluation import diameter_sweep, format_sweep_table, parse_diameters, summarise_sweep, write_sweep_csv
from mmcs_monai.inference import CellInferer


def test_parse_diameters():
    assert parse_diameters("10, 20.5,auto,stored") == [10.0, 20.5, "auto", "stored"]
    assert parse_diameters("[12,'subset']") == [12.0, "subset"]
    assert parse_diameters(15) == [15.0]
    with pytest.raises(ValueError, match="at least one"):
        parse_diameters("")


def test_sweep_scores_each_diameter_against_the_labels(tmp_path):
    labels = disk_labels(shape=(96, 96), centers=((25, 25), (70, 68), (25, 72)), radii=(9, 9, 9))
    tifffile.imwrite(tmp_path / "img.tif", (labels > 0).astype(np.uint8) * 200)
    tifffile.imwrite(tmp_path / "lbl.tif", labels)
    items = [{"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "lbl.tif"), "id": "a", "subset": "discs"}]
    # stored mean 36 px (too large for these 18 px discs), the subset's own 18 px: they must differ
    net = OracleNet(diam_mean=30.0, diam_labels=36.0)
    net.set_subset_diameters({"discs": 18.0, "other": 50.0})
    rows = diameter_sweep(net, items, ["stored", "subset", 300.0, "auto"], inferer=CellInferer(precision="fp32"), border=0)
    f1 = {r["diameter"]: r["f1"] for r in rows}
    # the image is resized by 30 / diameter: 96 px -> 80 (stored 36), 160 (subset 18), 10 -> 16 padded (300);
    # auto searches candidates largest first (4x the stored size first: 96 px at zoom 30/144 = 20 -> 32 padded) and
    # finds ~18 px cells; its 18 px candidate saw the whole image (160 px), and that segmentation is the answer
    assert net.seen[:4] == [(80, 80), (160, 160), (16, 16), (32, 32)] and (160, 160) in net.seen[4:]
    auto = next(r for r in rows if r["diameter"] == "auto")
    assert auto["diameter_px"] == pytest.approx(18.0, rel=0.15)  # not the stored 36
    assert f1["subset"] == 1.0 and f1["auto"] == 1.0 and f1[300.0] < 0.9
    subsets, table = summarise_sweep(rows)
    assert subsets == ["discs"] and [line["overall"] for line in table] == [f1["stored"], 1.0, f1[300.0], 1.0]
    text = format_sweep_table(rows)
    assert text.splitlines()[0] == "| diameter | overall | discs |" and f"| 300 | {f1[300.0]:.3f} |" in text
    with pytest.raises(ValueError, match="stored subsets: discs"):
        diameter_sweep(net, items, ["nuclei"], inferer=CellInferer(precision="fp32"))
    write_sweep_csv(tmp_path / "sweep.csv", rows)
    assert (tmp_path / "sweep.csv").read_text().splitlines()[2].startswith("subset,a,discs,1.0,3")
