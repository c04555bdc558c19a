"""Exports that carry the whole segmentation: the pipeline TorchScript file and the BioImage.IO package.

- :func:`export_pipeline` (``mmcs export --format pipeline``): one TorchScript file, image -> int32 labels
  (:class:`~mmcs_monai.pipeline.SegmentationPipeline`, scripted), that needs torch and nothing else;
- :func:`export_bioimageio` (``mmcs export --format bioimageio``): a BioImage.IO model package (spec 0.5, a
  zip): that file as ``torchscript`` weights, the same pipeline as ``pytorch_state_dict`` weights with its
  architecture's source (:func:`architecture_source`: one torch-only Python file), test tensors and a cover
  made from a sample image, the model card as documentation.

``docs/export.md`` says how to use them and what each holds.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcs_monai import masks, pipeline
from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import FIT_TILES, OVERLAP, ROI_SIZE, SW_BATCH_SIZE, model_diameters, resolve_diameter
from mmcs_monai.io import InputError, atomic_path
from mmcs_monai.networks import cpnet, padding, torchscript
from mmcs_monai.networks.torchscript import TorchScriptCPnet
from mmcs_monai.pipeline import SegmentationPipeline

__all__ = ["FORMATS", "pipeline_module", "export_pipeline", "export_bioimageio", "architecture_source", "check_writable"]

FORMATS = ("torchscript", "pipeline", "bioimageio")
# where the pipeline file keeps its settings (``torch.jit.load(path, _extra_files={PIPELINE_FILE: ""})``)
PIPELINE_FILE = "mmcs_pipeline.json"
# the sample image the package's test tensors and cover are made from (bundle/sample_data, CC0)
SAMPLE_IMAGE = "images/dsb_0c6507d493bf79b2.tif"
ARCHITECTURE_FILE = "mmcs_pipeline_architecture.py"
ARCHITECTURE_CALLABLE = "mmcs_pipeline"
# the model card's own words on the weights' licence (bundle/docs/README.md, "Intended use"), quoted verbatim
WEIGHTS_LICENCE_SENTENCE = (
    "The weights inherit the non-commercial terms of the MoNuSeg rows (CC BY-NC-SA 4.0) and the unstated "
    "licence of the DeepCell rows: do not use them commercially."
)


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking a file can be written there.

    Raises:
        InputError: naming the path: a folder, or a parent folder that cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; give the file to write")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(path, f"cannot create its folder ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot write to the folder {parent} (permission denied)")
    return path


def pipeline_module(
    network: torch.nn.Module,
    diameter: float | str | None = None,
    nucleus_channel: int | None = None,
    cyto_channel: int | None = None,
    mask_settings: MaskSettings | None = None,
    scriptable: bool = True,
) -> SegmentationPipeline:
    """The :class:`SegmentationPipeline` of ``network`` (a CPnet), in eval mode.

    Args:
        network: the CPnet (its weights are used, not changed).
        diameter: the cell diameter the pipeline uses when a call gives none: a number, a stored subset name,
            None/``stored``: the model's training-set mean. ``auto`` cannot be stored (it stays outside).
        nucleus_channel, cyto_channel: channel indices of ``[C, H, W]`` images (None: none / the mean).
        mask_settings: flows -> masks thresholds (default :class:`MaskSettings`()).
        scriptable: wrap the network in its TorchScript shim (for :func:`torch.jit.script`); else the eager CPnet.
    """
    if diameter in ("auto", "refine"):
        raise ValueError(
            f"diameter {diameter!r} is estimated by the library, not inside the exported file; "
            "give a number, a stored subset name or 'stored'"
        )
    settings = mask_settings or MaskSettings()
    diam_mean, _ = model_diameters(network)
    net = TorchScriptCPnet(network) if scriptable else network
    return SegmentationPipeline(
        net,
        diam_mean=diam_mean,
        diameter=resolve_diameter(network, diameter),
        nucleus_channel=-1 if nucleus_channel is None else int(nucleus_channel),
        cyto_channel=-1 if cyto_channel is None else int(cyto_channel),
        roi_size=ROI_SIZE,
        overlap=OVERLAP,
        sw_batch_size=SW_BATCH_SIZE,
        fit_tiles=FIT_TILES,
        flow_threshold=settings.flow_threshold or 0.0,
        cellprob_threshold=settings.cellprob_threshold,
        min_size=settings.min_size,
        niter=settings.niter,
        max_size_fraction=settings.max_size_fraction,
    ).eval()


def _pipeline_settings(module: SegmentationPipeline) -> dict[str, Any]:
    names = [n for n in inspect.signature(SegmentationPipeline).parameters if n != "network"]
    return {n: getattr(module, n) for n in names}


def export_pipeline(
    network: torch.nn.Module,
    path: str | os.PathLike,
    diameter: float | str | None = None,
    nucleus_channel: int | None = None,
    cyto_channel: int | None = None,
    mask_settings: MaskSettings | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Script the pipeline of ``network`` (:func:`pipeline_module`) and save it atomically to ``path``, with its
    settings (and ``metadata``) as the extra file ``mmcs_pipeline.json``.

    Raises:
        InputError: ``path`` cannot be written.
    """
    path = check_writable(path)
    module = pipeline_module(network, diameter, nucleus_channel, cyto_channel, mask_settings)
    scripted = torch.jit.script(module)
    info = {"format": "mmcs pipeline 1", "settings": _pipeline_settings(module), "metadata": dict(metadata or {})}
    try:
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={PIPELINE_FILE: json.dumps(info).encode()})
    except OSError as err:
        raise InputError(path, f"cannot be written ({err.strerror or err})") from None
    return path


