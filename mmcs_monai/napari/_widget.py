"""The "MMCS segmentation" dock widget: a form over :mod:`.core`, :mod:`.finetune` and :mod:`.client`.

Three sections:

- **Segment**: image layer (grey, RGB, or [C, H, W] channels; cytoplasm and nucleus channel, or a nucleus channel
  from another open grey layer), model (empty: the shipped one; or a checkpoint, a Cellpose 3 file or a ``.ts``,
  loaded with :func:`~mmcs_monai.networks.load_model` as ``mmcs infer`` loads it), diameter (``auto``, pixels,
  ``stored`` or a subset name) and the :class:`~mmcs_monai.flows.MaskSettings` thresholds -> a Labels layer
  ``<image> masks`` whose metadata records the image, channels, diameter used and model.
- **Correct & fine-tune**: the checked Labels layers and their images become a training set; ``mmcs train`` runs in
  a child process at low priority (:mod:`.finetune`), optionally with the other open images or a folder as the
  unlabelled set; progress and validation F1 come from its output; the new model becomes the widget's model and the
  image is segmented again with it.
- **Label server**: a MONAI Label server's URL (:mod:`.client`): next sample (image and its box as a Shapes layer),
  infer the box or the image, submit the selected Labels layer as the image's final label, train, status.

Everything slow runs in a worker thread (napari's ``create_worker``) or the child process; the form stays usable
and Cancel stops the work. A mistake (a wrong model file, a layer of the wrong kind, an empty Labels layer, a server
that does not answer) is a napari notification (``show_error``), never a traceback: worker functions return a
:class:`Failure` instead of raising.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from mmcs_monai.flows import MaskSettings
from mmcs_monai.io import InputError, exception_chain
from mmcs_monai.napari import finetune
from mmcs_monai.napari.client import LabelClient, LabelServerError
from mmcs_monai.napari.core import TrainingImage, layer_channels, network_input, parse_diameter, segment_steps, write_training_set

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8000"
# the user-facing errors a worker turns into a notification (anything else is shown with its type: a bug)
EXPECTED = (InputError, LabelServerError, ValueError, KeyError, FileNotFoundError, OSError)


@dataclass(frozen=True)
class Failure:
    """What a worker returns instead of raising: the one line to show."""

    message: str


def user_message(error: BaseException) -> str:
    """One line for ``error``: the first expected error in its chain (a file and its problem first), else its type
    and message."""
    chain = exception_chain(error)
    for kind in EXPECTED:
        for link in chain:
            if isinstance(link, kind):
                text = str(link.args[0]) if isinstance(link, KeyError) and link.args else str(link)
                return (text.strip().splitlines() or [type(link).__name__])[0]
    return f"{type(error).__name__}: {error}"


def guarded(work):
    """Wrap a worker function (plain or generator) so that it returns a :class:`Failure` instead of raising."""
    import inspect

    if inspect.isgeneratorfunction(work):

        def generator(*args, **kwargs):
            try:
                return (yield from work(*args, **kwargs))
            except Exception as err:  # every error becomes a notification: the viewer shows no traceback
                logger.debug("worker failed", exc_info=True)
                return Failure(user_message(err))

        return generator

    def function(*args, **kwargs):
        try:
            return work(*args, **kwargs)
        except Exception as err:
            logger.debug("worker failed", exc_info=True)
            return Failure(user_message(err))

    return function


@dataclass
class SegmentJob:
    """One segmentation, read from the form in the main thread: ``channels`` float32 [C, H, W], channel choices,
    model file (None: shipped), diameter option, mask thresholds."""

    layer: str
    channels: np.ndarray
    cyto_channel: int | None
    nucleus_channel: int | None
    model: str | None
    diameter: float | str
    mask_settings: MaskSettings
    cancel: threading.Event = field(default_factory=threading.Event)


class ModelCache:
    """Networks by file (path, modification time, size): a model is read once per change of its file. Thread safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[tuple, Any] = {}

    def get(self, path: str | None):
        """The network in ``path`` (None: the shipped model), in eval mode on this process's device.

        Raises:
            InputError: (``ModelFileError``) the file is missing or not a model.
        """
        from mmcs_monai.distributed import local_device
        from mmcs_monai.networks import load_model
        from mmcs_monai.workflows import resolve_model

        file = resolve_model(path)
        stat = file.stat() if file.is_file() else None
        key = (str(file.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
        with self._lock:
            if key not in self._models:
                self._models = {key: load_model(file, map_location=local_device())}  # keep one: models are large
            return self._models[key]


class MMCSWidget(QWidget):
    """The dock widget. ``napari_viewer`` is given by napari (npe2 widget contribution)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.models = ModelCache()
        self.worker = None  # the running segmentation or server worker
        self.train_worker = None
        self.process = None  # the training child
        self.client: LabelClient | None = None
        self.server_info: dict = {}
        self.sample: dict = {}  # the server's last next-sample answer
        self.last_segmentation: dict = {}
        self.last_training: dict = {}
        self._segment_job: SegmentJob | None = None
        self._drop_answer = False

        layout = QVBoxLayout(self)
        layout.addWidget(self._segment_box())
        layout.addWidget(self._finetune_box())
        layout.addWidget(self._server_box())
        layout.addStretch(1)

        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh_layers)
        self._refresh_layers()

        self.poll = QTimer(self)
        self.poll.setInterval(2000)
        self.poll.timeout.connect(self.server_status)

    # -- form ---------------------------------------------------------------------------------------------------
    def _segment_box(self) -> QGroupBox:
        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._refresh_channels)
        self.cyto_combo = QComboBox()
        self.nucleus_combo = QComboBox()
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("shipped model (bundle/models/model.pt); 'permissive', 'fast', or a file")
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_edit)
        model_row.addWidget(browse)
        self.diameter_combo = QComboBox()
        self.diameter_combo.setEditable(True)
        self.diameter_combo.addItems(["auto", "stored"])
        self.diameter_combo.setToolTip("auto (estimated per image), a number of pixels, stored (the model's mean) or a subset name")
        defaults = MaskSettings()
        self.flow_spin = _spin(0.0, 10.0, defaults.flow_threshold if defaults.flow_threshold is not None else 0.0, 0.05)
        self.flow_spin.setToolTip("flow error threshold (0: no check), Cellpose's flow_threshold")
        self.cellprob_spin = _spin(-6.0, 6.0, defaults.cellprob_threshold, 0.25)
        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(-1, 100000)
        self.min_size_spin.setValue(int(defaults.min_size))
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow("image", self.image_combo)
        form.addRow("cytoplasm", self.cyto_combo)
        form.addRow("nucleus", self.nucleus_combo)
        form.addRow("model", model_row)
        form.addRow("diameter", self.diameter_combo)
        form.addRow("flow threshold", self.flow_spin)
        form.addRow("cell prob. threshold", self.cellprob_spin)
        form.addRow("min size (px)", self.min_size_spin)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)
        return box

    def _finetune_box(self) -> QGroupBox:
        box = QGroupBox("Correct && fine-tune")
        form = QFormLayout(box)
        self.labels_list = QListWidget()
        self.labels_list.setMaximumHeight(90)
        self.labels_list.setToolTip("checked Labels layers (corrected) are the training set; each with its image")
        self.unlabelled_combo = QComboBox()
        self.unlabelled_combo.addItem("none", None)
        self.unlabelled_combo.addItem("other open image layers", "layers")
        self.unlabelled_combo.addItem("a folder", "folder")
        self.unlabelled_edit = QLineEdit()
        self.unlabelled_edit.setPlaceholderText("folder of unlabelled images")
        self.minutes_spin = _spin(0.1, 600.0, 5.0, 1.0)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(0, 100000)
        self.epochs_spin.setToolTip("0: the recipe's")
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText(str(finetune.DEFAULT_RUNS))
        self.train_button = QPushButton("Fine-tune")
        self.train_button.clicked.connect(self.fine_tune)
        self.train_cancel = QPushButton("Cancel")
        self.train_cancel.setEnabled(False)
        self.train_cancel.clicked.connect(self.cancel_training)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.train_cancel)
        self.train_progress = QProgressBar()
        self.train_progress.setRange(0, 100)
        self.train_status = QLabel("")
        self.train_status.setWordWrap(True)
        form.addRow("labels", self.labels_list)
        form.addRow("unlabelled", self.unlabelled_combo)
        form.addRow("", self.unlabelled_edit)
        form.addRow("time budget (min)", self.minutes_spin)
        form.addRow("epochs", self.epochs_spin)
        form.addRow("models to", self.output_edit)
        form.addRow(buttons)
        form.addRow(self.train_progress)
        form.addRow(self.train_status)
        self.extra_train_args: list[str] = []  # more `mmcs train` overrides (tests use small patches)
        return box

    def _server_box(self) -> QGroupBox:
        box = QGroupBox("Label server")
        form = QFormLayout(box)
        self.url_edit = QLineEdit(DEFAULT_SERVER)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(self.connect_server)
        url_row = QHBoxLayout()
        url_row.addWidget(self.url_edit)
        url_row.addWidget(self.connect_button)
        self.server_model = QComboBox()
        self.strategy_combo = QComboBox()
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(0, 100000)
        self.patch_spin.setValue(256)
        self.patch_spin.setToolTip("box side in pixels (0: the whole image)")
        self.next_button = QPushButton("Next sample")
        self.next_button.clicked.connect(self.next_sample)
        self.infer_box_button = QPushButton("Infer box")
        self.infer_box_button.clicked.connect(lambda: self.server_infer(box=True))
        self.infer_image_button = QPushButton("Infer image")
        self.infer_image_button.clicked.connect(lambda: self.server_infer(box=False))
        self.submit_button = QPushButton("Submit label")
        self.submit_button.clicked.connect(self.submit_label)
        self.server_train_button = QPushButton("Train")
        self.server_train_button.clicked.connect(self.server_train)
        self.server_params = QLineEdit("{}")
        self.server_params.setToolTip('training parameters as JSON, e.g. {"epochs": 20}')
        rows = [QHBoxLayout(), QHBoxLayout()]
        for button in (self.next_button, self.infer_box_button, self.infer_image_button):
            rows[0].addWidget(button)
        for button in (self.submit_button, self.server_train_button):
            rows[1].addWidget(button)
        self.server_status_label = QLabel("not connected")
        self.server_status_label.setWordWrap(True)
        form.addRow("URL", url_row)
        form.addRow("model", self.server_model)
        form.addRow("strategy", self.strategy_combo)
        form.addRow("box (px)", self.patch_spin)
        form.addRow(rows[0])
        form.addRow("train params", self.server_params)
        form.addRow(rows[1])
        form.addRow(self.server_status_label)
        return box

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "Models (*.pt *.pth *.ts *);;All files (*)")
        if path:
            self.model_edit.setText(path)

    def _refresh_layers(self, *_args) -> None:
        """Refill the image choice and the labels list from the viewer's layers (keeping the current choices)."""
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.image_combo.addItem(layer.name)
        if current and self.image_combo.findText(current) >= 0:
            self.image_combo.setCurrentIndex(self.image_combo.findText(current))
        self.image_combo.blockSignals(False)
        checked = {
            self.labels_list.item(i).text() for i in range(self.labels_list.count()) if self.labels_list.item(i).checkState() == Qt.Checked
        }
        self.labels_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                item = QListWidgetItem(layer.name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.name in checked else Qt.Unchecked)
                self.labels_list.addItem(item)
        self._refresh_channels()

    def _refresh_channels(self, *_args) -> None:
        """Channel choices of the chosen image layer: its channels, and other grey layers of its size as a nucleus."""
        layer = self._layer(self.image_combo.currentText())
        self.cyto_combo.clear()
        self.nucleus_combo.clear()
        self.cyto_combo.addItem("mean of the channels", None)
        self.nucleus_combo.addItem("none", None)
        if layer is None:
            return
        names = ["red", "green", "blue"] if layer.rgb else None
        count = 3 if layer.rgb else (layer.data.shape[0] if layer.ndim == 3 else 1)
        for c in range(count if count > 1 else 0):
            text = f"channel {c}" + (f" ({names[c]})" if names else "")
            self.cyto_combo.addItem(text, ("channel", c))
            self.nucleus_combo.addItem(text, ("channel", c))
        for other in self.viewer.layers:
            if isinstance(other, Image) and other is not layer and not other.rgb and other.ndim == 2:
                if tuple(other.data.shape[-2:]) == tuple(self._shape(layer)):
                    self.nucleus_combo.addItem(f"layer: {other.name}", ("layer", other.name))

    def _layer(self, name: str):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    @staticmethod
    def _shape(layer) -> tuple[int, int]:
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return tuple(data.shape[-3:-1]) if getattr(layer, "rgb", False) else tuple(data.shape[-2:])

    def set_image(self, name: str) -> None:
        """Choose the image layer ``name`` (as a user would in the list)."""
        self._refresh_layers()
        self.image_combo.setCurrentIndex(self.image_combo.findText(name))

    def set_channels(self, cyto: Any = None, nucleus: Any = None) -> None:
        """Choose the cytoplasm and nucleus: None, a channel index, or (nucleus) the name of another grey layer."""
        for combo, choice in ((self.cyto_combo, cyto), (self.nucleus_combo, nucleus)):
            data = None if choice is None else ("channel", choice) if isinstance(choice, int) else ("layer", choice)
            index = next((i for i in range(combo.count()) if combo.itemData(i) == data), -1)
            if index < 0:
                raise ValueError(f"no choice {choice!r} in {[combo.itemText(i) for i in range(combo.count())]}")
            combo.setCurrentIndex(index)

    # -- segment ------------------------------------------------------------------------------------------------
    def image_job(self, image_name: str | None = None) -> SegmentJob:
        """The segmentation the form asks for (main thread: reads layers and fields).

        Raises:
            InputError, ValueError: no image layer, a layer of the wrong kind or shape, a bad diameter.
        """
        name = image_name or self.image_combo.currentText()
        layer = self._layer(name)
        if layer is None:
            active = self.viewer.layers.selection.active
            kind = f"the selected layer {active.name!r} is a {type(active).__name__} layer" if active is not None else "no layer"
            raise InputError(name or "image", f"choose an image layer to segment ({kind}; open an image first)")
        if not isinstance(layer, Image):
            raise InputError(name, f"is a {type(layer).__name__} layer: choose an image layer")
        data = layer.data[0] if layer.multiscale else layer.data
        channels = layer_channels(data, layer.rgb, name)
        cyto = self._channel_choice(self.cyto_combo)
        nucleus_choice = self.nucleus_combo.currentData()
        nucleus = None
        if nucleus_choice and nucleus_choice[0] == "channel":
            nucleus = nucleus_choice[1]
        elif nucleus_choice and nucleus_choice[0] == "layer":
            other = self._layer(nucleus_choice[1])
            if other is None:
                raise InputError(nucleus_choice[1], "the nucleus layer is no longer open")
            plane = layer_channels(other.data, False, other.name)
            if plane.shape != (1, *channels.shape[-2:]):
                raise InputError(other.name, f"nucleus layer of shape {plane.shape[1:]} does not match the image {channels.shape[1:]}")
            channels, nucleus = np.concatenate([channels, plane]), len(channels)
        model = self.model_edit.text().strip() or None
        settings = MaskSettings.from_options(
            flow_threshold=float(self.flow_spin.value()),
            cellprob_threshold=float(self.cellprob_spin.value()),
            min_size=int(self.min_size_spin.value()),
        )
        return SegmentJob(name, channels, cyto, nucleus, model, parse_diameter(self.diameter_combo.currentText()), settings)

    @staticmethod
    def _channel_choice(combo: QComboBox) -> int | None:
        data = combo.currentData()
        return data[1] if data else None

    def segment(self, image_name: str | None = None, suffix: str = "masks") -> None:
        """Segment the chosen image layer in a worker; the result becomes the Labels layer ``<image> <suffix>``."""
        if self.worker is not None:
            show_warning("MMCS: segmentation or a server request is still running; wait for it or cancel it")
            return
        try:
            job = self.image_job(image_name if isinstance(image_name, str) else None)
        except EXPECTED as err:
            show_error(f"MMCS: {user_message(err)}")
            return
        self._segment_job = job
        self.status.setText(f"segmenting {job.layer}...")
        self._start(guarded(self._segment_work), lambda result: self._segmented(job, result, suffix), job)

    def _segment_work(self, job: SegmentJob):
        from mmcs_monai.inference import CellInferer
        from mmcs_monai.segmentation import CellSegmenter

        yield 1, "loading the model"
        network = self.models.get(job.model)
        yield 3, "preparing the image"
        image = network_input(job.channels, job.cyto_channel, job.nucleus_channel, job.layer)
        # eager (compile False): a notebook-sized image never repays a compile; precision auto as `mmcs infer`
        segmenter = CellSegmenter(network, CellInferer(precision="auto", compile=False), job.mask_settings)
        segmentation = yield from segment_steps(segmenter, image, job.diameter, job.cancel)
        subsets = sorted(getattr(network, "subset_diameters", {}) or {})
        return segmentation, subsets

    def _segmented(self, job: SegmentJob, result, suffix: str) -> None:
        if isinstance(result, Failure):
            self.status.setText(f"failed: {result.message}")
            show_error(f"MMCS: {result.message}")
            return
        segmentation, subsets = result
        if segmentation is None:
            self.status.setText("cancelled")
            self.progress.setValue(0)
            return
        for subset in subsets:
            if self.diameter_combo.findText(subset) < 0:
                self.diameter_combo.addItem(subset)
        image = self._layer(job.layer)
        metadata = {
            "mmcs_image": job.layer,
            "mmcs_cyto_channel": job.cyto_channel,
            "mmcs_nucleus_channel": job.nucleus_channel,
            "mmcs_diameter": float(segmentation.diameter),
            "mmcs_model": job.model or "shipped",
            "mmcs_source": (job.layer, job.channels, job.cyto_channel, job.nucleus_channel),
        }
        kwargs = {"scale": image.scale[-2:], "translate": image.translate[-2:]} if image is not None else {}
        name = f"{job.layer} {suffix}"
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels):
            layer = self.viewer.layers[name]
            layer.data = segmentation.masks
            layer.metadata.update(metadata)
        else:
            self.viewer.add_labels(segmentation.masks, name=name, metadata=metadata, **kwargs)
        self.last_segmentation = {"layer": name, "cells": segmentation.cells, "diameter": float(segmentation.diameter)}
        self.status.setText(f"{job.layer}: {segmentation.cells} cells at diameter {segmentation.diameter:.1f} px")

    def _start(self, work, on_result, *args) -> None:
        """Run ``work(*args)`` (a :func:`guarded` generator yielding ``(percent, message)`` or a plain function) in a worker."""
        worker = create_worker(work, *args, _start_thread=False)
        self.worker = worker
        if hasattr(worker, "yielded"):
            worker.yielded.connect(self._progressed)
        worker.returned.connect(on_result)
        worker.finished.connect(self._worker_done)
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        worker.start()

    def _progressed(self, step) -> None:
        percent, message = step
        self.progress.setValue(int(percent))
        self.status.setText(message)

    def _worker_done(self) -> None:
        self.worker = None
        self.segment_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def cancel(self) -> None:
        """Stop the running segmentation (within one network call: it then returns nothing) or drop the answer of the
        running server request."""
        if self._segment_job is not None:
            self._segment_job.cancel.set()
        else:
            self._drop_answer = True
        self.status.setText("cancelling...")

    # -- correct & fine-tune ------------------------------------------------------------------------------------
    def check_labels(self, names: list[str] | None = None) -> None:
        """Check (tick) the Labels layers ``names`` for fine-tuning (None: all)."""
        for i in range(self.labels_list.count()):
            item = self.labels_list.item(i)
            item.setCheckState(Qt.Checked if names is None or item.text() in names else Qt.Unchecked)

    def training_images(self) -> tuple[list[TrainingImage], list[str]]:
        """The checked Labels layers with their images (the image each was segmented from, else the chosen image layer),
        and the names of the images used.

        Raises:
            InputError: no Labels layer checked, a layer that is not Labels or not 2D, an empty one, or no image of its size.
        """
        checked = [
            self.labels_list.item(i).text() for i in range(self.labels_list.count()) if self.labels_list.item(i).checkState() == Qt.Checked
        ]
        if not checked:
            raise InputError("labels", "tick at least one corrected Labels layer to fine-tune on")
        images, used = [], []
        for name in checked:
            labels_layer = self._layer(name)
            if not isinstance(labels_layer, Labels):
                raise InputError(name, "is not a Labels layer")
            labels = np.asarray(labels_layer.data)
            if labels.ndim != 2:
                raise InputError(name, f"labels of shape {labels.shape}: 2D Labels layers only")
            if not labels.any():
                raise InputError(name, "the Labels layer is empty: paint or keep some cells before fine-tuning")
            source = labels_layer.metadata.get("mmcs_source")  # what it was segmented from: channels, cyto, nucleus
            if source is not None:
                image_name, channels, cyto, nucleus = source
            else:
                job = self.image_job()
                image_name, channels, cyto, nucleus = job.layer, job.channels, job.cyto_channel, job.nucleus_channel
            if channels.shape[-2:] != labels.shape:
                raise InputError(name, f"labels of shape {labels.shape} do not match the image {image_name!r} ({channels.shape[-2:]})")
            images.append(TrainingImage.from_channels(name, channels, cyto, nucleus, labels))
            used.append(image_name)
        return images, used

    def unlabelled_images(self, used: list[str]) -> list[TrainingImage] | str | None:
        """The unlabelled set asked for: other open 2D image layers (as training images without labels), a folder
        (its path), or None."""
        mode = self.unlabelled_combo.currentData()
        if mode == "folder":
            folder = Path(self.unlabelled_edit.text().strip()).expanduser()
            if not self.unlabelled_edit.text().strip() or not folder.is_dir():
                raise InputError(folder, "unlabelled images: choose an existing folder")
            return str(folder)
        if mode == "layers":
            job = self.image_job()
            images = []
            for layer in self.viewer.layers:
                if isinstance(layer, Image) and layer.name not in used:
                    try:
                        channels = layer_channels(layer.data, layer.rgb, layer.name)
                    except InputError:
                        continue  # not a 2D image: not an unlabelled sample
                    if len(channels) == len(job.channels):
                        images.append(TrainingImage.from_channels(layer.name, channels, job.cyto_channel, job.nucleus_channel))
            if not images:
                show_warning("MMCS: no other open image layer to learn from: fine-tuning on the labels alone")
                return None
            return images
        return None

    def fine_tune(self) -> None:
        """Write the training set and run ``mmcs train`` in a child process; on success segment again with the new model."""
        if self.train_worker is not None:
            show_warning("MMCS: a fine-tuning run is already going; cancel it first")
            return
        try:
            images, used = self.training_images()
            unlabelled = self.unlabelled_images(used)
            model_path = self.model_edit.text().strip() or None
            network = self.models.get(model_path)
            from mmcs_monai.workflows import resolve_model

            pretrained = resolve_model(model_path)
            run = finetune.run_folder(self.output_edit.text().strip() or None)
            command_args = {
                "pretrained": pretrained,
                "run": run,
                "minutes": float(self.minutes_spin.value()),
                "nbase": [int(n) for n in getattr(network, "nbase", [])] or None,
                "diam_mean": float(network.diam_mean) if hasattr(network, "diam_mean") else None,
                "epochs": int(self.epochs_spin.value()) or None,
                "extra": list(self.extra_train_args),
            }
            finetune.training_command(run / "data" / "datalist.json", **command_args)  # checks the model can be fine-tuned
        except EXPECTED as err:
            show_error(f"MMCS: {user_message(err)}")
            return
        self.train_status.setText(f"writing the training set to {run}")
        self.last_training = {"run": str(run)}
        worker = create_worker(guarded(self._train_work), images, unlabelled, command_args, _start_thread=False)
        self.train_worker = worker
        worker.yielded.connect(self._train_progressed)
        worker.returned.connect(self._trained)
        worker.finished.connect(self._train_done)
        self.train_button.setEnabled(False)
        self.train_cancel.setEnabled(True)
        self.train_progress.setValue(0)
        worker.start()

    def _train_work(self, images, unlabelled, command_args):
        run = Path(command_args["run"])
        datalist = write_training_set(images, run / "data")
        unlabelled_source = write_training_set(unlabelled, run / "unlabelled") if isinstance(unlabelled, list) else unlabelled
        command = finetune.training_command(datalist, unlabelled=unlabelled_source, **command_args)
        progress = finetune.TrainingProgress(minutes=command_args["minutes"])
        process = finetune.start_training(command, run / "train.log")
        self.process = process
        yield (
            progress.percent(),
            f"started (pid {process.pid}): {len(images)} labelled image(s)" + (", with unlabelled images" if unlabelled_source else ""),
        )
        with open(run / "train.log", "w") as log:
            log.write(" ".join(command) + "\n")
            for line in process.stdout:
                log.write(line)
                if progress.read(line):
                    yield progress.percent(), progress.status()
        code = finetune.stop_training(process)
        self.process = None
        model = run / "model.pt"
        if code != 0 or not model.is_file():
            if progress.error:
                return Failure(f"fine-tuning failed: {progress.error}")
            if code is not None and code < 0 or self.last_training.get("cancelled"):
                return None
            return Failure(f"fine-tuning failed (exit status {code}); see {run / 'train.log'}")
        return {"model": str(model), "run": str(run), "best_f1": progress.best_f1, "status": progress.status(), "val_f1": progress.val_f1}

    def _train_progressed(self, step) -> None:
        percent, message = step
        self.train_progress.setValue(int(percent))
        self.train_status.setText(message)

    def _trained(self, result) -> None:
        if isinstance(result, Failure):
            self.train_status.setText(result.message)
            show_error(f"MMCS: {result.message}")
            return
        if result is None:
            self.train_status.setText("fine-tuning cancelled")
            self.train_progress.setValue(0)
            return
        self.last_training.update(result)
        self.train_progress.setValue(100)
        self.train_status.setText(f"{result['status']}; model {result['model']}")
        self.model_edit.setText(result["model"])
        if self.diameter_combo.currentText() == "auto":
            # a model fine-tuned on one experiment stores the corrected cells' mean diameter; segmenting at it
            # scored better than the size search in benchmarks.finetune (docs/training.md, "Fine-tuning")
            self.diameter_combo.setCurrentText("stored")
        diameter = self.diameter_combo.currentText()
        show_info(f"MMCS: fine-tuned model written to {result['model']}; segmenting again with it (diameter {diameter})")
        if self.image_combo.currentText():
            self.segment(suffix="masks (fine-tuned)")

    def _train_done(self) -> None:
        self.train_worker = None
        self.train_button.setEnabled(True)
        self.train_cancel.setEnabled(False)

    def cancel_training(self) -> None:
        """Stop the fine-tuning child (SIGTERM to its process group; the worker then reaps it)."""
        self.last_training["cancelled"] = True
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.train_status.setText("cancelling fine-tuning...")

    def closeEvent(self, event) -> None:  # Qt names it
        """Closing the widget ends a fine-tuning child and the status polling (nothing keeps running unseen)."""
        self.poll.stop()
        if self.process is not None:
            self.cancel_training()
        super().closeEvent(event)

    # -- label server -------------------------------------------------------------------------------------------
    def _server_call(self, work, on_result, *args) -> None:
        """Run a server request in a worker (the viewer never waits on the network)."""
        if self.worker is not None:
            show_warning("MMCS: segmentation or a server request is still running; wait for it or cancel it")
            return
        self._segment_job = None
        self._drop_answer = False
        self._start(guarded(work), lambda result: self._server_answer(result, on_result), *args)

    def _server_answer(self, result, on_result) -> None:
        if self._drop_answer:
            self._drop_answer = False
            self.status.setText("cancelled")
            self.server_status_label.setText("request cancelled")
            return
        if isinstance(result, Failure):
            self.server_status_label.setText(result.message)
            show_error(f"MMCS: {result.message}")
            return
        on_result(result)

    def _client(self) -> LabelClient:
        url = self.url_edit.text().strip()
        if self.client is None or self.client.url != url.rstrip("/"):
            self.client = LabelClient(url)
        return self.client

    def connect_server(self) -> None:
        """``GET /info/``: fill the model and strategy choices."""
        try:
            client = self._client()
        except LabelServerError as err:
            show_error(f"MMCS: {err}")
            return
        self.server_status_label.setText(f"connecting to {client.url}...")
        self._server_call(client.info, self._connected)

    def _connected(self, info: dict) -> None:
        self.server_info = info
        self.server_model.clear()
        self.server_model.addItems(sorted(info.get("models", {})))
        self.strategy_combo.clear()
        strategies = sorted(info.get("strategies", {}), key=lambda s: (s != "random", s))
        self.strategy_combo.addItems(strategies)
        total = info.get("datastore", {}).get("total", "?")
        self.server_status_label.setText(
            f"connected to {info.get('name', 'server')}: {total} images; models {', '.join(sorted(info.get('models', {})))}"
        )

    def _need_connection(self) -> bool:
        if not self.server_info:
            show_error("MMCS: connect to a label server first")
            return False
        return True

    def next_sample(self) -> None:
        """Next image (and its box) from the chosen strategy: an image layer and a Shapes layer with the box."""
        if not self._need_connection():
            return
        client, strategy, side = self._client(), self.strategy_combo.currentText(), int(self.patch_spin.value())

        def work():
            answer = client.next_sample(strategy, (side, side) if side else None)
            return answer, client.image(answer["id"])

        self._server_call(work, self._sampled)

    def _sampled(self, result) -> None:
        answer, data = result
        image_id = answer["id"]
        name = f"server: {image_id}"
        rgb = data.ndim == 3 and data.shape[-1] in (3, 4)
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.viewer.add_image(data, name=name, rgb=rgb, metadata={"mmcs_server_image": image_id})
        x, y, w, h = (int(v) for v in answer.get("bbox") or [0, 0, data.shape[1], data.shape[0]])
        box_name = f"{name} box"
        if box_name in self.viewer.layers:
            self.viewer.layers.remove(box_name)
        corners = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], dtype=float)
        self.viewer.add_shapes(
            [corners], shape_type="rectangle", edge_color="yellow", face_color="transparent", edge_width=2, name=box_name
        )
        self.sample = {"id": image_id, "bbox": [x, y, w, h], "shape": tuple(data.shape[:2]), "layer": name}
        self.set_image(name)
        reason = f" ({answer['reason']})" if answer.get("reason") else ""
        self.server_status_label.setText(f"next sample: {image_id}, box x {x} y {y} w {w} h {h}{reason}")

    def _sample_box(self) -> list[int]:
        """The box of the current sample: the first rectangle of its Shapes layer (as the user may have moved it)."""
        box_layer = self._layer(f"{self.sample['layer']} box")
        if isinstance(box_layer, Shapes) and len(box_layer.data):
            corners = np.asarray(box_layer.data[0])
            (y0, x0), (y1, x1) = corners.min(axis=0), corners.max(axis=0)
            return [int(round(x0)), int(round(y0)), max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))]
        return list(self.sample["bbox"])

    def server_infer(self, box: bool = False) -> None:
        """Segment the current sample on the server, its box or the whole image -> Labels layer ``<image> labels``."""
        if not self._need_connection():
            return
        if not self.sample:
            show_error("MMCS: ask for a next sample first")
            return
        client, model, sample = self._client(), self.server_model.currentText(), dict(self.sample)
        region = self._sample_box() if box else None

        def work():
            if region is not None:
                return client.infer_box(model, sample["id"], region, sample["shape"])
            return client.infer(model, sample["id"])

        self._server_call(work, lambda labels: self._server_labels(sample, labels, region))

    def _server_labels(self, sample: dict, labels: np.ndarray, region) -> None:
        name = f"{sample['layer']} labels"
        metadata = {"mmcs_server_image": sample["id"], "mmcs_image": sample["layer"]}
        if name in self.viewer.layers:
            self.viewer.layers[name].data = labels
        else:
            self.viewer.add_labels(labels, name=name, metadata=metadata)
        self.viewer.layers.selection.active = self.viewer.layers[name]
        where = f"box {region}" if region is not None else "whole image"
        self.server_status_label.setText(f"{sample['id']} ({where}): {len(np.unique(labels)) - 1} cells from the server")

    def submit_label(self) -> None:
        """``PUT /datastore/label?tag=final``: the selected Labels layer as the final label of its server image."""
        if not self._need_connection():
            return
        layer = self.viewer.layers.selection.active
        if not isinstance(layer, Labels):
            kind = f"{layer.name!r} is a {type(layer).__name__} layer" if layer is not None else "no layer is selected"
            show_error(f"MMCS: select the corrected Labels layer to submit ({kind})")
            return
        image_id = layer.metadata.get("mmcs_server_image") or self.sample.get("id")
        if not image_id:
            show_error(f"MMCS: {layer.name}: not a label of a server image (ask for a next sample first)")
            return
        labels = np.asarray(layer.data)
        if not labels.any():
            show_error(f"MMCS: {layer.name}: the Labels layer is empty: nothing to submit")
            return
        client = self._client()
        self._server_call(lambda: client.save_label(image_id, labels), lambda answer: self._submitted(image_id, answer))

    def _submitted(self, image_id: str, answer: dict) -> None:
        self.server_status_label.setText(f"label of {image_id} saved ({answer.get('cells', '?')} cells)")

    def server_train(self) -> None:
        """``POST /train/<model>`` with the JSON parameters; the status is then polled every 2 s until it ends."""
        if not self._need_connection():
            return
        try:
            params = json.loads(self.server_params.text() or "{}")
            if not isinstance(params, dict):
                raise ValueError('training parameters must be a JSON object, e.g. {"epochs": 20}')
        except json.JSONDecodeError as err:
            show_error(f"MMCS: training parameters are not JSON ({err.msg})")
            return
        except ValueError as err:
            show_error(f"MMCS: {err}")
            return
        client, model = self._client(), self.server_model.currentText()
        self._server_call(lambda: client.train(model, params), self._training_started)

    def _training_started(self, answer: dict) -> None:
        self.server_status_label.setText(f"training submitted ({answer.get('id', '')})")
        self.poll.start()

    def server_status(self) -> None:
        """``GET /train/`` (and ``/info/`` once it ended): show the server's training status."""
        if self.client is None or self.worker is not None:
            return

        def work():
            status = self.client.train_status()
            info = self.client.info() if status.get("status") not in ("SUBMITTED", "RUNNING") else None
            return status, info

        self._server_call(work, self._status_shown)

    def _status_shown(self, result) -> None:
        status, info = result
        state = status.get("status", "no training yet")
        text = f"training: {state}"
        if info is not None:
            self.poll.stop()
            self.server_info = info
            stats = next(iter((info.get("train_stats") or {}).values()), {})
            if stats:
                f1 = stats.get("best_val_f1")
                text += f"; best validation F1 {f1:.3f}" if isinstance(f1, (int, float)) else ""
                text += "; published" if stats.get("published") else "; not published (the served model stays)"
        self.server_status_label.setText(text)
        self.last_server_status = {"status": state, "info": info}


def _spin(low: float, high: float, value: float, step: float) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(low, high)
    spin.setDecimals(2)
    spin.setSingleStep(step)
    spin.setValue(value)
    return spin


__all__ = ["Failure", "MMCSWidget", "user_message"]
