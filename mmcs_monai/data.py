"""Data lists: one loader for every way a user points at data.

A data list is a list of dicts, one per image, as MONAI datasets expect::

    {"image": "/abs/img.tif", "label": "/abs/lbl.tif", "id": "img", "subset": "fluorescence",
     "nucleus_channel": None}

``label`` is absent for unlabelled images. ``subset`` names the modality or data set the image
belongs to (used for per-subset diameters and per-modality scores). Manifest rows that say where an
image comes from also give ``source`` (``source_group``, else ``source_repo``): what per-source balancing reads.

Accepted sources (:func:`load_datalist`):

- a manifest CSV or JSON with ``split``, ``image``, ``label`` columns (the dev manifest format;
  ``modality`` becomes ``subset``), paths relative to the manifest;
- a MONAI Decathlon-style JSON (``{"training": [...], "validation": [...]}``);
- a JSON list of dicts;
- a folder with ``images/`` and ``labels/`` subfolders (matched by file stem), or a folder of
  images alone (unlabelled); OME-Zarr folders (``*.zarr``) count as images, and one alone is a data list of one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from monai.data import CacheDataset

from mmcs_monai.io import InputError, atomic_path, image_stem, masks_filename
from mmcs_monai.ome import is_image as is_image_file
from mmcs_monai.ome import is_zarr

logger = logging.getLogger(__name__)

# Decathlon JSONs name their splits differently from manifests.
_DECATHLON_KEYS = {"train": "training", "val": "validation", "validation": "validation", "test": "test"}


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
    item["id"] = row.get("id") or image_stem(Path(image))
    item["subset"] = row.get("subset") or row.get("modality") or "default"
    nucleus = row.get("nucleus_channel")
    item["nucleus_channel"] = None if nucleus in (None, "") else int(nucleus)
    source = row.get("source_group") or row.get("source_repo")
    if source:
        item["source"] = source
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
        labels = {image_stem(p): p for p in labels_dir.iterdir() if is_image_file(p)} if labels_dir.is_dir() else {}
        rows = []
        for image in sorted(p for p in images_dir.iterdir() if is_image_file(p)):
            row = {"image": str(image)}
            if image_stem(image) in labels:
                row["label"] = str(labels[image_stem(image)])
            rows.append(row)
    else:
        rows = [{"image": str(p)} for p in sorted(folder.iterdir()) if is_image_file(p)]
    if not rows:
        raise InputError(folder, "folder holds no images (looked for images/ and labels/, or image files)")
    return [_normalise_row(r, folder) for r in rows]


def load_datalist(
    source: str | os.PathLike | list | tuple,
    split: str | None = None,
    exclude_partial: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Read a data list from a manifest, a Decathlon JSON, a JSON list or a folder, or several of them.

    Args:
        source: path of the manifest/JSON/folder, or a list of such paths: their rows are joined in
            order (ids must be unique across them).
        split: keep rows of this split (``train``, ``val``, ...); for Decathlon JSON, the section.
        exclude_partial: drop rows whose ``gt_complete`` is ``partial...`` (masks miss many cells),
            as the dev data's README asks for F1 figures.
        limit: keep the first ``limit`` rows (quick runs).

    Returns:
        list of dicts with absolute ``image`` (and ``label``) paths, ``id``, ``subset``, ``nucleus_channel``.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("data_source", "empty list of data sources")
        items, seen = [], {}
        for one in source:
            for item in load_datalist(one, split=split, exclude_partial=exclude_partial):
                if item["id"] in seen:
                    raise InputError(one, f"image id {item['id']!r} is also in {seen[item['id']]}")
                seen[item["id"]] = one
                items.append(item)
        return items[:limit] if limit else items
    source = Path(source)
    if is_zarr(source):  # one OME-Zarr image
        items = [_normalise_row({"image": str(source)}, source.parent)]
    elif source.is_dir():
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


def subset_weights(items: list[dict[str, Any]], power: float = 0.5, key: str = "subset") -> list[float]:
    """Sampling weight per item so that a subset of ``n`` images gets a share proportional to ``n ** (1 - power)``.

    ``power=0`` samples every image equally (large subsets dominate), ``power=1`` gives every subset
    the same share (a 3-image subset is drawn as often as a 300-image one), ``0.5`` is in between:
    shares follow the square root of the subset sizes. The weights sum to ``len(items)``.

    Args:
        items: data list rows with a ``key`` entry (missing: ``"default"``).
        power: exponent of the per-subset down-weighting, in [0, 1].
        key: the row key that groups images: ``subset`` (modality) or ``source`` (where they come from,
            as for the unlabelled pool).

    Returns:
        one positive float per item, in the order of ``items``.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power}")
    if not items:
        return []
    groups = [str(item.get(key) or "default") for item in items]
    counts: dict[str, int] = {}
    for group in groups:
        counts[group] = counts.get(group, 0) + 1
    raw = [counts[group] ** -power for group in groups]
    scale = len(items) / sum(raw)
    return [w * scale for w in raw]


