"""Ignite handlers: atomic checkpoints with resume, best-model saving, the training diameter, bad-sample reports."""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.transforms import Randomizable, Transform

from mmcs_monai.cells import SEGMENTATION_SUMMARY, read_segmentation_summary, write_segmentation_summary
from mmcs_monai.diameters import datalist_diameters
from mmcs_monai.distributed import all_gather_objects, broadcast_buffers, is_main_process
from mmcs_monai.inference import CELL_DIAMETER_KEY
from mmcs_monai.io import atomic_path
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import load_model
from mmcs_monai.reporting import Progress, diameter_note, model_note, timing_note

logger = logging.getLogger(__name__)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DataParallel/DistributedDataParallel wrappers."""
    return getattr(network, "module", network)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states, so a resumed run draws the same augmentations."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def randomizable_transforms(*transforms: Any) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``transforms``, depth first, each once.

    Walks ``Compose.transforms`` and the attributes of each transform (a dictionary transform holds its
    array twin as an attribute, e.g. ``RandScaleIntensityd.rand_scale``), so the list holds every object
    whose own ``R`` (``numpy.random.RandomState``) draws augmentations.
    """
    found: dict[int, Randomizable] = {}
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for child in obj:
                walk(child)
            return
        if not isinstance(obj, Transform):
            return
        if isinstance(obj, Randomizable):
            found.setdefault(id(obj), obj)
        for child in vars(obj).values():
            if isinstance(child, (Transform, list, tuple)):
                walk(child)

    walk(list(transforms))
    return list(found.values())


