"""Durations on the command line: ``90``, ``90s``, ``15m``, ``12h``, ``7d`` (a click parameter type)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ValueError for anything else (negative, empty, unknown unit)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration: use e.g. 30s, 15m, 12h, 7d or plain seconds")
    return float(match.group(1)) * _UNITS[match.group(2)]


if TYPE_CHECKING:
    _ParamType = click.ParamType[float]
else:  # click < 8.2 has no type parameter at run time
    _ParamType = click.ParamType


class Duration(_ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
