"""CellInferer: scale to the model's diameter, tile, and return flows at the input size."""

import pytest
import torch

from helpers import OracleNet, RecordingNet
from mmcs_monai.inference import CellInferer, resolve_diameter
from mmcs_monai.networks import CPnet
from mmcs_monai.precision import PrecisionInferer, autocast_context


def test_zoom_uses_stored_diameter_then_given_one():
    net = RecordingNet(diam_mean=30.0, diam_labels=15.0)
    inferer = CellInferer(roi_size=512, overlap=0.0)
    out = inferer(torch.rand(1, 2, 50, 70), net)
    assert net.seen[-1] == (112, 144) and out.shape == (1, 3, 50, 70)  # 100 x 140 in one tile, padded to 16s
    assert inferer.zoom_for(net) == 2.0
    assert inferer.zoom_for(net, diameter=60.0) == 0.5
    assert CellInferer(diameter=30.0).zoom_for(net) == 1.0


def test_single_tile_matches_direct_forward():
    torch.manual_seed(0)
    net = CPnet(nbase=(2, 8, 16, 32)).eval()
    net.set_diam_labels(30.0)
    x = torch.rand(1, 2, 64, 64)
    out = CellInferer(roi_size=64, overlap=0.0, precision="fp32")(x, net)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), atol=1e-5, rtol=1e-5)


def test_tiled_output_is_close_to_whole_image_forward_inside():
    torch.manual_seed(0)
    net = CPnet(nbase=(2, 8, 16, 32)).eval()
    net.set_diam_labels(30.0)
    x = torch.rand(1, 2, 96, 160)
    tiled = CellInferer(roi_size=64, overlap=0.5, precision="fp32")(x, net)
    with torch.no_grad():
        whole = net(x)
    assert tiled.shape == whole.shape
    # Tiles see less context than the whole image, so they agree only approximately.
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.9


def test_auto_precision_and_bf16_close_to_fp32():
    from mmcs_monai.precision import native_bf16, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    torch.manual_seed(0)
    net = CPnet(nbase=(2, 8, 16, 32)).eval()
    x = torch.rand(1, 2, 64, 64)
    fp32 = CellInferer(roi_size=64, precision="fp32")(x, net)
    bf16 = CellInferer(roi_size=64, precision="bf16", channels_last=True)(x, net)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_precision_names_are_checked():
    with pytest.raises(ValueError, match="precision"):
        CellInferer(precision="int4")
    with pytest.raises(ValueError, match="training precision"):
        PrecisionInferer("int8")  # int8 is for inference (networks/test_quantized.py)
    with pytest.raises(ValueError, match="GPU"):
        autocast_context("cpu", "fp16").__enter__()
    net = CPnet(nbase=(2, 8, 16)).eval()
    out = PrecisionInferer("bf16", channels_last=True)(torch.rand(2, 2, 32, 32), net)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)


def test_training_inferer_auto_precision_and_layout():
    """``auto`` resolves per device; channels_last None follows the resolved precision; the output is fp32."""
    from mmcs_monai.precision import resolve_precision

    net = CPnet(nbase=(2, 8, 16)).eval()
    x = torch.rand(2, 2, 32, 32)
    out = PrecisionInferer("auto", channels_last=None)(x, net)
    bf16 = resolve_precision("auto", "cpu") == "bf16"
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    weight = net.downsample.down.res_down_0.conv.conv_1[2].weight  # a 3x3 conv: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) == bf16 != weight.is_contiguous()
    with torch.no_grad():
        reference = net.to(memory_format=torch.contiguous_format)(x)
    assert (out - reference).abs().max() < (0.1 if bf16 else 1e-5)


def test_cpu_inference_runs_channels_last_in_fp32_and_training_does_not():
    """CellInferer's default layout on a CPU is channels-last whatever the precision (oneDNN's NHWC kernels), with the
    contiguous run's flows; the training inferer keeps fp32 contiguous; an explicit False is obeyed."""
    from mmcs_monai.precision import resolve_channels_last

    assert resolve_channels_last(None, "cpu", "fp32") and resolve_channels_last(None, "cpu", "bf16")
    assert not resolve_channels_last(None, "cpu", "fp32", training=True) and resolve_channels_last(None, "cpu", "bf16", training=True)
    assert not resolve_channels_last(None, "cuda", "fp32") and not resolve_channels_last(False, "cpu", "bf16")
    torch.manual_seed(0)
    net = CPnet(nbase=(2, 8, 16, 32)).eval()
    weight = net.downsample.down.res_down_0.conv.conv_1[2].weight  # a 3x3 conv: the layouts differ
    x = torch.rand(1, 2, 96, 80)
    contiguous = CellInferer(roi_size=64, precision="fp32", channels_last=False)(x, net)
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    default = CellInferer(roi_size=64, precision="fp32")(x, net)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert (default - contiguous).abs().max() < 1e-4 * contiguous.abs().max()


