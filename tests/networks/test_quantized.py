"""int8 inference (mmcs_monai.networks.quantized, mmcs_monai.calibration): a calibrated network runs quantized within
the error 7-bit activations allow, only with the weights it was calibrated on, only where asked for or where ``auto``
finds a calibration, fast int8 kernels (AVX-512 VNNI) and no native bf16; calibration files are read and written
safely; ``mmcs calibrate`` and ``mmcs infer --precision int8`` work end to end on a model file.
"""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import gaussian_filter

from helpers import BUNDLE, REPO, disk_labels, run_mmcs_batch, subprocess_env
from mmcs_monai import precision
from mmcs_monai.calibration import sample_items
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import InputError
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import CPnet, load_model, quantized
from mmcs_monai.networks.quantized import (
    attach_calibration,
    calibrate,
    calibration_file,
    quantized_forward,
    read_calibration,
    weights_digest,
    write_calibration,
)
from mmcs_monai.precision import PrecisionInferer, fast_int8, resolve_precision
from mmcs_monai.segmentation import segmenter_from_options

QUANTIZED_LOGGER = "mmcs_monai.networks.quantized"
TINY_MODEL = REPO / "tests" / "data" / "tiny_cpnet.pt"


@pytest.fixture(autouse=True)
def fresh_notes():
    quantized.reset_notes()
    yield
    quantized.reset_notes()


def _net(seed=0, nbase=(2, 16, 32, 64)):
    torch.manual_seed(seed)
    net = CPnet(nbase=nbase).eval()
    net.set_diam_labels(30.0)
    return net


def _tiles(seed=1, n=4, size=64):
    """Blurry bright blobs on a dark ground, in the 0-1 range inference normalises images to."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, size // 8, size // 8, generator=generator) ** 4
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_a_calibrated_network_runs_in_int8_within_the_error_of_7_bit_activations():
    net = _net()
    attach_calibration(net, calibrate(net, [_tiles(seed) for seed in range(4)]))
    forward = quantized_forward(net, strict=True)
    x = _tiles(seed=9, n=2, size=72)  # not a multiple of 16: padded and cropped as CPnet does
    with torch.no_grad():
        expected, got = net(x), forward(x)
    assert got.shape == expected.shape == (2, 3, 72, 72) and got.dtype == torch.float32
    # 7-bit activations (127 levels over each measured range): a few percent of the output's spread, not more
    relative = ((got - expected).abs().mean() / expected.std()).item()
    assert relative < 0.08, relative
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.99


def test_a_calibration_applies_only_to_the_weights_it_was_measured_on(caplog):
    net = _net()
    attach_calibration(net, calibrate(net, [_tiles()]))
    with torch.no_grad():
        net.output[-1].weight.mul_(1.01)  # as fine-tuning would
    assert quantized_forward(net, strict=False) is None
    assert [r for r in caplog.records if r.name == QUANTIZED_LOGGER and "other weights" in r.getMessage()]
    with pytest.raises(ValueError, match="precision int8: .*other weights"):
        quantized_forward(net, strict=True)
    x = _tiles(n=1)
    # ``auto`` falls back to fp32: the same flows as the fp32 inferer, bit for bit
    auto = CellInferer(precision="auto", diameter=30.0)._run(x, net)
    fp32 = CellInferer(precision="fp32", diameter=30.0)._run(x, net)
    assert torch.equal(auto, fp32) or resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="other weights"):
        CellInferer(precision="int8", diameter=30.0)._run(x, net)


def test_int8_needs_a_calibration_and_a_cpu():
    net = _net()
    with pytest.raises(ValueError, match="no int8 calibration.*mmcs calibrate"):
        CellInferer(precision="int8", diameter=30.0)._run(_tiles(n=1), net)
    with pytest.raises(ValueError, match="int8 runs on a CPU"):
        resolve_precision("int8", "cuda")
    # without a calibration ``auto`` never means int8
    assert resolve_precision("auto", "cpu", net) in ("fp32", "bf16")


def test_training_refuses_int8():
    with pytest.raises(ValueError, match="training precision"):
        PrecisionInferer("int8")


def test_calibration_files_round_trip_and_name_the_file_when_bad(tmp_path):
    net = _net(nbase=(2, 8, 16))
    calibration = calibrate(net, [_tiles(size=32)])
    assert calibration["weights_sha256"] == weights_digest(net) and calibration["tiles"] == 4
    path = write_calibration(tmp_path / "m.int8.json", calibration)
    assert read_calibration(path) == json.loads(json.dumps(calibration))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    (tmp_path / "bad.int8.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.int8\.json: cannot read the int8 calibration"):
        read_calibration(tmp_path / "bad.int8.json")
    (tmp_path / "other.int8.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match=r"other\.int8\.json: not an int8 calibration"):
        read_calibration(tmp_path / "other.int8.json")
    assert calibration_file(tmp_path / "model.pt") == tmp_path / "model.int8.json"


def test_load_model_attaches_the_calibration_beside_the_file(tmp_path):
    model = tmp_path / "tiny.pt"
    shutil.copy(TINY_MODEL, model)
    network = load_model(model)
    assert quantized.calibration_of(network) is None
    write_calibration(calibration_file(model), calibrate(network, [_tiles(size=32)]))
    network = load_model(model)
    assert quantized.calibration_of(network)["weights_sha256"] == weights_digest(network)
    assert quantized_forward(network, strict=True) is not None
    calibration_file(model).write_text("[]")
    with pytest.raises(InputError, match=r"tiny\.int8\.json: not an int8 calibration"):
        load_model(model)


def test_sample_items_draws_alike_from_every_subset_in_list_order():
    items = [{"id": f"a{i}", "subset": "a"} for i in range(5)] + [{"id": "b0", "subset": "b"}, {"id": "n0"}]
    sample = sample_items(items, per_subset=2, seed=3)
    assert [i["subset"] for i in sample if i.get("subset") == "a"] == ["a", "a"]
    assert {"b0", "n0"} <= {i["id"] for i in sample} and len(sample) == 4
    assert [items.index(i) for i in sample] == sorted(items.index(i) for i in sample)
    assert sample == sample_items(items, per_subset=2, seed=3)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), or None elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def test_fast_int8_means_avx512_vnni_kernels_as_the_cpu_reports_them():
    """int8 pays only with fbgemm's AVX-512 VNNI kernels: on an AVX2-only CPU it was slower than fp32 end to end
    (benchmarks/README.md, "0.4.7"). The expectation comes from the kernel's own flag list, not from torch."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("needs /proc/cpuinfo")
    expected = "avx512_vnni" in flags and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert fast_int8("cpu") is expected
    assert fast_int8("cuda") is False


