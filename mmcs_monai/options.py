"""Option values as commands, configs, requests and environment variables spell them: the one place they are parsed.

A command line's ``--overlay false``, a MONAI Label ``--conf semi off``, a request's ``"score_after": "1"`` and
``MMCS_OVERLAY=yes`` all arrive as strings; :func:`parse_bool` reads each the same way and refuses anything else
with a message naming the option, so a typo is an error instead of a silent ``False``.
"""

from __future__ import annotations

import re
from typing import Any

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def parse_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: a bool as it is, the integers 0 and 1, or one of :data:`TRUE_WORDS` /
    :data:`FALSE_WORDS` in any case, surrounding spaces ignored.

    Raises:
        ValueError: anything else (``"{name} 'maybe': expected true or false"``).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{name} {value!r}: expected true or false")


# what ``--formats`` may name (``mmcs infer`` and ``infer-slide``): the label TIFF, GeoJSON objects for QuPath, an
# ImageJ ROI set for Fiji, NGFF labels in an OME-Zarr for napari and other NGFF viewers
OUTPUT_FORMATS = ("tif", "geojson", "roi", "zarr")
DEFAULT_FORMATS = ("tif",)
_FORMAT_ALIASES = {"tiff": "tif", "json": "geojson", "imagej": "roi", "zip": "roi", "ngff": "zarr", "ome-zarr": "zarr", "omezarr": "zarr"}


def parse_formats(value: Any, name: str = "formats") -> tuple[str, ...]:
    """The output formats named by ``value``: a comma-separated string (``"tif,geojson"``), a list or tuple of names,
    or None (:data:`DEFAULT_FORMATS`). Names are any case; ``tiff``, ``json``, ``imagej``, ``ngff`` are aliases.
    Returns them in :data:`OUTPUT_FORMATS` order, each once.

    Raises:
        ValueError: an unknown name or none at all (the message lists the known ones).
    """
    if value is None:
        return DEFAULT_FORMATS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = set()
    for item in items:
        word = str(item).strip().lower()
        if not word:
            continue
        word = _FORMAT_ALIASES.get(word, word)
        if word not in OUTPUT_FORMATS:
            raise ValueError(f"{name} {item!r}: unknown output format; use one or more of {', '.join(OUTPUT_FORMATS)}")
        names.add(word)
    if not names:
        raise ValueError(f"{name} {value!r}: no output format; use one or more of {', '.join(OUTPUT_FORMATS)}")
    return tuple(f for f in OUTPUT_FORMATS if f in names)


_MICROMETRES = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(um|µm|μm|micron|microns|micrometer|micrometers|micrometre|micrometres)\s*$",
    re.IGNORECASE,
)


def parse_micrometres(value: Any) -> float | None:
    """The length in micrometres that ``value`` spells (``"12um"``, ``"12 µm"``, ``"7.5micron"``), or None for anything
    else (a number of pixels, ``"auto"``, a subset name)."""
    if not isinstance(value, str):
        return None
    match = _MICROMETRES.match(value)
    return float(match.group(1)) if match else None


def parse_pixel_size(value: Any, name: str = "pixel_size") -> float | None:
    """A pixel size in micrometres per pixel: a positive number, ``"0.325"``, ``"0.325um"``; None stays None.

    Raises:
        ValueError: not a positive number.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    micrometres = parse_micrometres(value)
    try:
        size = float(micrometres if micrometres is not None else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r}: expected micrometres per pixel, e.g. 0.325") from None
    if not size > 0 or size != size or size == float("inf"):
        raise ValueError(f"{name} {value!r}: must be a positive number of micrometres per pixel")
    return size


def parse_channels(value: Any, name: str = "channels") -> tuple[int | str, ...] | None:
    """``--channels`` as given: ``"DAPI"``, ``"cyto,DAPI"``, ``"0,2"``, ``2``, ``(0, 2)`` -> a tuple of one or two
    entries, each a channel index (int) or a channel name (str, matched against the image's channel names
    later); None stays None. The first is the channel to segment (the cytoplasm channel, or the one channel of a
    nuclear stain), the second the nucleus channel.

    Raises:
        ValueError: more than two channels, or none.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    parsed: list[int | str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        parsed.append(int(text) if re.fullmatch(r"\d+", text) else text)
    if not 1 <= len(parsed) <= 2:
        raise ValueError(f"{name} {value!r}: give one channel (to segment) or two (cytoplasm, nucleus), by name or index")
    return tuple(parsed)


__all__ = [
    "DEFAULT_FORMATS",
    "FALSE_WORDS",
    "OUTPUT_FORMATS",
    "TRUE_WORDS",
    "parse_bool",
    "parse_channels",
    "parse_formats",
    "parse_micrometres",
    "parse_pixel_size",
]