class TransformRandomState:
    """The random states of MONAI transforms, as a checkpoint object (``state_dict``/``load_state_dict``).

    MONAI's random transforms draw from their own ``self.R``, not from the global RNGs that
    :func:`rng_state` saves: MONAI's ``DataLoader`` seeds them once when it is built, so a resumed run
    (a new process, a new loader) would draw the first epoch's augmentations again. Saved beside the
    network and the global RNG state, it makes a resumed run draw what the uninterrupted run draws
    (with ``num_workers 0``; worker processes get their seeds from the restored torch RNG instead).

    Args:
        transforms: the transform pipelines (``Compose``, lists or single transforms) to cover.
    """

    optional_in_checkpoint = True  # checkpoints written before it existed still resume

    def __init__(self, transforms: Any) -> None:
        self.transforms = transforms

    def _randomizables(self) -> list[Randomizable]:
        return randomizable_transforms(self.transforms)

    def state_dict(self) -> dict[str, Any]:
        return {"states": [t.R.get_state() for t in self._randomizables()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        targets = self._randomizables()
        if len(targets) != len(state["states"]):
            raise ValueError(f"checkpoint holds {len(state['states'])} transform random states, the pipeline has {len(targets)}")
        for target, saved in zip(targets, state["states"]):
            target.R = np.random.RandomState()
            target.R.set_state(saved)


class CheckpointHandler:
    """Save the whole training state every ``save_interval`` epochs and at the end; resume from it.

    Files in ``save_dir``:

    - ``checkpoint.pt``: ``{name: obj.state_dict() for name, obj in save_dict}``, the state of the
      engine the handler is attached to (epoch, iteration) under ``trainer``, and the RNG state;
      ``save_dict`` holds the network, optimizer, scheduler and any other stateful object.
    - ``model_final.pt``: the network's state dict alone at the end of training (Cellpose-3
      compatible keys, ``diam_mean``/``diam_labels`` included); also written as ``model.pt`` when
      no best-by-validation model exists there.

    Both are written to a temporary file and renamed, so killing the process at any moment leaves
    the previous complete file.

    Args:
        save_dir: folder for the files.
        save_dict: objects with ``state_dict``/``load_state_dict``; must include ``network``.
        save_interval: epochs between checkpoints (0: only at the end).
        resume: load ``checkpoint.pt`` at start when it exists and continue from its epoch.
        iteration_interval: also save every this many iterations (0: off), for long epochs; a run
            resumed from such a checkpoint continues the interrupted epoch from its iteration count.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        resume: bool = False,
        iteration_interval: int = 0,
    ) -> None:
        if "network" not in save_dict:
            raise ValueError("save_dict must include 'network'")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.resume = resume
        self.iteration_interval = iteration_interval

    @property
    def checkpoint_path(self) -> Path:
        return self.save_dir / "checkpoint.pt"

    def attach(self, engine: Engine) -> None:
        # The engine is saved through the handler rather than save_dict: a config that put the
        # trainer in save_dict would reference the trainer from the trainer's own handler list.
        self.save_dict.setdefault("trainer", engine)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        if self.iteration_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def _state(self) -> dict[str, Any]:
        state = {name: (unwrap(obj) if name == "network" else obj).state_dict() for name, obj in self.save_dict.items()}
        state["rng"] = rng_state()
        return state

    def save(self, engine: Engine) -> None:
        if is_main_process():  # every rank holds the same state; one writes it
            save_atomic(self._state(), self.checkpoint_path)

    def save_final(self, engine: Engine) -> None:
        if not is_main_process():
            return
        self.save(engine)
        weights = unwrap(self.save_dict["network"]).state_dict()
        save_atomic(weights, self.save_dir / "model_final.pt")
        if not (self.save_dir / "model.pt").is_file():
            # No validation ran (or none saved a best model): inference's default file is the final model.
            save_atomic(weights, self.save_dir / "model.pt")

    def load(self, engine: Engine) -> None:
        # every rank loads the same checkpoint (DDP has already wrapped the network, so each must)
        # a run killed while writing leaves its temporary file (never the real one): clear those
        for stale in self.save_dir.glob(".*.pt.*.tmp") if is_main_process() else ():
            stale.unlink(missing_ok=True)
            logger.info("resume: removed %s left by an interrupted write", stale.name)
        if not self.checkpoint_path.is_file():
            logger.info("resume: no checkpoint at %s, starting from scratch", self.checkpoint_path)
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        max_epochs = engine.state.max_epochs  # the resumed run's own length wins over the saved one
        for name, obj in self.save_dict.items():
            if name not in state and getattr(obj, "optional_in_checkpoint", False):
                logger.warning("resume: %s has no %r (an older checkpoint); continuing without it", self.checkpoint_path, name)
                continue
            if name not in state:
                raise KeyError(f"{self.checkpoint_path}: has no entry {name!r} (has {sorted(state)})")
            target = unwrap(obj) if name == "network" else obj
            target.load_state_dict(state[name])
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        if "rng" in state:
            set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d", self.checkpoint_path, engine.state.epoch)


class ModelFileLoader:
    """Attach to an evaluator: when it starts, replace its network with the model in ``model_path``.

    The bundle's ``network_def`` stays the architecture (what model-zoo's tools build, export and check
    without a weights file); the file, a checkpoint of any CPnet size, a Cellpose 3 file or an exported
    ``.ts``, is read only when the run starts, with :func:`~mmcs_monai.networks.load_model` (a bad file
    raises its ``ModelFileError``). Like MONAI's ``CheckpointLoader``, but the file decides the architecture.
    """

    def __init__(self, model_path: str | Path, device: torch.device | str = "cpu") -> None:
        self.model_path = Path(model_path)
        self.device = torch.device(device)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.network = load_model(self.model_path, map_location=self.device).eval()
        logger.info("model: %s", self.model_path)


class SyncBuffersHandler:
    """Under DDP, give every rank rank 0's buffers (batch-norm statistics) after each iteration.

    Parameters are kept identical by DDP's gradient all-reduce; running statistics are updated by each
    rank's own batch, and DDP only overwrites them at the next forward. Runs right after the optimizer
    step (MONAI's ``MODEL_COMPLETED``), before any ``ITERATION_COMPLETED`` handler such as the EMA
    teacher, which copies the buffers. No-op in a single process.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        broadcast_buffers(unwrap(self.network))


class BestModelSaver:
    """Attach to an evaluator: write the network to ``save_path`` whenever ``metric_name`` improves.

    Stateful (``state_dict``/``load_state_dict``) so a resumed run keeps the best value seen.
    """

    def __init__(self, network: torch.nn.Module, save_path: str, metric_name: str = "val_f1") -> None:
        self.network = network
        self.save_path = Path(save_path)
        self.metric_name = metric_name
        self.best = -float("inf")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if value > self.best:  # the metric is reduced over ranks, so every rank agrees; rank 0 writes
            self.best = value
            if is_main_process():
                save_atomic(unwrap(self.network).state_dict(), self.save_path)
                logger.info("new best %s %.4f: saved %s", self.metric_name, value, self.save_path)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.best = float(state["best"])


class TrainingDiameterHandler:
    """At the start of training, store the training set's diameters in the network.

    The overall mean becomes ``diam_labels`` (inference's default diameter, as in Cellpose) and the
    per-subset means the network's ``subset_diameters`` table (inference can pick one by name).

    Args:
        network: the CPnet (or a DDP/DataParallel wrapper of it).
        datalist: labelled items; measured with :func:`mmcs_monai.diameters.datalist_diameters`.
        diameters: ``(mean, {subset: mean})`` already measured (skips reading the labels again).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        datalist: list[Mapping[str, Any]] | None = None,
        diameters: tuple[float, Mapping[str, float]] | None = None,
    ) -> None:
        if datalist is None and diameters is None:
            raise ValueError("give the training datalist or its measured diameters")
        self.network = network
        self.datalist = datalist
        self.diameters = diameters

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        mean, subsets = self.diameters if self.diameters is not None else datalist_diameters(self.datalist)
        net = unwrap(self.network)
        if mean > 0:
            net.set_diam_labels(mean)
        net.set_subset_diameters(subsets)
        table = ", ".join(f"{name} {d:.1f}" for name, d in subsets.items())
        logger.info("training cell diameters (px): mean %.2f; per subset: %s", mean, table or "none")


class LearningRateLogger:
    """Write the optimizer's learning rate to TensorBoard (``lr``) at the end of every epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, summary_writer, tag: str = "lr") -> None:
        self.optimizer = optimizer
        self.writer = summary_writer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)


def used_diameter(pred: Any) -> float | str:
    """The diameter (pixels, rounded to 0.1) an engine output ``pred`` was segmented at, or ``""`` when it carries none."""
    value = getattr(pred, "meta", {}).get(CELL_DIAMETER_KEY) if pred is not None else None
    return "" if value is None else round(float(value), 1)


def dataset_size(engine: Engine) -> int | None:
    """Number of items in the engine's data loader's data set (None when it has no length)."""
    try:
        return len(engine.state.dataloader.dataset)
    except (AttributeError, TypeError):
        return None


def megapixels_of(masks: torch.Tensor) -> float:
    """Megapixels of an image's masks (its last two dimensions)."""
    return masks.shape[-1] * masks.shape[-2] / 1e6 if masks.ndim >= 2 else 0.0


class SegmentationReport:
    """Attach to an inference evaluator: progress, one line per image, a summary CSV and a summary line.

    - Progress (:class:`~mmcs_monai.reporting.Progress`): on a terminal a bar (count, rate, ETA);
      otherwise the per-image log lines carry the count, the rate and the ETA
      (``[12/48] img_7: 231 cells at diameter 17.4 px, 2.1 s/image, ETA 40 s``), so CI and log files
      show progress too.
    - ``segmentation_summary.csv`` (id, image, cells, diameter_px) in ``output_dir`` when the run ends,
      atomically (rows of images done earlier and skipped now are kept; under ``torchrun`` rank 0 writes
      the rows of every rank).
    - A summary line at the end: images done / skipped / bad, cells found, the diameters used, time and
      s/MPix, where the outputs are, and the model (file and SHA-256 prefix).

    Args:
        output_dir: destination folder.
        model_path: the model file used (named in the summary).
        images_total: how many images the input held (the difference to this run's and the bad ones is
            "skipped": their masks were already there).
        bad_samples: the run's :class:`~mmcs_monai.data.BadSampleLog` (counted in the summary).
        progress: show progress (bar or counted lines).
        masks_key / pred_key: keys of the instance masks and of the inferer's output in the engine output.
    """

    def __init__(
        self,
        output_dir: str,
        model_path: str | None = None,
        images_total: int | None = None,
        bad_samples: Any = None,
        progress: bool = True,
        masks_key: str = "masks",
        pred_key: str = "pred",
    ):
        self.output_dir = Path(output_dir)
        self.model_path = model_path
        self.images_total = images_total
        self.bad_samples = bad_samples
        self.progress = progress
        self.masks_key, self.pred_key = masks_key, pred_key
        self.rows: dict[str, dict[str, Any]] = {}
        self.done: list[dict[str, Any]] = []
        self.megapixels = 0.0
        self._progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.rows = read_segmentation_summary(self.output_dir / SEGMENTATION_SUMMARY)
        self.done, self.megapixels = [], 0.0
        self._progress = Progress(dataset_size(engine), "segmenting", "image", logger, enabled=self.progress)

    def record(self, engine: Engine) -> None:
        for out, item in zip(engine.state.output, engine.state.batch):
            masks = torch.as_tensor(out[self.masks_key])
            row = {
                "id": str(item.get("id", len(self.rows))),
                "image": item.get("image_file") if isinstance(item.get("image_file"), str) else "",
                "cells": int(masks.max()) if masks.numel() else 0,
                "diameter_px": used_diameter(out.get(self.pred_key)),
            }
            self.rows[row["id"]] = row
            self.done.append(row)
            self.megapixels += megapixels_of(masks)
            self._progress.step(f"{row['id']}: {row['cells']} cells at diameter {row['diameter_px']} px")

    def write(self, engine: Engine) -> None:
        self._progress.close()
        # each rank segmented its share: rank 0 writes them all
        done = [row for rows in all_gather_objects(self.done) for row in rows]
        for rows in all_gather_objects(self.rows):
            self.rows.update(rows)
        megapixels = sum(all_gather_objects(self.megapixels))
        if is_main_process():
            write_segmentation_summary(self.output_dir / SEGMENTATION_SUMMARY, self.rows.values())
            logger.info(self.summary(done, megapixels, self._progress.elapsed))

    def summary(self, done: list[dict[str, Any]], megapixels: float, seconds: float) -> str:
        """The run's one-line summary (see the class docstring)."""
        bad = len(getattr(self.bad_samples, "entries", []) or [])
        skipped = max(0, self.images_total - len(done) - bad) if self.images_total is not None else 0
        parts = [f"{len(done)} image(s) segmented, {skipped} skipped (masks already there), {bad} bad"]
        if bad:
            parts[-1] += f" (see {self.output_dir / 'bad_samples.csv'})"
        parts.append(f"{sum(r['cells'] for r in done)} cells")
        parts.append(diameter_note(r["diameter_px"] for r in done))
        parts.append(timing_note(seconds, megapixels))
        parts.append(f"outputs in {self.output_dir}")
        if self.model_path:
            parts.append(model_note(self.model_path))
        return "; ".join(p for p in parts if p)


class F1ReportHandler:
    """Attach to an evaluator: per-image F1 with its subset, written as CSV and summarised per subset.

    Writes ``f1_per_image.csv`` (id, subset, f1, precision, recall, tp, fp, fn, diameter_px: the cell diameter
    the image was segmented at, empty when the inferer does not report it, and cells: the cells found) and
    ``f1_summary.json`` (overall and per subset: mean per-image F1, number of images) into
    ``output_dir`` at the end of the run, atomically, and logs the summary table. While it runs it shows
    progress (:class:`~mmcs_monai.reporting.Progress`: a bar on a terminal, counted lines otherwise); at the
    end a summary line: images scored and bad, the overall F1, cells found, the diameters used, time and
    s/MPix, where the outputs are and the model (file and SHA-256 prefix).

    Args:
        output_dir: destination folder.
        border: drop cells touching a frame this wide (CellSeg protocol: 2).
        masks_key / label_key: keys of predicted and true instance masks in the engine output.
        pred_key: key of the inferer's output (its ``cell_diameter`` meta is the diameter used).
        model_path: the model file scored (named in the summary line).
        bad_samples: the run's :class:`~mmcs_monai.data.BadSampleLog` (counted in the summary line).
        progress: show progress.
    """

    COLUMNS = ["id", "subset", "f1", "precision", "recall", "tp", "fp", "fn", "diameter_px", "cells"]

    def __init__(
        self,
        output_dir: str,
        border: int = 2,
        iou_threshold: float = 0.5,
        masks_key="masks",
        label_key="label",
        pred_key="pred",
        model_path: str | None = None,
        bad_samples: Any = None,
        progress: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.border = border
        self.iou_threshold = iou_threshold
        self.masks_key, self.label_key, self.pred_key = masks_key, label_key, pred_key
        self.model_path = model_path
        self.bad_samples = bad_samples
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self.megapixels = 0.0
        self._progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.rows.clear()
        self.megapixels = 0.0
        self._progress = Progress(dataset_size(engine), "scoring", "image", logger, enabled=self.progress)

    def record(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        for out, item in zip(outputs, batch):
            gt = np.asarray(torch.as_tensor(out[self.label_key]).cpu())
            masks = torch.as_tensor(out[self.masks_key]).cpu()
            score = f1_score(gt.squeeze(), np.asarray(masks).squeeze(), self.iou_threshold, self.border)
            row = {"id": item.get("id", len(self.rows)), "subset": item.get("subset", "default")}
            row.update({k: score[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")})
            row["diameter_px"] = used_diameter(out.get(self.pred_key))
            row["cells"] = int(masks.max()) if masks.numel() else 0
            self.rows.append(row)
            self.megapixels += megapixels_of(masks)
            if self._progress is not None:
                self._progress.step(f"{row['id']}: F1 {row['f1']:.3f}, {row['cells']} cells at diameter {row['diameter_px']} px")

    def summary(self) -> dict[str, dict[str, float]]:
        """{"overall": {...}, subset: {...}} with mean per-image F1 and the number of images."""
        groups: dict[str, list[float]] = {"overall": [r["f1"] for r in self.rows]}
        for r in self.rows:
            groups.setdefault(str(r["subset"]), []).append(r["f1"])
        return {name: {"f1": float(np.mean(v)) if v else float("nan"), "images": len(v)} for name, v in groups.items()}

    def summary_line(self, seconds: float) -> str:
        """The run's one-line summary (see the class docstring)."""
        bad = len(getattr(self.bad_samples, "entries", []) or [])
        overall = self.summary()["overall"]["f1"]
        parts = [f"{len(self.rows)} image(s) scored, {bad} bad", f"F1@{self.iou_threshold:g} {overall:.3f}"]
        parts.append(f"{sum(r['cells'] for r in self.rows)} cells")
        parts.append(diameter_note(r["diameter_px"] for r in self.rows))
        parts.append(timing_note(seconds, self.megapixels))
        parts.append(f"outputs {self.output_dir / 'f1_per_image.csv'}, {self.output_dir / 'f1_summary.json'}")
        if self.model_path:
            parts.append(model_note(self.model_path))
        return "; ".join(p for p in parts if p)

    def write(self, engine: Engine) -> None:
        seconds = self._progress.elapsed if self._progress is not None else 0.0
        if self._progress is not None:
            self._progress.close()
        summary = self.summary()
        with atomic_path(self.output_dir / "f1_per_image.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)
        with atomic_path(self.output_dir / "f1_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        lines = [f"{'subset':<48} {'images':>6} {'F1@0.5':>7}"]
        lines += [f"{name:<48} {s['images']:>6} {s['f1']:>7.3f}" for name, s in summary.items()]
        logger.info("F1 at IoU 0.5 (border %d px removed):\n%s", self.border, "\n".join(lines))
        logger.info(self.summary_line(seconds))


class TrainingReport:
    """Attach to a trainer: the run's summary line when it completes.

    ``training: 2 epoch(s), 6 iterations, 41.0 s (20.5 s/epoch); best validation F1 0.712; models in
    bundle/trained (model.pt, model_final.pt, checkpoint.pt); TensorBoard logs in bundle/eval; started from
    model X (sha256 ...) | from scratch; 0 bad sample(s)``. Attach it after the checkpoint handler, so the
    files it names are written when it reports. Progress while training is the bundle's ``ProgressBar``
    (a terminal) and ``StatsHandler``'s loss lines.

    Args:
        ckpt_dir: where the models and the checkpoint go.
        output_dir: TensorBoard logs.
        pretrained: the model file training started from (None: from scratch).
        best_model: the run's :class:`BestModelSaver` (its best validation value is reported).
        bad_samples: the run's :class:`~mmcs_monai.data.BadSampleLog`.
    """

    def __init__(self, ckpt_dir: str, output_dir: str | None = None, pretrained: str | None = None, best_model=None, bad_samples=None):
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = output_dir
        self.pretrained = pretrained
        self.best_model = best_model
        self.bad_samples = bad_samples
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.COMPLETED, self)

    def start(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def summary(self, epochs: int, iterations: int, seconds: float) -> str:
        """The run's one-line summary (see the class docstring)."""
        per_epoch = f" ({seconds / epochs:.1f} s/epoch)" if epochs else ""
        parts = [f"training: {epochs} epoch(s), {iterations} iterations, {seconds:.1f} s{per_epoch}"]
        best = getattr(self.best_model, "best", -float("inf"))
        parts.append(f"best validation F1 {best:.3f}" if best > -float("inf") else "no validation ran (model.pt is the final model)")
        written = [name for name in ("model.pt", "model_final.pt", "checkpoint.pt") if (self.ckpt_dir / name).is_file()]
        parts.append(f"models in {self.ckpt_dir} ({', '.join(written)})")
        if self.output_dir:
            parts.append(f"TensorBoard logs in {self.output_dir}")
        parts.append(f"started from {model_note(self.pretrained)}" if self.pretrained else "started from scratch")
        parts.append(f"{len(getattr(self.bad_samples, 'entries', []) or [])} bad sample(s)")
        return "; ".join(parts)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            logger.info(self.summary(engine.state.epoch, engine.state.iteration, time.perf_counter() - self._start))


class TimeBudgetHandler:
    """Stop training cleanly once ``minutes`` of wall time have passed since the run started.

    The trainer then completes as usual (final checkpoint and model written, ``COMPLETED`` handlers
    run), which makes same-budget comparisons and "train for the night" runs possible. None or
    a value <= 0 disables it.
    """

    def __init__(self, minutes: float | None = None) -> None:
        self.minutes = minutes
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        if self.minutes and self.minutes > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def __call__(self, engine: Engine) -> None:
        if time.monotonic() - self._start > self.minutes * 60:
            logger.info("time budget of %.1f min reached at epoch %d: stopping", self.minutes, engine.state.epoch)
            engine.terminate()


class BadSampleReport:
    """At the end of a run (finished, stopped or failed), log the bad samples skipped and write them as CSV.

    Args:
        bad_samples: the :class:`mmcs_monai.data.BadSampleLog` the data sets record into.
        output_dir: where ``bad_samples.csv`` goes (only written when there were any).
    """

    def __init__(self, bad_samples, output_dir: str | Path | None = None) -> None:
        self.bad_samples = bad_samples
        self.output_dir = Path(output_dir) if output_dir else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        self(engine)
        raise error

    def __call__(self, engine: Engine) -> None:
        if not self.bad_samples.entries:
            logger.info("bad samples: none")
            return
        logger.warning(self.bad_samples.summary())
        if self.output_dir is not None and is_main_process():
            self.bad_samples.write_csv(self.output_dir / "bad_samples.csv")
