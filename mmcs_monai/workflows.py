"""Running the bundle's workflows from Python: the one function the command line and the label app call.

:func:`default_bundle_root` finds the bundle (``configs/``, ``docs/``, ``sample_data/``, ``models/``) in a
source checkout and in a wheel install alike (the wheel carries it as the ``mmcs_monai.bundle`` package
data); :func:`run_workflow` runs one of its workflows through ``monai.bundle.run``, so this and
``python -m monai.bundle run ...`` are the same code path.

Runs are quiet by default (:func:`quiet_run`): MONAI's warning that a config's ``_target_`` and ``$`` values
are executed is not shown for the configs this package ships (it still is for a recipe or another bundle),
and ignite's lines for a fresh start ("Engine run resuming from iteration 0") and an evaluator's epoch
and end are dropped; ``MMCS_DEBUG=1`` (``mmcs --verbose``) shows everything.

Recipes (configs merged over a workflow's) ship in the bundle's ``configs/recipes/`` and are named without
their folder or ``.json`` (``recipe="finetune"``, ``mmcs train --recipe finetune``); a path works as well
(:func:`resolve_recipe`).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from mmcs_monai.io import InputError

# workflow -> the bundle configs it runs (recipes and overrides come on top)
WORKFLOW_CONFIGS: dict[str, list[str]] = {
    "training": ["train.json"],
    "evaluating": ["train.json", "evaluate.json"],
    "inference": ["inference.json"],
}
DISTRIBUTED_CONFIGS = {"training": "multi_gpu_train.json", "inference": "multi_gpu_inference.json"}
RECIPES = "recipes"  # the folder of the user recipes in the bundle's configs/
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages in a wheel install)

# what a quiet run leaves out: MONAI's trust warning (a message prefix) and ignite's lines, per engine logger
TRUST_WARNING = "parsing config_file "
ENGINE_NOISE: dict[str, tuple[str, ...]] = {
    # monai.bundle.run's "input summary" block and logging-file line (ten lines before a mistake's one error line)
    "monai.bundle.scripts": ("--- input summary of ", "> ", "---"),
    "monai.bundle.workflows": ("Setting logging properties based on config",),
    # an evaluator's every run starts "resuming" and ends its one epoch (inference, evaluation, each validation)
    "ignite.engine.engine.SupervisedEvaluator": ("Engine run resuming from iteration 0,", "Epoch[", "Engine run finished"),
    "ignite.engine.engine.SupervisedTrainer": ("Engine run resuming from iteration 0, epoch 0 ",),
}
# keywords of monai.bundle.run besides config overrides
RUN_KEYWORDS = {"tracking", "args_file", "init_id", "final_id"}


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


# The models the bundle ships, by name -> file in ``<bundle_root>/models/``. ``model`` (the generalist, trained on
# every source, research use) is every command's default; ``permissive`` is trained only on sources whose
# licence allows commercial use (bundle/docs/README.md, "Permissive model"); ``fast`` is the generalist's recipe at
# half the network's width (a quarter of the compute per pixel; "Fast model").
SHIPPED_MODELS = {"model": "model.pt", "permissive": "permissive.pt", "fast": "fast.pt"}
DEFAULT_MODEL = "model"


def shipped_model(bundle_root: str | os.PathLike | None = None, name: str = DEFAULT_MODEL) -> Path:
    """The file of the shipped model ``name`` (one of :data:`SHIPPED_MODELS`), ``<bundle_root>/models/<file>``.

    Raises:
        InputError: ``name`` is not a shipped model.
    """
    if name not in SHIPPED_MODELS:
        raise InputError(name, f"not a shipped model; the bundle ships {', '.join(SHIPPED_MODELS)}")
    return resolve_bundle_root(bundle_root) / "models" / SHIPPED_MODELS[name]


def resolve_model(model: str | os.PathLike | None = None, bundle_root: str | os.PathLike | None = None) -> Path:
    """The model file a ``--model`` option means: None -> the default shipped model; a shipped model's name
    (``permissive``) -> its file; anything else -> that path (write ``./permissive`` for a file of that name)."""
    if model is None or str(model) == "":
        return shipped_model(bundle_root)
    if str(model) in SHIPPED_MODELS:
        return shipped_model(bundle_root, str(model))
    return Path(model).expanduser()


def under_torchrun() -> bool:
    """Whether this process is one of several ``torchrun`` ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def bundle_recipes(bundle_root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The recipes ``bundle_root`` ships (default :func:`default_bundle_root`): name -> ``configs/recipes/NAME.json``,
    and ``semi`` -> ``configs/semi.json`` (phase 2, merged over ``train.json`` like a recipe)."""
    configs = resolve_bundle_root(bundle_root) / "configs"
    return {"semi": configs / "semi.json", **{path.stem: path for path in sorted((configs / RECIPES).glob("*.json"))}}


RECIPE_BASE = "recipe_base"  # a recipe's key naming the recipes it is merged over (names or files)


def recipe_files(recipe: str | os.PathLike, bundle_root: str | os.PathLike | None = None, _seen: tuple = ()) -> list[Path]:
    """The config files ``recipe`` stands for, in merge order: the recipes named by its ``"recipe_base"`` key (each
    expanded the same way), then the recipe itself. ``finetune_semi`` -> ``semi.json``, ``finetune.json``,
    ``finetune_semi.json``.

    Raises:
        InputError: an unknown recipe (:func:`resolve_recipe`), a ``recipe_base`` that is not a list of names, or a
            recipe that builds on itself.
    """
    path = resolve_recipe(recipe, bundle_root)
    if path in _seen:
        raise InputError(path, "recipe builds on itself through recipe_base")
    try:
        base = json.loads(path.read_text()).get(RECIPE_BASE, []) if path.suffix == ".json" else []
    except (OSError, ValueError, AttributeError):
        base = []  # not a JSON object: MONAI's parser reports it
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise InputError(path, f"{RECIPE_BASE} must be a list of recipe names or files")
    files: list[Path] = []
    for name in base:
        files += [f for f in recipe_files(name, bundle_root, (*_seen, path)) if f not in files]
    return [*files, path]


def resolve_recipe(recipe: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> Path:
    """The file of ``recipe``: a config file's path, or the name of one of :func:`bundle_recipes` (``finetune``,
    ``finetune.json``).

    Raises:
        InputError: neither a file nor a known name (the message lists the known names).
    """
    path = Path(recipe)
    if path.is_file():
        return path.resolve()
    shipped = bundle_recipes(bundle_root)
    name = path.name.removesuffix(".json")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    if (SOURCE_ROOT / path).is_file():
        return (SOURCE_ROOT / path).resolve()  # a file of the checkout (experiments/recipes/...), named from another folder
    known = ", ".join(sorted(shipped)) or "none"
    raise InputError(recipe, f"no such recipe file or recipe name (the bundle's recipes: {known})")


def workflow_config_files(
    workflow: str, bundle_root: Path, recipe: str | Sequence[str] | None = None, distributed: bool | None = None
) -> list[str]:
    """The config files of ``workflow`` in ``bundle_root``, the multi-GPU one under ``torchrun``, then the recipes.

    Raises:
        ValueError: an unknown workflow.
        InputError: a recipe that is neither a file nor a recipe name (:func:`resolve_recipe`).
    """
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"unknown workflow {workflow!r}; known: {sorted(WORKFLOW_CONFIGS)}")
    files = [str(bundle_root / "configs" / name) for name in WORKFLOW_CONFIGS[workflow]]
    recipes = [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe or [])
    for r in recipes:
        files += [str(f) for f in recipe_files(r, bundle_root) if str(f) not in files]
    if (under_torchrun() if distributed is None else distributed) and workflow in DISTRIBUTED_CONFIGS:
        # after the recipes: the distributed wiring (DDP, samplers) must win over a recipe's settings
        files.append(str(bundle_root / "configs" / DISTRIBUTED_CONFIGS[workflow]))
    return files


def debug_requested() -> bool:
    """Whether ``MMCS_DEBUG=1`` asks for everything: tracebacks, MONAI's warnings, ignite's lines."""
    return os.environ.get("MMCS_DEBUG") == "1"


def shipped_configs(config_files: Sequence[str]) -> bool:
    """Whether every file is one of the configs this package ships (``configs/`` of :func:`default_bundle_root`
    and its recipes)."""
    shipped = default_bundle_root() / "configs"
    return all(Path(f).resolve().parent in (shipped, shipped / RECIPES) for f in config_files)


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def quiet_run(config_files: Sequence[str]) -> Iterator[None]:
    """Within: no trust warning for shipped configs (:func:`shipped_configs`), and none of :data:`ENGINE_NOISE`.

    Both are undone on leaving (the filters are removed, the warning filters restored), so code around a
    run sees logging and warnings as they were.
    """
    filters = [(logging.getLogger(name), DropMessages(prefixes)) for name, prefixes in ENGINE_NOISE.items()]
    for engine_logger, noise in filters:
        engine_logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            if shipped_configs(config_files):
                warnings.filterwarnings("ignore", message=TRUST_WARNING, category=UserWarning)
            yield
    finally:
        for engine_logger, noise in filters:
            engine_logger.removeFilter(noise)


def check_options(config_files: Sequence[str], overrides: Mapping[str, object]) -> None:
    """Raise for an override that names nothing in ``config_files`` (a typo would be silently ignored).

    Raises:
        ValueError: ``unknown option --dimeter (did you mean --diameter?)``.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    for key in overrides:
        if key in RUN_KEYWORDS or key in parser:
            continue
        close = difflib.get_close_matches(key, [str(k) for k in parser.get()], n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise ValueError(f"unknown option --{key}{hint}")


def bundle_command(
    workflow: str,
    config_files: Sequence[str | os.PathLike] | None = None,
    bundle_root: str | os.PathLike | None = None,
    overrides: Mapping[str, object] | None = None,
) -> list[str]:
    """The arguments of ``python -m monai.bundle run WORKFLOW ...`` (from ``monai.bundle`` on: prefix them with
    ``[sys.executable, "-m"]``, or give them to ``torchrun``), for the same run :func:`run_workflow` makes.

    Args:
        workflow: the run id (``training``, ``evaluating``, ``inference``).
        config_files: config files (paths, or names in the bundle's ``configs/``); default the workflow's
            :data:`WORKFLOW_CONFIGS`.
        bundle_root: the bundle (default :func:`default_bundle_root`).
        overrides: config values, in order: strings as they are, lists, tuples and dicts as JSON, None as
            ``"$None"`` (``monai.bundle`` would drop a plain None), others with ``str`` (``True`` -> ``"True"``,
            which ``monai.bundle``'s parser reads back as a bool).

    Returns:
        ``["monai.bundle", "run", workflow, "--config_file", "[...]", "--meta_file", ..., "--bundle_root", ...,
        "--key", "value", ...]``.
    """
    import json

    root = resolve_bundle_root(bundle_root)
    if config_files is None:
        files = workflow_config_files(workflow, root, distributed=False)
    else:
        files = [str(f) if Path(f).is_absolute() else str(root / "configs" / f) for f in config_files]
    meta_file = str(root / "configs" / "metadata.json")
    command = ["monai.bundle", "run", workflow, "--config_file", json.dumps(files), "--meta_file", meta_file, "--bundle_root", str(root)]
    for key, value in _kept_none(overrides).items():
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        command += [f"--{key}", text]
    return command


NONE_EXPRESSION = "$None"  # a config expression that evaluates to None


def _kept_none(overrides: Mapping[str, object] | None) -> dict[str, object]:
    """``overrides`` with each None written as ``"$None"``: ``monai.bundle.run`` drops None values
    (``update_kwargs(ignore_none=True)``), so ``pretrained=None`` would silently leave a recipe's
    pretrained model in place; the expression sets the value to None."""
    return {key: NONE_EXPRESSION if value is None else value for key, value in (overrides or {}).items()}


def run_workflow(
    workflow: str,
    bundle_root: str | os.PathLike | None = None,
    recipe: str | Sequence[str] | None = None,
    overrides: Mapping[str, object] | None = None,
    config_files: Sequence[str] | None = None,
    quiet: bool | None = None,
    strict: bool = False,
) -> None:
    """Run a bundle workflow (``training``, ``evaluating``, ``inference``) with ``monai.bundle.run``.

    Args:
        workflow: the run id; its configs come from :data:`WORKFLOW_CONFIGS` unless ``config_files`` is given.
        bundle_root: the bundle (default :func:`default_bundle_root`).
        recipe: config file(s) merged over the workflow's: paths or recipe names (``finetune``, :func:`bundle_recipes`).
        overrides: config values (``{"epochs": 10, "data_source": "manifest.csv"}``).
        config_files: use exactly these config files.
        quiet: run within :func:`quiet_run` (default: unless ``MMCS_DEBUG=1``).
        strict: refuse overrides that name nothing in the configs (:func:`check_options`); the CLI sets it.
    """
    from monai.bundle import run

    root = resolve_bundle_root(bundle_root)
    files = list(config_files) if config_files is not None else workflow_config_files(workflow, root, recipe)
    if strict:
        check_options(files, overrides or {})
    quiet = not debug_requested() if quiet is None else quiet
    with quiet_run(files) if quiet else nullcontext():
        run(
            run_id=workflow,
            config_file=files,
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"),
            bundle_root=str(root),
            **_kept_none(overrides),
        )
