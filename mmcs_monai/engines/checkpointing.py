"""Checkpoints and resume: the whole training state saved atomically, the RNG and transform random states, the
best model by validation, and an evaluator's model read from a file when it starts."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

from mmcs_monai.distributed import is_main_process
from mmcs_monai.engines.utils import save_atomic, unwrap
from mmcs_monai.networks import load_model, size_network_file

logger = logging.getLogger(__name__)


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
        if getattr(engine.network, "size_network", None) is not None:
            logger.info("model: %s (auto searches sizes with %s)", self.model_path, size_network_file(self.model_path))
        else:
            logger.info("model: %s", self.model_path)


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
