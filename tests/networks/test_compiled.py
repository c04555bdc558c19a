"""Compiled inference (mmcs_monai.networks.compiled): same masks as eager, no recompiles per batch or tile,
and a clean fallback (one log line) where compiling is impossible.

The tests that really compile are marked slow: inductor takes a minute or more per network on 2 cores.
"""

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import BUNDLE, subprocess_env
from mmcs_monai.inference import CellInferer, fitted_tile
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import CPnet, compiled, load_model
from mmcs_monai.precision import parse_compile, resolve_compile
from mmcs_monai.segmentation import segmenter_from_options

COMPILE_LOGGER = "mmcs_monai.networks.compiled"


@pytest.fixture(autouse=True)
def fresh_notes():
    compiled.reset_notes()
    yield
    compiled.reset_notes()


def _net(seed=0, nbase=(2, 8, 16)):
    torch.manual_seed(seed)
    net = CPnet(nbase=nbase).eval()
    net.set_diam_labels(30.0)
    return net


def _fallback_lines(caplog):
    return [r for r in caplog.records if r.name == COMPILE_LOGGER and "without compiling" in r.getMessage()]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------- options


def test_parse_compile_accepts_command_line_spellings():
    assert parse_compile(None) == "auto" and parse_compile("AUTO") == "auto"
    assert parse_compile(True) is True and parse_compile("true") is True and parse_compile("on") is True
    assert parse_compile(False) is False and parse_compile("false") is False and parse_compile("0") is False
    with pytest.raises(ValueError, match="compile must be"):
        parse_compile("sometimes")


