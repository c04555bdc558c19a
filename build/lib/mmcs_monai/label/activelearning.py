"""Active learning for the label server: score unlabelled images by the model's uncertainty, pick the next.

``POST /scoring/mmcs_uncertainty`` runs :class:`UncertaintyScoring` (in its own process, started by MONAI
Label); it stores each unlabelled image's score in the datastore under the image's info key
``mmcs_uncertainty``. ``POST /activelearning/mmcs_uncertainty`` (:class:`MostUncertain`) answers with the
unlabelled image whose stored score is highest. The train task calls the scoring again after it publishes a
new model, so the scores always come from the model being served.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from mmcs_monai.inference import CellInferer
from mmcs_monai.label.datastore import CellDatastore
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.uncertainty import image_uncertainty, rank_by_uncertainty
from mmcs_monai.transforms import inference_preprocessing

logger = logging.getLogger(__name__)

SCORE_KEY = "mmcs_uncertainty"


class UncertaintyScoring(ScoringMethod):
    """Score every unlabelled image by test-time-augmentation disagreement (:mod:`mmcs_monai.label.uncertainty`).

    Writes ``{"mmcs_uncertainty": {"score", "mask_agreement", "prob_std", "cells", "model", "ts"}}`` into each
    image's info (``error`` instead of ``score`` for an image that cannot be read), ten images per datastore
    write so progress is visible while it runs.

    Args:
        model: the served model.
        precision: network precision.
        diameter: the inference diameter (None: the model's stored mean).
        flush_every: images per datastore write.
    """

    def __init__(self, model: ServedModel, precision: str = "auto", diameter=None, flush_every: int = 10):
        super().__init__("Uncertainty of unlabelled images: disagreement of the model's masks under flips (1 - mean F1)")
        self.model = model
        self.inferer = CellInferer(precision=precision)
        self.diameter = diameter
        self.flush_every = flush_every
        self.preprocess = inference_preprocessing("image")

    def score_image(self, path: str) -> dict[str, Any]:
        image = self.preprocess({"image": path})["image"]
        return image_uncertainty(image, self.model.network(), self.inferer, self.diameter)

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


class MostUncertain(Strategy):
    """Next image to label: the unlabelled image with the highest stored uncertainty score.

    Returns ``{"id", "score", "scored", "unscored"}``; an HTTP 409 when no unlabelled image has a score yet.
    """

    def __init__(self):
        super().__init__("Most uncertain unlabelled image (run scoring mmcs_uncertainty first; training refreshes it)")

    def __call__(self, request: dict[str, Any], datastore: CellDatastore) -> dict[str, Any] | None:
        unlabelled = datastore.get_unlabeled_images()
        if not unlabelled:
            return None
        scores = {}
        for image_id in unlabelled:
            entry = datastore.get_image_info(image_id).get(SCORE_KEY, {})
            if "score" in entry:
                scores[image_id] = entry
        if not scores:
            raise HTTPException(
                409, f"none of the {len(unlabelled)} unlabelled images has an uncertainty score yet: POST /scoring/{SCORE_KEY} first"
            )
        best = rank_by_uncertainty(scores)[0]
        logger.info("most uncertain of %d scored images: %s (%.3f)", len(scores), best, scores[best]["score"])
        return {"id": best, "score": scores[best]["score"], "scored": len(scores), "unscored": len(unlabelled) - len(scores)}
