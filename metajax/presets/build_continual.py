"""Turn a continual configuration into built pieces: the stream, the model, the learner.

Each family is a registry, a ``name -> builder`` dict, so that adding an algorithm, a model or
a benchmark is one entry here (and a preset note in :mod:`metajax.presets.continual`):

- :data:`LEARNERS`: ``name -> builder(config, loss, per_task, num_classes) ->
  ContinualLearner``;
- :data:`MODELS`: ``name -> builder(config, stream) -> (init, apply)``;
- the benchmarks: the published protocols of :data:`metajax.presets.protocols.PROTOCOLS`
  plus :data:`EXTRA_BENCHMARKS` (streams with no published protocol).

:func:`run_experiment` builds the pieces of a configuration and hands them to the run layer,
:func:`metajax.train.continual.train_continual`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.continual.agem import agem
from metajax.continual.er import er
from metajax.continual.gem import gem
from metajax.continual.lamaml import lamaml
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    cross_entropy_loss,
    finetune,
)
from metajax.continual.mer import mer
from metajax.presets.protocols import PROTOCOLS, protocol_stream
from metajax.train.config import ConfigError
from metajax.types import Stream

if TYPE_CHECKING:
    from metajax.presets.continual import ContinualConfig

LearnerBuilder = Callable[["ContinualConfig", ExampleLossFn, int, int], ContinualLearner]
ModelBuilder = Callable[
    ["ContinualConfig", Stream],
    tuple[Callable[[jax.Array], Any], Callable[[Any, jax.Array], jax.Array]],
]


def _lamaml_family(variant: str) -> LearnerBuilder:
    def build(c: ContinualConfig, loss: ExampleLossFn, per_task: int,
              num_classes: int) -> ContinualLearner:
        del per_task, num_classes
        return lamaml(
            loss,
            alpha_init=c.alpha_init,
            memory_size=c.memory,
            replay_batch=c.replay_batch,
            lr_eta=None if variant == "cmaml" else c.lr_eta,
            outer_lr=None if variant == "lamaml" else c.outer_lr,
            variant=variant,
            glances=c.glances,
            first_order=c.first_order,
            multi_step_loss=c.multi_step_loss,
            replay_past_tasks=c.replay_past_tasks,
            grad_clip_norm=c.grad_clip_norm or None,
            clip_inner_rates=c.clip_inner_rates,
        )

    return build


LEARNERS: dict[str, LearnerBuilder] = {
    "finetune": lambda c, loss, per_task, classes: finetune(loss, optax.sgd(c.lr)),
    "er": lambda c, loss, per_task, classes: er(
        loss, optax.sgd(c.lr), memory_size=c.memory, replay_batch=c.replay_batch
    ),
    "agem": lambda c, loss, per_task, classes: agem(
        loss, optax.sgd(c.lr), memory_per_task=per_task, ref_batch=c.ref_batch,
        num_classes=classes, memory=c.memory_layout, ref_sampling=c.ref_sampling,
    ),
    "gem": lambda c, loss, per_task, classes: gem(
        loss, optax.sgd(c.lr), memory_per_task=per_task, memory_strength=c.memory_strength,
        ridge=c.ridge,
    ),
    "mer": lambda c, loss, per_task, classes: mer(
        loss, lr=c.lr, beta=c.beta, gamma=c.gamma, batches_per_example=c.batches_per_example,
        memory_size=c.memory, replay_batch=c.replay_batch,
    ),
    "cmaml": _lamaml_family("cmaml"),
    "sync": _lamaml_family("sync"),
    "lamaml": _lamaml_family("lamaml"),
}
"""Continual learners by name: ``builder(config, loss, memory_per_task, num_classes) ->
learner`` (``num_classes``: the stream's, for A-GEM's per-class memory)."""


def _mlp(c: ContinualConfig, stream: Stream):
    from metajax.nn.mlp import MLP

    module = MLP(hidden=(c.hidden,) * c.layers, outputs=stream.num_classes)
    example = jnp.zeros((1, int(np.prod(stream.train_x.shape[2:]))), jnp.float32)

    def apply(params, x):
        return module.apply(params, x.reshape(x.shape[0], -1))

    def init(key):
        return module.init(key, example)

    return init, apply


def _conv4(c: ContinualConfig, stream: Stream):
    from metajax.nn.conv4 import Conv4

    module = Conv4(num_classes=stream.num_classes, filters=c.hidden, norm="none")
    example = jnp.zeros((1, *stream.train_x.shape[2:]), jnp.float32)

    def init(key):
        return module.init(key, example)

    return init, module.apply


MODELS: dict[str, ModelBuilder] = {"mlp": _mlp, "conv4": _conv4}
"""Models by name: ``builder(config, stream) -> (init(key) -> params, apply(params, x))``."""

EXTRA_BENCHMARKS: tuple[str, ...] = ("split_omniglot",)
"""Benchmarks without a published protocol (our own settings)."""

BENCHMARKS: tuple[str, ...] = (*sorted(PROTOCOLS), *EXTRA_BENCHMARKS)


def build_stream(config: ContinualConfig, *, progress: bool = True) -> Stream:
    """The stream of ``config.benchmark`` (data from ``config.data_dir``), without its
    ``cv_tasks`` leading tasks."""
    protocol = config.protocol
    data_dir = config.data_dir or None
    if config.benchmark == "split_omniglot":
        from metajax.data.omniglot import load_omniglot
        from metajax.data.streams import split_omniglot

        arrays = load_omniglot(data_dir, progress=progress)
        kwargs = dict(protocol["kwargs"])
        tasks = kwargs.pop("num_tasks", None)
        if tasks is not None:
            names = list(dict.fromkeys(np.asarray(arrays.alphabet).tolist()))
            if tasks > len(names):
                raise ConfigError(f"tasks={tasks}: Omniglot has {len(names)} alphabets")
            kwargs["alphabets"] = names[:tasks]
        stream = split_omniglot(arrays, seed=config.seed, **kwargs)
    else:
        benchmark = PROTOCOLS[config.benchmark].benchmark
        if benchmark == "split_cifar100":
            from metajax.data.cifar100 import load_cifar100

            data = load_cifar100(data_dir, progress=progress)
        else:
            from metajax.data.mnist import load_mnist

            data = load_mnist(data_dir, progress=progress)
        stream = protocol_stream(config.benchmark, data, seed=config.seed, **protocol["kwargs"])
    cv = protocol["cv_tasks"]
    if cv >= stream.num_tasks:
        raise ConfigError(f"cv_tasks={cv} leaves none of the stream's {stream.num_tasks} tasks")
    if cv:
        stream = Stream(
            stream.train_x[cv:], stream.train_y[cv:], stream.test_x[cv:], stream.test_y[cv:],
            stream.num_classes, None if stream.class_mask is None else stream.class_mask[cv:],
        )
    return stream


def build_continual_model(
    config: ContinualConfig, stream: Stream
) -> tuple[Callable[[jax.Array], Any], Callable[[Any, jax.Array], jax.Array]]:
    """``(init(key) -> params, apply(params, x) -> logits)`` of ``config.model`` for
    ``stream``'s inputs and classes (the :data:`MODELS` entry)."""
    return MODELS[config.model](config, stream)