def architecture_source() -> str:
    """One torch-only Python file holding CPnet, :mod:`mmcs_monai.masks`, :mod:`mmcs_monai.pipeline` and the
    factory ``mmcs_pipeline(cpnet, pipeline)`` (the package's ``pytorch_state_dict`` architecture): the
    library's own source, concatenated, without its imports of ``mmcs_monai``."""
    parts = ['"""MMCS segmentation pipeline (CPnet + flows -> masks), generated from mmcs_monai by `mmcs export`."""\n']
    parts.append("from __future__ import annotations\n")
    for module in (padding, torchscript, cpnet, masks, pipeline):
        lines = inspect.getsource(module).splitlines()
        kept = [line for line in lines if not line.startswith(("from mmcs_monai", "from __future__"))]
        parts.append(f"\n# ---- {module.__name__} ----\n" + "\n".join(kept) + "\n")
    parts.append(
        "\n\ndef mmcs_pipeline(cpnet: dict, pipeline: dict) -> SegmentationPipeline:\n"
        '    """The pipeline module: ``CPnet(**cpnet)`` inside ``SegmentationPipeline(**pipeline)``."""\n'
        "    return SegmentationPipeline(CPnet(**cpnet), **pipeline).eval()\n"
    )
    return "".join(parts)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _yaml_dump(data: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=100)


