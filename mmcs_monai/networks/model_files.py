"""Model files: read a Cellpose 3 / mmcs checkpoint or an exported TorchScript model, and export one.

Every command and config that takes a model goes through :func:`load_model`, which accepts a checkpoint
(ours or Cellpose 3's, plain state dict or nested in a trainer checkpoint) or a ``.ts`` export. A file that
cannot be used raises :class:`ModelFileError` (an :class:`~mmcs_monai.io.InputError`), whose message starts
with the file's path.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mmcs_monai.io import InputError, atomic_path
from mmcs_monai.networks.cpnet import LEGACY_EXTRA_STATE_KEY, SUBSET_TABLE_KEY, CPnet
from mmcs_monai.networks.quantized import attach_calibration, calibration_file, read_calibration

__all__ = [
    "ModelFileError",
    "load_model",
    "load_cellpose_checkpoint",
    "extract_state_dict",
    "infer_cpnet_args",
    "export_torchscript",
    "load_torchscript",
    "is_torchscript_file",
    "max_output_difference",
    "save_release_file",
    "size_network_file",
]

# extra files stored beside the weights (the names MONAI's ``ckpt_export`` uses for the metadata)
METADATA_FILE = "metadata.json"


def size_network_file(path: str | os.PathLike) -> Path:
    """The file of the size network of model file ``path``: ``size_<stem>.pt`` in its folder (Cellpose keeps its size
    models as ``size_<model>.npy`` beside the models). :func:`load_model` attaches it (:meth:`CPnet.attach_size_network`)
    when it exists: the ``auto`` size search then runs that cheaper network instead of the model."""
    path = Path(path)
    return path.with_name(f"size_{path.stem}.pt")


class ModelFileError(InputError):
    """A model file that cannot be used: missing, empty, not a model, or weights that do not fit."""


# ---------------------------------------------------------------------- checkpoints
# keys under which trainers nest the network weights, first match wins
_NESTED_KEYS = ("network", "model", "net", "state_dict", "model_state_dict")
_DIAM_KEYS = ("diam_mean", "diam_labels")
_EXTRA_STATE = LEGACY_EXTRA_STATE_KEY  # a dict, in files written before the subset table was a tensor
_OPTIONAL_KEYS = (SUBSET_TABLE_KEY, LEGACY_EXTRA_STATE_KEY)  # absent from Cellpose files


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for k, v in obj.items() if not str(k).endswith(_EXTRA_STATE))
    )


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the network state dict held by a loaded checkpoint object.

    Accepts a plain state dict (Cellpose ``save_model``) or a dict nesting it under one of
    ``"network", "model", "net", "state_dict", "model_state_dict"`` (MONAI ``CheckpointSaver`` with
    ``save_dict={"network": net, ...}``). A ``"module."`` prefix (DataParallel/DDP) is stripped.

    Raises:
        ValueError: naming ``source`` when no state dict is found.
    """
    if _is_state_dict(obj):
        state = dict(obj)
    elif isinstance(obj, Mapping):
        nested = [k for k in _NESTED_KEYS if _is_state_dict(obj.get(k))]
        if not nested:
            raise ValueError(
                f"{source}: no network state dict found; expected a state dict or a dict with one of the keys "
                f"{list(_NESTED_KEYS)}, got keys {sorted(map(str, obj))[:10]}."
            )
        state = dict(obj[nested[0]])
    else:
        raise ValueError(f"{source}: expected a state dict (mapping of tensors), got {type(obj).__name__}.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def infer_cpnet_args(state: Mapping[str, torch.Tensor]) -> dict:
    """Infer ``nbase``, ``nout``, ``sz`` and ``diam_mean`` of :class:`CPnet` from its state dict.

    Raises:
        ValueError: when the keys do not look like a CPnet (e.g. a Cellpose 4 / SAM checkpoint).
    """
    if "W2" in state:
        raise ValueError("this is a Cellpose 4 (Cellpose-SAM) checkpoint; only Cellpose 3 CPnet weights are supported.")
    nbase = []
    k = 0
    while f"downsample.down.res_down_{k}.proj.1.weight" in state:
        w = state[f"downsample.down.res_down_{k}.proj.1.weight"]  # [out, in, 1, 1]
        if k == 0:
            nbase.append(int(w.shape[1]))
        nbase.append(int(w.shape[0]))
        k += 1
    if not nbase or "output.2.weight" not in state:
        some = sorted(state)[:5]
        raise ValueError(f"keys do not look like a Cellpose CPnet (first keys: {some}).")
    args = {
        "nbase": nbase,
        "nout": int(state["output.2.weight"].shape[0]),
        "sz": int(state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1]),
    }
    if "diam_mean" in state:
        args["diam_mean"] = float(state["diam_mean"].reshape(-1)[0])
    return args


