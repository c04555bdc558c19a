"""Run reports: progress, per-image rows, output files and one summary line for inference and evaluation
runs (:class:`SegmentationReport`, :class:`F1ReportHandler`, both on :class:`ImageRunReport`), and the
training run's summary line (:class:`TrainingReport`)."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from mmcs_monai.cells import SEGMENTATION_SUMMARY, read_segmentation_summary, write_segmentation_summary
from mmcs_monai.distributed import all_gather_objects, is_main_process
from mmcs_monai.inference import CELL_DIAMETER_KEY
from mmcs_monai.io import atomic_path
from mmcs_monai.metrics import f1_score
from mmcs_monai.reporting import Progress, diameter_note, model_note, timing_note

logger = logging.getLogger(__name__)


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


def bad_count(bad_samples: Any) -> int:
    """Entries of a :class:`~mmcs_monai.data.BadSampleLog` (0 for None)."""
    return len(getattr(bad_samples, "entries", []) or [])


class ImageRunReport:
    """The skeleton of an evaluator's per-image report; subclasses say what a row holds and what is written.

    Attached to an engine it shows progress (:class:`~mmcs_monai.reporting.Progress`: a bar on a terminal,
    counted lines otherwise) with one line per image (``<id>: [note, ]<cells> cells at diameter <d> px``),
    collects one row per image (:meth:`row`, plus ``cells`` and ``diameter_px``) in :attr:`done` and the
    megapixels segmented, and at the end calls :meth:`finish` with the run's seconds.
    :meth:`summary_of` joins a summary line's common parts: cells, diameters used, time and s/MPix, outputs
    and the model.

    Args:
        output_dir: destination folder.
        model_path: the model file used (named in the summary line).
        bad_samples: the run's :class:`~mmcs_monai.data.BadSampleLog` (counted in the summary line).
        progress: show progress.
        masks_key / pred_key: keys of the instance masks and of the inferer's output (its ``cell_diameter``
            meta is the diameter used) in the engine output.
    """

    progress_label = "processing"

    def __init__(
        self,
        output_dir: str,
        model_path: str | None = None,
        bad_samples: Any = None,
        progress: bool = True,
        masks_key: str = "masks",
        pred_key: str = "pred",
    ):
        self.output_dir = Path(output_dir)
        self.model_path = model_path
        self.bad_samples = bad_samples
        self.progress = progress
        self.masks_key, self.pred_key = masks_key, pred_key
        self.done: list[dict[str, Any]] = []
        self.megapixels = 0.0
        self._progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.done, self.megapixels = [], 0.0
        self._progress = Progress(dataset_size(engine), self.progress_label, "image", logger, enabled=self.progress)

    def row(self, out: dict[str, Any], item: dict[str, Any], masks: torch.Tensor) -> dict[str, Any]:
        """The row of one image (``cells`` and ``diameter_px`` are added to it)."""
        raise NotImplementedError

    def note(self, row: dict[str, Any]) -> str:
        """What the progress line says before the cells (e.g. ``"F1 0.812, "``)."""
        return ""

    def recorded(self, row: dict[str, Any]) -> None:
        """Called with each finished row."""

    def record(self, engine: Engine) -> None:
        for out, item in zip(engine.state.output, engine.state.batch):
            masks = torch.as_tensor(out[self.masks_key])
            row = self.row(out, item, masks)
            row["cells"] = int(masks.max()) if masks.numel() else 0
            row["diameter_px"] = used_diameter(out.get(self.pred_key))
            if isinstance(item, dict) and "pixel_size_um" in item:  # inference items (DiameterInPixelsd) carry it
                size = float(item["pixel_size_um"])
                size = size if size == size else None
                row["pixel_size_um"] = round(size, 6) if size else ""
                row["diameter_um"] = round(row["diameter_px"] * size, 2) if size and row["diameter_px"] != "" else ""
            self.recorded(row)
            self.done.append(row)
            self.megapixels += megapixels_of(masks)
            if self._progress is not None:
                micrometres = f" ({row['diameter_um']} µm)" if row.get("diameter_um") not in ("", None) else ""
                self._progress.step(f"{row['id']}: {self.note(row)}{row['cells']} cells at diameter {row['diameter_px']} px{micrometres}")

    def write(self, engine: Engine) -> None:
        seconds = self._progress.elapsed if self._progress is not None else 0.0
        if self._progress is not None:
            self._progress.close()
        self.finish(seconds)

    def finish(self, seconds: float) -> None:
        """Write the outputs and log the summary line, at the end of a run of ``seconds``."""
        raise NotImplementedError

    def summary_of(self, head: list[str], rows: Iterable[dict[str, Any]], megapixels: float, seconds: float, outputs: str) -> str:
        """``head``, then the cells found in ``rows``, their diameters, the timing, ``outputs`` and the model, joined by "; "."""
        rows = list(rows)
        parts = [*head, f"{sum(r['cells'] for r in rows)} cells", diameter_note(r["diameter_px"] for r in rows)]
        micrometres = [r["diameter_um"] for r in rows if r.get("diameter_um") not in ("", None)]
        if micrometres:
            low, high = min(micrometres), max(micrometres)
            parts[-1] += f" ({low:.1f} µm)" if high - low < 0.05 else f" ({low:.1f}-{high:.1f} µm)"
        parts += [timing_note(seconds, megapixels), outputs, model_note(self.model_path) if self.model_path else ""]
        return "; ".join(p for p in parts if p)


class SegmentationReport(ImageRunReport):
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

    progress_label = "segmenting"

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
        super().__init__(output_dir, model_path, bad_samples, progress, masks_key, pred_key)
        self.images_total = images_total
        self.rows: dict[str, dict[str, Any]] = {}

    def start(self, engine: Engine) -> None:
        self.rows = read_segmentation_summary(self.output_dir / SEGMENTATION_SUMMARY)
        super().start(engine)

    def row(self, out: dict[str, Any], item: dict[str, Any], masks: torch.Tensor) -> dict[str, Any]:
        image = item.get("image_file")
        return {"id": str(item.get("id", len(self.rows))), "image": image if isinstance(image, str) else ""}

    def recorded(self, row: dict[str, Any]) -> None:
        self.rows[row["id"]] = row

    def finish(self, seconds: float) -> None:
        # each rank segmented its share: rank 0 writes them all
        done = [row for rows in all_gather_objects(self.done) for row in rows]
        for rows in all_gather_objects(self.rows):
            self.rows.update(rows)
        megapixels = sum(all_gather_objects(self.megapixels))
        if is_main_process():
            write_segmentation_summary(self.output_dir / SEGMENTATION_SUMMARY, self.rows.values())
            logger.info(self.summary(done, megapixels, seconds))

    def summary(self, done: list[dict[str, Any]], megapixels: float, seconds: float) -> str:
        """The run's one-line summary (see the class docstring)."""
        bad = bad_count(self.bad_samples)
        skipped = max(0, self.images_total - len(done) - bad) if self.images_total is not None else 0
        head = f"{len(done)} image(s) segmented, {skipped} skipped (masks already there), {bad} bad"
        if bad:
            head += f" (see {self.output_dir / 'bad_samples.csv'})"
        return self.summary_of([head], done, megapixels, seconds, f"outputs in {self.output_dir}")