def test_auto_keeps_fp32_on_avx2_kernels_though_the_model_has_a_calibration():
    """In a child process limited to AVX2 kernels (as on an AVX2 laptop): no native bf16, no fast int8, so ``auto`` is
    fp32 for the shipped model (which has a calibration) and for its size network (which has none)."""
    code = (
        "from mmcs_monai.networks import load_model; from mmcs_monai.precision import fast_int8, native_bf16, resolve_precision;"
        f"n = load_model({str(BUNDLE / 'models' / 'model.pt')!r});"
        "print(native_bf16('cpu'), fast_int8('cpu'), resolve_precision('auto', 'cpu', n),"
        " resolve_precision('auto', 'cpu', n.size_network), resolve_precision('int8', 'cpu', n))"
    )
    env = subprocess_env(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "fp32", "fp32", "int8"]


def test_auto_means_int8_for_a_calibrated_model_where_int8_is_fast_and_bf16_is_not_native(monkeypatch):
    """The decision table of ``auto`` on a CPU, the CPU's answers set by hand (the machine cannot change its CPU):
    int8 needs fast int8 kernels, no native bf16 and a calibration of the network's own weights."""
    network = load_model(BUNDLE / "models" / "model.pt")
    cases = {(False, True): "int8", (False, False): "fp32", (True, True): "bf16", (True, False): "bf16"}
    for (bf16, vnni), expected in cases.items():
        monkeypatch.setattr(precision, "native_bf16", lambda device, bf16=bf16: bf16)
        monkeypatch.setattr(precision, "fast_int8", lambda device, vnni=vnni: vnni)
        assert resolve_precision("auto", "cpu", network) == expected, (bf16, vnni)
        assert resolve_precision("auto", "cpu", network.size_network) == ("bf16" if bf16 else "fp32")
        assert resolve_precision("auto", "cpu") == ("bf16" if bf16 else "fp32")