def export_bioimageio(
    network: torch.nn.Module,
    path: str | os.PathLike,
    bundle_root: str | os.PathLike,
    diameter: float | str | None = None,
    mask_settings: MaskSettings | None = None,
    sample: str = SAMPLE_IMAGE,
) -> Path:
    """Write the BioImage.IO package (a zip, model spec 0.5) of ``network`` to ``path``.

    Args:
        network: the CPnet (eager: its state dict goes in as the ``pytorch_state_dict`` weights).
        path: the ``.zip`` to write (atomically).
        bundle_root: the bundle (model card ``docs/README.md``, ``configs/metadata.json``, sample data).
        diameter: the stored diameter the package uses (default: the model's training-set mean).
        mask_settings: flows -> masks thresholds.
        sample: the sample image (relative to ``sample_data``) the test tensors and cover are made from.

    Raises:
        InputError: ``path`` cannot be written, or the bundle lacks the model card or the sample.
        ValueError: ``network`` is not an eager CPnet (a TorchScript file was given).
    """
    from mmcs_monai.io import read_image, write_overlay
    from mmcs_monai.networks import CPnet, infer_cpnet_args

    if not isinstance(network, CPnet):
        raise ValueError(
            "the BioImage.IO package needs a checkpoint (its pytorch_state_dict weights are CPnet's state dict), "
            f"not a {type(network).__name__}: export from the .pt checkpoint"
        )
    cpnet_args = infer_cpnet_args(network.state_dict())
    path = check_writable(path)
    root = Path(bundle_root)
    card = root / "docs" / "README.md"
    sample_path = root / "sample_data" / sample
    for needed in (card, sample_path):
        if not needed.is_file():
            raise InputError(needed, "not found: the BioImage.IO package needs the bundle's model card and sample image")
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    with tempfile.TemporaryDirectory(prefix="mmcs-bioimageio-") as tmp_name:
        tmp = Path(tmp_name)
        # one pipeline, two weight formats: scripted, and eager from the architecture source + state dict
        ts_path = export_pipeline(network, tmp / "pipeline.pt", diameter, nucleus_channel=1, mask_settings=mask_settings)
        eager = pipeline_module(network, diameter, nucleus_channel=1, mask_settings=mask_settings, scriptable=False)
        settings = _pipeline_settings(eager)
        torch.save(eager.state_dict(), tmp / "weights.pt")
        (tmp / ARCHITECTURE_FILE).write_text(architecture_source())
        # test tensors: the sample as [1, 2, H, W] (cytoplasm, nucleus = zeros: grey image), and the file's labels
        image = np.asarray(read_image(sample_path), dtype=np.float32)
        grey = image.mean(0) if image.ndim == 3 else image
        test_input = np.stack([grey, np.zeros_like(grey)])[None].astype(np.float32)
        scripted = torch.jit.load(str(ts_path))
        with torch.no_grad():
            labels = scripted(torch.from_numpy(test_input)).numpy().astype(np.int32)
        np.save(tmp / "test_input.npy", test_input)
        np.save(tmp / "test_output.npy", labels)
        _write_cover(tmp / "cover.png", grey, labels[0, 0], write_overlay)
        (tmp / "README.md").write_text(_documentation(card.read_text(), settings, metadata))
        (tmp / "LICENSE").write_text((root / "LICENSE").read_text() if (root / "LICENSE").is_file() else "")
        rdf = _rdf(tmp, settings, dict(cpnet_args), metadata, tuple(test_input.shape))
        (tmp / "rdf.yaml").write_text(_yaml_dump(rdf))
        try:
            with atomic_path(path) as out:
                with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                    for name in sorted(p.name for p in tmp.iterdir()):
                        archive.write(tmp / name, name)
        except OSError as err:
            raise InputError(path, f"cannot be written ({err.strerror or err})") from None
    return path


def _write_cover(path: Path, grey: np.ndarray, labels: np.ndarray, write_overlay) -> None:
    """The cover: the sample and its outlined masks side by side (BioImage.IO wants about 2:1)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        overlay = np.asarray(Image.open(write_overlay(Path(tmp) / "overlay.png", grey[None], labels)).convert("RGB"))
    lo, hi = np.percentile(grey, (1, 99))
    plain = (np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    side = np.concatenate([np.repeat(plain[..., None], 3, axis=-1), overlay], axis=1)
    Image.fromarray(side).save(path, format="PNG")


def _documentation(card: str, settings: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    """The package's documentation: the model card, then how the package runs."""
    return (
        card.rstrip()
        + f"""

# This BioImage.IO package

Made by `mmcs export --format bioimageio` (mmcs-monai, bundle version {metadata.get("version", "?")}). It holds the
whole segmentation, image in, instance labels out: percentile normalisation, resizing so cells of
{settings["diameter"]:.2f} px (the model's stored training-set mean diameter) reach the network's
{settings["diam_mean"]:.0f} px, tiled CPnet inference (tiles of up to {settings["roi_size"]} px, Gaussian
blending), flows -> masks (Cellpose 3's flow following, flow QC {settings["flow_threshold"]}, masks under
{settings["min_size"]} px removed, holes filled), resized back. Both weight formats are the same pipeline:
`torchscript` (`pipeline.pt`, runs with torch alone) and `pytorch_state_dict` (`weights.pt` with
`{ARCHITECTURE_FILE}`).

- **Input** `image`: float32 `[batch, channel, y, x]`, channels (cytoplasm, nucleus); give zeros as the
  nucleus channel when there is none (a grey or RGB image: its grey as the first channel). Any size.
  Cells are assumed {settings["diameter"]:.2f} px across; resize images whose cells are much smaller or
  larger first (the automatic diameter estimate of `mmcs infer --diameter auto` is not in the package).
  Pixel size: not fixed (the training data mix several microscopes and magnifications).
- **Output** `labels`: int32 `[batch, 1, y, x]`, 0 background, cells 1..n.

## Validation

The package segments every image at the stored diameter: use the "stored" columns of the Performance table
above (phase 2, the shipped weights: F1 0.748 over all validation images, 0.735 over the five modalities);
the "auto" columns need the diameter estimate of `mmcs infer`, which stays outside. The package's masks are
those of `mmcs infer --diameter stored --precision fp32` (identical on the sample images; F1 between them on
dev val: `docs/export.md` of the repository).

**Weights licence**, as the model card states it: {WEIGHTS_LICENCE_SENTENCE} The package's `license`
field says CC-BY-NC-SA-4.0, the strictest licence the card names; the code is Apache-2.0 (`LICENSE`).
"""
    )


