"""The MONAI Label app: annotate cells, train from the labels, pick the next image by uncertainty.

Start it (the app folder ``apps/mmcs`` holds only a ``main.py`` importing :class:`MMCSLabelApp`)::

    monailabel start_server --app apps/mmcs --studies path/to/images --host 127.0.0.1 --port 8000 \\
        --conf models mmcs --conf model bundle/models/model.pt

``--conf`` keys (all optional):

- ``models``: ``mmcs`` (the one model here) or ``all``;
- ``model``: checkpoint (mmcs or Cellpose 3), exported ``.ts``, or a shipped model's name (``permissive``) to serve (default: the bundle's shipped
  ``models/model.pt``); copied to ``<model_dir>/mmcs.pt`` on first start, which training then replaces;
- ``model_dir``: where the served model and training runs live (default ``<app>/model``);
- ``device``: ``cpu``, ``cuda:0`` ... (default: the first GPU, else CPU);
- ``precision``: ``auto`` (bf16 where native; int8 on AVX-512 VNNI CPUs for a calibrated model), ``fp32``, ``bf16``,
  ``fp16``, ``int8`` (inference);
- ``diameter``, ``nucleus_channel``, ``cyto_channel``, ``flow_threshold``, ``cellprob_threshold``, ``min_size``:
  server-wide inference defaults (``diameter``: pixels, a stored subset name, ``stored``, ``auto``: the default);
- ``max_upload_mb``: largest request body and uploaded file accepted: images, labels, infer uploads,
  sessions (default 256);
- ``max_image_mpix``: largest image read, in megapixels (2^20 pixels), checked on the file's header before
  anything is decoded (default 64: 8192 x 8192);
- ``max_label_polygons``, ``max_label_vertices``: what one ASAP XML label may hold (defaults 100000 and
  1000000; see :class:`~mmcs_monai.label.asap.AsapLimits`);
- ``train_<key>``: default of a training parameter, e.g. ``train_epochs 20`` (see ``TRAIN_PARAMETERS``);
- ``bundle_root``: bundle whose configs training runs (default: the repository's ``bundle/``);
- ``auto_update_scoring``: ``true`` rescores at start and after every next-image request (default ``false``);
- ``child_threads``: torch threads of the training and scoring processes the server starts (default: all
  cores but one, at least 1); they also run at a lower priority (``nice`` 10), so the server keeps answering.

Tasks: infer ``mmcs`` (also through the WSI endpoints QuPath uses: ASAP XML or DSA JSON polygons of a
region); train ``mmcs``; scoring ``mmcs_uncertainty``; strategies ``random`` (listed first: it measured best) and ``mmcs_uncertainty``.
Requests are checked before they run and the work runs off the event loop (:mod:`mmcs_monai.label.routes`);
one inference runs at a time.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp

from mmcs_monai.label import routes
from mmcs_monai.label.activelearning import SCORE_KEY, MostUncertain, RandomSample, UncertaintyScoring
from mmcs_monai.label.asap import AsapLimits
from mmcs_monai.label.datastore import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, CellDatastore, UploadRejected
from mmcs_monai.label.infer import INFER_PARAMETERS, CellInferTask
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.train import TRAIN_PARAMETERS, CellTrainTask
from mmcs_monai.options import parse_bool
from mmcs_monai.workflows import resolve_model

logger = logging.getLogger(__name__)

MODEL_NAME = "mmcs"


def _typed(value: str, default: Any) -> Any:
    """A ``--conf`` string as the type of the parameter's default (conf values arrive as strings)."""
    if value in ("None", "none", "null"):
        return None
    if isinstance(default, bool):
        return parse_bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return value


# how often (s) a thread running Python hands the interpreter lock to a waiting one, in the server process
SERVER_SWITCH_INTERVAL = 0.001


def keep_answering() -> None:
    """Tune the server process so that a request converting a large label (ASAP XML in Python, seconds of
    work) does not hold up the others; measured with a 10 MB label (tests/label/test_qupath.py):

    - start-up leaves about 600,000 objects (torch, MONAI, the model) that a full garbage collection walks,
      holding every thread for about 0.25 s each time the label's allocations trigger one: they are moved to
      the permanent generation (``gc.freeze``), and a full collection then takes about 0.03 s;
    - answering ``GET /info/`` passes the interpreter lock between threads a few dozen times, each wait up
      to the switch interval (5 ms by default): with 1 ms (and the freeze) its longest wait fell from 0.45-0.66 s
      to 0.07-0.10 s during the parse (2-core Zen 2).
    """
    gc.freeze()
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL)


