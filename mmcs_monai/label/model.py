"""The model file a label server segments with, which training replaces while the server runs."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path

import torch

from mmcs_monai.distributed import local_device
from mmcs_monai.io import InputError, atomic_path
from mmcs_monai.networks import load_model, size_network_file

logger = logging.getLogger(__name__)


class ServedModel:
    """A model file (mmcs/Cellpose 3 checkpoint or exported ``.ts``), loaded again whenever it changes.

    Training runs in another process and replaces the file with :meth:`publish` (atomic rename), so a
    request either sees the old model or the new one, never a half-written file; the next request after
    the rename loads the new one.

    Args:
        path: the served file (``<app>/model/mmcs.pt`` by default).
        device: torch device (default :func:`~mmcs_monai.distributed.local_device`: the GPU if any, else the CPU).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None):
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else local_device()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._network: torch.nn.Module | None = None
        self._digest: tuple[tuple[int, int], str] | None = None

    @classmethod
    def install(cls, source: str | os.PathLike | None, model_dir: str | os.PathLike, device=None) -> ServedModel:
        """The served model in ``model_dir``: ``mmcs.pt`` (or ``mmcs.ts``), copied from ``source`` the first time, with
        the size network beside ``source`` (:func:`~mmcs_monai.networks.size_network_file`: ``size_mmcs.pt``), if any.

        A model already served there is kept (it may have been trained by this server), so restarting the
        server with the same ``--conf model`` does not undo training.

        Raises:
            InputError: no served model yet and ``source`` is missing.
        """
        model_dir = Path(model_dir)
        suffix = ".ts" if source and str(source).endswith(".ts") else ".pt"
        served = model_dir / f"mmcs{suffix}"
        if not served.is_file():
            if not source:
                raise InputError(
                    served, "no model to serve yet: start the server with --conf model PATH (an mmcs or Cellpose 3 checkpoint)"
                )
            if not Path(source).is_file():
                raise InputError(source, "model file not found (--conf model)")
            sizer = size_network_file(source)
            if suffix == ".pt" and sizer.is_file():  # before the model: a served model is complete once it exists
                with atomic_path(size_network_file(served)) as tmp:
                    shutil.copyfile(sizer, tmp)
            with atomic_path(served) as tmp:
                shutil.copyfile(source, tmp)
            logger.info("serving %s (copied from %s)", served, source)
        elif source:
            logger.info(
                "serving %s, kept from an earlier start (it may be trained); --conf model %s is not copied over it: delete %s to start from it",
                served,
                source,
                served,
            )
        return cls(served, device)

    def _file_stamp(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def network(self) -> torch.nn.Module:
        """The current network, in eval mode on the device (reloaded if the file changed since last call)."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp != self._stamp or self._network is None:
                self._network = load_model(self.path, map_location=self.device)
                self._stamp = stamp
                logger.info("loaded model %s (%s)", self.path, self.modified())
            return self._network

    def modified(self) -> str:
        """When the served file was last replaced (ISO time, seconds)."""
        return datetime.fromtimestamp(self.path.stat().st_mtime).isoformat(timespec="seconds")

    def sha256(self) -> str:
        """SHA-256 of the served file (computed once per version of the file)."""
        stamp = self._file_stamp()
        if self._digest is None or self._digest[0] != stamp:
            self._digest = (stamp, hashlib.sha256(self.path.read_bytes()).hexdigest())
        return self._digest[1]

    def describe(self) -> dict[str, str]:
        """File, last replacement time and SHA-256: which model answered a request."""
        return {"file": str(self.path), "modified": self.modified(), "sha256": self.sha256()}

    def publish(self, new_model: str | os.PathLike) -> Path:
        """Serve ``new_model`` from now on: the current file is kept as ``previous<suffix>``, then replaced atomically.

        The size network served with the old weights goes with them (``size_previous.pt``): trained weights search
        sizes with themselves, which have seen the new images (docs/usage.md, "Cell diameters").
        """
        previous = self.path.with_name(f"previous{self.path.suffix}")
        with atomic_path(previous) as tmp:
            shutil.copyfile(self.path, tmp)
        with atomic_path(self.path) as tmp:
            shutil.copyfile(new_model, tmp)
        sizer = size_network_file(self.path)
        if sizer.is_file():
            os.replace(sizer, size_network_file(previous))
        logger.info("published %s as %s (previous model kept as %s)", new_model, self.path, previous)
        return self.path
