"""The plugin's loop for real (slow): masks equal the real ``mmcs infer``'s, a short fine-tune in a child process
writes a model that ``mmcs infer --model`` loads and the image is segmented again with it (with the viewer's event
latency measured meanwhile), the semi-supervised variant, Cancel of a training, and server mode against a real label
server on 127.0.0.1."""

import os
import sys
import time

import numpy as np
import pytest
import tifffile

from helpers import REPO, SAMPLE_IMAGES, TINY_MODEL, run_mmcs_batch
from mmcs_monai.io import read_labels

sys.path.insert(0, str(REPO / "tests" / "label"))
from label_server import label_server  # noqa: E402

pytestmark = pytest.mark.slow

GREY = SAMPLE_IMAGES / "dsb_0c6507d493bf79b2.tif"
RGB = SAMPLE_IMAGES / "dsb_610f32e2d9d270d7.tif"
LABELS = REPO / "bundle" / "sample_data" / "labels"
TINY = ["--patch_size", "64", "--batch_size", "4", "--val_interval", "1"]


def errors(notifications):
    return [message for severity, message in notifications if severity == "error"]


def segment(widget, qtbot, layer, **choices):
    widget.set_image(layer)
    widget.set_channels(**choices)
    widget.segment()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    return widget.viewer.layers[f"{layer} masks"].data


