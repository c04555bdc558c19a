"""Array and dictionary transforms: values against independent computations."""

import math

import numpy as np
import pytest
import tifffile
import torch

from helpers import BUNDLE, disk_labels
from mmcs_monai.diameters import datalist_diameters, median_diameter, with_subset_diameters
from mmcs_monai.flows import labels_to_flows
from mmcs_monai.io import InputError, read_labels
from mmcs_monai.transforms import (
    FlowsToMasks,
    LabelsToFlows,
    LoadMicroscopyd,
    NormalizePercentile,
    RandCellAffine,
    RandCellAffined,
    StackNucleusChannel,
    StackNucleusChanneld,
    inference_preprocessing,
)


def test_stack_nucleus_channel():
    rgb = np.stack([np.full((4, 5), v, np.float32) for v in (1, 2, 6)])
    out = StackNucleusChannel()(rgb)
    assert out.shape == (2, 4, 5)
    np.testing.assert_allclose(out[0], 3.0)  # mean of channels
    np.testing.assert_array_equal(out[1], 0.0)  # no nucleus stain
    out = StackNucleusChannel(nucleus_channel=2)(rgb)
    np.testing.assert_allclose(out[0], 1.5)  # mean of the others
    np.testing.assert_allclose(out[1], 6.0)
    out = StackNucleusChannel(cyto_channel=1, nucleus_channel=0)(rgb)
    np.testing.assert_allclose(out, np.stack([rgb[1], rgb[0]]))
    with pytest.raises(ValueError, match="nucleus_channel=3"):
        StackNucleusChannel(nucleus_channel=3)(rgb)


def test_stack_nucleus_channeld_per_item_override():
    img = np.stack([np.full((3, 3), 1.0), np.full((3, 3), 5.0)]).astype(np.float32)
    out = StackNucleusChanneld()({"image": img, "nucleus_channel": 1})
    np.testing.assert_allclose(out["image"][1], 5.0)
    with pytest.raises(InputError, match="f.tif"):
        StackNucleusChanneld()({"image": img, "nucleus_channel": 4, "image_file": "f.tif"})


def test_configured_nucleus_channel_reaches_the_network_input(tmp_path):
    """A 3-channel image, cytoplasm in channel 0 and nuclei in channel 2: with ``nucleus_channel=2`` set by
    configuration (no per-row entry), every preprocessing path puts the normalised channel 2 in the nucleus
    plane and channel 0 in the cytoplasm plane, through the transform, the library pipeline and the bundle."""
    from monai.bundle import ConfigParser

    rng = np.random.default_rng(0)
    cyto = rng.integers(0, 200, (40, 50)).astype(np.uint8)
    nuclei = (disk_labels((40, 50), ((12, 12), (28, 35)), (6, 8)) > 0).astype(np.uint8) * 180 + 20
    path = tmp_path / "two_stains.tif"
    tifffile.imwrite(path, np.stack([cyto, np.zeros_like(cyto), nuclei], axis=-1), photometric="rgb")
    expected = np.stack(
        [NormalizePercentile()(cyto[None].astype(np.float32))[0], NormalizePercentile()(nuclei[None].astype(np.float32))[0]]
    )

    raw = LoadMicroscopyd("image")({"image": str(path)})
    stacked = StackNucleusChanneld(cyto_channel=0, nucleus_channel=2)(dict(raw))["image"]
    np.testing.assert_array_equal(np.asarray(stacked), np.stack([cyto, nuclei]).astype(np.float32))
    library = inference_preprocessing("image", cyto_channel=0, nucleus_channel=2)({"image": str(path)})["image"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"nucleus_channel": 2, "cyto_channel": 0, "bundle_root": str(BUNDLE)})
    bundle = parser.get_parsed_content("preprocessing")({"image": str(path), "id": "two_stains", "image_file": str(path)})["image"]
    for image in (library, bundle):
        np.testing.assert_allclose(np.asarray(image), expected, atol=1e-5)


