"""The napari plugin in a real viewer: found through npe2, segments as ``mmcs infer`` does, cancels, and answers
mistakes with a notification (quick tests; the fine-tune loop, the ``mmcs infer`` comparison and the label server
are in ``test_loop.py``)."""

import sys
import time

import numpy as np
import pytest
import tifffile
import tomllib

from helpers import REPO, SAMPLE_IMAGES, TINY_MODEL
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_image
from mmcs_monai.napari import core, finetune
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel, inference_preprocessing

MANIFEST = REPO / "mmcs_monai" / "napari" / "napari.yaml"
GREY = SAMPLE_IMAGES / "dsb_0c6507d493bf79b2.tif"
RGB = SAMPLE_IMAGES / "dsb_610f32e2d9d270d7.tif"


def wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def errors(notifications):
    return [message for severity, message in notifications if severity == "error"]


def test_manifest_validates_and_is_declared_with_every_sample_image(display):
    """What ``npe2 validate mmcs-monai --imports`` does, in this process: the installed distribution's entry point
    gives the manifest, it validates, and every ``python_name`` imports."""
    from npe2 import PluginManifest

    for name in (str(MANIFEST), "mmcs-monai"):
        manifest = PluginManifest._from_package_or_name(name)
        manifest.validate_imports()
        assert manifest.name == "mmcs-monai" and [w.display_name for w in manifest.contributions.widgets] == ["MMCS segmentation"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["napari.manifest"] == {"mmcs-monai": "mmcs_monai.napari:napari.yaml"}
    assert "napari.yaml" in project["tool"]["setuptools"]["package-data"]["mmcs_monai.napari"]
    from mmcs_monai.napari import _sample_data

    text = MANIFEST.read_text()
    assert set(_sample_data.SAMPLE_IDS) == {p.stem for p in SAMPLE_IMAGES.glob("*.tif")}
    assert all(f"_sample_data:{i}" in text and f"key: {i}" in text for i in _sample_data.SAMPLE_IDS)


@pytest.mark.parametrize("path", [GREY, RGB], ids=["grey", "rgb"])
def test_layer_data_becomes_what_mmcs_infer_reads(path):
    data = tifffile.imread(path)
    channels = core.layer_channels(data, rgb=data.ndim == 3, name=path.stem)
    assert np.array_equal(channels, read_image(path))
    expected = inference_preprocessing("image", nucleus_channel=0 if data.ndim == 3 else None)({"image": str(path)})["image"]
    got = core.network_input(channels, nucleus_channel=0 if data.ndim == 3 else None)
    assert np.array_equal(got, np.asarray(expected))


def test_training_set_round_trips_through_the_training_pipeline(tmp_path):
    from mmcs_monai.data import load_datalist
    from mmcs_monai.transforms import LoadMicroscopyd, NormalizePercentiled, StackNucleusChanneld

    rgb = read_image(RGB)
    labels = np.zeros(rgb.shape[1:], np.int32)
    labels[10:20, 10:20] = 3
    images = [
        core.TrainingImage.from_channels("with nucleus", rgb, cyto_channel=1, nucleus_channel=2, labels=labels),
        core.TrainingImage.from_channels("grey", read_image(GREY)),
    ]
    datalist = core.write_training_set(images, tmp_path / "data")
    items = load_datalist(datalist)
    assert [i["id"] for i in items] == ["with_nucleus", "grey"] and items[0]["nucleus_channel"] == 1 and "label" not in items[1]
    load = [LoadMicroscopyd(keys=["image"]), StackNucleusChanneld(keys="image"), NormalizePercentiled(keys="image")]
    item = dict(items[0])
    for transform in load:
        item = transform(item)
    # the training pipeline sees the channels the widget segments: cytoplasm = channel 1, nucleus = channel 2
    assert np.allclose(item["image"], core.network_input(rgb, cyto_channel=1, nucleus_channel=2), atol=1e-6)
    assert np.array_equal(tifffile.imread(items[0]["label"]), labels)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="empty"):
        core.write_training_set([core.TrainingImage.from_channels("x", rgb, labels=np.zeros_like(labels))], tmp_path / "e")


