"""What a long command tells its user: progress while it runs, and the parts of its summary line.

:class:`Progress` is the one progress display of the package (folder inference, evaluation, slide
blocks, the diameter sweep, export checks): a bar with the count, the rate and the ETA when stderr is a
terminal; otherwise a log line per step with the count, the rate and the ETA
(``[12/48] img_7: 231 cells at diameter 17.4 px, 2.1 s/image, ETA 1 min 20 s``), so CI jobs and log
files show progress too.

The ``*_note`` functions write the parts every summary line shares: the time and seconds per megapixel,
the range of diameters used, and the model file with its SHA-256 prefix.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from mmcs_monai.distributed import is_main_process

logger = logging.getLogger(__name__)

SHA_PREFIX = 12  # hex digits of a model's SHA-256 shown in summaries


def show_bar(stream=None) -> bool:
    """Whether to draw a progress bar: ``stream`` (default stderr, where bars go) is a terminal, on rank 0."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and is_main_process()


def format_seconds(seconds: float) -> str:
    """``40 s``, ``3 min 20 s``, ``1 h 05 min``: a duration as a person reads it."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of a counted job: a bar on a terminal, counted log lines otherwise.

    Args:
        total: number of steps (None: unknown; lines then carry the count alone).
        desc: what is being done (the bar's label, e.g. ``"segmenting"``).
        unit: what one step is (``"image"``, ``"block"``).
        log: logger for the lines (default this module's); with a bar, notes go to it at DEBUG.
        enabled: False: no bar and no count, each note logged as it is.
        bar: force the bar on or off (default :func:`show_bar`).

    Use ``progress.step("img_7: 231 cells")`` after each step and ``progress.close()`` at the end (or
    ``with Progress(...) as progress:``).
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "image",
        log: logging.Logger | None = None,
        enabled: bool = True,
        bar: bool | None = None,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.log = log or logger
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled and (show_bar() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, leave=False, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        """Seconds since the job started."""
        return time.perf_counter() - self.start

    def line(self, note: str = "") -> str:
        """The counted line after the latest step: ``[i/N] note, s/unit, ETA``."""
        per_step = self.elapsed / max(self.done, 1)
        count = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        parts = [f"{count} {note or self.desc}".rstrip(), f"{per_step:.1f} s/{self.unit}"]
        if self.total:
            parts.append(f"ETA {format_seconds(per_step * max(self.total - self.done, 0))}")
        return ", ".join(parts)

    def step(self, note: str = "", n: int = 1) -> None:
        """Count ``n`` steps done; ``note`` says what the last one found."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self.log.debug(note)
        elif not self.enabled:
            if note:
                self.log.info(note)
        else:
            self.log.info(self.line(note))

    def close(self) -> None:
        """Remove the bar (lines need no closing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class OnceLog:
    """A warning logged once per process and reason: ``note = OnceLog(logger, "compile: %s; running eagerly")``, then
    ``note(reason)`` wherever a fallback happens; ``note.reset()`` forgets what was logged (tests)."""

    def __init__(self, logger: logging.Logger, template: str):
        self.logger = logger
        self.template = template
        self.seen: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason not in self.seen:
            self.seen.add(reason)
            self.logger.warning(self.template, reason)

    def reset(self) -> None:
        self.seen.clear()


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes; ``"missing"`` when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def model_note(path: str | Path) -> str:
    """``model <file> (sha256 <prefix>)``: which model a run used."""
    return f"model {path} (sha256 {file_sha256(path)[:SHA_PREFIX]})"


def timing_note(seconds: float, megapixels: float = 0.0) -> str:
    """``12.3 s, 1.02 s/MPix`` (the rate only when pixels were counted)."""
    rate = f", {seconds / megapixels:.2f} s/MPix" if megapixels > 0 else ""
    return f"{seconds:.1f} s{rate}"


def diameter_note(diameters: Iterable[float | str], pixel_size: float | None = None) -> str:
    """``diameter 17.4 px`` or ``diameter 8.0-35.5 px`` for the diameters used (empty values left out), with
    ``(5.6 µm)`` / ``(2.6-11.5 µm)`` added where ``pixel_size`` (micrometres per pixel) is known; ``""`` when none
    was reported."""
    values = [float(d) for d in diameters if d != "" and d is not None]
    if not values:
        return ""
    low, high = min(values), max(values)
    note = f"diameter {low:.1f} px" if high - low < 0.05 else f"diameter {low:.1f}-{high:.1f} px"
    if pixel_size:
        um_low, um_high = low * pixel_size, high * pixel_size
        note += f" ({um_low:.1f} µm)" if um_high - um_low < 0.05 else f" ({um_low:.1f}-{um_high:.1f} µm)"
    return note
