"""Strict JSON decoding shared by the frame and HTTP parsers (never raises)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; browsers' JSON.parse would reject them downstream.
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str) -> tuple[bool, Any]:
    """Decode ``text``: ``(True, value)``, or ``(False, None)`` for anything but strict JSON.

    Refused besides syntax errors: ``NaN``/``Infinity``, nesting deep enough to hit the
    recursion limit, oversized integers, and ``\\ud800``-style escapes that decode to lone
    surrogates (they could not be encoded as UTF-8 later).
    """
    try:
        value = _decoder.decode(text)
    except (ValueError, RecursionError):
        return False, None
    if "\\u" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            return False, None
    return True, value
