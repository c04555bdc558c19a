"""The ``mmcs`` command: train, infer, evaluate, measure diameters, sweep the inference diameter, export.

``train``, ``infer`` and ``evaluate`` run the bundle's workflows (``bundle/configs/*.json``) through
``monai.bundle.run`` (:func:`~mmcs_monai.workflows.run_workflow`), so they and ``python -m monai.bundle run ...``
are the same code path, and their options are bundle config overrides (``--epochs 10``, ``--data_source
path``...). ``infer-slide``, ``diameter``, ``diameter-sweep`` and ``export`` call the library directly
(:class:`~mmcs_monai.wholeslide.SlideSegmenter`, :mod:`~mmcs_monai.diameters`, :mod:`~mmcs_monai.evaluation`,
:mod:`~mmcs_monai.networks`) and take the options their functions below list.

Examples::

    mmcs train                                     # sample data, default recipe
    mmcs train --data_source ../shared/data/dev/manifest.csv --recipe cpu
    mmcs infer images/ outputs/ --model bundle/models/model.pt --diameter 25
    mmcs evaluate --data_source ../shared/data/dev/manifest.csv
    mmcs diameter labels/
    mmcs infer-slide slide.tif outputs/ --model bundle/models/model.pt
    mmcs diameter-sweep ../shared/data/dev/manifest.csv --diameters 10,20,30,stored,auto
    mmcs export --model bundle/models/model.pt --output bundle/models/model.ts
    mmcs export --format pipeline --output pipeline.pt      # image -> labels, one file, torch alone (docs/export.md)
    mmcs export --format bioimageio --output mmcs.zip        # BioImage.IO package (spec 0.5)

Long commands show progress (a bar on a terminal, counted log lines with an ETA otherwise) and end with a
summary line (images, cells, diameters, time and s/MPix, outputs, the model and its SHA-256 prefix). A
mistake (a wrong path, an unreadable model, a bad option value, an unknown option or subset name) exits with
status 2 and one ``mmcs: error:`` line; ``--verbose`` (or ``MMCS_DEBUG=1``) shows the traceback and every
library message.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcs_monai.workflows import debug_requested, resolve_bundle_root, resolve_model, run_workflow


def _bundle_root(bundle_root: str | os.PathLike | None) -> Path:
    return resolve_bundle_root(bundle_root)


def _model_path(model: str | None, bundle_root: str | None) -> Path:
    """The model file a command uses: ``model`` (a file, or a shipped model's name: ``permissive``), default
    ``<bundle_root>/models/model.pt`` (:func:`~mmcs_monai.workflows.resolve_model`)."""
    return resolve_model(model, bundle_root)


def _load_network(model: str | None, bundle_root: str | None, device: str | None = None):
    """The network in ``model`` (default ``<bundle_root>/models/model.pt``): a checkpoint or an exported
    TorchScript model, in eval mode on ``device`` (default :func:`~mmcs_monai.distributed.local_device`)."""
    import torch

    from mmcs_monai.distributed import local_device
    from mmcs_monai.networks import load_model

    device = torch.device(device) if device is not None else local_device()
    return load_model(_model_path(model, bundle_root), map_location=device)


def train(recipe: str | list[str] | None = None, bundle_root: str | None = None, **overrides) -> None:
    """Train a model (supervised) with ``bundle/configs/train.json``.

    Args:
        recipe: extra config(s) merged over train.json (a recipe name, e.g. ``cpu`` or ``finetune``, or a file).
        bundle_root: bundle folder (default: the repository's ``bundle/``).
        overrides: config values, e.g. ``--data_source manifest.csv --epochs 50 --resume True``; ``--pretrained``
            takes a file or a shipped model's name (``--recipe finetune --pretrained permissive``).
            Models are written to ``<bundle_root>/trained`` unless ``--ckpt_dir`` is given (the shipped
            ``<bundle_root>/models/model.pt`` is never overwritten).
    """
    if overrides.get("pretrained"):  # a shipped model's name (--pretrained permissive) or a file
        overrides["pretrained"] = str(_model_path(overrides["pretrained"], bundle_root))
    # under torchrun (torchrun --nproc_per_node=N -m mmcs_monai.cli train ...) multi_gpu_train.json is added
    run_workflow("training", bundle_root, recipe, overrides, strict=True)


def infer(
    input_dir: str,
    output_dir: str,
    model: str | None = None,
    diameter: float | str | None = None,
    bundle_root: str | None = None,
    **overrides,
) -> None:
    """Segment every image in ``input_dir``; write ``<id>_masks.tif`` and ``<id>_overlay.png`` to ``output_dir``.

    Args:
        input_dir: folder of images (TIFF, OME-TIFF, PNG, JPEG, NIfTI, OME-Zarr folders), one OME-Zarr, or a data list.
        output_dir: destination; images that already have masks there are skipped.
        model: model file (ours or a Cellpose 3 checkpoint) or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        diameter: cell diameter in pixels in these images, in micrometres (``12um``: each image's pixel size from
            its OME metadata, or ``--pixel_size``), a stored subset name, ``stored`` (the model's training mean) or
            ``auto`` (the default: estimated per image, and reported per image in the log and in
            ``segmentation_summary.csv``, in px and, where the pixel size is known, in µm).
        overrides: e.g. ``--nucleus_channel 1 --flow_threshold 0.4 --precision bf16``; ``--formats tif,geojson,roi,zarr``
            (outputs: label TIFF, QuPath GeoJSON, ImageJ ROI set, NGFF labels), ``--channels DAPI`` or
            ``--channels cyto,DAPI`` (by OME channel name or index), ``--pixel_size 0.325`` (µm per pixel).
    """
    overrides.update(input_dir=str(input_dir), output_dir=str(output_dir))
    if diameter is not None:
        overrides["diameter"] = diameter
    if model:
        overrides["model_path"] = str(_model_path(model, bundle_root))
    run_workflow("inference", bundle_root, None, overrides, strict=True)


def evaluate(
    model: str | None = None,
    diameter: float | str | None = None,
    precision: str | None = None,
    bundle_root: str | None = None,
    recipe=None,
    **overrides,
) -> None:
    """F1 at IoU 0.5 on the validation split; writes ``f1_per_image.csv`` and ``f1_summary.json``.

    Args:
        model: model file or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        diameter: inference diameter, as for ``mmcs infer`` (the config's ``inference_diameter``; default ``auto``).
        precision: inference precision (``inference_precision``: auto, fp32, bf16, fp16).
        overrides: e.g. ``--data_source manifest.csv --val_split val --output_dir eval/``.
    """
    if model:
        overrides["model_path"] = str(_model_path(model, bundle_root))
    if diameter is not None:
        overrides["inference_diameter"] = diameter
    if precision is not None:
        overrides["inference_precision"] = precision
    run_workflow("evaluating", bundle_root, recipe, overrides, strict=True)


def diameter(*paths: str) -> dict[str, float]:
    """Median cell diameter (pixels) of each label file (or folder of label files), and their mean."""
    from mmcs_monai.diameters import mean_of_diameters, median_diameter
    from mmcs_monai.io import is_image_file, read_labels

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if is_image_file(f)) if p.is_dir() else [p]
    result = {str(f): round(median_diameter(read_labels(f)), 2) for f in files}
    result["mean"] = round(mean_of_diameters(result.values()), 2)
    return result


def infer_slide(
    image: str,
    output: str,
    model: str | None = None,
    table: bool | str = True,
    diameter: float | str | None = "auto",
    block_size: int = 2048,
    halo: int | None = None,
    precision: str = "auto",
    compile: bool | str = "auto",
    nucleus_channel: int | None = None,
    cyto_channel: int | None = None,
    flow_threshold: float | None = None,
    cellprob_threshold: float | None = None,
    min_size: int | None = None,
    bundle_root: str | None = None,
    formats: str = "tif",
    channels: str | None = None,
    pixel_size: float | str | None = None,
) -> str:
    """Segment one large image (whole slide, 10,000 x 10,000 px and more) block by block.

    Args:
        image: TIFF or OME-TIFF (tiled, stripped or pyramidal; only the needed tiles are decoded), OME-Zarr (level 0,
            only the chunks a block touches), npy, PNG...
        output: label TIFF path, or a folder for ``<stem>_masks.tif``.
        model: model file or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        table: write the per-cell CSV (id, centroid, area, bbox) beside the labels (``True``), to this
            path, or not (``False``).
        diameter: cell diameter in pixels, in micrometres (``12um``: needs the pixel size, from the image's metadata
            or ``pixel_size``), a stored subset name, ``auto`` (the default: estimated once, on a central crop, and
            used for every block) or ``stored`` (the model's mean).
        formats: outputs, comma-separated: ``tif`` (the label TIFF, the default), ``geojson`` (QuPath objects),
            ``roi`` (ImageJ ROI set), ``zarr`` (NGFF labels: into the input OME-Zarr, else a new one).
        channels: the channel to segment and, optionally, the nucleus channel, by name (OME metadata) or index:
            ``DAPI``, ``cyto,DAPI``, ``0,2``.
        pixel_size: micrometres per pixel (overrides the metadata).
        block_size: block side in network pixels; memory grows with its square.
        halo: context around each block in image pixels (default ``max(64, 4 * diameter)``).
        precision: inference precision (auto, fp32, bf16, fp16).
        compile: run the network compiled (``torch.compile``): True, False, or ``auto`` (the default: on a
            CPU for slides large enough to repay the one-time compile: 20 megapixels in fp32, 100 in bf16).
        flow_threshold, cellprob_threshold, min_size: mask thresholds (default: the library's, as in Cellpose 3).

    Returns:
        a one-line summary (cells, blocks, diameter, time and s/MPix, outputs, model and its SHA-256 prefix).
    """
    from mmcs_monai import distributed
    from mmcs_monai.flows import MaskSettings
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.io import image_stem, masks_filename
    from mmcs_monai.wholeslide import SlideSegmenter

    out = Path(output)
    stem = image_stem(image)
    labels_path = out if out.suffix.lower() in (".tif", ".tiff") else out / masks_filename(stem)
    table_path = None
    if table:
        table_path = Path(table) if isinstance(table, str) else labels_path.with_name(f"{stem}_cells.csv")
    distributed.init_process_group()  # under torchrun: the blocks are shared out over the ranks
    network = _load_network(model, bundle_root, device=str(distributed.local_device()))
    segmenter = SlideSegmenter(
        network,
        CellInferer(precision=precision, compile=compile),
        block_size=block_size,
        halo=halo,
        diameter=diameter,
        cyto_channel=cyto_channel,
        nucleus_channel=nucleus_channel,
        mask_settings=MaskSettings.from_options(flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold, min_size=min_size),
        channels=channels,
        pixel_size=pixel_size,
        formats=formats,
    )
    result = segmenter(image, labels_path, table_path)
    main_process = distributed.is_main_process()
    distributed.destroy_process_group()
    if not main_process:
        return None  # rank 0 reports
    return _slide_summary(image, result, _model_path(model, bundle_root))


def _slide_summary(image: str, result, model_path: Path) -> str:
    """``mmcs infer-slide``'s summary line from its :class:`~mmcs_monai.wholeslide.SlideResult`."""
    from mmcs_monai.reporting import diameter_note, model_note, timing_note

    outputs = ", ".join(str(p) for p in result.outputs)
    megapixels = result.shape[0] * result.shape[1] / 1e6
    parts = [f"{image}: {result.cells} cells in {result.blocks} blocks", diameter_note([result.diameter], result.pixel_size)]
    parts += [timing_note(result.seconds, megapixels), f"outputs {outputs}", model_note(model_path)]
    return "; ".join(parts)


def diameter_sweep(
    data_source: str,
    model: str | None = None,
    diameters="10,15,20,25,30,40,stored,subset,refine,auto",
    split: str = "val",
    limit: int | None = None,
    precision: str = "auto",
    roi_size: int | None = None,
    border: int = 2,
    output: str | None = None,
    bundle_root: str | None = None,
) -> str:
    """F1 at IoU 0.5 on a labelled set for each inference diameter (rows) overall and per subset (columns).

    Args:
        data_source: labelled data (manifest CSV/JSON, Decathlon JSON or folder).
        model: model file or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        diameters: comma-separated numbers (pixels) and names: ``stored`` (the model's mean),
            ``subset`` (each image at its own subset's stored diameter), ``auto`` (the multi-scale estimate),
            ``refine`` (segment at the stored mean, measure, segment again), or a stored subset name.
        split: data split to score (manifests with a split column; ignored otherwise).
        limit: score only the first N images.
        output: optional CSV with one row per (diameter, image).

    Returns:
        the table (Markdown; the command line prints it).
    """
    import logging
    import time

    from mmcs_monai.data import load_datalist
    from mmcs_monai.evaluation import diameter_sweep as sweep
    from mmcs_monai.evaluation import format_sweep_table, parse_diameters, sweep_summary, write_sweep_csv
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.io import InputError
    from mmcs_monai.reporting import model_note

    start = time.perf_counter()
    items = [i for i in load_datalist(data_source, split=split, exclude_partial=True, limit=limit) if i.get("label")]
    if not items:
        raise InputError(data_source, f"no labelled images in split {split!r}")
    specs = parse_diameters(diameters)
    network = _load_network(model, bundle_root)
    inferer = CellInferer(precision=precision, **({"roi_size": int(roi_size)} if roi_size else {}))
    rows = sweep(network, items, specs, inferer=inferer, border=border)
    if output:
        write_sweep_csv(output, rows)
    where = f"outputs {output} and the table on stdout" if output else "the table on stdout"
    summary = [sweep_summary(rows, time.perf_counter() - start), where, model_note(_model_path(model, bundle_root))]
    logging.getLogger(__name__).info("; ".join(summary))
    return format_sweep_table(rows)


def calibrate(
    data_source: str,
    model: str | None = None,
    split: str | None = None,
    sources: str | None = None,
    per_subset: int = 8,
    diameter: float | str = "auto",
    seed: int = 0,
    bundle_root: str | None = None,
) -> str:
    """Calibrate a model for int8 inference: write ``<stem>.int8.json`` beside the model file. ``precision auto``
    then runs it in int8 on a CPU with AVX-512 VNNI and no native bf16 (on an AVX2-only CPU int8 is no faster than
    fp32), and ``--precision int8`` anywhere on a CPU.

    Args:
        data_source: images like the model's training images: a folder, a manifest CSV/JSON or a Decathlon JSON.
        model: model file or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        split: rows of this split only (``train``; manifests with a split column).
        sources: rows of these sources only, comma-separated (the manifest's ``source`` values).
        per_subset: images drawn from each subset (modality) of ``data_source``.
        diameter: the diameter the images are segmented at while their tiles are recorded (``auto`` as ``mmcs infer``).
        seed: the draw of the images.

    Returns:
        the calibration file written (the command line prints it).
    """
    from mmcs_monai.calibration import calibrate_model
    from mmcs_monai.data import load_datalist, select_rows

    items = load_datalist(data_source, split=split)
    if sources:  # fire gives "a,b" as a tuple
        names = sources.split(",") if isinstance(sources, str) else sources
        items = select_rows(items, [str(s).strip() for s in names if str(s).strip()])
    return str(calibrate_model(_model_path(model, bundle_root), items, diameter=diameter, per_subset=int(per_subset), seed=int(seed)))


def export(
    model: str | None = None,
    output: str | None = None,
    bundle_root: str | None = None,
    verify: bool = True,
    format: str = "torchscript",
    diameter: float | str | None = None,
    nucleus_channel: int | None = None,
    cyto_channel: int | None = None,
) -> str:
    """Export a checkpoint as one TorchScript file (what ``python -m monai.bundle ckpt_export`` writes), or, with
    ``--format pipeline`` / ``--format bioimageio``, the whole segmentation (``docs/export.md``).

    ``--format torchscript`` (the default) writes the network alone:

    The file holds the weights, ``diam_mean``/``diam_labels`` and the per-subset diameters, the bundle's
    ``metadata.json`` and ``inference.json``; it takes any H and W (padding inside) and runs without
    mmcs-monai (``torch.jit.load``). The Deploy app (``mmcs_monai/deploy/app.py``) and ``mmcs infer --model``
    take it.

    Args:
        model: checkpoint (ours or Cellpose 3) or a shipped model's name (``permissive``); default ``<bundle_root>/models/model.pt``.
        output: destination; default ``<bundle_root>/models/model.ts``. Written atomically.
        verify: compare the exported model with the checkpoint on the bundle's sample images.
        format: ``torchscript`` (the network), ``pipeline`` (one TorchScript file, image -> int32 labels: default
            output ``<bundle_root>/models/pipeline.pt``) or ``bioimageio`` (a BioImage.IO model package, spec 0.5:
            default output ``<bundle_root>/models/bioimageio.zip``; needs a checkpoint, not a TorchScript file).
        diameter: for ``pipeline``/``bioimageio``: the cell diameter stored in the file (pixels or a stored subset
            name; default: the model's training-set mean). ``auto`` stays outside the file.
        nucleus_channel, cyto_channel: for ``pipeline``: the channels of ``[C, H, W]`` images stored in the file
            (default: no nucleus channel; cytoplasm = the mean of the other channels). The package takes
            (cytoplasm, nucleus) channels.

    Returns:
        a one-line summary (path, diameters, largest output difference).
    """
    from mmcs_monai.export import FORMATS

    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if format != "torchscript":
        return _export_segmentation(model, output, bundle_root, format, diameter, nucleus_channel, cyto_channel, verify)
    import json
    import time

    import numpy as np
    import torch

    from mmcs_monai.networks import export_torchscript, load_torchscript
    from mmcs_monai.networks.model_files import max_output_difference
    from mmcs_monai.reporting import Progress, model_note

    start = time.perf_counter()
    root = _bundle_root(bundle_root)
    network = _load_network(model, bundle_root, device="cpu")  # exported on CPU: loads anywhere
    path = Path(output) if output else root / "models" / "model.ts"
    configs = {"inference": json.loads((root / "configs" / "inference.json").read_text())}
    export_torchscript(network, path, metadata=root / "configs" / "metadata.json", configs=configs)
    exported, _ = load_torchscript(path)
    summary = f"{path}: diam_mean {float(exported.diam_mean):.1f}, diam_labels {float(exported.diam_labels):.2f}"
    summary += f", {len(exported.subset_diameters)} subset diameter(s)"
    if verify:
        from mmcs_monai.data import load_datalist
        from mmcs_monai.transforms import inference_preprocessing

        load = inference_preprocessing()
        items = load_datalist(root / "sample_data" / "datalist.json", split="validation")[:3]
        difference = 0.0
        with Progress(len(items), "checking the export", "image") as progress:
            for item in items:
                image = torch.as_tensor(np.asarray(load(item)["image"]))[None]
                difference = max(difference, max_output_difference(network, exported, [image]))
                progress.step(f"{item.get('id', item['image'])}: max |eager - TorchScript| {difference:.2e}")
        summary += f"; max |eager - TorchScript| on {len(items)} sample images: {difference:.2e}"
        if difference >= 1e-4:
            raise SystemExit(summary + " (>= 1e-4: the export does not match)")
    return f"{summary}; {time.perf_counter() - start:.1f} s; from {model_note(_model_path(model, bundle_root))}"


def _export_segmentation(model, output, bundle_root, format, diameter, nucleus_channel, cyto_channel, verify) -> str:
    """``mmcs export --format pipeline|bioimageio``: see :func:`export`."""
    import time

    import numpy as np
    import torch

    from mmcs_monai import export as exports
    from mmcs_monai.reporting import model_note

    start = time.perf_counter()
    root = _bundle_root(bundle_root)
    default = "pipeline.pt" if format == "pipeline" else "bioimageio.zip"
    path = exports.check_writable(Path(output) if output else root / "models" / default)
    network = _load_network(model, bundle_root, device="cpu")  # exported on CPU: loads anywhere
    if format == "bioimageio":
        exports.export_bioimageio(network, path, root, diameter=diameter)
        summary = f"{path}: BioImage.IO model package (spec 0.5; check it with `bioimageio test {path}`)"
    else:
        exports.export_pipeline(network, path, diameter, nucleus_channel, cyto_channel)
        summary = f"{path}: pipeline TorchScript file, image -> int32 labels (torch.jit.load; needs torch only)"
        if verify:
            from mmcs_monai.data import load_datalist
            from mmcs_monai.io import read_image
            from mmcs_monai.segmentation import CellSegmenter
            from mmcs_monai.transforms import inference_preprocessing

            exported = torch.jit.load(str(path))
            segmenter = CellSegmenter(network, mask_settings=None)
            segmenter.inferer.precision, segmenter.inferer.compile = "fp32", False
            load = inference_preprocessing(nucleus_channel=nucleus_channel, cyto_channel=cyto_channel)
            items = load_datalist(root / "sample_data" / "datalist.json", split="validation")[:2]
            same = 0
            for item in items:
                x = np.asarray(load(item)["image"])
                expected = segmenter(x, diameter=float(exported.diameter)).masks
                with torch.no_grad():
                    got = exported(torch.as_tensor(np.asarray(read_image(item["image"]), dtype=np.float32))).numpy()
                same += int(np.array_equal(expected, got))
            summary += f"; same masks as the library on {same} of {len(items)} sample images"
    return f"{summary}; {time.perf_counter() - start:.1f} s; from {model_note(_model_path(model, bundle_root))}"


def user_error(error: BaseException) -> str | None:
    """The one line to show for ``error``, or None for a bug (shown with its traceback).

    MONAI's config evaluation wraps the error a user can act on (``RuntimeError: Failed to evaluate
    ConfigExpression ...``); this walks the chain back to it: an :class:`~mmcs_monai.io.InputError` (a file
    and its problem, model files included) first, else a ``ValueError``/``KeyError`` (a bad option value,
    an unknown subset name).
    """
    from mmcs_monai.io import InputError, exception_chain

    chain = exception_chain(error)
    for kind in (InputError, FileNotFoundError, ValueError, KeyError):
        for link in chain:
            if isinstance(link, kind):
                message = str(link.args[0]) if isinstance(link, KeyError) and link.args else str(link)
                return (message.strip().splitlines() or [type(link).__name__])[0]
    return None


def _log_to_stderr() -> None:
    """Where the commands that run no bundle workflow log (progress, summaries): stderr, so their stdout
    (a table, a summary) can be redirected alone. A workflow's own ``logging.conf`` replaces this."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """``mmcs`` entry point: a mistake exits with status 2 and one line; ``--verbose`` or ``MMCS_DEBUG=1``
    shows the traceback instead."""
    import sys

    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        os.environ["MMCS_DEBUG"] = "1"  # the workflows read it too: MONAI's warnings and ignite's lines come back
    verbose = debug_requested()
    argv = [a for a in argv if a != "--verbose"]
    _log_to_stderr()
    commands = {
        "train": train,
        "infer": infer,
        "evaluate": evaluate,
        "diameter": diameter,
        "diameter-sweep": diameter_sweep,
        "infer-slide": infer_slide,
        "export": export,
        "calibrate": calibrate,
    }
    try:
        fire.Fire(commands, command=argv, name="mmcs")
    except SystemExit:
        raise
    except Exception as err:
        message = None if verbose else user_error(err)
        if message is None:
            raise
        print(f"mmcs: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