class MMCSLabelApp(MONAILabelApp):
    """MONAI Label app serving one MMCS cell segmentation model (see the module docstring for ``--conf``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        models = conf.get("models", MODEL_NAME)
        if models not in (MODEL_NAME, "all"):
            raise ValueError(f"--conf models {models!r}: this app serves one model, {MODEL_NAME!r} (or 'all')")
        self.model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        source = resolve_model(conf.get("model"), conf.get("bundle_root"))
        self.served = ServedModel.install(source, self.model_dir, conf.get("device") or None)
        self.precision = conf.get("precision", "auto")
        self.infer_defaults = {k: _typed(conf[k], v) for k, v in INFER_PARAMETERS.items() if k in conf}
        self.train_defaults = {k: _typed(conf[f"train_{k}"], v) for k, v in TRAIN_PARAMETERS.items() if f"train_{k}" in conf}
        self.max_upload_bytes = int(float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_BYTES / 2**20)) * 2**20)
        self.max_image_pixels = int(float(conf.get("max_image_mpix", DEFAULT_MAX_IMAGE_PIXELS / 2**20)) * 2**20)
        defaults = AsapLimits()
        self.asap_limits = AsapLimits(
            max_polygons=int(conf.get("max_label_polygons", defaults.max_polygons)),
            max_vertices=int(conf.get("max_label_vertices", defaults.max_vertices)),
        )
        self.child_threads = int(conf.get("child_threads") or max(1, (os.cpu_count() or 2) - 1))
        # one inference at a time: requests queue here instead of sharing the cores (server-wide, by design)
        self.inference_lock = threading.Lock()
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
        self._auto_update_scoring = parse_bool(conf.get("auto_update_scoring", "false"), "auto_update_scoring")

    def init_datastore(self) -> CellDatastore:
        if self.studies.startswith(("http://", "https://")):
            raise ValueError("this app works on a local studies folder of TIFF/PNG/JPEG images")
        logger.info(
            "datastore: %s (uploads up to %d bytes, images up to %d pixels, labels up to %d polygons / %d vertices)",
            self.studies,
            self.max_upload_bytes,
            self.max_image_pixels,
            self.asap_limits.max_polygons,
            self.asap_limits.max_vertices,
        )
        return CellDatastore(
            self.studies,
            max_upload_bytes=self.max_upload_bytes,
            max_image_pixels=self.max_image_pixels,
            asap_limits=self.asap_limits,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _scoring(self) -> UncertaintyScoring:
        return UncertaintyScoring(
            self.served, precision=self.precision, diameter=self.infer_defaults.get("diameter"), max_pixels=self.max_image_pixels
        )

    def init_infers(self) -> dict[str, CellInferTask]:
        return {MODEL_NAME: CellInferTask(self.served, self.infer_defaults, precision=self.precision)}

    def init_trainers(self) -> dict[str, CellTrainTask]:
        task = CellTrainTask(self.served, self.model_dir, self.conf.get("bundle_root"), self.train_defaults, scoring=self._scoring())
        return {MODEL_NAME: task}

    def init_scoring_methods(self) -> dict[str, UncertaintyScoring]:
        return {SCORE_KEY: self._scoring()}

    def init_strategies(self) -> dict[str, Any]:
        def start_scoring():
            """Score the unlabelled images in the background, unless scoring runs already (then None)."""
            if not self._server_mode:
                return None
            from monailabel.utils.async_tasks.task import AsyncTask

            return AsyncTask.run("scoring", request={"method": SCORE_KEY}, enqueue=False)[0]

        # random is listed first, so QuPath's dialog offers it by default: in experiments/active_learning (5 seeds,
        # modality-balanced validation) no uncertainty strategy beat random picks
        return {"random": RandomSample(), SCORE_KEY: MostUncertain(self._scoring(), start_scoring, self.inference_lock)}

    def on_init_complete(self) -> None:
        """In the server: rewire MONAI Label's endpoints (:func:`mmcs_monai.label.routes.install`) and keep
        it answering while a request converts a large label in Python (:func:`keep_answering`)."""
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")
        if self._server_mode and server is not None:
            routes.install(server.app, routes.RequestChecks(self))
            keep_answering()

    # ------------------------------------------------------------------ inference
    def _image_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """``request`` with ``image`` a path the server may read: a datastore image, the exact file this request
        uploaded, or its session's image; anything else is 404, whether or not such a file exists. The image's
        declared size is checked against ``max_image_mpix`` before it is decoded (413)."""
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise UploadRejected(400, "give an image: a datastore image id, an uploaded file, or a session_id")
        datastore = self.datastore()
        if image in datastore.list_images():
            path = datastore.get_image_uri(image)
            datastore.check_pixels(path, f"image {image!r}")
            return {**request, "image_id": image, "image": path}
        path = Path(image) if os.path.isabs(image) else None
        if path is not None and path.is_file():
            sessions = Path(self.sessions().store_path).resolve() if self.sessions() else None
            if routes.is_this_upload(path):
                datastore.check_pixels(path, "uploaded image")
                return request
            if "session" in request and sessions is not None and path.resolve().is_relative_to(sessions):
                datastore.check_pixels(path, "session image")
                return request
        raise UploadRejected(404, f"image {image!r} is not in the datastore: give a datastore image id or upload the file")

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's infer, limited to datastore images, files uploaded with the request and sessions."""
        request = self._image_request(request)
        with self.inference_lock:
            return super().infer(request, datastore)

    def infer_wsi(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """QuPath's "Annotate": the cells of a region as ASAP XML (``output=asap``), DSA JSON or a summary.

        See :meth:`~mmcs_monai.label.infer.CellInferTask.infer_region` for the request and the answer.
        """
        task = self._infers.get(request.get("model"))
        if task is None:
            raise UploadRejected(404, f"unknown model {request.get('model')!r}; this server has: {', '.join(self._infers)}")
        request = self._image_request({**task.config(), **request})
        with self.inference_lock:
            return task.infer_region(request)

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        """The reply to a label upload: what was stored (cells, format, and any conversion made)."""
        info = self.datastore().get_label_info(label_id, "final") or {}
        return {k: info[k] for k in ("cells", "format", "converted", "polygons", "outside") if k in info}

    # ------------------------------------------------------------------ child processes
    def _as_child_process(self) -> None:
        """Training and scoring run in processes the server starts: fewer threads, lower priority."""
        if self._server_mode or getattr(self, "_child_limited", False):
            return
        self._child_limited = True
        import torch

        torch.set_num_threads(self.child_threads)
        try:
            os.nice(10)
        except OSError:  # not permitted: run at the same priority
            pass
        logger.info("child process: %d torch threads, nice 10", self.child_threads)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        self._as_child_process()
        return super().train(request)

    def scoring(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        self._as_child_process()
        return super().scoring(request, datastore)
