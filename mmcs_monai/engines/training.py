"""Training-time handlers: batch-norm buffers under DDP, the training diameter, the learning rate in
TensorBoard, a wall-time budget, and the bad samples a run skipped."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from mmcs_monai.diameters import datalist_diameters
from mmcs_monai.distributed import broadcast_buffers, is_main_process
from mmcs_monai.engines.utils import unwrap

logger = logging.getLogger(__name__)


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
