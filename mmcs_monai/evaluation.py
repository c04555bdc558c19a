"""F1 over a sweep of inference diameters on a labelled set (the paper's Table 4).

The same image -> masks path as everywhere else (:class:`~mmcs_monai.segmentation.CellSegmenter`),
scored with :func:`~mmcs_monai.metrics.f1_score`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import atomic_path
from mmcs_monai.metrics import f1_score
from mmcs_monai.reporting import Progress, diameter_note, timing_note
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms import inference_preprocessing

logger = logging.getLogger(__name__)

# Special diameter names besides numbers and stored subset names.
STORED, AUTO, OWN_SUBSET = "stored", "auto", "subset"


def parse_diameters(diameters: str | float | Sequence[str | float]) -> list[str | float]:
    """``"10,20,auto"`` / ``[10, "auto"]`` -> ``[10.0, 20.0, "auto"]`` (names kept as strings)."""
    if isinstance(diameters, str):
        diameters = [d for d in diameters.strip("[]()").split(",") if d.strip()]
    elif not isinstance(diameters, Sequence):
        diameters = [diameters]
    parsed: list[str | float] = []
    for d in diameters:
        text = str(d).strip().strip("'\"")
        try:
            parsed.append(float(text))
        except ValueError:
            parsed.append(text)
    if not parsed:
        raise ValueError("give at least one diameter")
    return parsed


def _inference_diameter(spec: str | float, item: Mapping[str, Any], network: torch.nn.Module) -> str | float | None:
    """What to hand the inferer for one image: ``subset`` means the image's own subset if stored."""
    if spec == STORED:
        return None
    if spec == OWN_SUBSET:
        subset = str(item.get("subset") or "")
        return subset if subset in getattr(network, "subset_diameters", {}) else None
    return spec


def diameter_sweep(
    network: torch.nn.Module,
    items: Sequence[Mapping[str, Any]],
    diameters: Sequence[str | float],
    inferer: CellInferer | None = None,
    border: int = 2,
    mask_settings: MaskSettings | None = None,
) -> list[dict[str, Any]]:
    """Per-image F1 at IoU 0.5 for each inference diameter.

    Args:
        network: a CPnet in eval mode.
        items: labelled data-list items (``image``, ``label``, optional ``subset``/``nucleus_channel``).
        diameters: numbers (pixels), ``"stored"`` (the model's mean), ``"auto"``, ``"subset"`` (each
            image at its own subset's stored diameter) or a stored subset name.
        inferer: the inferer to use (default: 224 px tiles, auto precision).
        border: CellSeg border (px) for the F1.
        mask_settings: flows -> masks thresholds (default: :class:`MaskSettings`()).

    Returns:
        one row per (diameter, image): ``diameter`` (as asked), ``id``, ``subset``, ``f1``, ``cells``
        (predicted), ``diameter_px`` (the diameter the image was segmented at) and ``megapixels`` (the
        image's size). Progress (:class:`~mmcs_monai.reporting.Progress`) counts the images.
    """
    segmenter = CellSegmenter(network, inferer, mask_settings)
    load = inference_preprocessing(keys=["image", "label"])
    rows = []
    with Progress(len(items), "sweeping diameters", "image", logger) as progress:
        for item in items:
            data = load(dict(item))
            image = torch.as_tensor(np.asarray(data["image"]))
            gt = np.asarray(data["label"])[0]
            mine = []
            for spec in diameters:
                result = segmenter(image, diameter=_inference_diameter(spec, item, network))
                score = f1_score(gt, result.masks, border=border)
                mine.append(
                    {
                        "diameter": spec,
                        "id": item.get("id", ""),
                        "subset": str(item.get("subset") or "default"),
                        "f1": score["f1"],
                        "cells": result.cells,
                        "diameter_px": round(result.diameter, 2),
                        "megapixels": gt.shape[-1] * gt.shape[-2] / 1e6,
                    }
                )
            rows += mine
            progress.step(f"{item.get('id', item['image'])}: F1 " + ", ".join(f"{_label(r['diameter'])} {r['f1']:.3f}" for r in mine))
    return rows


def _label(spec: str | float) -> str:
    """A diameter as asked, as the table writes it (``25``, ``auto``)."""
    return f"{spec:g}" if isinstance(spec, float) else str(spec)


def sweep_summary(rows: Sequence[Mapping[str, Any]], seconds: float) -> str:
    """The sweep's one-line summary: images and diameters scored, the best diameter overall, the
    diameters used, time and s/MPix (over every segmentation run)."""
    _, table = summarise_sweep(rows)
    best = max(table, key=lambda line: line["overall"])
    used = diameter_note(r["diameter_px"] for r in rows)
    parts = [
        f"{len({r['id'] for r in rows})} image(s) x {len(table)} diameter(s) scored",
        f"best overall F1 {best['overall']:.3f} at diameter {_label(best['diameter'])}",
        f"segmented at {used}" if used else "",
        timing_note(seconds, sum(r.get("megapixels", 0.0) for r in rows)),
    ]
    return "; ".join(p for p in parts if p)


def summarise_sweep(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Mean F1 per diameter, overall and per subset: ``(subsets, [{"diameter", "overall", subset...}])``."""
    subsets = sorted({r["subset"] for r in rows})
    table = []
    for spec in dict.fromkeys(r["diameter"] for r in rows):
        mine = [r for r in rows if r["diameter"] == spec]
        line = {"diameter": spec, "overall": float(np.mean([r["f1"] for r in mine])), "images": len(mine)}
        for subset in subsets:
            values = [r["f1"] for r in mine if r["subset"] == subset]
            line[subset] = float(np.mean(values)) if values else float("nan")
        table.append(line)
    return subsets, table


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of mean F1 per diameter (rows) overall and per subset (columns)."""
    subsets, table = summarise_sweep(rows)
    header = ["diameter", "overall", *subsets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in table:
        lines.append("| " + " | ".join([_label(line["diameter"])] + [f"{line[k]:.3f}" for k in header[1:]]) + " |")
    return "\n".join(lines)


def write_sweep_csv(path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Per-image rows (diameter, id, subset, f1, cells, diameter_px) as CSV, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["diameter", "id", "subset", "f1", "cells", "diameter_px"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
