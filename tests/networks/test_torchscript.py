"""TorchScript export: round trip, equality with the eager model, diameters and metadata inside, clear errors."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import bundle, subprocess_env
from mmcs_monai import cli
from mmcs_monai.inference import CellInferer, resolve_diameter
from mmcs_monai.io import InputError, read_image
from mmcs_monai.networks import CPnet, export_torchscript, load_model, load_torchscript
from mmcs_monai.transforms.array import NormalizePercentile, StackNucleusChannel

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
SAMPLE_IMAGES = sorted((BUNDLE / "sample_data" / "images").glob("*.tif"))


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = CPnet(nbase=[2, 8, 16, 32], diam_mean=17.0)
    _randomise_bn(net)
    net.set_diam_labels(21.5)
    net.set_subset_diameters({"small": 12.0, "large nuclei (RGB)": 40.0})
    return net.eval()


@pytest.fixture(scope="module")
def exported(network, tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "model.ts"
    export_torchscript(network, path, metadata={"version": "9.9.9", "task": "cells"}, configs={"inference": {"a": 1}})
    return path


def sample_batch(path) -> torch.Tensor:
    """A real sample image as the network sees it: [1, 2, H, W] float32, 1-99 percentile scaled."""
    return torch.as_tensor(np.asarray(NormalizePercentile()(StackNucleusChannel()(read_image(path)))))[None]


@pytest.mark.parametrize("shape", [(1, 2, 64, 64), (2, 2, 37, 91), (3, 2, 200, 17), (1, 2, 5, 5)])
def test_exported_model_takes_any_size_and_equals_eager(network, exported, shape):
    model, _ = load_torchscript(exported)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = network(x), model(x)
    assert got.shape == (shape[0], 3, *shape[2:])
    assert (got - expected).abs().max() < 1e-4


def test_exported_model_equals_eager_on_real_sample_images(network, exported):
    model, _ = load_torchscript(exported)
    assert len(SAMPLE_IMAGES) >= 3
    for path in SAMPLE_IMAGES[:3]:
        x = sample_batch(path)
        with torch.no_grad():
            assert (model(x) - network(x)).abs().max() < 1e-4, path


def test_diameters_and_metadata_travel_in_the_file(network, exported):
    model, metadata = load_torchscript(exported)
    assert float(model.diam_mean) == 17.0 and float(model.diam_labels) == 21.5
    assert dict(model.subset_diameters) == {"small": 12.0, "large nuclei (RGB)": 40.0}
    assert model.diameter_for("small") == 12.0
    assert metadata == {"version": "9.9.9", "task": "cells"}
    with zipfile.ZipFile(exported) as archive:
        names = archive.namelist()
    assert any(n.endswith("extra/inference.json") for n in names)
    # the inferer resolves diameters from the exported model exactly as from the eager one
    for diameter in (None, "small", "large nuclei (RGB)", 33.0):
        assert resolve_diameter(model, diameter) == resolve_diameter(network, diameter)
    with pytest.raises(ValueError, match="stored subsets: large nuclei \\(RGB\\), small"):
        resolve_diameter(model, "medium")


def test_exported_model_predicts_like_eager_through_the_inferer(network, exported):
    model, _ = load_torchscript(exported)
    x = sample_batch(SAMPLE_IMAGES[0])
    inferer = CellInferer(roi_size=96, precision="fp32", diameter="small")
    assert (inferer(x, model) - inferer(x, network)).abs().max() < 1e-4


def test_exported_file_loads_without_mmcs_installed(exported):
    """TorchScript holds its own code: block the package and load + run the file."""
    script = (
        "import sys, torch\n"
        "sys.modules['mmcs_monai'] = None  # any import of the package now fails\n"
        f"m = torch.jit.load({str(exported)!r})\n"
        "print(tuple(m(torch.zeros(1, 2, 30, 41)).shape), float(m.diam_labels))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 3, 30, 41) 21.5" in result.stdout


def test_export_leaves_the_network_unchanged(network, tmp_path):
    net = CPnet(nbase=[2, 8, 16]).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    export_torchscript(net, tmp_path / "m.ts")
    assert net.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.ts"
    path.write_bytes(b"previous model")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_torchscript(CPnet(nbase=[2, 8, 16]).eval(), path)
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "model file not found"),
        (b"", "model file is empty"),
        (b"\x00garbage" * 100, "not a TorchScript model"),
    ],
)
def test_missing_or_corrupt_model_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "model.ts"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as err:
        load_torchscript(path)
    assert str(path) in str(err.value)


def test_truncated_model_is_a_clear_error(exported, tmp_path):
    path = tmp_path / "cut.ts"
    data = exported.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{path}.*(not a TorchScript model|cannot load)"):
        load_torchscript(path)


def test_damaged_archive_member_is_a_clear_error(exported, tmp_path):
    """A zip that still lists code/ but whose weights are garbage."""
    path = tmp_path / "damaged.ts"
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data if "/code/" in info.filename else b"\x00" * len(data))
    with pytest.raises(InputError, match="cannot load the TorchScript model"):
        load_torchscript(path)


def test_checkpoint_given_as_torchscript_points_to_export(network, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    with pytest.raises(InputError, match="mmcs export"):
        load_torchscript(path)
    # load_model takes either kind
    assert isinstance(load_model(path), CPnet)


def test_other_torchscript_model_is_refused(tmp_path):
    path = tmp_path / "other.ts"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(2, 3, 3)), str(path))
    with pytest.raises(InputError, match="not exported from an mmcs CPnet"):
        load_torchscript(path)


def test_bundle_ckpt_export_and_mmcs_export_write_equal_models(network, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt)
    out = tmp_path / "bundle_model.ts"
    bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(out),
        "--ckpt_file",
        str(ckpt),
        "--nbase",
        "[2,8,16,32]",  # network_def is the architecture; a checkpoint of another size says its own
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        cwd=BUNDLE,
    )
    from_bundle, metadata = load_torchscript(out)
    assert metadata["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert dict(from_bundle.subset_diameters) == network.subset_diameters

    summary = cli.export(model=str(ckpt), output=str(tmp_path / "cli_model.ts"))
    assert "max |eager - TorchScript| on 3 sample images" in summary
    from_cli, cli_metadata = load_torchscript(tmp_path / "cli_model.ts")
    assert cli_metadata == metadata
    x = sample_batch(SAMPLE_IMAGES[1])
    with torch.no_grad():
        reference = network(x)
        assert (from_bundle(x) - reference).abs().max() < 1e-4
        assert (from_cli(x) - reference).abs().max() < 1e-4