def _read_torch_file(path: Path):
    if not path.is_file():
        raise ModelFileError(path, "model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(path, "model file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError/EOFError... depending on the content
        raise ModelFileError(path, f"not a readable torch checkpoint ({type(e).__name__}: {_load_failure(e)})") from e


def _load_failure(error: Exception) -> str:
    """What ``torch.load`` found wrong, in one line: the weights-only unpickler's own reason when it gave one
    (its message is a page of advice around it), else the first line of the message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason or (lines[i + 1] if i + 1 < len(lines) else "unsupported content")
    return lines[0] if lines else "unreadable"


def load_cellpose_checkpoint(path: str | Path, net: CPnet | None = None, strict: bool = True, **kwargs) -> CPnet:
    """Load Cellpose 3 weights (or an mmcs trainer checkpoint) into a :class:`CPnet`.

    The file is read with ``torch.load(map_location="cpu", weights_only=True)``. Checkpoints from before
    Cellpose 2 lack ``diam_mean``/``diam_labels``; those two are then kept from the network (with a warning).

    Args:
        path: file written by Cellpose's ``CPnet.save_model`` (a state dict) or by MONAI ``CheckpointSaver``
            (``{"network": state_dict, ...}``; see :func:`extract_state_dict`).
        net: network to load into; when ``None`` one is built from :func:`infer_cpnet_args`.
        strict: require the keys to match exactly (shapes must always match).
        kwargs: constructor arguments overriding the inferred ones (only when ``net`` is None).

    Returns:
        the network (on CPU when built here; ``net`` itself otherwise).

    Raises:
        ModelFileError: the file is missing, empty, not a torch file, holds no state dict, or keys/shapes
            that do not match the network; the message names the file and lists a few missing/unexpected keys.
    """
    path = Path(path)
    source = str(path)
    try:
        state = extract_state_dict(_read_torch_file(path), source=source)
    except ModelFileError:
        raise
    except ValueError as e:
        raise ModelFileError(path, str(e).removeprefix(f"{source}: ")) from None
    if net is None:
        try:
            args = infer_cpnet_args(state)
        except ValueError as e:
            raise ModelFileError(path, str(e)) from None
        args.update(kwargs)
        net = CPnet(**args)
    elif kwargs:
        raise TypeError(f"constructor arguments {sorted(kwargs)} are only used when net is None.")

    own = net.state_dict()
    missing_diams = [k for k in _DIAM_KEYS if k not in state]
    if missing_diams and all(k in state for k in own if k not in _DIAM_KEYS):
        warnings.warn(f"{source}: no {missing_diams} in checkpoint; keeping the network's values.", stacklevel=2)
        state.update({k: own[k] for k in missing_diams})

    missing = sorted(set(own) - set(state) - set(_OPTIONAL_KEYS))
    unexpected = sorted(set(state) - set(own) - set(_OPTIONAL_KEYS))
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in _OPTIONAL_KEYS and torch.is_tensor(own[k]) and state[k].shape != own[k].shape
    ]
    if wrong_shape or (strict and (missing or unexpected)):
        raise ModelFileError(
            path,
            f"checkpoint does not match CPnet(nbase={net.nbase}, nout={net.nout}, sz={net.sz}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:5]}.",
        )
    net.load_state_dict(state, strict=strict)
    return net


def save_release_file(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write the weights of model file ``source`` as a compact release file at ``destination``, atomically.

    The state dict keeps Cellpose 3's keys and the subset table; floating-point weights are stored in
    float16 (half the size), ``diam_mean``/``diam_labels`` in float32. :func:`load_cellpose_checkpoint`
    casts everything back to the network's float32 when it loads the file.

    Raises:
        ModelFileError: ``source`` is not a readable model file.
    """
    network = load_cellpose_checkpoint(source)
    state = {
        k: v.half() if torch.is_tensor(v) and v.is_floating_point() and k not in _DIAM_KEYS else v for k, v in network.state_dict().items()
    }
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as tmp:
        torch.save(state, tmp)
    return destination


def _metadata_dict(metadata: Mapping[str, Any] | str | os.PathLike | None) -> dict:
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return json.loads(Path(metadata).read_text())


def export_torchscript(
    network: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | str | os.PathLike | None = None,
    configs: Mapping[str, Any] | None = None,
) -> Path:
    """Script ``network`` (a CPnet) and save it atomically with the metadata and configs as extra JSON files.

    Args:
        network: the CPnet (eval mode is used for the trace; the network itself is left as it was).
        path: destination ``.ts`` file; written to a temporary file first, then renamed.
        metadata: bundle metadata (a dict or the path of ``metadata.json``), stored as ``metadata.json``
            as ``python -m monai.bundle ckpt_export`` does.
        configs: ``{name: dict}`` configs stored as ``<name>.json`` (e.g. the inference config).

    Returns:
        the written path.
    """
    scripted = torch.jit.script(network)
    extra = {METADATA_FILE: json.dumps(_metadata_dict(metadata)).encode()}
    for name, config in (configs or {}).items():
        extra[f"{name}.json"] = json.dumps(config).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files=extra)
    return path


