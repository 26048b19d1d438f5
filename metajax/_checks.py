"""Argument checks shared by the learners: one message per kind of mistake, raised early.

Traced values pass the number checks (they are the caller's); counts that fix a shape or a
loop length must be Python ints, because they are static under ``jit``.
"""

from __future__ import annotations

import numbers


def check_number(name: str, value, *, positive: bool = True) -> None:
    """Reject a Python number that is not real, or not > 0 (>= 0 with ``positive=False``);
    traced values pass."""
    if isinstance(value, bool) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        ok = value > 0 if positive else value >= 0
        if not ok:
            raise ValueError(f"{name} must be {'>' if positive else '>='} 0, got {value!r}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Reject anything but a Python int ``>= minimum`` (shapes and loop lengths are static)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
