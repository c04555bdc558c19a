"""Fine-tuning from the viewer: ``mmcs train`` in a child process at low priority, and what its output says.

The widget never trains in its own process: :func:`start_training` runs the command line itself
(``python -c "... cli.main(argv)" train --recipe finetune ...``, :func:`training_command`) with ``os.nice(19)``
and limited BLAS/OpenMP threads, so the viewer keeps its cores' attention. :class:`TrainingProgress` reads the
child's log lines (``Epoch: 3/40, Iter: ...``, ``Epoch[3] Metrics -- val_f1: 0.812``, the summary line and any
``mmcs: error:`` line); :func:`stop_training` ends the child and everything it started.

A run writes into its own folder (:func:`run_folder`): ``data/`` (the training set), ``unlabelled/`` (other open
images, when asked), ``model.pt`` (best validation F1: the model the widget then segments with), ``model_final.pt``,
``checkpoint.pt``, ``eval/`` (TensorBoard) and ``train.log`` (the child's output). The shipped model's folder is
refused as a destination, so the shipped file is never overwritten.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmcs_monai.io import InputError
from mmcs_monai.networks.model_files import is_torchscript_file
from mmcs_monai.workflows import bundle_recipes, default_bundle_root, shipped_model

# the recipes a run merges over train.json: supervised, and with the unlabelled images (semi-supervised phase)
RECIPE = "finetune"
SEMI_RECIPE = "finetune_semi"
# where runs go unless the user picks a folder
DEFAULT_RUNS = Path.home() / "mmcs-napari" / "models"
# the child runs the command line's own entry point, at the lowest priority
CHILD_CODE = "import os, sys; os.nice(19); from mmcs_monai import cli; cli.main(sys.argv[1:])"

_EPOCH = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")
_VAL_F1 = re.compile(r"Metrics -- .*?val_f1: ([0-9.]+)")
_SUMMARY = re.compile(r"training: (\d+) epoch\(s\), \d+ iterations")
_BEST = re.compile(r"best validation F1 ([0-9.]+)")
_ERROR = re.compile(r"mmcs: error: (.*)")
_BUDGET = re.compile(r"time budget of ([0-9.]+) min reached at epoch (\d+)")


def child_threads() -> int:
    """Torch/BLAS threads of the training child: all cores but one (the viewer's), at least 1."""
    return max(1, (os.cpu_count() or 2) - 1)


def child_environment(threads: int | None = None) -> dict[str, str]:
    """The child's environment: this one with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``threads`` (default
    :func:`child_threads`), unbuffered output, and this checkout's package first on ``PYTHONPATH``."""
    threads = threads or child_threads()
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=path)


def semi_recipe() -> str | list[str]:
    """The recipe of a fine-tune with unlabelled images: ``finetune_semi`` where the bundle ships it, else the same
    configs named one by one (the bundle's ``semi.json`` then ``finetune``)."""
    if SEMI_RECIPE in bundle_recipes():
        return SEMI_RECIPE
    return [str(default_bundle_root() / "configs" / "semi.json"), RECIPE]


def run_folder(parent: str | os.PathLike | None = None) -> Path:
    """A new folder for one run: ``<parent>/finetune-<date>-<time>`` (parent default ``~/mmcs-napari/models``).

    Raises:
        InputError: ``parent`` is the shipped model's folder.
    """
    parent = Path(parent).expanduser() if parent else DEFAULT_RUNS
    if parent.resolve() == shipped_model().parent.resolve():
        raise InputError(parent, "this folder holds the shipped model: choose another folder for fine-tuned models")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = parent / f"finetune-{stamp}", 1
    while folder.exists():
        n += 1
        folder = parent / f"finetune-{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def training_command(
    data_source: str | os.PathLike,
    pretrained: str | os.PathLike,
    run: str | os.PathLike,
    minutes: float,
    unlabelled: str | os.PathLike | None = None,
    nbase: Sequence[int] | None = None,
    diam_mean: float | None = None,
    epochs: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The child's command line: ``mmcs train --recipe finetune`` (``finetune_semi`` with ``unlabelled``, a data list
    or folder of images) from ``pretrained`` into ``run``, stopping after ``minutes``.

    Args:
        nbase, diam_mean: the architecture of ``pretrained`` (its channel widths; its training diameter, pixels), so
            a model of any CPnet size fine-tunes.
        epochs: overrides the recipe's number of epochs (None: the recipe's).
        extra: more ``--option value`` overrides, as ``mmcs train`` takes them.

    Raises:
        InputError: ``pretrained`` is a TorchScript export (it holds no trainable checkpoint).
    """
    if is_torchscript_file(pretrained):
        raise InputError(pretrained, "an exported TorchScript model cannot be fine-tuned: choose the checkpoint (.pt) it came from")
    run = Path(run)
    recipe = semi_recipe() if unlabelled else RECIPE
    argv = ["train", "--recipe", str(recipe), "--data_source", str(data_source), "--pretrained", str(pretrained)]
    argv += ["--ckpt_dir", str(run), "--output_dir", str(run / "eval"), "--time_budget_minutes", str(float(minutes))]
    if unlabelled:
        argv += ["--unlabelled_source", str(unlabelled)]
    if nbase is not None:
        argv += ["--nbase", str([int(n) for n in nbase]).replace(" ", "")]
    if diam_mean is not None:
        argv += ["--diam_mean", str(float(diam_mean))]
    if epochs:
        argv += ["--epochs", str(int(epochs))]
    return [sys.executable, "-c", CHILD_CODE, *argv, *map(str, extra)]


def start_training(command: Sequence[str], log: str | os.PathLike, threads: int | None = None) -> subprocess.Popen:
    """Start ``command`` (:func:`training_command`) as a child in its own session (so :func:`stop_training` ends it
    and whatever it starts), its output on a pipe (text, line by line) and copied to ``log`` by the reader."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=child_environment(threads),
        start_new_session=True,
    )


