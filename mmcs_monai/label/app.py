"""The MONAI Label app: annotate cells, train from the labels, pick the next image by uncertainty.

Start it (the app folder ``apps/mmcs`` holds only a ``main.py`` importing :class:`MMCSLabelApp`)::

    monailabel start_server --app apps/mmcs --studies path/to/images --host 127.0.0.1 --port 8000 \\
        --conf models mmcs --conf model bundle/models/model.pt

``--conf`` keys (all optional):

- ``models``: ``mmcs`` (the one model here) or ``all``;
- ``model``: checkpoint (mmcs or Cellpose 3) or exported ``.ts`` to serve (default: the bundle's shipped
  ``models/model.pt``); copied to ``<model_dir>/mmcs.pt`` on first start, which training then replaces;
- ``model_dir``: where the served model and training runs live (default ``<app>/model``);
- ``device``: ``cpu``, ``cuda:0`` ... (default: the first GPU, else CPU);
- ``precision``: ``auto`` (bf16 where native), ``fp32``, ``bf16``, ``fp16``;
- ``diameter``, ``nucleus_channel``, ``cyto_channel``, ``flow_threshold``, ``cellprob_threshold``, ``min_size``:
  server-wide inference defaults (``diameter``: pixels, a stored subset name, ``stored``, ``auto``: the default);
- ``max_upload_mb``: largest image/label upload accepted (default 256);
- ``train_<key>``: default of a training parameter, e.g. ``train_epochs 20`` (see ``TRAIN_PARAMETERS``);
- ``bundle_root``: bundle whose configs training runs (default: the repository's ``bundle/``);
- ``auto_update_scoring``: ``true`` rescores at start and after every next-image request (default ``false``).

Tasks: infer ``mmcs``; train ``mmcs``; scoring ``mmcs_uncertainty``; strategies ``mmcs_uncertainty`` and
``random``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

from mmcs_monai.label.activelearning import SCORE_KEY, MostUncertain, UncertaintyScoring
from mmcs_monai.label.datastore import DEFAULT_MAX_UPLOAD_BYTES, CellDatastore, UploadRejected
from mmcs_monai.label.infer import INFER_PARAMETERS, CellInferTask
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.train import TRAIN_PARAMETERS, CellTrainTask
from mmcs_monai.workflows import shipped_model

logger = logging.getLogger(__name__)

MODEL_NAME = "mmcs"


def _typed(value: str, default: Any) -> Any:
    """A ``--conf`` string as the type of the parameter's default (conf values arrive as strings)."""
    if value in ("None", "none", "null"):
        return None
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return value


class MMCSLabelApp(MONAILabelApp):
    """MONAI Label app serving one MMCS cell segmentation model (see the module docstring for ``--conf``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        models = conf.get("models", MODEL_NAME)
        if models not in (MODEL_NAME, "all"):
            raise ValueError(f"--conf models {models!r}: this app serves one model, {MODEL_NAME!r} (or 'all')")
        self.model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        source = conf.get("model") or shipped_model(conf.get("bundle_root"))
        self.served = ServedModel.install(source, self.model_dir, conf.get("device") or None)
        self.precision = conf.get("precision", "auto")
        self.infer_defaults = {k: _typed(conf[k], v) for k, v in INFER_PARAMETERS.items() if k in conf}
        self.train_defaults = {k: _typed(conf[f"train_{k}"], v) for k, v in TRAIN_PARAMETERS.items() if f"train_{k}" in conf}
        self.max_upload_bytes = int(float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_BYTES / 2**20)) * 2**20)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="mmcs-monai",
            description="Semi-supervised multi-modality cell segmentation (MMCS): infer, train, active learning",
            version="0.1.0",
            labels={"cell": 1},
        )
        # the train task refreshes the scores itself; MONAI Label's default would also rescore after every
        # "next sample" request, which costs four segmentations per unlabelled image each time
        self._auto_update_scoring = conf.get("auto_update_scoring", "false").lower() == "true"

    def init_datastore(self) -> CellDatastore:
        if self.studies.startswith(("http://", "https://")):
            raise ValueError("this app works on a local studies folder of TIFF/PNG/JPEG images")
        logger.info("datastore: %s (uploads up to %d bytes)", self.studies, self.max_upload_bytes)
        return CellDatastore(
            self.studies,
            max_upload_bytes=self.max_upload_bytes,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _scoring(self) -> UncertaintyScoring:
        return UncertaintyScoring(self.served, precision=self.precision, diameter=self.infer_defaults.get("diameter"))

    def init_infers(self) -> dict[str, CellInferTask]:
        return {MODEL_NAME: CellInferTask(self.served, self.infer_defaults, precision=self.precision)}

    def init_trainers(self) -> dict[str, CellTrainTask]:
        task = CellTrainTask(self.served, self.model_dir, self.conf.get("bundle_root"), self.train_defaults, scoring=self._scoring())
        return {MODEL_NAME: task}

    def init_scoring_methods(self) -> dict[str, UncertaintyScoring]:
        return {SCORE_KEY: self._scoring()}

    def init_strategies(self) -> dict[str, Any]:
        return {SCORE_KEY: MostUncertain(), "random": Random()}

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's infer, limited to datastore images and uploaded files.

        MONAI Label reads ``image`` as a server path when such a file exists; here only an id in the
        datastore or a file the request itself uploaded (in the temp folder) is segmented.
        """
        image = request.get("image")
        if isinstance(image, str) and os.path.exists(image):
            inside_temp = Path(image).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
            if not inside_temp:
                raise UploadRejected(403, f"image {image!r}: give a datastore image id or upload the file")
        elif isinstance(image, str):
            request = {**request, "image_id": image}
            if image not in self.datastore().list_images():
                raise UploadRejected(404, f"image {image!r} is not in the datastore")
        return super().infer(request, datastore)