def max_output_difference(network: nn.Module, exported: nn.Module, images: list[torch.Tensor]) -> float:
    """Largest absolute difference between the two models' outputs over ``images`` (each ``[B, C, H, W]``)."""
    difference = 0.0
    with torch.no_grad():
        for x in images:
            difference = max(difference, float((network(x) - exported(x)).abs().max()))
    return difference


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled ``code/``), not a ``torch.save`` file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported model; returns ``(module in eval mode, metadata dict)``.

    Raises:
        ModelFileError: the file is missing, empty, not a TorchScript archive (a checkpoint is named as such,
            with the command that exports it), or a TorchScript model that is not an exported CPnet.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(path, "model file is empty")
    if not is_torchscript_file(path):
        problem = "not a TorchScript model"
        if zipfile.is_zipfile(path):
            problem += " (it looks like a checkpoint: export it with `mmcs export CHECKPOINT MODEL.ts`)"
        raise ModelFileError(path, problem)
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError/ValueError/... for damaged archives
        raise ModelFileError(path, f"cannot load the TorchScript model ({type(err).__name__}: {err})") from None
    for attribute in ("diam_mean", "diam_labels", "subset_diameters"):
        if not hasattr(module, attribute):
            raise ModelFileError(path, f"TorchScript model has no {attribute!r}: not exported from an mmcs CPnet")
    try:
        metadata = json.loads(extra[METADATA_FILE] or "{}")
    except json.JSONDecodeError:
        metadata = {}
    return module.eval(), metadata


def load_model(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> nn.Module:
    """The network in ``path``, in eval mode: an exported TorchScript model, or a Cellpose 3 / mmcs checkpoint, with
    its size network attached where the checkpoint has one (:func:`size_network_file`), and each one's int8
    calibration where it has one (:func:`~mmcs_monai.networks.quantized.calibration_file`).

    Raises:
        ModelFileError: naming the file and the problem (the size network's file when that one is the problem).
    """
    path = Path(path)
    if is_torchscript_file(path):
        return load_torchscript(path, map_location)[0]
    network = _with_calibration(load_cellpose_checkpoint(path).to(map_location).eval(), path)
    sizer = size_network_file(path)
    if sizer.is_file():
        network.attach_size_network(_with_calibration(load_cellpose_checkpoint(sizer).to(map_location).eval(), sizer))
    return network


def _with_calibration(network: CPnet, path: Path) -> CPnet:
    """``network`` with the int8 calibration beside its file attached, where there is one (:mod:`.quantized`)."""
    calibration = calibration_file(path)
    if calibration.is_file():
        attach_calibration(network, read_calibration(calibration))
    return network