def spread_per_group(items: list[dict[str, Any]], limit: int | None, key: str = "source") -> list[dict[str, Any]]:
    """At most ``limit`` rows of each group, evenly spaced through the group's rows, in their order.

    Deterministic: a source's rows are often frames of one series, so the spread takes frames from across
    it rather than its first ones. Rows without ``key`` form one group. ``limit`` None or 0 keeps every row.

    Args:
        items: data list rows.
        limit: rows kept per group.
        key: the row key that groups them (``source``, ``subset``).

    Returns:
        the kept rows, in the order of ``items``.
    """
    if not limit:
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be positive, got {limit}")
    members: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        members.setdefault(str(item.get(key) or "default"), []).append(index)
    kept = set()
    for indices in members.values():
        count = min(limit, len(indices))
        kept.update(indices[i * len(indices) // count] for i in range(count))
    return [item for index, item in enumerate(items) if index in kept]


def select_rows(items: list[dict[str, Any]], keep: list[str] | tuple[str, ...], key: str = "source", drop_ids=()) -> list[dict[str, Any]]:
    """The rows whose ``key`` is one of ``keep``, less the rows named in ``drop_ids``, in their order.

    The curated way to train on a subset of sources, such as the permissive model's licence-checked
    sources: a name in ``keep`` or ``drop_ids`` that matches no row is an error, so a renamed source
    or a stale id list cannot pass silently.

    Args:
        items: data list rows (``load_datalist``).
        keep: values of ``key`` to keep (``source``: the manifest's ``source_group`` or ``source_repo``).
        key: the row key to select on.
        drop_ids: row ``id`` values to leave out of the kept sources (single rows of other terms).

    Returns:
        the selected rows.

    Raises:
        ValueError: a value of ``keep`` or an id of ``drop_ids`` matches no row.
    """
    keep, drop_ids = set(keep), set(drop_ids)
    unknown = sorted(keep - {str(item.get(key)) for item in items})
    unknown += sorted(drop_ids - {str(item.get("id")) for item in items})
    if unknown:
        raise ValueError(f"no data list row has {key} or id {unknown}")
    return [item for item in items if item.get(key) in keep and item.get("id") not in drop_ids]


def pending_outputs(items: list[dict[str, Any]], output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Items whose masks file is not yet in ``output_dir``, so a folder run resumes where it stopped."""
    output_dir = Path(output_dir)
    return [i for i in items if not (output_dir / masks_filename(i["id"])).is_file()]


# ---------------------------------------------------------------------------------------------
# Datasets that skip bad samples instead of stopping a long run.


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception (MONAI's ``Compose`` wraps a transform's error in a RuntimeError)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _sample_name(item: Any) -> str:
    if isinstance(item, dict):
        for key in ("image", "image_file", "id"):
            if item.get(key):
                return str(item[key])
    return repr(item)[:200]


class BadSampleLog:
    """Bad samples met during a run: each with its file, the stage and the problem.

    Args:
        max_bad_fraction: more bad samples than this fraction of a data list stops the run
            (:meth:`check`), since then the data, not one file, is wrong.
    """

    def __init__(self, max_bad_fraction: float = 0.1):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.entries: list[dict[str, str]] = []

    def add(self, item: Any, stage: str, error: BaseException) -> None:
        cause = root_cause(error)
        entry = {"file": _sample_name(item), "stage": stage, "problem": f"{type(cause).__name__}: {cause}"}
        self.entries.append(entry)
        logger.warning("skipping bad sample %s (%s): %s", entry["file"], stage, entry["problem"])

    def check(self, bad: int, total: int, what: str = "samples") -> None:
        """Raise when ``bad`` of ``total`` exceeds the allowed fraction."""
        if total and bad / total > self.max_bad_fraction:
            examples = "; ".join(f"{e['file']}: {e['problem']}" for e in self.entries[:5])
            raise RuntimeError(
                f"{bad} of {total} {what} are unusable ({bad / total:.0%} > max_bad_fraction "
                f"{self.max_bad_fraction:.0%}); fix the data or raise the limit. First ones: {examples}"
            )

    def summary(self) -> str:
        if not self.entries:
            return "no bad samples"
        lines = [f"{len(self.entries)} bad sample(s) skipped:"]
        lines += [f"  {e['file']} ({e['stage']}): {e['problem']}" for e in self.entries]
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> None:
        """``file, stage, problem`` rows, written atomically."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "stage", "problem"])
            writer.writeheader()
            writer.writerows(self.entries)


class SkippingCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` that leaves out samples whose transforms fail, and says which.

    Samples that fail while the cache is filled (unreadable files, label/image mismatch, ...) are
    removed from the data set; a sample whose random transforms fail later is replaced by the next
    good one for that draw. Every failure goes to ``bad_samples`` with its path; too many
    (``bad_samples.max_bad_fraction`` of the list) stop the run with a clear message.

    Args:
        data, transform: as ``CacheDataset`` (``transform`` a ``Compose``).
        bad_samples: where failures are recorded (shared with the summary handler).
        kwargs: other ``CacheDataset`` arguments (``cache_rate``, ``num_workers``...).
    """

    def __init__(self, data, transform, bad_samples: BadSampleLog | None = None, **kwargs):
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleLog()
        self._failed_at_cache: set[int] = set()
        super().__init__(data, transform, **kwargs)

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as err:  # any transform error: the sample is bad, the run goes on
            self.bad_samples.add(self.data[idx], "loading", err)
            self._failed_at_cache.add(idx)
            return None

    def set_data(self, data) -> None:
        self._failed_at_cache = set()
        super().set_data(data)
        if not self._failed_at_cache:
            return
        total = len(self.data)
        self.bad_samples.check(len(self._failed_at_cache), total, "samples in the data list")
        keep = [i for i in range(total) if i not in self._failed_at_cache]
        cached = list(self._cache)
        self.data = [self.data[i] for i in keep]
        self._cache = [cached[i] for i in keep if i < len(cached)]
        self.cache_num = len(self._cache)

    def _transform(self, index: int):
        if not -len(self.data) <= index < len(self.data):
            raise IndexError(f"index {index} out of range for {len(self.data)} samples")
        index %= len(self.data)
        for attempt in range(len(self.data)):
            i = (index + attempt) % len(self.data)
            try:
                return super()._transform(i)
            except Exception as err:
                self.bad_samples.add(self.data[i], "augmentation", err)
                self.bad_samples.check(len({e["file"] for e in self.bad_samples.entries}), len(self.data))
        raise RuntimeError(f"every sample failed its transforms; {self.bad_samples.summary()}")


def check_image_options(items: list[dict[str, Any]], channels=None, diameter=None, pixel_size=None) -> list[dict[str, Any]]:
    """``items`` as they are, once every image's metadata (:func:`mmcs_monai.ome.image_info`, no pixels read) has what
    the options need: each channel named in ``channels`` (``--channels DAPI``), and a pixel size for a ``diameter`` in
    micrometres (``12um``) unless ``pixel_size`` gives one. Run before segmenting, so a mistake stops the run at once
    with one line.

    Raises:
        InputError: naming the first image without the channel (and listing its channels) or the pixel size.
    """
    from mmcs_monai.ome import image_info, resolve_channel
    from mmcs_monai.options import parse_channels, parse_micrometres, parse_pixel_size

    names = [c for c in parse_channels(channels) or () if isinstance(c, str)]
    needs_size = parse_micrometres(diameter) is not None and parse_pixel_size(pixel_size) is None
    if not names and not needs_size:
        return items
    for item in items:
        info = image_info(item["image"])
        for name in names:
            resolve_channel(item["image"], name, info, len(info.channel_names or ()))
        if needs_size and not info.pixel_size:
            raise InputError(
                item["image"], f"diameter {diameter!r} is in micrometres but the image has no pixel size in its metadata; give --pixel_size"
            )
    return items


def readable_images(items: list[dict[str, Any]], bad_samples: BadSampleLog | None = None) -> list[dict[str, Any]]:
    """The items whose image (and label, when given) can be read; the others go to ``bad_samples``.

    Inference over a folder calls this first so one broken file is reported and skipped instead of
    stopping the run; the check reads each file once, which costs far less than segmenting it.
    """
    from mmcs_monai.io import read_labels
    from mmcs_monai.ome import read_image

    bad_samples = bad_samples if bad_samples is not None else BadSampleLog(max_bad_fraction=1.0)
    good = []
    for item in items:
        try:
            image, _ = read_image(item["image"])
            if item.get("label"):
                read_labels(item["label"], image_shape=image.shape[1:])
        except InputError as err:
            bad_samples.add(item, "reading", err)
            continue
        good.append(item)
    bad_samples.check(len(items) - len(good), len(items), "images")
    return good