def stop_training(process: subprocess.Popen, grace: float = 5.0) -> int | None:
    """End the training child (SIGTERM to its process group, SIGKILL after ``grace`` seconds); returns its status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)
        except ProcessLookupError:
            pass
    return process.poll()


@dataclass
class TrainingProgress:
    """What the child's log lines said so far.

    Attributes:
        epoch, epochs: the last epoch started and the run's planned total (0 before the first).
        val_f1: validation F1 at IoU 0.5 per validated epoch, in order.
        best_f1: the best validation F1 of the summary line (None before it, or when nothing was validated).
        summary: the run's one-line summary (set when it completed).
        error: the ``mmcs: error:`` line's message, when it failed on a mistake.
        budget_reached: the time budget stopped it early.
        minutes: the time budget (for :meth:`percent`).
    """

    minutes: float = 0.0
    epoch: int = 0
    epochs: int = 0
    val_f1: list[float] = field(default_factory=list)
    best_f1: float | None = None
    summary: str | None = None
    error: str | None = None
    budget_reached: bool = False
    started: float = field(default_factory=time.monotonic)

    def read(self, line: str) -> bool:
        """Take one line of the child's output; True when it changed what :meth:`status` says."""
        if m := _EPOCH.search(line):
            self.epoch, self.epochs = int(m.group(1)), int(m.group(2))
        elif m := _VAL_F1.search(line):
            self.val_f1.append(float(m.group(1)))
        elif m := _SUMMARY.search(line):
            self.summary = line.split(" - INFO - ", 1)[-1].strip()
            self.epoch = int(m.group(1))
            best = _BEST.search(line)
            self.best_f1 = float(best.group(1)) if best else None
        elif m := _ERROR.search(line):
            self.error = m.group(1).strip()
        elif _BUDGET.search(line):
            self.budget_reached = True
        else:
            return False
        return True

    def percent(self) -> int:
        """Done so far (0-100): the larger of the epochs' share and the time budget's."""
        by_epochs = 100.0 * max(self.epoch - 1, 0) / self.epochs if self.epochs else 0.0
        by_time = 100.0 * (time.monotonic() - self.started) / (60.0 * self.minutes) if self.minutes > 0 else 0.0
        if self.summary:
            return 100
        return int(min(99.0, max(by_epochs, by_time)))

    def status(self) -> str:
        """One line for the widget: epoch, last and best validation F1."""
        if self.error:
            return f"failed: {self.error}"
        if self.summary:
            best = f"best validation F1 {self.best_f1:.3f}" if self.best_f1 is not None else "no validation ran"
            return f"done: {self.epoch} epoch(s), {best}" + (" (time budget reached)" if self.budget_reached else "")
        parts = [f"epoch {self.epoch}/{self.epochs}" if self.epochs else "starting (loading data, first epoch)"]
        if self.val_f1:
            parts.append(f"validation F1 {self.val_f1[-1]:.3f} (best {max(self.val_f1):.3f})")
        return ", ".join(parts)


__all__ = [
    "DEFAULT_RUNS",
    "TrainingProgress",
    "child_environment",
    "child_threads",
    "run_folder",
    "semi_recipe",
    "start_training",
    "stop_training",
    "training_command",
]