def test_normalize_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    img = np.stack([rng.normal(100, 20, (32, 32)), np.full((32, 32), 3.0)]).astype(np.float32)
    out = NormalizePercentile(1, 99)(img)
    lo, hi = np.percentile(img[0], (1, 99))
    np.testing.assert_allclose(out[0], (img[0] - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)  # constant channel: zeros, not NaN


def test_labels_to_flows_target_layout(discs):
    target = LabelsToFlows()(discs[None])
    assert target.shape == (3, *discs.shape) and target.dtype == np.float32
    np.testing.assert_array_equal(target[2], (discs > 0).astype(np.float32))
    np.testing.assert_allclose(target[:2], labels_to_flows(discs), atol=1e-6)


def _cosine_inside(a, b, mask):
    dot = (a * b).sum(0)[mask]
    norm = np.linalg.norm(a, axis=0)[mask] * np.linalg.norm(b, axis=0)[mask] + 1e-8
    return float((dot / norm).mean())


@pytest.mark.parametrize("angle, flip", [(math.pi / 2, False), (math.pi, True), (0.7, True)])
def test_rand_cell_affine_rotates_flow_vectors_with_the_image(discs, angle, flip):
    affine = RandCellAffine(spatial_size=96, target_diameter=30, scale_range=0.0)
    affine._angle, affine._flip, affine._scale, affine._center_frac = angle, flip, 1.0, (0.5, 0.5)
    flows = LabelsToFlows()(discs[None])
    labels_w, flows_w = affine([discs[None], flows], ["label", "flows"], diameter=30.0, randomize=False)
    labels_w = labels_w[0].numpy()
    # Flows recomputed from the warped labels are what the warped flows must match.
    expected = labels_to_flows(labels_w)
    interior = (labels_w > 0) & (flows_w[2].numpy() > 0.99)
    assert _cosine_inside(flows_w[:2].numpy(), expected, interior) > 0.95
    assert len(np.unique(labels_w)) == len(np.unique(discs))


def test_rand_cell_affine_resizes_to_target_diameter():
    labels = disk_labels(shape=(200, 200), centers=((50, 50), (150, 60), (100, 150)), radii=(10, 10, 10))
    affine = RandCellAffine(spatial_size=256, target_diameter=30, scale_range=0.0, rotate=False, flip=False)
    (warped,) = affine([labels[None]], ["label"], diameter=median_diameter(labels))
    assert median_diameter(warped) == pytest.approx(30, rel=0.05)


def test_rand_cell_affined_is_reproducible_and_crops(discs):
    data = {
        "image": np.random.default_rng(0).random((2, 96, 96)).astype(np.float32),
        "flows": LabelsToFlows()(discs[None]),
        "diameter": 20.0,
    }
    t1 = RandCellAffined(keys=["image", "flows"], spatial_size=64).set_random_state(seed=3)
    t2 = RandCellAffined(keys=["image", "flows"], spatial_size=64).set_random_state(seed=3)
    a, b = t1(data), t2(data)
    assert a["image"].shape == (2, 64, 64) and a["flows"].shape == (3, 64, 64)
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["flows"], b["flows"])
    c = t1(data)
    assert not torch.equal(a["image"], c["image"])  # a new draw each call


def test_load_microscopyd_checks_label_size(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((10, 12), np.uint8))
    tifffile.imwrite(tmp_path / "lbl.tif", np.zeros((10, 11), np.uint16))
    with pytest.raises(InputError, match="lbl.tif.*image is"):
        LoadMicroscopyd()({"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "lbl.tif")})
    tifffile.imwrite(tmp_path / "lbl.tif", np.ones((10, 12), np.uint16))
    out = LoadMicroscopyd()({"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "lbl.tif")})
    assert out["image"].shape == (1, 10, 12) and out["label"].shape == (1, 10, 12)
    assert out["image_file"].endswith("img.tif")


def test_flows_to_masks_transform_recovers_labels(discs):
    target = LabelsToFlows()(discs[None])
    output = np.concatenate([5 * target[:2], np.where(target[2:] > 0, 10.0, -10.0)])
    masks = FlowsToMasks()(output)
    assert masks.shape == (1, *discs.shape) and masks.dtype == torch.int32
    assert int(masks.max()) == 3
    from mmcs_monai.metrics import match_instances

    # the same cells, pixel for pixel (ids may be renumbered): every disc matched at IoU > 0.95
    recovered = masks[0].numpy()
    for i in (1, 2, 3):
        ids, counts = np.unique(recovered[discs == i], return_counts=True)
        assert len(ids) == 1 and ids[0] > 0 and counts[0] == (discs == i).sum()
    assert ((recovered > 0) == (discs > 0)).mean() > 0.99
    assert match_instances(discs, recovered, 0.95)[0] == 3


def test_subset_diameters_bring_both_subsets_to_the_target_size(tmp_path):
    """Two subsets whose cells differ 4x: after the subset resize both measure the network's 30 px."""
    items = []
    for subset, radius, size in (("small", 4, 64), ("large", 16, 128)):
        centers = ((size // 4, size // 4), (size * 3 // 4, size // 2))
        labels = disk_labels(shape=(size, size), centers=centers, radii=(radius,) * 2)
        tifffile.imwrite(tmp_path / f"{subset}.tif", labels)
        items.append({"label": str(tmp_path / f"{subset}.tif"), "subset": subset})
    _, subsets = datalist_diameters(items)
    warp = RandCellAffined(keys="label", spatial_size=288, scale_range=0.0, rotate=False, flip=False)
    for item in with_subset_diameters(items, subsets):
        out = warp({"label": read_labels(item["label"])[None], "diameter": item["diameter"]})
        assert median_diameter(np.asarray(out["label"])) == pytest.approx(30.0, rel=0.1), item["subset"]


def test_save_cell_outputs_writes_renumbered_masks_and_their_cell_table(tmp_path):
    import csv

    from skimage.measure import regionprops

    from mmcs_monai.transforms import SaveCellOutputsd

    masks = disk_labels(shape=(70, 90), centers=((20, 20), (50, 60), (15, 75)), radii=(8, 10, 5)).astype(np.int32)
    masks[masks == 2] = 9  # a gap in the ids
    saved = SaveCellOutputsd(keys="masks", output_dir=str(tmp_path), image_key=None, table=True)({"id": "cells", "masks": masks[None]})
    written = read_labels(saved["masks_file"])
    assert sorted(np.unique(written)) == [0, 1, 2, 3]
    assert np.array_equal(written > 0, masks > 0)
    with open(saved["masks_table_file"], newline="") as f:
        rows = list(csv.DictReader(f))
    props = regionprops(written)
    assert [int(r["id"]) for r in rows] == [p.label for p in props]
    for row, prop in zip(rows, props):
        assert int(row["area"]) == prop.area
        assert (float(row["centroid_y"]), float(row["centroid_x"])) == pytest.approx(prop.centroid, abs=0.01)
        assert [int(row[k]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")] == list(prop.bbox)
    assert {p.name for p in tmp_path.iterdir()} == {"cells_masks.tif", "cells_cells.csv"}