def test_masks_equal_mmcs_infer(widget, viewer, qtbot, tmp_path, notifications):
    """The real ``mmcs infer`` at its defaults (``auto``, the shipped model) on a grey image, with the tiny model on an
    RGB one, and with ``--nucleus_channel 1 --diameter 20`` on a two-channel image: the widget's Labels layers hold the
    same masks, for a nucleus channel of the layer and for the same channel opened as its own layer."""
    grey, rgb = tifffile.imread(GREY), tifffile.imread(RGB)
    stack = np.stack([grey, np.fliplr(grey)])  # [C, H, W]: cytoplasm, nucleus
    folders = {name: tmp_path / name for name in ("grey", "rgb", "stack")}
    for name, data in (("grey", grey), ("rgb", rgb), ("stack", stack)):
        folders[name].mkdir()
        tifffile.imwrite(folders[name] / f"{name}.tif", data)
    commands = [
        ["infer", folders["grey"], tmp_path / "out"],
        ["infer", folders["rgb"], tmp_path / "out", "--model", TINY_MODEL],
        ["infer", folders["stack"], tmp_path / "out", "--nucleus_channel", "1", "--diameter", "20"],
    ]
    for result in run_mmcs_batch(commands, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
        assert result.returncode == 0, result.stderr[-2000:]
    expected = {name: read_labels(tmp_path / "out" / f"{name}_masks.tif") for name in folders}

    viewer.add_image(grey, name="grey")
    assert np.array_equal(segment(widget, qtbot, "grey"), expected["grey"]) and expected["grey"].max() > 10
    widget.model_edit.setText(str(TINY_MODEL))
    viewer.add_image(rgb, name="rgb", rgb=True)
    assert np.array_equal(segment(widget, qtbot, "rgb"), expected["rgb"])
    widget.model_edit.setText("")
    widget.diameter_combo.setCurrentText("20")
    viewer.add_image(stack, name="stack")
    assert np.array_equal(segment(widget, qtbot, "stack", nucleus=1), expected["stack"]) and expected["stack"].max() > 0
    viewer.add_image(stack[0], name="cytoplasm")
    viewer.add_image(stack[1], name="nuclei")
    assert np.array_equal(segment(widget, qtbot, "cytoplasm", nucleus="nuclei"), expected["stack"])
    assert "diameter" in widget.status.text() and not errors(notifications)


def _latency_probe(interval_ms=20):
    """Start a QTimer every ``interval_ms``; returns the list of gaps (s) between its ticks."""
    from qtpy.QtCore import QTimer

    gaps, last = [], [time.perf_counter()]
    timer = QTimer()
    timer.setInterval(interval_ms)

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer.timeout.connect(tick)
    timer.start()
    return timer, gaps


def test_fine_tune_writes_a_model_that_loads_and_segments_again(widget, viewer, qtbot, tmp_path, notifications):
    """A corrected Labels layer -> ``mmcs train --recipe finetune`` in a child at nice 19 with limited threads -> a new
    model outside the bundle that ``mmcs infer --model`` loads; validation F1 shown; the image segmented again with it.
    The viewer's event loop keeps ticking meanwhile (the largest gap between 20 ms timer ticks is printed)."""
    from mmcs_monai import cli

    viewer.add_image(tifffile.imread(GREY), name="grey")
    viewer.add_labels(read_labels(LABELS / GREY.name), name="corrected")
    widget.set_image("grey")
    widget.model_edit.setText(str(TINY_MODEL))
    widget.diameter_combo.setCurrentText("stored")
    widget.check_labels(["corrected"])
    widget.epochs_spin.setValue(3)
    widget.minutes_spin.setValue(2.0)
    widget.output_edit.setText(str(tmp_path / "models"))
    widget.extra_train_args = list(TINY)
    timer, gaps = _latency_probe()
    start = time.monotonic()
    widget.fine_tune()
    qtbot.waitUntil(lambda: widget.process is not None or widget.train_worker is None, timeout=30_000)
    process = widget.process
    assert process is not None, widget.train_status.text()
    qtbot.waitUntil(lambda: process.poll() is not None or os.getpriority(os.PRIO_PROCESS, process.pid) == 19, timeout=10_000)
    assert os.getpriority(os.PRIO_PROCESS, process.pid) == 19  # the child lowered its own priority first thing
    environ = dict(v.split("=", 1) for v in open(f"/proc/{process.pid}/environ").read().split("\0") if "=" in v)
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == str(max(1, (os.cpu_count() or 2) - 1))
    qtbot.waitUntil(lambda: widget.train_worker is None, timeout=240_000)
    seconds = time.monotonic() - start
    timer.stop()
    print(
        f"\nUI latency during fine-tuning ({seconds:.0f} s): max gap {max(gaps) * 1000:.0f} ms between 20 ms ticks, "
        f"99th percentile {np.percentile(gaps, 99) * 1000:.0f} ms, {len(gaps)} ticks"
    )
    assert not errors(notifications), errors(notifications)
    result = widget.last_training
    model = result["model"]
    assert model.startswith(str(tmp_path / "models")) and model.endswith("model.pt")
    assert "done: 3 epoch(s), best validation F1" in widget.train_status.text() and len(result["val_f1"]) == 3
    assert widget.model_edit.text() == model
    network = cli._load_network(model, None)  # what `mmcs infer --model` loads it with
    assert list(network.nbase) == [2, 16, 32, 64]
    qtbot.waitUntil(lambda: "grey masks (fine-tuned)" in viewer.layers and widget.worker is None, timeout=120_000)
    assert viewer.layers["grey masks (fine-tuned)"].metadata["mmcs_model"] == model
    assert max(gaps) < 1.0  # the viewer never froze for a second


def test_fine_tune_with_the_other_open_images_as_unlabelled(widget, viewer, qtbot, tmp_path, notifications):
    """The other open image layers as the unlabelled set: written beside the training set, passed as
    ``--unlabelled_source`` with the semi-supervised recipe; the run completes."""
    viewer.add_image(tifffile.imread(GREY), name="grey")
    for path in sorted(SAMPLE_IMAGES.glob("*.tif"))[:2]:
        viewer.add_image(tifffile.imread(path), name=path.stem)
    viewer.add_labels(read_labels(LABELS / GREY.name), name="corrected")
    widget.set_image("grey")
    widget.model_edit.setText(str(TINY_MODEL))
    widget.check_labels(["corrected"])
    widget.unlabelled_combo.setCurrentIndex(widget.unlabelled_combo.findData("layers"))
    widget.epochs_spin.setValue(1)
    widget.output_edit.setText(str(tmp_path / "models"))
    widget.extra_train_args = [*TINY, "--unlabelled_batch_size", "2", "--pseudo_interval", "1"]
    widget.fine_tune()
    qtbot.waitUntil(lambda: widget.train_worker is None, timeout=240_000)
    assert not errors(notifications), errors(notifications)
    run = widget.last_training["run"]
    log = open(f"{run}/train.log").read()
    assert "--unlabelled_source" in log and "done: 1 epoch(s)" in widget.train_status.text()
    assert sorted(os.listdir(f"{run}/unlabelled/images")) == sorted(f"{p.stem}.tif" for p in sorted(SAMPLE_IMAGES.glob("*.tif"))[:2])


def test_cancel_stops_the_training_child(widget, viewer, qtbot, tmp_path):
    """Cancel during training: the child (and its process group) ends, the widget says so and keeps its model."""
    viewer.add_image(tifffile.imread(GREY), name="grey")
    viewer.add_labels(read_labels(LABELS / GREY.name), name="corrected")
    widget.set_image("grey")
    widget.model_edit.setText(str(TINY_MODEL))
    widget.check_labels(["corrected"])
    widget.epochs_spin.setValue(10000)
    widget.output_edit.setText(str(tmp_path / "models"))
    widget.extra_train_args = list(TINY)
    widget.fine_tune()
    qtbot.waitUntil(lambda: widget.process is not None, timeout=30_000)
    process = widget.process
    qtbot.waitUntil(lambda: widget.train_progress.value() > 0 or "epoch" in widget.train_status.text(), timeout=60_000)
    widget.cancel_training()
    qtbot.waitUntil(lambda: widget.train_worker is None, timeout=30_000)
    assert process.poll() is not None and widget.train_status.text() == "fine-tuning cancelled"
    assert widget.model_edit.text() == str(TINY_MODEL) and "grey masks (fine-tuned)" not in viewer.layers
    assert not list((tmp_path / "models").glob("*/model_final.pt"))  # it did not run to its end


def test_server_mode_against_a_real_label_server(widget, viewer, qtbot, tmp_path, notifications):
    """Connect, next sample (image + its box as a Shapes layer), infer the image (the server's masks) and the box (the
    server's cells of that region), submit the corrected label, train, status."""
    import json

    from napari.layers import Shapes

    images = sorted(SAMPLE_IMAGES.glob("*.tif"))[:3]
    with label_server(tmp_path / "label", images, TINY_MODEL) as server:
        widget.url_edit.setText(server.url)
        widget.connect_server()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert {widget.strategy_combo.itemText(i) for i in range(widget.strategy_combo.count())} == {"random", "mmcs_uncertainty"}
        assert widget.server_model.currentText() == "mmcs"

        widget.strategy_combo.setCurrentText("random")
        widget.patch_spin.setValue(128)
        widget.next_sample()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        image_id, (x, y, w, h) = widget.sample["id"], widget.sample["bbox"]
        layer = viewer.layers[f"server: {image_id}"]
        assert np.array_equal(layer.data, tifffile.imread(server.studies / f"{image_id}.tif")) and (w, h) == (128, 128)
        box = viewer.layers[f"server: {image_id} box"]
        assert isinstance(box, Shapes) and box.shape_type == ["rectangle"]
        corners = np.asarray(box.data[0])
        assert np.array_equal(corners.min(axis=0), [y, x]) and np.array_equal(corners.max(axis=0), [y + h, x + w])

        widget.server_infer(box=False)
        qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
        labels = viewer.layers[f"server: {image_id} labels"].data
        response = server.post("/infer/mmcs", params={"image": image_id, "output": "image"})
        import io

        assert np.array_equal(labels, tifffile.imread(io.BytesIO(response.content))) and labels.max() > 5

        widget.server_infer(box=True)
        qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
        boxed = viewer.layers[f"server: {image_id} labels"].data
        region = server.post(
            f"/infer/wsi/mmcs?image={image_id}&output=json",
            data=json.dumps({"level": 0, "location": [x, y], "size": [w, h], "min_poly_area": 0}),
            headers={"Content-Type": "application/json"},
        ).json()
        assert len(np.unique(boxed)) - 1 == region["cells"] > 0
        assert not boxed[:, : max(0, x - 60)].any()  # nothing far left of the box

        viewer.layers.selection.active = viewer.layers[f"server: {image_id} labels"]
        widget.submit_label()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        objects = server.get("/datastore/", params={"output": "all"}).json()["objects"]
        assert "final" in objects[image_id]["labels"], objects[image_id]
        stored = tifffile.imread(server.studies / "labels" / "final" / f"{image_id}.tif")
        assert np.array_equal(stored, boxed)

        widget.server_params.setText(json.dumps({"epochs": 1, "batch_size": 2, "patch_size": 64, "semi": False, "publish": "always"}))
        widget.server_train()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert widget.poll.isActive()
        qtbot.waitUntil(lambda: not widget.poll.isActive(), timeout=300_000)
        text = widget.server_status_label.text()
        assert text.startswith("training: DONE") and "best validation F1" in text and "published" in text, text
    assert not errors(notifications), errors(notifications)