def test_training_command_and_progress_lines(tmp_path):
    command = finetune.training_command(tmp_path / "d.json", TINY_MODEL, tmp_path / "run", 2.5, nbase=[2, 16, 32, 64], diam_mean=30.0)
    assert command[:2] == [sys.executable, "-c"] and "os.nice(19)" in command[2] and "cli.main(" in command[2]
    argv = command[3:]
    assert argv[:3] == ["train", "--recipe", "finetune"] and argv[argv.index("--time_budget_minutes") + 1] == "2.5"
    assert argv[argv.index("--nbase") + 1] == "[2,16,32,64]" and argv[argv.index("--ckpt_dir") + 1] == str(tmp_path / "run")
    semi = finetune.training_command(tmp_path / "d.json", TINY_MODEL, tmp_path / "run", 1, unlabelled=tmp_path / "u")
    assert "--unlabelled_source" in semi and "finetune" in semi[semi.index("--recipe") + 1]
    env = finetune.child_environment(1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="shipped model"):
        finetune.run_folder(REPO / "bundle" / "models")

    progress = finetune.TrainingProgress(minutes=10)
    lines = [
        "2026-12-03 22:58:34,953 - INFO - Epoch: 1/3, Iter: 1/1 -- train_loss: 1.0265",
        "2026-12-03 22:58:36,294 - INFO - Epoch[1] Metrics -- val_f1: 0.8095",
        "2026-12-03 22:58:37,328 - INFO - Epoch: 3/3, Iter: 1/1 -- train_loss: 0.3462",
    ]
    assert all(progress.read(line) for line in lines) and not progress.read("unrelated")
    assert progress.status() == "epoch 3/3, validation F1 0.809 (best 0.809)" and 60 <= progress.percent() < 100
    progress.read("x - mmcs_monai.engines.reports - INFO - training: 3 epoch(s), 3 iterations, 3.4 s; best validation F1 0.812; models in")
    assert progress.best_f1 == 0.812 and progress.percent() == 100 and progress.status().startswith("done: 3 epoch(s)")


def test_widget_from_npe2_segments_like_the_library(widget, viewer, qtbot, notifications):
    """Through the widget (found by npe2), a [C, H, W] layer with a cytoplasm channel chosen, at the stored diameter:
    the masks of ``CellSegmenter`` on what ``mmcs infer`` reads; the diameter used is shown. The sample data opens
    through npe2 too."""
    viewer.open_sample("mmcs-monai", RGB.stem)
    assert viewer.layers[RGB.stem].rgb and np.array_equal(viewer.layers[RGB.stem].data, tifffile.imread(RGB))
    grey = tifffile.imread(GREY)
    stack = np.stack([np.flipud(grey), grey])  # channel 1 is the image; channel 0 a decoy
    viewer.add_image(stack, name="two channels")
    widget.set_image("two channels")
    widget.set_channels(cyto=1, nucleus=None)
    widget.model_edit.setText(str(TINY_MODEL))
    widget.diameter_combo.setCurrentText("stored")
    widget.segment()
    wait(qtbot, widget)
    masks = viewer.layers["two channels masks"]
    network = load_model(TINY_MODEL)
    image = NormalizePercentile()(StackNucleusChannel(cyto_channel=1)(stack.astype(np.float32)))  # inference.json's two steps
    expected = CellSegmenter(network, CellInferer(compile=False))(image, diameter="stored")
    assert np.array_equal(masks.data, expected.masks) and expected.cells > 5
    assert f"at diameter {expected.diameter:.1f} px" in widget.status.text() and masks.metadata["mmcs_cyto_channel"] == 1
    assert not errors(notifications)


def test_cancel_stops_a_segmentation(widget, viewer, qtbot, notifications):
    """A large image at ``auto`` (many network calls): Cancel ends the worker within a network call, adds nothing."""
    big = np.tile(tifffile.imread(GREY), (6, 6))  # 1536 x 1536
    viewer.add_image(big, name="big")
    widget.set_image("big")
    widget.diameter_combo.setCurrentText("auto")
    start = time.monotonic()
    widget.segment()
    qtbot.waitUntil(lambda: widget.progress.value() >= 5, timeout=30_000)
    widget.cancel()
    wait(qtbot, widget, timeout=30_000)
    assert time.monotonic() - start < 20
    assert widget.status.text() == "cancelled" and "big masks" not in viewer.layers
    assert not errors(notifications)


def test_mistakes_are_notifications(widget, viewer, qtbot, notifications, tmp_path):
    """A wrong model file, a layer of the wrong kind, an empty labels layer, a server that does not answer: one napari
    notification each, no traceback."""
    viewer.add_image(tifffile.imread(GREY), name="grey")
    widget.set_image("grey")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    widget.model_edit.setText(str(bad))
    widget.segment()
    wait(qtbot, widget)
    assert "grey masks" not in viewer.layers

    widget.model_edit.setText("")
    viewer.add_image(np.zeros((5, 40, 40), np.uint8), name="stack")
    widget.set_image("stack")
    widget.segment()

    viewer.add_labels(np.zeros((256, 256), np.int32), name="empty labels")
    widget.set_image("grey")
    widget.check_labels(["empty labels"])
    widget.fine_tune()

    widget.url_edit.setText(f"http://127.0.0.1:{free_port()}")
    widget.connect_server()
    wait(qtbot, widget)
    widget.next_sample()  # not connected

    found = errors(notifications)
    assert len(found) == 5, found
    assert str(bad) in found[0] and "not a readable torch checkpoint" in found[0]
    assert "stack" in found[1] and "(5, 40, 40)" in found[1]
    assert "empty labels" in found[2] and "empty" in found[2]
    assert "does not answer" in found[3]
    assert "connect to a label server first" in found[4]
    assert all(message.startswith("MMCS: ") and "Traceback" not in message for message in found)
    assert widget.train_worker is None and widget.process is None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
