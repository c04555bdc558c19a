"""Semi-supervised phase (MMCS): a mean teacher, temporally ensembled pseudo labels, mixed batches.

How the pieces fit (wired in ``bundle/configs/semi.json``):

- the teacher is an exponential moving average of the student (ignite's ``EMAHandler``);
- :class:`PseudoLabelStore` keeps, for every unlabelled image, an exponential average of the
  teacher's predictions at the image's own size (dY, dX as unit flows, cell probability), bias
  corrected like Adam/temporal ensembling: ``target = Z / (1 - alpha**t)``;
- :class:`PseudoLabelRefresher` fills the store from the pretrained model at the start and adds the
  teacher's predictions every ``interval`` epochs;
- with a ``start_epoch`` (``semi_start_epoch`` in the configs) the first epochs are supervised only
  ("labels first": no unlabelled batches, ``w`` = 0); at that epoch the teacher is reset to the
  student, which has now learnt from the labels, and the store is filled from it. Fine-tuning on a
  modality the pretrained model does not segment needs this: pseudo labels made by that model teach
  its mistakes;
- :class:`MixedBatchLoader` makes each training batch of labelled samples plus unlabelled samples
  (their pseudo targets warped by the same random transform as the image, see
  ``transforms.AttachPseudoTargetd``), with a per-sample ``labelled`` flag;
- ``losses.SemiSupervisedLoss`` computes ``(1 - w) * L(labelled) + w * L(unlabelled)``;
  :class:`UnlabelledWeightHandler` ramps ``w`` and logs both terms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from skimage.segmentation import find_boundaries

from mmcs_monai.distributed import all_gather_objects, set_sampler_epoch, shard
from mmcs_monai.engines.utils import unwrap
from mmcs_monai.flows import FLOW_SCALE, flows_to_masks

logger = logging.getLogger(__name__)


class PseudoLabelStore:
    """Temporal ensemble of teacher predictions for each unlabelled image, kept in memory as float16.

    Each entry holds ``Z`` float16 [3, H, W] at the image's own size: (dY, dX) as unit-scale flows
    (network output / 5) and the cell probability (sigmoid of the logit); ``count`` (updates so far);
    and ``diameter``, the cell diameter (pixels) the prediction was made at, which the training
    transform uses to resize the image and its target together.

    Args:
        alpha: ensemble momentum: ``Z <- alpha * Z + (1 - alpha) * prediction``.
    """

    def __init__(self, alpha: float = 0.6) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.entries: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def update(self, key: str, prediction: torch.Tensor, diameter: float) -> None:
        """Add a prediction [3, H, W] float (dY, dX unit scale, cell probability) for image ``key``."""
        prediction = torch.as_tensor(prediction, dtype=torch.float32).cpu()
        entry = self.entries.get(key)
        if entry is None or tuple(entry["Z"].shape) != tuple(prediction.shape):
            entry = {"Z": torch.zeros_like(prediction), "count": 0}
        z = entry["Z"].float() * self.alpha + (1 - self.alpha) * prediction
        self.entries[key] = {"Z": z.to(torch.float16), "count": entry["count"] + 1, "diameter": float(diameter)}

    def target(self, key: str) -> torch.Tensor:
        """Bias-corrected ensemble [3, H, W] float32 for image ``key``."""
        entry = self.entries[key]
        return entry["Z"].float() / (1 - self.alpha ** entry["count"])

    def diameter(self, key: str) -> float:
        return self.entries[key]["diameter"]

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "entries": self.entries}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self.entries = dict(state["entries"])


def prediction_to_pseudo(pred: torch.Tensor) -> torch.Tensor:
    """Network output [3, H, W] (5x flows, logit) -> pseudo target [3, H, W] (unit flows, probability)."""
    return torch.cat([pred[:2] / FLOW_SCALE, torch.sigmoid(pred[2:3])])


class PseudoLabelRefresher:
    """Fill the :class:`PseudoLabelStore` from a network's predictions on the unlabelled images.

    At the start of training an empty store is filled from ``initial_network`` (the pretrained
    student); then every ``interval`` epochs the ``teacher`` predicts every unlabelled image again
    and the predictions are added to the ensemble.

    With ``start_epoch`` > 0 nothing is predicted before the end of that epoch; then the teacher is
    reset to the student's weights (the EMA restarts from the model fine-tuned on the labels), the
    store is emptied and filled from it, and refreshes follow every ``interval`` epochs after that.

    Args:
        store: the store to fill.
        teacher: the EMA teacher network.
        initial_network: the network whose predictions start the store (the student at epoch 0).
        dataset: deterministic dataset of the unlabelled images (items with ``id`` and a
            preprocessed ``image`` [2, H, W]).
        inferer: a ``CellInferer``; its diameter (else the teacher's ``diam_labels``) sets the scale.
        interval: epochs between refreshes.
        summary_writer: optional TensorBoard writer for a pseudo-mask panel of the first image.
        start_epoch: supervised epochs before the first pseudo labels (0: from the start).
        keep_diameters: an image already in the store is predicted again at the diameter (pixels) it was
            first predicted at, so the ensemble averages predictions made at one scale and only an image's
            first prediction pays for the inferer's ``auto`` search (the costly part on a large pool).
            False: every refresh uses the inferer's diameter again.
    """

    def __init__(
        self,
        store: PseudoLabelStore,
        teacher: torch.nn.Module,
        initial_network: torch.nn.Module,
        dataset: Sequence[Mapping[str, Any]],
        inferer,
        interval: int = 100,
        summary_writer=None,
        start_epoch: int = 0,
        keep_diameters: bool = True,
    ) -> None:
        if interval < 1 or start_epoch < 0:
            raise ValueError(f"interval must be >= 1 and start_epoch >= 0, got {interval} and {start_epoch}")
        self.store = store
        self.teacher = teacher
        self.initial_network = initial_network
        self.dataset = dataset
        self.inferer = inferer
        self.interval = interval
        self.writer = summary_writer
        self.start_epoch = start_epoch
        self.keep_diameters = keep_diameters
        self.predicted_ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.fill_if_empty)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def fill_if_empty(self, engine: Engine) -> None:
        """At the start (or on resuming) of a run whose semi-supervised part has begun: fill an empty store."""
        if len(self.store) or engine.state.epoch < self.start_epoch:
            return
        if self.start_epoch == 0:
            self.predict_all(self.initial_network, engine)
        elif engine.state.epoch == self.start_epoch:  # resumed from the checkpoint of the last supervised epoch
            self.start_from_student(engine)
        else:  # resumed past the start from a checkpoint without a store
            self.refresh(engine)

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self.start_epoch and epoch == self.start_epoch:
            self.start_from_student(engine)
        elif epoch > self.start_epoch and (epoch - self.start_epoch) % self.interval == 0:
            self.refresh(engine)

    def start_from_student(self, engine: Engine | None = None) -> None:
        """Labels first, then pseudo labels: the teacher becomes a copy of the student, the store starts afresh from it."""
        self.teacher.load_state_dict(unwrap(self.initial_network).state_dict())
        self.store.entries.clear()
        logger.info("supervised epochs done: the teacher restarts from the student for the pseudo labels")
        self.refresh(engine)

    def refresh(self, engine: Engine | None = None) -> None:
        # The teacher copied the student's diameters when it was made, before training measured
        # them; keep them in step.
        student = unwrap(self.initial_network)
        for name in ("diam_mean", "diam_labels"):
            getattr(self.teacher, name).data.copy_(getattr(student, name).data)
        if hasattr(student, "subset_diameters"):
            self.teacher.set_subset_diameters(student.subset_diameters)
        self.predict_all(self.teacher, engine)

    def predict_all(self, network: torch.nn.Module, engine: Engine | None = None) -> None:
        network = unwrap(network)
        was_training = network.training
        network.eval()
        device = next(network.parameters()).device
        predictions = []
        self.predicted_ids = []  # this rank's share on the last refresh (every id under one process)
        try:
            # under torchrun each rank predicts its shard, then every rank gets all of them
            # (all-gather), so the stores stay identical without one rank writing for the others
            for index in shard(range(len(self.dataset))):
                item = self.dataset[index]
                image = torch.as_tensor(item["image"], dtype=torch.float32)[None].to(device)
                key = str(item["id"])
                # at the inferer's diameter (pixels, stored or auto), or where this image was first predicted
                first = self.store.diameter(key) if self.keep_diameters and key in self.store else None
                flows, used = self.inferer.predict(image, network, diameter=first)
                predictions.append((key, prediction_to_pseudo(flows[0].cpu()), used[0]))
                self.predicted_ids.append(key)
        finally:
            network.train(was_training)
        for part in all_gather_objects(predictions):
            for key, target, diameter in part:
                self.store.update(key, target, diameter)
        logger.info("pseudo labels refreshed for %d unlabelled images", len(self.dataset))
        if self.writer is not None and engine is not None and len(self.dataset):
            self._log_panel(engine)

    def _log_panel(self, engine: Engine) -> None:
        item = self.dataset[0]
        target = self.store.target(str(item["id"]))
        masks = flows_to_masks(FLOW_SCALE * target[:2], torch.logit(target[2].clamp(1e-4, 1 - 1e-4)))
        image = torch.as_tensor(item["image"])[0].clamp(0, 1)
        panel = image[None].repeat(3, 1, 1)
        edges = torch.as_tensor(find_boundaries(np.asarray(masks), mode="inner"))
        panel[0][edges], panel[1][edges], panel[2][edges] = 1.0, 0.0, 0.0
        self.writer.add_image("unlabelled/pseudo_masks", panel, engine.state.epoch)


class MixedBatchLoader:
    """Iterate labelled batches, each joined with the next unlabelled batch (cycled).

    One epoch is one pass over the labelled loader (as in the supervised phase); the unlabelled
    loader starts a new (reshuffled) pass at every epoch and whenever it runs out, so an epoch
    depends on nothing but the RNG state at its start and a resumed run draws what the
    uninterrupted one draws. Stateful (``state_dict``: the epoch count that distributed samplers
    are told), so it can sit in the checkpoint. Each joined batch has the keys of both (``image``,
    ``flows``) concatenated along the batch axis, and ``labelled`` float [B] (1 labelled, 0 not).

    Args:
        labelled: loader of labelled batches (dicts with ``image`` and ``flows``).
        unlabelled: loader of unlabelled batches with pseudo targets under ``flows``; None or an
            empty loader gives labelled batches alone.
        keys: keys to join.
        start_epoch: epochs of labelled batches alone before the unlabelled ones join (they would carry
            no weight: ``UnlabelledWeightHandler`` keeps ``w`` at 0 until then).
    """

    def __init__(
        self,
        labelled: Iterable,
        unlabelled: Iterable | None,
        keys: Sequence[str] = ("image", "flows"),
        start_epoch: int = 0,
    ):
        self.labelled = labelled
        self.unlabelled = unlabelled
        self.keys = tuple(keys)
        self.start_epoch = start_epoch
        self._unlabelled_iter: Iterator | None = None
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.labelled)  # type: ignore[arg-type]

    def _next_unlabelled(self):
        if self.unlabelled is None:
            return None
        for _ in range(2):
            if self._unlabelled_iter is None:
                self._unlabelled_iter = iter(self.unlabelled)
            try:
                return next(self._unlabelled_iter)
            except StopIteration:
                self._unlabelled_iter = None
        return None  # an empty unlabelled set

    optional_in_checkpoint = True  # checkpoints written before it was saved still resume

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._epoch = int(state["epoch"])

    def __iter__(self):
        # distributed samplers reshuffle per epoch only when told the epoch (one pass = one epoch)
        self._epoch += 1
        self._unlabelled_iter = None
        set_sampler_epoch(self.labelled, self._epoch)
        set_sampler_epoch(self.unlabelled, self._epoch)
        mixed = self._epoch > self.start_epoch
        for lab in self.labelled:
            n_lab = len(lab[self.keys[0]])
            unlab = self._next_unlabelled() if mixed else None
            if unlab is None:
                batch = {k: lab[k] for k in self.keys}
                batch["labelled"] = torch.ones(n_lab)
            else:
                batch = {k: torch.cat([torch.as_tensor(lab[k]), torch.as_tensor(unlab[k])]) for k in self.keys}
                batch["labelled"] = torch.cat([torch.ones(n_lab), torch.zeros(len(unlab[self.keys[0]]))])
            yield batch


def sigmoid_rampup(epoch: int, rampup_epochs: int) -> float:
    """exp(-5 (1 - t)^2) for t = epoch / rampup_epochs in [0, 1] (Laine & Aila); 1 without ramp-up."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(epoch / rampup_epochs, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class UnlabelledWeightHandler:
    """Set the loss's unlabelled weight each epoch; log w and both loss terms.

    ``w = 0`` for the first ``start_epoch`` epochs, then ``w = w_max * rampup(epoch - start_epoch)``
    (epochs counted from 0).

    Args:
        loss: a ``SemiSupervisedLoss`` (its ``w`` is set; its ``last_terms`` are logged).
        w_max: the weight after ramp-up (paper: 0.4 without extra data, 0.05 with it).
        rampup_epochs: epochs of sigmoid ramp-up (0: constant).
        summary_writer: TensorBoard writer (optional).
        start_epoch: supervised epochs before the unlabelled term counts.
    """

    def __init__(self, loss, w_max: float = 0.4, rampup_epochs: int = 0, summary_writer=None, start_epoch: int = 0) -> None:
        self.loss = loss
        self.w_max = w_max
        self.rampup_epochs = rampup_epochs
        self.writer = summary_writer
        self.start_epoch = start_epoch

    def weight(self, epoch: int) -> float:
        """The unlabelled weight of epoch ``epoch`` (counted from 0)."""
        if epoch < self.start_epoch:
            return 0.0
        return self.w_max * sigmoid_rampup(epoch - self.start_epoch, self.rampup_epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.set_weight)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.log_terms)

    def set_weight(self, engine: Engine) -> None:
        self.loss.w = self.weight(engine.state.epoch - 1)
        if self.writer is not None:
            self.writer.add_scalar("w_unlabelled", self.loss.w, engine.state.epoch)

    def log_terms(self, engine: Engine) -> None:
        if self.writer is None:
            return
        for name, value in self.loss.last_terms.items():
            self.writer.add_scalar(f"loss_{name}", value, engine.state.iteration)
