"""Sinusoid regression tasks (Finn et al., 2017, section 5.1), sampled on device.

Each task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax.types import Task

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


def sample_tasks(key: jax.Array, num_tasks: int, shots: int, queries: int) -> Task:
    """Draw ``num_tasks`` sinusoids with ``shots`` support and ``queries`` query points each.

    Jit-able; ``num_tasks``, ``shots`` and ``queries`` are static Python ints.

    Returns:
      ``Task`` with support ``x, y [num_tasks, shots, 1]`` and query ``[num_tasks, queries, 1]``.
    """
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amplitude = jax.random.uniform(k_amp, (num_tasks, 1, 1), minval=AMPLITUDE_RANGE[0],
                                   maxval=AMPLITUDE_RANGE[1])
    phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), minval=PHASE_RANGE[0],
                               maxval=PHASE_RANGE[1])
    x = jax.random.uniform(k_x, (num_tasks, shots + queries, 1), minval=INPUT_RANGE[0],
                           maxval=INPUT_RANGE[1])
    y = amplitude * jnp.sin(x - phase)
    return Task((x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]))