def _rdf(folder: Path, settings: Mapping[str, Any], cpnet_args: dict, metadata: Mapping[str, Any], shape: tuple) -> dict:
    """rdf.yaml of the package (BioImage.IO model spec 0.5)."""
    diameter = float(settings["diameter"])
    space = "cells {:.2f} px across (the model's stored diameter; the network's training diameter is {:.0f} px)"
    space = space.format(diameter, float(settings["diam_mean"]))
    size = {"min": 16, "step": 16}
    inputs = [
        {
            "id": "image",
            "description": "microscopy image: cytoplasm (or grey) channel and nucleus channel (zeros when none)",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": ["cytoplasm", "nucleus"]},
                {"type": "space", "id": "y", "size": dict(size), "description": space},
                {"type": "space", "id": "x", "size": dict(size), "description": space},
            ],
            "test_tensor": {"source": "test_input.npy", "sha256": _sha256(folder / "test_input.npy")},
            "data": {"type": "float32"},
        }
    ]
    outputs = [
        {
            "id": "labels",
            "description": "instance labels: 0 background, cells 1..n",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": ["labels"]},
                {"type": "space", "id": "y", "size": {"tensor_id": "image", "axis_id": "y"}},
                {"type": "space", "id": "x", "size": {"tensor_id": "image", "axis_id": "x"}},
            ],
            "test_tensor": {"source": "test_output.npy", "sha256": _sha256(folder / "test_output.npy")},
            "data": {"type": "int32"},
        }
    ]
    torch_version = torch.__version__.split("+")[0]
    weights = {
        "torchscript": {
            "source": "pipeline.pt",
            "sha256": _sha256(folder / "pipeline.pt"),
            "pytorch_version": torch_version,
            "parent": "pytorch_state_dict",
        },
        "pytorch_state_dict": {
            "source": "weights.pt",
            "sha256": _sha256(folder / "weights.pt"),
            "architecture": {
                "source": ARCHITECTURE_FILE,
                "sha256": _sha256(folder / ARCHITECTURE_FILE),
                "callable": ARCHITECTURE_CALLABLE,
                "kwargs": {"cpnet": _plain(cpnet_args), "pipeline": _plain(dict(settings))},
            },
            "pytorch_version": torch_version,
        },
    }
    return {
        "format_version": "0.5.4",
        "type": "model",
        "name": "MMCS multi-modality cell segmentation",
        "description": (
            "Instance segmentation of cells and nuclei in 2D microscopy (fluorescent, brightfield, H&E, phase "
            "contrast): Cellpose 3's CPnet trained by the semi-supervised MMCS recipe, with the whole pipeline "
            "(normalisation, tiling, flows -> masks) inside; image in, int32 labels out. Research use only: " + WEIGHTS_LICENCE_SENTENCE
        ),
        "authors": [{"name": str(metadata.get("authors", "mmcs-monai developers"))}],
        "cite": [
            {
                "text": "Lou W. et al. Multi-stream Cell Segmentation with Low-level Cues for Multi-modality Images (MMCS). "
                "NeurIPS 2022 Cell Segmentation Challenge, PMLR 212 (2023).",
                "url": "https://proceedings.mlr.press/v212/",
            },
            {
                "text": "Stringer C., Wang T., Michaelos M., Pachitariu M. Cellpose: a generalist algorithm for cellular "
                "segmentation. Nature Methods 18, 100-106 (2021).",
                "doi": "10.1038/s41592-020-01018-x",
            },
        ],
        "license": "CC-BY-NC-SA-4.0",
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": ["cell-segmentation", "instance-segmentation", "cellpose", "microscopy", "2d", "pytorch", "torchscript"],
        "version": str(metadata.get("version", "0.1.0")),
        "attachments": [{"source": "LICENSE"}],
        "inputs": inputs,
        "outputs": outputs,
        "weights": weights,
        "config": {
            "mmcs": {
                "weights_licence": WEIGHTS_LICENCE_SENTENCE,
                "stored_diameter_px": diameter,
                "network_diameter_px": float(settings["diam_mean"]),
            }
        },
    }


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and numpy/torch scalars as Python numbers (YAML-safe)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value