@pytest.mark.slow
def test_the_shipped_models_int8_masks_match_their_fp32_masks():
    """The shipped calibration applies to the shipped weights, and the int8 masks of a synthetic image of round cells
    are the fp32 masks (F1 at IoU 0.5 between them). The permissive model ships none (docs/usage.md)."""
    labels = disk_labels(shape=(160, 160), centers=((40, 40), (40, 110), (110, 50), (115, 115)), radii=(14, 16, 12, 15))
    noise = np.random.default_rng(0).normal(0, 0.03, labels.shape)
    cells = gaussian_filter((labels > 0).astype(np.float32), 2) + noise
    image = torch.as_tensor(np.stack([cells, np.zeros_like(cells)]).astype(np.float32))
    assert not calibration_file(BUNDLE / "models" / "permissive.pt").exists()
    network = load_model(BUNDLE / "models" / "model.pt")
    assert quantized_forward(network, strict=True) is not None
    # a fixed diameter, and ``auto`` (its size network has no calibration and searches in fp32)
    for diameter in (30.0, "auto"):
        masks = {p: segmenter_from_options(network, diameter=diameter, precision=p)(image).masks for p in ("fp32", "int8")}
        assert masks["fp32"].max() == 4, diameter
        assert f1_score(masks["fp32"], masks["int8"])["f1"] == 1.0, diameter
        assert f1_score(labels, masks["int8"])["f1"] == 1.0, diameter


@pytest.mark.slow
def test_mmcs_calibrate_then_infer_in_int8(tmp_path):
    model, images, out = tmp_path / "tiny.pt", tmp_path / "images", tmp_path / "out"
    shutil.copy(TINY_MODEL, model)
    images.mkdir()
    for k in range(2):
        labels = disk_labels(shape=(96, 96), centers=((30, 30 + 8 * k), (60, 64)), radii=(10, 12))
        tifffile.imwrite(images / f"cells_{k}.tif", ((labels > 0) * 200 + 20).astype(np.uint8))
    calibrate_run, infer_run, bad_run = run_mmcs_batch(
        [
            ["calibrate", images, "--model", model, "--diameter", "20"],
            ["infer", images, out, "--model", model, "--precision", "int8", "--diameter", "20"],
            ["infer", images, tmp_path / "out2", "--model", tmp_path / "broken" / "tiny.pt", "--precision", "int8"],
        ]
    )
    assert calibrate_run.returncode == 0, calibrate_run.stderr[-2000:]
    assert calibrate_run.stdout.strip() == str(calibration_file(model))
    calibration = read_calibration(calibration_file(model))
    assert calibration["images"] == 2 and calibration["tiles"] >= 2
    assert infer_run.returncode == 0, infer_run.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*_masks.tif")) == ["cells_0_masks.tif", "cells_1_masks.tif"]
    assert bad_run.returncode == 2 and "tiny.pt" in bad_run.stderr


def test_an_explicit_int8_without_a_calibration_is_one_line_naming_the_way_out(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", ((disk_labels() > 0) * 200).astype(np.uint8))
    (run,) = run_mmcs_batch([["infer", images, tmp_path / "out", "--model", TINY_MODEL, "--precision", "int8", "--diameter", "20"]])
    assert run.returncode == 2, run.stderr[-2000:]
    assert "no int8 calibration" in run.stderr and "mmcs calibrate" in run.stderr and "Traceback" not in run.stderr


def test_quantized_logger_is_quiet_when_nothing_falls_back(caplog):
    caplog.set_level(logging.WARNING)
    net = _net(nbase=(2, 8, 16))
    attach_calibration(net, calibrate(net, [_tiles(size=32)]))
    assert quantized_forward(net) is not None
    assert not [r for r in caplog.records if r.name == QUANTIZED_LOGGER]


def test_a_copied_network_quantizes_its_own_weights():
    import copy

    net = _net(nbase=(2, 8, 16))
    attach_calibration(net, calibrate(net, [_tiles(size=32)]))
    assert quantized_forward(net, strict=True) is not None
    twin = copy.deepcopy(net)
    assert quantized.calibration_of(twin) == quantized.calibration_of(net)
    x = _tiles(n=1, size=32)
    with torch.no_grad():
        assert torch.equal(quantized_forward(twin, strict=True)(x), quantized_forward(net, strict=True)(x))
        twin.output[-1].bias.add_(1.0)  # the copy is trained on: its calibration no longer applies, the original's does
    assert quantized_forward(twin) is None and quantized_forward(net) is not None
