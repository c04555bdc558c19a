"""Data lists: one loader for every way a user points at data.

A data list is a list of dicts, one per image, as MONAI datasets expect::

    {"image": "/abs/img.tif", "label": "/abs/lbl.tif", "id": "img", "subset": "fluorescence",
     "nucleus_channel": None}

``label`` is absent for unlabelled images. ``subset`` names the modality or data set the image
belongs to (used for per-subset diameters and per-modality scores).

Accepted sources (:func:`load_datalist`):

- a manifest CSV or JSON with ``split``, ``image``, ``label`` columns (the dev manifest format;
  ``modality`` becomes ``subset``), paths relative to the manifest;
- a MONAI Decathlon-style JSON (``{"training": [...], "validation": [...]}``);
- a JSON list of dicts;
- a folder with ``images/`` and ``labels/`` subfolders (matched by file stem), or a folder of
  images alone (unlabelled).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from mmcs_monai.io import InputError, is_image_file, masks_filename

# Decathlon JSONs name their splits differently from manifests.
_DECATHLON_KEYS = {"train": "training", "val": "validation", "validation": "validation", "test": "test"}


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _resolve(base: Path, value: str | None) -> str | None:
    if value in (None, ""):
        return None
    path = Path(value)
    return str(path if path.is_absolute() else (base / path).resolve())


def _normalise_row(row: dict[str, Any], base: Path) -> dict[str, Any]:
    """Absolute paths, ``modality`` -> ``subset``, empty strings -> None, channel index -> int."""
    image = _resolve(base, row.get("image"))
    if image is None:
        raise InputError(base, f"data list row without an image: {row}")
    item: dict[str, Any] = {"image": image}
    label = _resolve(base, row.get("label"))
    if label is not None:
        item["label"] = label
    item["id"] = row.get("id") or _stem(Path(image))
    item["subset"] = row.get("subset") or row.get("modality") or "default"
    nucleus = row.get("nucleus_channel")
    item["nucleus_channel"] = None if nucleus in (None, "") else int(nucleus)
    for key in ("gt_complete", "diameter"):
        if row.get(key) not in (None, ""):
            item[key] = float(row[key]) if key == "diameter" else row[key]
    return item


def _from_rows(rows: list[dict[str, Any]], base: Path, split: str | None) -> list[dict[str, Any]]:
    if split is not None:
        rows = [r for r in rows if r.get("split", split) == split]
    return [_normalise_row(r, base) for r in rows]


def _from_folder(folder: Path) -> list[dict[str, Any]]:
    folder = folder.resolve()
    images_dir, labels_dir = folder / "images", folder / "labels"
    if images_dir.is_dir():
        labels = {_stem(p): p for p in labels_dir.iterdir() if is_image_file(p)} if labels_dir.is_dir() else {}
        rows = []
        for image in sorted(p for p in images_dir.iterdir() if is_image_file(p)):
            row = {"image": str(image)}
            if _stem(image) in labels:
                row["label"] = str(labels[_stem(image)])
            rows.append(row)
    else:
        rows = [{"image": str(p)} for p in sorted(folder.iterdir()) if is_image_file(p)]
    if not rows:
        raise InputError(folder, "folder holds no images (looked for images/ and labels/, or image files)")
    return [_normalise_row(r, folder) for r in rows]


def load_datalist(
    source: str | os.PathLike, split: str | None = None, exclude_partial: bool = False, limit: int | None = None
) -> list[dict[str, Any]]:
    """Read a data list from a manifest, a Decathlon JSON, a JSON list or a folder.

    Args:
        source: path of the manifest/JSON/folder.
        split: keep rows of this split (``train``, ``val``, ...); for Decathlon JSON, the section.
        exclude_partial: drop rows whose ``gt_complete`` is ``partial...`` (masks miss many cells),
            as the dev data's README asks for F1 figures.
        limit: keep the first ``limit`` rows (quick runs).

    Returns:
        list of dicts with absolute ``image`` (and ``label``) paths, ``id``, ``subset``, ``nucleus_channel``.
    """
    source = Path(source)
    if source.is_dir():
        items = _from_folder(source)
    elif not source.is_file():
        raise InputError(source, "data list not found")
    elif source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            items = _from_rows(list(csv.DictReader(f)), source.parent, split)
    elif source.suffix.lower() == ".json":
        with open(source) as f:
            content = json.load(f)
        if isinstance(content, dict) and "items" in content:
            items = _from_rows(content["items"], source.parent, split)
        elif isinstance(content, dict):
            key = _DECATHLON_KEYS.get(split or "train", split)
            if key not in content:
                raise InputError(source, f"no section {key!r} (has {sorted(content)})")
            base = source.parent / content.get("base_dir", ".")  # an absolute base_dir replaces the parent
            items = [_normalise_row(r, base) for r in content[key]]
        elif isinstance(content, list):
            items = _from_rows(content, source.parent, split)
        else:
            raise InputError(source, "JSON data list must be a list of rows or a dict of sections")
    else:
        raise InputError(source, "data list must be a folder, a .csv manifest or a .json file")
    if exclude_partial:
        items = [i for i in items if not str(i.get("gt_complete", "yes")).startswith("partial")]
    return items[:limit] if limit else items


def unlabelled(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same rows with their labels removed: images to use as unlabelled data."""
    return [{k: v for k, v in i.items() if k != "label"} for i in items]


def pending_outputs(items: list[dict[str, Any]], output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Items whose masks file is not yet in ``output_dir``, so a folder run resumes where it stopped."""
    output_dir = Path(output_dir)
    return [i for i in items if not (output_dir / masks_filename(i["id"])).is_file()]