class F1ReportHandler(ImageRunReport):
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
    progress_label = "scoring"

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
        super().__init__(output_dir, model_path, bad_samples, progress, masks_key, pred_key)
        self.border = border
        self.iou_threshold = iou_threshold
        self.label_key = label_key

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows scored so far (this run's)."""
        return self.done

    def row(self, out: dict[str, Any], item: dict[str, Any], masks: torch.Tensor) -> dict[str, Any]:
        gt = np.asarray(torch.as_tensor(out[self.label_key]).cpu())
        score = f1_score(gt.squeeze(), np.asarray(masks.cpu()).squeeze(), self.iou_threshold, self.border)
        row = {"id": item.get("id", len(self.done)), "subset": item.get("subset", "default")}
        row.update({k: score[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")})
        return row

    def note(self, row: dict[str, Any]) -> str:
        return f"F1 {row['f1']:.3f}, "

    def summary(self) -> dict[str, dict[str, float]]:
        """{"overall": {...}, subset: {...}} with mean per-image F1 and the number of images."""
        groups: dict[str, list[float]] = {"overall": [r["f1"] for r in self.done]}
        for r in self.done:
            groups.setdefault(str(r["subset"]), []).append(r["f1"])
        return {name: {"f1": float(np.mean(v)) if v else float("nan"), "images": len(v)} for name, v in groups.items()}

    def summary_line(self, seconds: float) -> str:
        """The run's one-line summary (see the class docstring)."""
        head = [f"{len(self.done)} image(s) scored, {bad_count(self.bad_samples)} bad"]
        head.append(f"F1@{self.iou_threshold:g} {self.summary()['overall']['f1']:.3f}")
        outputs = f"outputs {self.output_dir / 'f1_per_image.csv'}, {self.output_dir / 'f1_summary.json'}"
        return self.summary_of(head, self.done, self.megapixels, seconds, outputs)

    def finish(self, seconds: float) -> None:
        summary = self.summary()
        with atomic_path(self.output_dir / "f1_per_image.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
                writer.writeheader()
                writer.writerows(self.done)
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
        parts.append(f"{bad_count(self.bad_samples)} bad sample(s)")
        return "; ".join(parts)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            logger.info(self.summary(engine.state.epoch, engine.state.iteration, time.perf_counter() - self._start))
