"""The label server's train task: fine-tune the served model on the datastore, semi-supervised.

MONAI Label runs it in its own process (``POST /train/mmcs``), so the server keeps answering while it
trains. One run:

1. labelled set = images with a ``final`` label; a ``val_fraction`` of them (at least one, when there are
   ``min_val_images`` or more) is held out to choose the best epoch, otherwise every labelled image is also
   the validation set; unlabelled set = every other image;
2. the bundle's ``train.json`` (and ``semi.json`` when there are unlabelled images and ``semi`` is on) runs
   through ``monai.bundle`` from the served model, with its architecture and target diameter, writing to
   ``<model dir>/runs/<time>/``;
3. the run's best model is published if its validation F1 is at least the served model's on the same
   images (``publish: always`` skips the comparison): it replaces the served file atomically (the old one
   is kept as ``previous.pt``), and the infer task loads it on its next request;
4. the uncertainty scores of the unlabelled images are recomputed with the new model.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from mmcs_monai.io import atomic_path
from mmcs_monai.label.activelearning import UncertaintyScoring
from mmcs_monai.label.datastore import CellDatastore
from mmcs_monai.label.model import ServedModel
from mmcs_monai.label.publishing import should_publish, split_labelled
from mmcs_monai.options import parse_bool
from mmcs_monai.precision import TRAINING_PRECISIONS
from mmcs_monai.workflows import resolve_bundle_root, run_workflow

logger = logging.getLogger(__name__)

# what a client may set per run (``POST /train/mmcs`` body ``{"mmcs": {...}}``), with the server's defaults
TRAIN_PARAMETERS: dict[str, Any] = {
    "epochs": 50,
    "semi": True,  # add the unlabelled images (mean teacher + pseudo flows) when there are any
    "batch_size": 8,
    "unlabelled_batch_size": 8,
    "patch_size": 128,
    "learning_rate": 0.1,
    "warmup_epochs": 5,
    "pseudo_interval": 10,  # epochs between pseudo-label refreshes from the teacher
    "labels_first": 0.5,  # the fraction of the epochs on the labels alone before the unlabelled images join
    "val_fraction": 0.2,
    "min_val_images": 5,
    "time_budget_minutes": 0,  # stop after this many minutes (0: no limit)
    "precision": "auto",
    "seed": 0,
    "score_after": True,  # refresh the uncertainty scores with the new model
    "publish": "if_better",  # or "always": replace the served model even if it scores lower on validation
}


# what other MONAI Label clients call these (QuPath's training dialog sends max_epochs and the batch sizes)
TRAIN_ALIASES = {"max_epochs": "epochs", "train_batch_size": "batch_size"}
# keys clients send that this task has no use for (validation runs one whole image at a time)
TRAIN_IGNORED = {"val_batch_size", "model", "client_id", "bundle_path", "name"}


def _number(key: str, value: Any, kind: type, low: float | None = None, high: float | None = None) -> int | float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{key} {value!r}: expected a number")
    try:
        number = kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} {value!r}: expected {'an integer' if kind is int else 'a number'}") from err
    if kind is int and float(value) != number:
        raise ValueError(f"{key} {value!r}: expected an integer")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"
        raise ValueError(f"{key} {value!r}: must be in {bounds}")
    return number


def check_train_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """Training parameters (``TRAIN_PARAMETERS`` keys, or their aliases) checked and typed.

    Returns:
        the values under their own names, typed (ints, floats, bools, choices); aliases renamed, ignored
        keys dropped.

    Raises:
        ValueError: an unknown key or a bad value, naming it.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = TRAIN_ALIASES.get(key, key)
        if key in TRAIN_IGNORED:
            continue
        if key not in TRAIN_PARAMETERS:
            known = sorted(TRAIN_PARAMETERS) + sorted(TRAIN_ALIASES)
            raise ValueError(f"unknown training parameter {key!r}; known: {', '.join(known)}")
        if key in ("epochs", "batch_size", "unlabelled_batch_size", "patch_size", "pseudo_interval", "min_val_images"):
            value = _number(key, value, int, low=1)
        elif key in ("warmup_epochs", "seed"):
            value = _number(key, value, int, low=0)
        elif key == "learning_rate":
            value = _number(key, value, float, low=1e-8)
        elif key in ("val_fraction", "labels_first"):
            value = _number(key, value, float, low=0.0, high=0.9)
        elif key == "time_budget_minutes":
            value = _number(key, value if value is not None else 0, float, low=0.0)
        elif key in ("semi", "score_after"):
            value = parse_bool(value, key)
        elif key == "publish" and value not in ("if_better", "always"):
            raise ValueError(f"publish {value!r}: use 'if_better' or 'always'")
        elif key == "precision" and value not in TRAINING_PRECISIONS:
            raise ValueError(f"precision {value!r}: use one of {', '.join(TRAINING_PRECISIONS)}")
        out[key] = value
    return out