def test_auto_diameter_measures_cells_then_rescales():
    from helpers import disk_labels

    labels = disk_labels(shape=(96, 96), centers=((25, 25), (70, 68), (25, 72)), radii=(18, 18, 18))
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(96, 96)])[None]
    net = OracleNet(diam_mean=30.0, diam_labels=12.0)  # stored size 3x too small for these cells
    inferer = CellInferer(diameter="auto", precision="fp32")
    out, used = inferer.predict(image, net)
    assert out.shape == (1, 3, 96, 96) and torch.equal(out, inferer(image, net))
    assert used[0] == pytest.approx(36, rel=0.1) and not hasattr(inferer, "last_diameters")
    # the search's last candidate segmented the whole image at the estimate (zoom 30/35.7: 81 x 81, one tile rounded
    # up to 16 px) and its cells agreed with that size: that segmentation is the answer, no second pass
    net.seen.clear()
    inferer.predict(image, net)
    assert net.seen[-1] == (96, 96) and len(net.seen) == 6  # 5 grid candidates and one refinement, nothing more


def test_a_size_network_runs_the_search_and_the_network_only_the_final_segmentation():
    """With a size network attached, ``auto`` finds the size the size network alone finds (the same calls), and the
    network runs once, at that size: a whole-image segmentation the search settled on is not taken from the size
    network (alone, it would be the answer)."""
    from helpers import disk_labels

    labels = disk_labels(shape=(96, 96), centers=((25, 25), (70, 68), (25, 72)), radii=(18, 18, 18))
    image = torch.stack([torch.as_tensor(labels > 0, dtype=torch.float32), torch.zeros(96, 96)])[None]
    inferer = CellInferer(diameter="auto", precision="fp32")
    alone = OracleNet(diam_mean=30.0, diam_labels=12.0)
    _, alone_used = inferer.predict(image, alone)
    assert len(alone.seen) == 6  # settled: the search's last segmentation is the answer

    net, sizer = OracleNet(diam_mean=30.0, diam_labels=12.0), OracleNet(diam_mean=30.0, diam_labels=12.0)
    net.attach_size_network(sizer)
    out, used = inferer.predict(image, net)
    assert used == alone_used and sizer.seen == alone.seen
    fixed = OracleNet(diam_mean=30.0, diam_labels=12.0)
    expected = inferer.predict(image, fixed, diameter=used[0])[0]
    assert net.seen == fixed.seen == [fixed.seen[0]] and torch.equal(out, expected)


def test_subset_name_picks_the_stored_subset_diameter():
    net = RecordingNet(diam_mean=30.0, diam_labels=20.0)
    net.set_subset_diameters({"small": 10.0, "large": 60.0})
    image = torch.rand(1, 2, 120, 120)
    inferer = CellInferer(roi_size=512, precision="fp32")
    for diameter, side in ((None, 180), ("small", 360), ("large", 60), ("45", 80), (15.0, 240)):
        inferer(image, net, diameter=diameter)
        assert net.seen[-1] == (side + -side % 16,) * 2, diameter
    assert resolve_diameter(net, "large") == 60.0
    with pytest.raises(ValueError, match="stored subsets: large, small"):
        inferer(image, net, diameter="medium")
    with pytest.raises(ValueError, match="positive"):
        resolve_diameter(net, -3)


def test_to_channels_last_converts_a_network_once(monkeypatch):
    """``to_channels_last`` converts a contiguous network, then leaves a converted one alone (no pass over its
    parameters: the size search calls it once per candidate), and converts again one made contiguous since."""
    from mmcs_monai.precision import to_channels_last

    net = CPnet(nbase=(2, 8, 16, 32)).eval()
    weight = lambda: net.downsample.down.res_down_0.conv.conv_1[2].weight  # noqa: E731  a 3x3 kernel
    calls = []
    original = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    assert to_channels_last(net) is net and len(calls) == 1
    assert weight().is_contiguous(memory_format=torch.channels_last) and not weight().is_contiguous()
    to_channels_last(net)
    CellInferer(roi_size=64, precision="fp32")(torch.rand(1, 2, 64, 64), net)
    assert len(calls) == 1
    original(net, memory_format=torch.contiguous_format)
    to_channels_last(net)
    assert len(calls) == 2 and not weight().is_contiguous()
