"""Durations and sizes with units, as stack files write them (``"300ms"``, ``"4MiB"``).

A settings dataclass annotates a field with :class:`Duration` (seconds) or
:class:`Size` (bytes) and the loader parses strings with units into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
import difflib
import math
import re
from fractions import Fraction
from typing import Any

from groupcomm.errors import ConfigError

__all__ = ["Duration", "Size", "check_keys", "config_error", "parse_duration", "parse_size", "suggest_key"]


def config_error(where: str, problem: str, value: Any = dataclasses.MISSING) -> ConfigError:
    message = f"{where}: {problem}" if where else problem
    if value is not dataclasses.MISSING:
        message += f" (got {value!r})"
    return ConfigError(message)


def suggest_key(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, else `` (known keys: ...)``."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(known) or 'none'})"


def check_keys(table: Mapping[str, Any], known: Iterable[str], where: str, *, separator: str = ": ",
               error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` naming the first key of ``table`` not in ``known`` (``WHERE<separator>KEY``),
    with the closest known key as a hint."""
    known = set(known)
    for key in table:
        if key not in known:
            raise error(f"{where}{separator}{key}: unknown key{suggest_key(key, known)}")


# --------------------------------------------------------------------------- durations and sizes

# A plain decimal: no sign (handled separately), no exponent, no underscores.
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_QUANTITY = re.compile(rf"\s*([+-]?)({_NUMBER})\s*([^\s\d.+-]*)\s*")

_DURATION_UNITS: dict[str, Fraction] = {
    "ns": Fraction(1, 1_000_000_000),
    "us": Fraction(1, 1_000_000),
    "\u00b5s": Fraction(1, 1_000_000),  # micro sign
    "\u03bcs": Fraction(1, 1_000_000),  # greek mu
    "ms": Fraction(1, 1000),
    "": Fraction(1),
    "s": Fraction(1),
    "sec": Fraction(1),
    "m": Fraction(60),
    "min": Fraction(60),
    "h": Fraction(3600),
}

_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _prefix in enumerate("kmgt", start=1):
    _SIZE_UNITS[_prefix] = _SIZE_UNITS[_prefix + "b"] = 1000**_i
    _SIZE_UNITS[_prefix + "i"] = _SIZE_UNITS[_prefix + "ib"] = 1024**_i
del _i, _prefix


def parse_duration(value: str | int | float, *, where: str = "") -> float:
    """Seconds from ``"500ms"``, ``"1s"``, ``"2.5s"``, ``"1m"``, ``"250us"``, ``"1h"`` or a number.

    A bare number (or a numeric string without a unit) is seconds.  Units are
    ``ns``, ``us`` (or ``µs``), ``ms``, ``s`` (``sec``), ``m`` (``min``) and
    ``h``; they are case-sensitive (``"1M"`` is refused rather than guessed)
    and may be separated from the number by spaces.  Negative, NaN, infinite
    and empty values are refused.  ``where`` prefixes the error message.
    """
    if isinstance(value, bool):
        raise config_error(where, "expected a duration such as '500ms' or '1s', not a boolean", value)
    if isinstance(value, (int, float)):
        seconds = float(value) if isinstance(value, float) else value
        if isinstance(seconds, float) and math.isnan(seconds):
            raise config_error(where, "a duration cannot be NaN", value)
        if seconds < 0:
            raise config_error(where, "a duration cannot be negative", value)
        try:
            seconds = float(seconds)
        except OverflowError:
            raise config_error(where, "duration is too large", value) from None
        if math.isinf(seconds):
            raise config_error(where, "a duration must be finite", value)
        return seconds + 0.0  # -0.0 -> 0.0
    if not isinstance(value, str):
        raise config_error(where, f"expected a duration such as '500ms' or '1s', not {type(value).__name__}", value)
    if not value.strip():
        raise config_error(where, "empty duration", value)
    text = value.strip().lower()
    if text.lstrip("+-") in ("nan", "inf", "infinity"):
        raise config_error(where, "a duration must be a finite number", value)
    m = _QUANTITY.fullmatch(value)
    if m is None:
        raise config_error(where, "invalid duration: expected a number and a unit such as '500ms' or '1s'", value)
    sign, number, unit = m.groups()
    if unit not in _DURATION_UNITS:
        raise config_error(where, f"unknown duration unit {unit!r} (use ns, us, ms, s, m or h)", value)
    if sign == "-" and float(number) != 0:
        raise config_error(where, "a duration cannot be negative", value)
    try:
        seconds = float(Fraction(number) * _DURATION_UNITS[unit])  # exact, then rounded once
    except (ValueError, OverflowError):  # more digits than int() converts / beyond float
        raise config_error(where, "duration is too large", value) from None
    return seconds + 0.0


def parse_size(value: str | int, *, where: str = "") -> int:
    """Bytes from ``"64KiB"``, ``"1MiB"``, ``"60K"``, ``"1.5GB"`` or an integer.

    ``K``/``M``/``G``/``T`` are powers of 1000, ``Ki``/``Mi``/``Gi``/``Ti``
    powers of 1024; the trailing ``B`` is optional and units are
    case-insensitive.  A bare integer is bytes.  Negative values, fractions of
    a byte (``"1.5"``, ``"0.0001K"``) and unknown units are refused.
    """
    if isinstance(value, bool):
        raise config_error(where, "expected a size such as '64KiB' or 65536, not a boolean", value)
    if isinstance(value, int):
        if value < 0:
            raise config_error(where, "a size cannot be negative", value)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise config_error(where, "a size must be a finite number of bytes", value)
        if value < 0:
            raise config_error(where, "a size cannot be negative", value)
        if not value.is_integer():
            raise config_error(where, "a size must be a whole number of bytes", value)
        return int(value)
    if not isinstance(value, str):
        raise config_error(where, f"expected a size such as '64KiB' or 65536, not {type(value).__name__}", value)
    if not value.strip():
        raise config_error(where, "empty size", value)
    m = _QUANTITY.fullmatch(value)
    if m is None:
        raise config_error(where, "invalid size: expected a number and a unit such as '64KiB' or '1MB'", value)
    sign, number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise config_error(where, f"unknown size unit {unit!r} (use B, K, M, G, T or KiB, MiB, GiB, TiB)", value)
    try:
        amount = Fraction(number) * factor
    except ValueError:  # more digits than int() converts
        raise config_error(where, "size is too large", value) from None
    if sign == "-" and amount != 0:
        raise config_error(where, "a size cannot be negative", value)
    if amount.denominator != 1:
        raise config_error(where, "a size must be a whole number of bytes", value)
    return int(amount)


class Duration(float):
    """Seconds. Annotate dataclass fields with it to get duration parsing.

    ``Duration("50ms") == 0.05``; ``Duration(2) == 2.0``.  It is a float, so a
    config field typed ``Duration`` can be used wherever seconds are expected.
    """

    def __new__(cls, value: str | int | float = 0.0) -> Duration:
        return super().__new__(cls, parse_duration(value))


class Size(int):
    """Bytes. Annotate dataclass fields with it to get size parsing.

    ``Size("64KiB") == 65536``; ``Size("60K") == 60000``.
    """

    def __new__(cls, value: str | int = 0) -> Size:
        return super().__new__(cls, parse_size(value))