def best_metric(checkpoint: Path) -> float | None:
    """Best validation F1 stored by the bundle's ``BestModelSaver`` in a training checkpoint."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        return float(state["best_model"]["best"])
    except Exception:  # an absent or older checkpoint: the summary just lacks the number
        return None


class CellTrainTask(TrainTask):
    """Fine-tune the served model on the datastore's labels (and its unlabelled images).

    Args:
        model: the served model (a checkpoint: an exported ``.ts`` cannot be trained).
        model_dir: where runs are written (``runs/<time>/``).
        bundle_root: the bundle whose configs run (default: the repository's ``bundle/``).
        defaults: server-wide values for :data:`TRAIN_PARAMETERS`.
        scoring: the scoring method to run after publishing (None: none).
    """

    def __init__(
        self,
        model: ServedModel,
        model_dir: str | Path,
        bundle_root: str | Path | None = None,
        defaults: dict[str, Any] | None = None,
        scoring: UncertaintyScoring | None = None,
    ):
        super().__init__("Fine-tune the served model on labels/final, semi-supervised on the other images")
        self.model = model
        self.model_dir = Path(model_dir)
        self.bundle_root = bundle_root
        self.defaults = {**TRAIN_PARAMETERS, **(defaults or {})}
        self.scoring = scoring

    def config(self) -> dict[str, Any]:
        return dict(self.defaults)

    def stats(self) -> dict[str, Any]:
        """Summary of the last finished run (``{}`` before the first)."""
        path = self.model_dir / "last_train.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """A client's parameters checked (:func:`check_train_parameters`), before anything runs; raises ValueError."""
        if not isinstance(params, dict):
            raise ValueError(f"training parameters must be a JSON object, got {type(params).__name__}")
        return check_train_parameters({k: v for k, v in params.items() if not isinstance(v, dict)})

    def settings(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run parameters: the request's (top level, or under the model's name), else the server's."""
        nested = request.get("mmcs") if isinstance(request.get("mmcs"), dict) else {}
        known = {k: v for k, v in request.items() if TRAIN_ALIASES.get(k, k) in TRAIN_PARAMETERS}
        try:
            given = {**self.validate(known), **self.validate(nested)}
        except ValueError as err:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(err)) from err
        return {**self.defaults, **given}

    def served_f1(self, items: list[dict], precision: str) -> float:
        """Mean F1 at IoU 0.5 (CellSeg border) of the served model on ``items``, at its stored diameter."""
        from mmcs_monai.evaluation import diameter_sweep
        from mmcs_monai.inference import CellInferer

        rows = diameter_sweep(self.model.network(), items, ["stored"], inferer=CellInferer(precision=precision))
        return sum(r["f1"] for r in rows) / len(rows)

    def __call__(self, request: dict[str, Any], datastore: CellDatastore) -> dict[str, Any]:
        values = self.settings(request)
        if self.model.path.suffix == ".ts":
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"{self.model.path}: an exported TorchScript model cannot be trained; serve a checkpoint (.pt)",
            )
        labelled = datastore.labelled_items()
        if not labelled:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "no labelled images yet: save labels (PUT /datastore/label) first")
        unlabelled = datastore.unlabelled_items() if parse_bool(values["semi"], "semi") else []
        train_items, val_items = split_labelled(labelled, float(values["val_fraction"]), int(values["min_val_images"]), int(values["seed"]))

        run_dir = self.model_dir / "runs" / datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        rows = [{**i, "split": "train"} for i in train_items] + [{**i, "split": "val"} for i in val_items]
        rows += [{**i, "split": "unlabelled"} for i in unlabelled]
        datalist = run_dir / "datalist.json"
        with atomic_path(datalist) as tmp:
            tmp.write_text(json.dumps({"items": rows}, indent=1))

        network = self.model.network()
        started_from = self.model.describe()
        epochs = int(values["epochs"])
        overrides = {
            "data_source": str(datalist),
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "eval"),
            "pretrained": str(self.model.path),
            "nbase": list(network.nbase),
            "diam_mean": float(network.diam_mean),
            "epochs": epochs,
            "val_interval": max(1, epochs // 4),
            "batch_size": int(values["batch_size"]),
            "patch_size": int(values["patch_size"]),
            "learning_rate": float(values["learning_rate"]),
            "warmup_epochs": min(int(values["warmup_epochs"]), max(epochs - 1, 0)),
            "time_budget_minutes": values["time_budget_minutes"] or None,
            "precision": values["precision"],
            "seed": int(values["seed"]),
            "device": str(self.model.device),
        }
        root = resolve_bundle_root(self.bundle_root)
        recipe = []
        if unlabelled:
            recipe.append(str(root / "configs" / "semi.json"))
            overrides.update(
                unlabelled_source=str(datalist),
                unlabelled_split="unlabelled",
                unlabelled_batch_size=int(values["unlabelled_batch_size"]),
                pseudo_interval=max(1, int(values["pseudo_interval"])),
                semi_start_epoch=int(epochs * values["labels_first"]),
            )
        baseline = self.served_f1(val_items, values["precision"]) if values["publish"] == "if_better" else None
        start = time.time()
        logger.info(
            "training on %d labelled (%d val) and %d unlabelled images -> %s", len(train_items), len(val_items), len(unlabelled), run_dir
        )
        run_workflow("training", root, recipe, overrides)
        seconds = time.time() - start

        models = run_dir / "models"
        best = models / "model.pt" if (models / "model.pt").is_file() else models / "model_final.pt"
        run_f1 = best_metric(models / "checkpoint.pt")
        publish = should_publish(values["publish"], run_f1, baseline)
        if publish:
            self.model.publish(best)
        else:
            logger.warning("not published: validation F1 %.4f < served model's %.4f (publish: always overrides)", run_f1 or 0.0, baseline)
        summary = {
            "run": str(run_dir),
            "published": publish,
            "run_model": str(best),
            "started_from": started_from,
            "labelled": len(train_items),
            "validation": len(val_items),
            "validation_is_training_set": val_items == train_items,
            "unlabelled": len(unlabelled),
            "unlabelled_from_epoch": overrides["semi_start_epoch"] + 1 if unlabelled else None,
            "epochs": epochs,
            "best_val_f1": run_f1,
            "served_val_f1_before": baseline,
            "seconds": round(seconds, 1),
            "finished": datetime.now().isoformat(timespec="seconds"),
            "model": self.model.describe(),
        }
        if publish and self.scoring is not None and parse_bool(values["score_after"], "score_after"):
            summary["scoring"] = self.scoring(request, datastore)
        with atomic_path(self.model_dir / "last_train.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        logger.info("training finished: %s", summary)
        return summary