def build_continual_learner(
    config: ContinualConfig, stream: Stream, apply_fn: Callable[[Any, jax.Array], jax.Array]
) -> ContinualLearner:
    """The :class:`ContinualLearner` of ``config.learner`` (the :data:`LEARNERS` entry) with
    its hyper-parameters, on the softmax cross-entropy of ``apply_fn`` (task-aware when the
    stream has class masks). A-GEM and GEM split ``memory`` evenly over the tasks unless
    ``memory_per_task`` is set; A-GEM's ``memory_layout=per_class`` splits a task's share
    over the stream's classes, so it must be a multiple of them."""
    loss = cross_entropy_loss(apply_fn, stream.class_mask)
    per_task = config.memory_per_task or max(1, config.memory // stream.num_tasks)
    classes = stream.num_classes
    if config.learner == "agem" and config.memory_layout == "per_class" and per_task % classes:
        raise ConfigError(
            f"memory_layout=per_class keeps a ring per class: the {per_task} memory slots per "
            f"task must be a multiple of the stream's {classes} classes; set memory_per_task "
            f"(e.g. {classes * max(1, per_task // classes)}) or memory_layout=per_task"
        )
    return LEARNERS[config.learner](config, loss, per_task, classes)


def run_experiment(
    config: ContinualConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    mesh: Any = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Build ``config``'s stream, model and learner, train, and write ``run_dir``
    (:func:`metajax.train.continual.train_continual`: the files, the checkpoints and the
    summary). With ``resume``, continue after the latest task checkpoint in ``run_dir``,
    which must be of a configuration with the same :meth:`~ContinualConfig.fingerprint`.
    With a ``mesh`` the seeds are spread over its devices; with ``tensorboard``, event files
    are written to ``run_dir/tensorboard`` as well."""
    from metajax.train.continual import train_continual

    config.validate()
    stream = build_stream(config, progress=progress)
    protocol = config.protocol
    init, apply_fn = build_continual_model(config, stream)
    settings = config.sweep_settings()
    if settings:
        def learner(setting):  # traced values: one learner per run, inside the vmap
            return build_continual_learner(dataclasses.replace(config, **setting), stream,
                                           apply_fn)
    else:
        learner = build_continual_learner(config, stream, apply_fn)
    return train_continual(
        learner, stream, init, apply_fn, run_dir, settings=settings or None,
        batch_size=protocol["batch_size"], epochs=protocol["epochs"],
        lca_batches=config.lca_batches, seeds=config.seeds, seed=config.seed,
        config_json=config.to_json(), fingerprint=config.fingerprint(),
        labels={"preset": config.preset, "learner": config.learner,
                "benchmark": config.benchmark},
        progress=progress, resume=resume, log=log, mesh=mesh, tensorboard=tensorboard,
    )
