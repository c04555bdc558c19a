"""Image -> masks in one place: CellSegmenter gives the masks of the steps it joins, and keeps no per-call state."""

import threading

import numpy as np
import pytest
import torch

from helpers import SAMPLE_IMAGES, OracleNet, disk_labels
from mmcs_monai.flows import MaskSettings, flows_to_masks
from mmcs_monai.inference import CellInferer
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter, segmenter_from_options
from mmcs_monai.transforms import inference_preprocessing


def _sample_images(n=3):
    load = inference_preprocessing("image")
    return [torch.as_tensor(np.asarray(load({"image": str(p)})["image"])) for p in sorted(SAMPLE_IMAGES.glob("*.tif"))[:n]]


def test_segmenter_gives_the_masks_of_inferer_then_flows_to_masks(tiny_model):
    """Behaviour unchanged: the segmenter's masks are those of the two steps, run by hand, on sample images."""
    network = load_model(tiny_model).eval()
    inferer = CellInferer(precision="fp32")
    segmenter = CellSegmenter(network, inferer)
    cells = 0
    for image in _sample_images():
        flows = inferer(image[None], network)[0].numpy()
        expected = flows_to_masks(flows[:2], flows[2], flow_threshold=0.4, cellprob_threshold=0.0, min_size=15)  # Cellpose 3's
        result = segmenter(image)
        assert result.masks.dtype == np.int32 and np.array_equal(result.masks, expected)
        assert torch.equal(result.flows, torch.as_tensor(flows)) and result.diameter == pytest.approx(float(network.diam_labels))
        cells += result.cells
    assert cells > 50


def test_thresholds_are_the_segmenters_and_auto_measures_with_them(tiny_model):
    network = load_model(tiny_model).eval()
    image = _sample_images(1)[0]
    loose = segmenter_from_options(network, cellprob_threshold=-2.0, min_size=0, precision="fp32")
    strict = segmenter_from_options(network, cellprob_threshold=2.0, min_size=60, precision="fp32")
    assert loose.mask_settings == MaskSettings(cellprob_threshold=-2.0, min_size=0)
    assert loose(image).cells > strict(image).cells
    # one MaskSettings per segmenter: the inferer carries none of its own, auto measures with the segmenter's
    assert loose.inferer.mask_settings is None and strict.inferer.mask_settings is None
    with pytest.raises(ValueError, match="unknown"):
        segmenter_from_options(network, flow_treshold=0.5)
    with pytest.raises(ValueError, match="min_size must be a number"):
        MaskSettings.from_options(min_size="big")


def test_concurrent_calls_get_their_own_diameters():
    """One segmenter shared by threads (a server's requests): each result names the diameter it was made at."""
    labels = disk_labels(shape=(96, 96), centers=((25, 25), (70, 68), (25, 72)), radii=(18, 18, 18))
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(96, 96)])
    segmenter = CellSegmenter(OracleNet(diam_mean=30.0, diam_labels=12.0), CellInferer(precision="fp32"))
    results = {}

    def run(name, diameter):
        results[name] = [segmenter(image, diameter=diameter).diameter for _ in range(3)]

    threads = [threading.Thread(target=run, args=(n, d)) for n, d in (("auto", "auto"), ("fixed", 20.0), ("stored", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["fixed"] == [20.0] * 3 and results["stored"] == [12.0] * 3
    assert all(d == pytest.approx(36, rel=0.1) for d in results["auto"])


def _disk_image():
    labels = disk_labels(shape=(96, 96), centers=((25, 25), (70, 68), (25, 72)), radii=(18, 18, 18))
    return torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(96, 96)])


def test_diameter_for_is_the_diameter_the_segmentation_used():
    """CellSegmenter.diameter_for answers for an image what segmenting it uses: a number, stored, a subset, auto."""
    network = OracleNet(diam_mean=30.0, diam_labels=12.0)
    network.subset_diameters = {"large": 40.0}
    segmenter = CellSegmenter(network, CellInferer(precision="fp32"))
    image = _disk_image()
    for diameter, expected in ((20.0, 20.0), ("stored", 12.0), (None, 12.0), ("large", 40.0), ("auto", None)):
        used = segmenter.diameter_for(image, diameter)
        assert segmenter(image, diameter=diameter).diameter == used, diameter
        assert expected is None or used == expected, diameter
        assert segmenter.zoom_for(used) == pytest.approx(30.0 / used)
    assert segmenter.diameter_for(image, "auto") == pytest.approx(36, rel=0.1)
    assert CellSegmenter(network, CellInferer(precision="fp32", diameter="large")).diameter_for(image) == 40.0
    with pytest.raises(ValueError, match="no stored diameter"):
        segmenter.diameter_for(image, "medium")
    with pytest.raises(ValueError, match="give one"):
        segmenter.diameter_for(None, "auto")


def test_auto_measures_with_the_segmenters_thresholds():
    """The same inferer in two segmenters: auto measures masks made with each segmenter's own thresholds."""
    network, inferer, image = OracleNet(diam_mean=30.0, diam_labels=12.0), CellInferer(precision="fp32"), _disk_image()
    assert CellSegmenter(network, inferer).diameter_for(image, "auto") == pytest.approx(36, rel=0.1)
    # no mask survives a minimum size above the image's area: nothing measured, the stored diameter is kept
    assert CellSegmenter(network, inferer, MaskSettings(min_size=10**7)).diameter_for(image, "auto") == 12.0
