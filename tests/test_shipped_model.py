"""The shipped generalist model: tracked, compact, the default everywhere, and it segments the sample data."""

import numpy as np
import torch

from helpers import BUNDLE
from mmcs_monai.data import load_datalist
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms import inference_preprocessing
from mmcs_monai.workflows import shipped_model

SHIPPED = BUNDLE / "models" / "model.pt"


def test_shipped_model_is_the_default_and_compact():
    assert shipped_model() == SHIPPED and SHIPPED.is_file()
    assert SHIPPED.stat().st_size < 15e6
    state = torch.load(SHIPPED, weights_only=True)
    assert state["output.2.weight"].dtype == torch.float16 and state["diam_labels"].dtype == torch.float32
    network = load_model(SHIPPED)
    assert network.nbase == [2, 32, 64, 128, 256] and float(network.diam_mean) == 30.0
    assert 15 < float(network.diam_labels) < 40 and len(network.subset_diameters) >= 5


def test_shipped_model_segments_the_sample_images_with_default_settings():
    """Default settings (auto diameter, auto precision) on the 3 sample validation images: F1 above 0.6."""
    network = load_model(SHIPPED).eval()
    segmenter = CellSegmenter(network)
    load = inference_preprocessing(keys=["image", "label"])
    scores = []
    for item in load_datalist(BUNDLE / "sample_data" / "datalist.json", split="val"):
        data = load(dict(item))
        result = segmenter(torch.as_tensor(np.asarray(data["image"])))
        scores.append(f1_score(np.asarray(data["label"])[0], result.masks, border=2)["f1"])
    assert len(scores) == 3 and np.mean(scores) > 0.6, scores
