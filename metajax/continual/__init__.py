"""Continual learning: replay memories, gradient projections and metrics, as pure functions.

Memories are fixed-shape pytrees updated by pure functions (jit-able, sampled on device)::

    buffer = mj.continual.reservoir_init(capacity=200, example_x=x[0], example_y=y[0])
    buffer = mj.continual.reservoir_add_batch(buffer, key, x, y, task_id)
    replay = mj.continual.buffer_sample(buffer, key, batch_size=10)   # x, y, task, valid

Projections keep an update from raising the loss on past tasks (A-GEM, GEM)::

    g = mj.continual.project_agem(g, g_ref)
    g = mj.continual.project_gem(g, G)          # G: past-task gradients, [t, ...] per leaf

and :func:`metrics` turns the accuracy matrix ``R [T, T]`` into ACC/RA, BWT/BTI,
forgetting, FWT and LCA (:func:`metrics_over_seeds` for several runs). :func:`run` trains a
learner on a :class:`metajax.types.Stream`.

This package holds the algorithms only: the streams are in :mod:`metajax.data.streams`, the
published protocols in :mod:`metajax.presets.protocols`, configurations and their builders in
:mod:`metajax.presets.continual` and :mod:`metajax.presets.build_continual`, and the run
directory in :mod:`metajax.train.continual`.
"""

from metajax.continual.agem import AGEMState, agem
from metajax.continual.er import ERState, er
from metajax.continual.gem import GEMState, gem
from metajax.continual.lamaml import LaMAMLState, lamaml
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    FinetuneState,
    cross_entropy_loss,
    finetune,
    per_example_loss,
    weighted_mean,
    with_replay,
)
from metajax.continual.memory import (
    EpisodicMemory,
    ReplaySample,
    ReservoirBuffer,
    buffer_sample,
    episodic_add,
    episodic_init,
    episodic_sample,
    episodic_valid,
    reservoir_add,
    reservoir_add_batch,
    reservoir_init,
)
from metajax.continual.mer import MERState, mer
from metajax.continual.metrics import metrics, metrics_over_seeds
from metajax.continual.projections import nnls, project_agem, project_gem
from metajax.continual.run import NonFiniteTask, run

__all__ = [
    "NonFiniteTask",
    "AGEMState",
    "agem",
    "ERState",
    "er",
    "GEMState",
    "gem",
    "LaMAMLState",
    "lamaml",
    "ContinualLearner",
    "ExampleLossFn",
    "FinetuneState",
    "cross_entropy_loss",
    "finetune",
    "per_example_loss",
    "weighted_mean",
    "with_replay",
    "MERState",
    "mer",
    "run",
    "EpisodicMemory",
    "ReplaySample",
    "ReservoirBuffer",
    "buffer_sample",
    "episodic_add",
    "episodic_init",
    "episodic_sample",
    "episodic_valid",
    "metrics",
    "metrics_over_seeds",
    "nnls",
    "project_agem",
    "project_gem",
    "reservoir_add",
    "reservoir_add_batch",
    "reservoir_init",
]
