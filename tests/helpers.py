"""Shared test helpers (imported by tests as ``from helpers import ...``; fixtures live in ``conftest.py``).

Requirements: a test that needs an optional dependency calls :func:`require_module`, :func:`require_dev_data`
or :func:`environment_python`. Missing, the test is skipped, or **failed** when the matching
``MMCS_REQUIRE_<NAME>=1`` is set: ``scripts/test.sh`` (CI) sets them, so CI cannot go green by skipping.
"""

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcs_monai.networks import CPnet

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SAMPLE_IMAGES = BUNDLE / "sample_data" / "images"
DEV_DATA = Path(os.environ.get("MMCS_DEV_DATA", REPO.parent / "shared" / "data" / "dev"))

# A small CPnet (nbase [2, 16, 32, 64]) trained on the sample data, so tests that need real cells have them;
# tests/data/README.md says how it was made.
TINY_MODEL = REPO / "tests" / "data" / "tiny_cpnet.pt"


def _missing(requirement: str, message: str):
    if os.environ.get(f"MMCS_REQUIRE_{requirement}") == "1":
        pytest.fail(f"{message} (MMCS_REQUIRE_{requirement}=1: required here)")
    pytest.skip(message)


def require_module(name: str, requirement: str = "CELLPOSE"):
    """Import ``name`` (e.g. ``"cellpose.dynamics"``): the reference implementation the parity tests compare
    with. Missing: skip, or fail under ``MMCS_REQUIRE_<requirement>=1``."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        _missing(requirement, f"{name} not importable ({err}): pip install 'cellpose<4'")


def require_dev_data() -> Path:
    """Root of ``../shared/data/dev``; missing: skip, or fail under ``MMCS_REQUIRE_DEV_DATA=1``."""
    if not (DEV_DATA / "manifest.csv").is_file():
        _missing("DEV_DATA", f"dev data not found at {DEV_DATA}")
    return DEV_DATA


def environment_python(extra: str) -> Path:
    """Python of the separate environment for the ``extra`` (``deploy``, ``label``): ``MMCS_<EXTRA>_PYTHON``, else
    ``~/.venvs/mmcs-<extra>``. Missing: skip, or fail under ``MMCS_REQUIRE_<EXTRA>=1``."""
    name = extra.upper()
    python = Path(os.environ.get(f"MMCS_{name}_PYTHON", Path.home() / ".venvs" / f"mmcs-{extra}" / "bin" / "python"))
    if not python.is_file():
        _missing(name, f"{extra} environment not found at {python}: MMCS_VENV=~/.venvs/mmcs-{extra} bash scripts/setup_env.sh {extra}")
    return python


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process that must run *this checkout's* package (not an installed copy):
    the repository first on ``PYTHONPATH``, warnings quiet, plus ``extra``."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", **extra)


_MMCS_BATCH = r"""
import json, os, sys, tempfile, traceback
from mmcs_monai import cli
commands, results = json.load(open(sys.argv[1])), []
for argv in commands:
    saved = dict(os.environ)  # --verbose sets MMCS_DEBUG
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        kept = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            try:
                cli.main(argv)
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()  # what the interpreter prints for an uncaught exception
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(kept[0], 1); os.dup2(kept[1], 2)
            os.close(kept[0]); os.close(kept[1])
        out.seek(0); err.seek(0)
        results.append([code, out.read().decode(errors="replace"), err.read().decode(errors="replace")])
    os.environ.clear()
    os.environ.update(saved)
json.dump(results, open(sys.argv[2], "w"))
"""


def run_mmcs_batch(commands: list[list[str]], **env: str) -> list:
    """Run several ``mmcs`` command lines in one child process (``mmcs_monai.cli.main`` called once per command,
    its stdout and stderr captured at the file-descriptor level, the environment restored between commands), so
    a list of quick commands pays Python's and MONAI's start-up once instead of once each.

    Returns:
        one ``subprocess.CompletedProcess`` per command (``returncode``, ``stdout``, ``stderr``); an uncaught
        exception gives status 1 and its traceback on stderr, as the interpreter would.
    """
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        request, answer = Path(folder) / "commands.json", Path(folder) / "results.json"
        request.write_text(json.dumps([list(map(str, argv)) for argv in commands]))
        environment = subprocess_env(**env)
        environment.pop("PYTHONWARNINGS", None)
        run = subprocess.run(
            [sys.executable, "-c", _MMCS_BATCH, str(request), str(answer)], capture_output=True, text=True, env=environment, timeout=600
        )
        assert run.returncode == 0 and answer.is_file(), run.stderr[-3000:]
        results = json.loads(answer.read_text())
    return [subprocess.CompletedProcess(argv, code, out, err) for argv, (code, out, err) in zip(commands, results)]


# bundle runs with a tiny network, so a training epoch on the sample data takes seconds
TINY = ["--nbase", "[2,8,16,32]", "--patch_size", "64", "--batch_size", "4", "--num_workers", "0"]


def bundle(*args, cwd=REPO) -> str:
    """Run ``python -m monai.bundle <args>`` on this checkout (``args`` may start with ``monai.bundle``, as
    :func:`mmcs_monai.workflows.bundle_command` builds them); asserts exit 0, returns stdout + stderr."""
    import subprocess

    args = [str(a) for a in args]
    cmd = [sys.executable, "-m", *(args if args[:1] == ["monai.bundle"] else ["monai.bundle", *args])]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def configs(*names) -> str:
    """A JSON list of bundle config files: names in ``bundle/configs`` or paths."""
    import json

    return json.dumps([str(n) if Path(str(n)).is_absolute() else str(BUNDLE / "configs" / n) for n in names])


def disk_labels(shape=(96, 96), centers=((30, 30), (60, 64), (25, 70)), radii=(10, 14, 8)) -> np.ndarray:
    """Instance labels [H, W] uint16 of non-overlapping discs, ids 1..n in the order given."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, ((cy, cx), r) in enumerate(zip(centers, radii), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = i
    return labels


class RecordingNet(torch.nn.Module):
    """A stand-in network that records the sizes it is called with and returns x-coordinate ramps."""

    def __init__(self, diam_mean=30.0, diam_labels=15.0):
        super().__init__()
        self.diam_mean = torch.nn.Parameter(torch.tensor([diam_mean]), requires_grad=False)
        self.diam_labels = torch.nn.Parameter(torch.tensor([diam_labels]), requires_grad=False)
        self.seen = []
        self.subset_diameters = {}

    # the real network's subset-diameter table and size network
    set_subset_diameters = CPnet.set_subset_diameters
    diameter_for = CPnet.diameter_for
    attach_size_network = CPnet.attach_size_network

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return x[:, :1].repeat(1, 3, 1, 1)


class OracleNet(RecordingNet):
    """Stand-in network that returns perfect outputs for a binary disc image at any scale."""

    def forward(self, x):
        from skimage.measure import label

        from mmcs_monai.flows import labels_to_flows

        self.seen.append(tuple(x.shape[-2:]))
        outs = []
        for image in x[:, 0].float():
            labels = label(image.numpy() > 0.5)
            flows = torch.as_tensor(labels_to_flows(labels)) * 5
            outs.append(torch.cat([flows, torch.where(torch.as_tensor(labels > 0), 10.0, -10.0)[None]]))
        return torch.stack(outs)