def test_a_small_job_does_not_load_the_compiler_to_decide():
    """Probing torch.compile imports its compiler (about 0.7 s of a short run): ``auto`` asks only for a job large
    enough to compile. Checked in a child process, where nothing else has imported it."""
    code = (
        "import sys; from mmcs_monai.precision import resolve_compile;"
        "small = resolve_compile('auto', 'cpu', megapixels=1.0); print(small, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


def test_auto_compiles_large_cpu_jobs_only():
    assert resolve_compile("auto", "cpu", megapixels=1.0) is False
    assert resolve_compile("auto", "cpu", megapixels=1000.0) is True
    # the threshold follows the precision the network runs in: the compile repays sooner in fp32
    assert resolve_compile("auto", "cpu", megapixels=50.0, precision="fp32") is True
    assert resolve_compile("auto", "cpu", megapixels=50.0, precision="bf16") is False
    assert resolve_compile("auto", "cpu", megapixels=150.0, precision="bf16") is True
    assert resolve_compile("auto", "cuda", megapixels=1000.0) is False  # not measured on a GPU: stays off
    assert resolve_compile(True, "cpu", megapixels=0.0) is True
    assert resolve_compile("false", "cpu", megapixels=1000.0) is False
    images = [{"image": str(p)} for p in sorted((BUNDLE / "sample_data" / "images").iterdir())]
    assert resolve_compile("auto", "cpu", images=images) is False  # the sample images: under a megapixel
    inferer = CellInferer()
    assert inferer.compile == "auto" and inferer.for_workload(1000.0).compile is True
    assert inferer.for_workload(0.1).compile is False and inferer.compile == "auto"  # a copy; the inferer is unchanged
    assert CellInferer(precision="fp32").for_workload(50.0).compile is True
    assert CellInferer(precision="bf16").for_workload(50.0).compile is False


@pytest.mark.parametrize("size", [100, 224, 240, 300, 569, 756, 1000, 2250])
def test_fitted_tiles_keep_the_window_count_and_compute_fewer_pixels(size):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    def windows(tile):
        tile = min(tile, size)
        return len(dense_patch_slices((size,), (tile,), _get_scan_interval((size,), (tile,), 1, (0.1,))))

    tile = fitted_tile(size, 224, 0.1)
    assert tile % 16 == 0 and tile <= max(224, 16)
    assert windows(tile) == windows(224)
    assert tile * windows(tile) <= min(224, -(-size // 16) * 16) * windows(224)


def test_fit_tiles_sets_the_tile_shape():
    assert CellInferer(roi_size=224, fit_tiles=False).tile_shape(300, 100) == (224, 112)
    assert CellInferer(roi_size=224, overlap=0.1, fit_tiles=True).tile_shape(300, 100) == (160, 112)


def test_segmenter_from_options_takes_compile_and_fit_tiles():
    segmenter = segmenter_from_options(_net(), compile=False, fit_tiles=True)
    assert segmenter.inferer.compile is False and segmenter.inferer.fit_tiles is True


# ---------------------------------------------------------------------- fallbacks (no compiling)


def test_torchscript_model_falls_back_with_one_log_line(caplog):
    net = _net()
    scripted = torch.jit.script(net)
    inferer = CellInferer(roi_size=64, overlap=0.1, precision="fp32", compile=True)
    x = torch.rand(1, 2, 96, 96)
    with caplog.at_level(logging.INFO, logger=COMPILE_LOGGER):
        first = inferer(x, scripted)
        second = inferer(x, scripted)
    expected = CellInferer(roi_size=64, overlap=0.1, precision="fp32", compile=False)(x, scripted)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "TorchScript" in lines[0].getMessage()


def test_compile_failure_falls_back_to_eager_with_one_log_line(caplog, monkeypatch):
    def broken_compile(module, **kwargs):
        def run(x):
            raise RuntimeError("no working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = _net()
    x = torch.rand(1, 2, 150, 130)
    eager = CellInferer(roi_size=64, precision="fp32", compile=False)(x, net)
    inferer = CellInferer(roi_size=64, precision="fp32", compile=True)
    with caplog.at_level(logging.INFO, logger=COMPILE_LOGGER):
        outputs = [inferer(x, net) for _ in range(3)]
    for out in outputs:
        torch.testing.assert_close(out, eager)
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "no working C++ compiler" in lines[0].getMessage()


def test_input_errors_are_not_hidden_by_the_fallback(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    forward = compiled.compiled_forward(_net(), "cpu")
    with pytest.raises(ValueError, match="CPnet expects input"):
        forward(torch.rand(1, 3, 32, 32))  # eager raises the network's own error


def test_training_mode_and_copies(caplog, monkeypatch):
    import copy

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    net = _net()
    assert compiled.compiled_forward(net.train(), "cpu") is None
    net.eval()
    forward = compiled.compiled_forward(net, "cpu")
    assert forward is compiled.compiled_forward(net, "cpu")  # one per network, device, precision, layout
    assert compiled.compiled_forward(net, "cpu", precision="bf16") is not forward
    clone = copy.deepcopy(net)  # the compiled forms stay behind: the copy compiles its own
    assert compiled.compiled_forward(clone, "cpu").network is clone
    assert set(clone.state_dict()) == set(net.state_dict())
    assert "_mmcs_compiled" not in dict(net.named_modules())


# ---------------------------------------------------------------------- compiling (slow)


def test_each_network_gets_its_own_graph_cache_and_weight_changes_recompile(monkeypatch):
    # torch.compile stubbed: what is checked is which function is compiled and when, not inductor
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn) or fn)
    a, b = _net(seed=0), _net(seed=1)
    fa, fb = compiled.compiled_forward(a, "cpu"), compiled.compiled_forward(b, "cpu")
    x = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fa(x), a(x))
        torch.testing.assert_close(fb(x), b(x))
        fa(x)
        assert fa.compiles == 1 and len(calls) == 2
        # dynamo caches graphs per code object: two networks must never share one (frozen weights differ)
        assert calls[0].__code__ is not calls[1].__code__
        for p in a.parameters():  # as an optimizer step or load_state_dict would
            p.mul_(1.1)
        torch.testing.assert_close(fa(x), a(x))
    assert fa.compiles == 2 and len(calls) == 3 and calls[2].__code__ is not calls[0].__code__
    a.load_state_dict(b.state_dict())
    with torch.no_grad():
        fa(x)
    assert fa.compiles == 3
    with torch.no_grad():
        fa(x[:1])  # a batch of one tile runs eagerly: nothing compiled
    assert fa.compiles == 3 and len(calls) == 4


@pytest.mark.slow
def test_compiled_masks_agree_with_eager_without_recompiling(tiny_model):
    """One real compile (about a minute on 2 cores): every tile size and batch of the sample images runs
    through the one graph, and the masks are eager's."""
    from mmcs_monai.data import load_datalist
    from mmcs_monai.transforms import inference_preprocessing

    torch._dynamo.reset()
    net = load_model(tiny_model).eval()
    load = inference_preprocessing()
    items = load_datalist(BUNDLE / "sample_data" / "datalist.json", split="validation")
    images = [np.asarray(load(item)["image"]) for item in items]
    eager = segmenter_from_options(net, diameter="stored", compile=False)
    fast = segmenter_from_options(net, diameter="stored", compile=True)
    tiles = {fast.inferer.tile_shape(*image.shape[-2:]) for image in images}
    before = _graphs()
    scores = [f1_score(eager(image).masks, fast(image).masks)["f1"] for image in images]
    assert _graphs() - before == 1, tiles  # one graph for every tile shape and batch of 2+ tiles
    (forward,) = net.__dict__["_mmcs_compiled"].entries.values()  # one compiled form: this device, precision, layout
    assert forward.compiles == 1 and not forward.failed
    print("masks F1 compiled vs eager per image:", [round(x, 4) for x in scores], "tiles:", sorted(tiles))
    assert np.mean(scores) > 0.95 and min(scores) > 0.8, scores  # bf16 where the CPU has it: same tolerance as eager bf16 vs fp32


@pytest.mark.slow
def test_missing_compiler_falls_back_with_one_log_line(caplog):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    net = _net(seed=3, nbase=(2, 8, 16))
    x = torch.rand(2, 2, 64, 64)
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}), caplog.at_level(logging.INFO, logger=COMPILE_LOGGER):
        forward = compiled.compiled_forward(net, "cpu")
        with torch.no_grad():
            outputs = [forward(x), forward(x)]
            assert compiled.compiled_forward(net, "cpu") is None  # known to fail: the caller runs eager
            expected = net(x)
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert forward.failed and len(_fallback_lines(caplog)) == 1
    torch._dynamo.reset()


def test_bundle_configs_decide_compile(tmp_path):
    from monai.bundle import ConfigParser

    def inferer(config: str, key: str, **overrides):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / name) for name in config.split("+")])
        parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path), **overrides})
        return parser.get_parsed_content(key)

    assert inferer("inference.json", "inferer").compile is False  # auto: the 12 sample images are too few
    assert inferer("inference.json", "inferer", compile=True).compile is True
    evaluate = "train.json+evaluate.json"
    assert inferer(evaluate, "validate#inferer").compile is False
    assert inferer(evaluate, "validate#inferer", compile=True).compile is True
