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


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` as a Python int after checking it is an integer ``>= minimum``.

    Counts fix shapes and loop lengths, which are static under ``jit``: anything that is not an
    integer (a float, a bool, a traced value) is a ``TypeError``, and a traced value is told to
    be passed as a static argument; an integer below ``minimum`` is a ``ValueError``. numpy
    integers are accepted.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if _is_traced(value):
            hint = f"; under jax.jit pass {name} as a static argument (static_argnames)"
        raise TypeError(
            f"{name} must be a Python int >= {minimum}, got {value!r} of type "
            f"{type(value).__name__}{hint}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return int(value)


def _is_traced(value) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)
