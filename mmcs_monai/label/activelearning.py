"""Active learning for the label server: score unlabelled images by the model's uncertainty, pick the next.

``POST /scoring/mmcs_uncertainty`` runs :class:`UncertaintyScoring` (in its own process, started by MONAI
Label); it stores each unlabelled image's score, and a coarse map of where in the image the model is unsure
(:mod:`mmcs_monai.label.patches`), in the datastore under the image's info key ``mmcs_uncertainty``.

``POST /activelearning/<strategy>`` answers ``{"id", "bbox": [x, y, w, h], "path", ...}``, what QuPath's "Next
sample" draws: :class:`MostUncertain` picks the unlabelled image whose stored score is highest, or, when the
request names an ``image`` (QuPath's "next patch from the current image"), that image; the box is the
``patch_size`` patch over its most uncertain blocks. A named image without a score is scored on the spot.
Without a named image, unlabelled images that have no score yet count as the most uncertain: while there are
any, scoring is started in the background (unless it runs) and one of them is picked at random, which
``reason`` says.
:class:`RandomSample` picks at random. The train task rescores after it publishes a new model.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from mmcs_monai.inference import CellInferer
from mmcs_monai.label.datastore import DEFAULT_MAX_IMAGE_PIXELS, CellDatastore, UploadRejected, check_pixels
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.patches import uncertain_window, uncertainty_grid
from mmcs_monai.label.uncertainty import rank_by_uncertainty, tta_flows, tta_uncertainty
from mmcs_monai.transforms import inference_preprocessing

logger = logging.getLogger(__name__)

SCORE_KEY = "mmcs_uncertainty"


class UncertaintyScoring(ScoringMethod):
    """Score every unlabelled image by test-time-augmentation disagreement (:mod:`mmcs_monai.label.uncertainty`).

    Writes ``{"mmcs_uncertainty": {"score", "mask_agreement", "prob_std", "cells", "grid", "grid_px", "shape",
    "model", "ts"}}`` into each image's info (``error`` instead of ``score`` for an image that cannot be read), ten images per datastore
    write so progress is visible while it runs.

    Args:
        model: the served model.
        precision: network precision.
        diameter: the inference diameter (None: the model's stored mean).
        flush_every: images per datastore write.
        max_pixels: larger images are not scored (an ``error`` entry says why).
    """

    def __init__(
        self, model: ServedModel, precision: str = "auto", diameter=None, flush_every: int = 10, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ):
        super().__init__("Uncertainty of unlabelled images: disagreement of the model's masks under flips (1 - mean F1)")
        self.model = model
        self.max_pixels = max_pixels
        self.inferer = CellInferer(precision=precision)
        self.diameter = diameter
        self.flush_every = flush_every
        self.preprocess = inference_preprocessing("image")

    def score_image(self, path: str) -> dict[str, Any]:
        """Uncertainty of one image file: score, agreement, probability spread, cells and the block map."""
        import torch

        check_pixels(path, f"image {path!r}", self.max_pixels)  # before decoding: a huge image is refused, not read
        image = torch.as_tensor(self.preprocess({"image": path})["image"], dtype=torch.float32)[None]
        network = self.model.network()
        device = next(iter(network.parameters()), torch.empty(0)).device
        flows = tta_flows(image.to(device), network, self.inferer, self.diameter).cpu()
        return {**tta_uncertainty(flows), **uncertainty_grid(flows)}

    def score_one(self, datastore: CellDatastore, image_id: str) -> dict[str, Any]:
        """Score one datastore image now and store it (what "next sample" does for an unscored image)."""
        entry = {**self.score_image(datastore.get_image_uri(image_id)), "model": self.model.modified(), "ts": int(time.time())}
        datastore.update_image_infos({image_id: {SCORE_KEY: entry}})
        return entry

    def __call__(self, request: dict[str, Any], datastore: CellDatastore) -> dict[str, Any]:
        items = datastore.unlabelled_items()
        stamp = self.model.modified()
        pending: dict[str, dict] = {}
        failed = []
        start = time.time()
        for n, item in enumerate(items, start=1):
            try:
                entry = self.score_image(item["image"])
            except Exception as err:  # a bad file is reported and skipped, the rest are scored
                entry = {"error": f"{type(err).__name__}: {err}"}
                failed.append(item["id"])
                logger.warning("scoring skipped %s: %s", item["id"], entry["error"])
            pending[item["id"]] = {SCORE_KEY: {**entry, "model": stamp, "ts": int(time.time())}}
            if len(pending) >= self.flush_every or n == len(items):
                datastore.update_image_infos(pending)
                pending = {}
        seconds = time.time() - start
        logger.info("scored %d unlabelled images in %.1f s (%d failed)", len(items), seconds, len(failed))
        return {"scored": len(items) - len(failed), "failed": failed, "model": stamp, "seconds": round(seconds, 1)}


def _sizes(request: dict[str, Any]) -> tuple[list[int], list[int] | None]:
    """``patch_size`` [w, h] (default: the whole image) and ``image_size`` [w, h] (None) of a request."""

    def pair(key: str, default):
        value = request.get(key, default)
        if value is None:
            return None
        try:
            w, h = (int(v) for v in value)
        except (TypeError, ValueError) as err:
            raise UploadRejected(400, f"{key} {value!r}: give [width, height] in pixels") from err
        return [w, h]

    return pair("patch_size", [0, 0]), pair("image_size", None)


def _image_size(datastore: CellDatastore, image_id: str) -> list[int]:
    height, width = datastore.image_shape(image_id)
    return [int(width), int(height)]


def _answer(datastore: CellDatastore, image_id: str, entry: dict | None, patch: list[int], **extra: Any) -> dict[str, Any]:
    bbox = uncertain_window(entry, patch, _image_size(datastore, image_id))
    return {"id": image_id, "bbox": bbox, **({"score": entry["score"]} if entry and "score" in entry else {}), **extra}


class MostUncertain(Strategy):
    """Next image (and patch) to label: the most uncertain unlabelled image, or the patch of the named image.

    Request (JSON; every key optional): ``image`` (a datastore id: the patch of that image; "" or absent:
    the most uncertain unlabelled image), ``patch_size`` [w, h] (default: the whole image), ``image_size``
    (ignored: the server reads the size). Returns ``{"id", "bbox" [x, y, w, h], "score"?, "scored",
    "unscored", "reason"?}``.

    Args:
        scoring: scores an image on the spot when the named one has no score yet.
        start_scoring: starts scoring every unlabelled image in the background (the app's
            ``async_scoring``); None: not available.
        lock: held while scoring on the spot (the app's one-inference-at-a-time lock).
    """

    def __init__(
        self,
        scoring: UncertaintyScoring | None = None,
        start_scoring: Callable[[], Any] | None = None,
        lock: threading.Lock | None = None,
    ):
        super().__init__("Most uncertain unlabelled image, and its most uncertain patch (scores itself when nothing is scored)")
        self.scoring = scoring
        self.start_scoring = start_scoring
        self.lock = lock

    def __call__(self, request: dict[str, Any], datastore: CellDatastore) -> dict[str, Any] | None:
        patch, _ = _sizes(request)
        named = request.get("image") or ""
        if named:
            if named not in datastore.list_images():
                raise UploadRejected(
                    404, f"image {named!r} is not in the datastore: upload it first, or ask without an image for the next one"
                )
            entry = datastore.get_image_info(named).get(SCORE_KEY)
            if (not entry or "grid" not in entry) and self.scoring is not None:
                with self.lock or nullcontext():
                    entry = self.scoring.score_one(datastore, named)
            return _answer(datastore, named, entry, patch)

        unlabelled = datastore.get_unlabeled_images()
        if not unlabelled:
            raise UploadRejected(404, "every image in the datastore has a label: add images, or train on the labels")
        entries = {i: datastore.get_image_info(i).get(SCORE_KEY) or {} for i in unlabelled}
        scores = {i: e for i, e in entries.items() if "score" in e}
        unscored = sorted(i for i, e in entries.items() if not e)  # never scored (an "error" entry was tried)
        counts = {"scored": len(scores), "unscored": len(unscored)}
        if unscored:
            # an image not scored yet is not known to be certain: it comes before every scored one, whatever
            # their scores (one image scored for "next patch" must not stand for the rest)
            started = self.start_scoring() if self.start_scoring is not None else None
            reason = (
                f"{len(unscored)} of the {len(unlabelled)} unlabelled images have no uncertainty score yet: "
                + ("scoring started in the background; " if started else "scoring runs in the background; ")
                + "an unscored image counts as the most uncertain, and this one was picked at random among them"
            )
            choice = random.choice(unscored)
            logger.info("next sample: %s (%s)", choice, reason)
            return _answer(datastore, choice, None, patch, reason=reason, **counts)
        if not scores:  # every unlabelled image failed to score
            choice = random.choice(sorted(unlabelled))
            reason = f"none of the {len(unlabelled)} unlabelled images could be scored (see their {SCORE_KEY} error); picked at random"
            return _answer(datastore, choice, None, patch, reason=reason, **counts)
        best = rank_by_uncertainty(scores)[0]
        logger.info("most uncertain of %d scored images: %s (%.3f)", len(scores), best, scores[best]["score"])
        return _answer(datastore, best, scores[best], patch, **counts)


class RandomSample(Strategy):
    """Next image to label at random among the unlabelled ones, with a random ``patch_size`` box in it."""

    def __init__(self):
        super().__init__("Random unlabelled image, random patch")

    def __call__(self, request: dict[str, Any], datastore: CellDatastore) -> dict[str, Any] | None:
        patch, _ = _sizes(request)
        named = request.get("image") or ""
        if named and named not in datastore.list_images():
            raise UploadRejected(404, f"image {named!r} is not in the datastore: upload it first, or ask without an image")
        unlabelled = datastore.get_unlabeled_images()
        if not named and not unlabelled:
            raise UploadRejected(404, "every image in the datastore has a label: add images, or train on the labels")
        choice = named or random.choice(sorted(unlabelled))
        width, height = _image_size(datastore, choice)
        w = min(patch[0], width) if patch[0] > 0 else width
        h = min(patch[1], height) if patch[1] > 0 else height
        bbox = [random.randint(0, width - w), random.randint(0, height - h), w, h]
        return {"id": choice, "bbox": bbox}
