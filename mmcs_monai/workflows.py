"""Running the bundle's workflows from Python: the one function the command line and the label app call.

:func:`default_bundle_root` finds the bundle (``configs/``, ``docs/``, ``sample_data/``, ``models/``) in a
source checkout and in a wheel install alike (the wheel carries it as the ``mmcs_monai.bundle`` package
data); :func:`run_workflow` runs one of its workflows through ``monai.bundle.run``, so this and
``python -m monai.bundle run ...`` are the same code path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmcs_monai.io import InputError

# workflow -> the bundle configs it runs (recipes and overrides come on top)
WORKFLOW_CONFIGS: dict[str, list[str]] = {
    "training": ["train.json"],
    "evaluating": ["train.json", "evaluate.json"],
    "inference": ["inference.json"],
}
DISTRIBUTED_CONFIGS = {"training": "multi_gpu_train.json", "inference": "multi_gpu_inference.json"}
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages in a wheel install)


def default_bundle_root() -> Path:
    """The bundle folder of this installation: the checkout's ``bundle/`` or the installed package data.

    Raises:
        InputError: when neither holds ``configs/train.json`` (a broken install).
    """
    spec = importlib.util.find_spec("mmcs_monai.bundle")
    candidates = list(spec.submodule_search_locations or []) if spec else []
    candidates.append(str(SOURCE_ROOT / "bundle"))
    for candidate in candidates:
        if (Path(candidate) / "configs" / "train.json").is_file():
            return Path(candidate).resolve()
    raise InputError(candidates[-1], "no bundle found (configs/train.json); reinstall mmcs-monai or pass --bundle_root")


def resolve_bundle_root(bundle_root: str | os.PathLike | None = None) -> Path:
    """``bundle_root`` (checked), or :func:`default_bundle_root`."""
    if bundle_root is None:
        return default_bundle_root()
    root = Path(bundle_root)
    if not (root / "configs" / "train.json").is_file():
        raise InputError(root, "not a bundle folder (no configs/train.json)")
    return root.resolve()


def shipped_model(bundle_root: str | os.PathLike | None = None) -> Path:
    """The generalist model the bundle ships, ``<bundle_root>/models/model.pt``: every command's default model."""
    return resolve_bundle_root(bundle_root) / "models" / "model.pt"


def under_torchrun() -> bool:
    """Whether this process is one of several ``torchrun`` ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def workflow_config_files(
    workflow: str, bundle_root: Path, recipe: str | Sequence[str] | None = None, distributed: bool | None = None
) -> list[str]:
    """The config files of ``workflow`` in ``bundle_root``, the multi-GPU one under ``torchrun``, then the recipes.

    Raises:
        ValueError: an unknown workflow.
        InputError: a recipe file that does not exist.
    """
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"unknown workflow {workflow!r}; known: {sorted(WORKFLOW_CONFIGS)}")
    files = [str(bundle_root / "configs" / name) for name in WORKFLOW_CONFIGS[workflow]]
    recipes = [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe or [])
    for r in recipes:
        path = Path(r)
        if not path.is_file() and (SOURCE_ROOT / r).is_file():
            path = SOURCE_ROOT / r  # a recipe of the checkout's configs/, named from another folder
        if not path.is_file():
            raise InputError(r, "recipe config not found")
        files.append(str(path.resolve()))
    if (under_torchrun() if distributed is None else distributed) and workflow in DISTRIBUTED_CONFIGS:
        # after the recipes: the distributed wiring (DDP, samplers) must win over a recipe's settings
        files.append(str(bundle_root / "configs" / DISTRIBUTED_CONFIGS[workflow]))
    return files


def run_workflow(
    workflow: str,
    bundle_root: str | os.PathLike | None = None,
    recipe: str | Sequence[str] | None = None,
    overrides: Mapping[str, object] | None = None,
    config_files: Sequence[str] | None = None,
) -> None:
    """Run a bundle workflow (``training``, ``evaluating``, ``inference``) with ``monai.bundle.run``.

    Args:
        workflow: the run id; its configs come from :data:`WORKFLOW_CONFIGS` unless ``config_files`` is given.
        bundle_root: the bundle (default :func:`default_bundle_root`).
        recipe: config file(s) merged over the workflow's (e.g. ``configs/cpu.json``).
        overrides: config values (``{"epochs": 10, "data_source": "manifest.csv"}``).
        config_files: use exactly these config files.
    """
    from monai.bundle import run

    root = resolve_bundle_root(bundle_root)
    files = list(config_files) if config_files is not None else workflow_config_files(workflow, root, recipe)
    run(
        run_id=workflow,
        config_file=files,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **dict(overrides or {}),
    )
