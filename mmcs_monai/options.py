"""Option values as commands, configs, requests and environment variables spell them: the one place they are parsed.

A command line's ``--overlay false``, a MONAI Label ``--conf semi off``, a request's ``"score_after": "1"`` and
``MMCS_OVERLAY=yes`` all arrive as strings; :func:`parse_bool` reads each the same way and refuses anything else
with a message naming the option, so a typo is an error instead of a silent ``False``.
"""

from __future__ import annotations

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


__all__ = ["FALSE_WORDS", "TRUE_WORDS", "parse_bool"]
