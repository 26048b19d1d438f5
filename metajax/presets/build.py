"""From a :class:`~metajax.train.config.Config` to the pieces a run needs.

This is the only place that knows which dataset, model and algorithm a name stands for; the
training loop receives the finished pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import metajax as mj
from metajax.data import sinusoid
from metajax.nn.mlp import MLP
from metajax.train.config import Config
from metajax.types import Batch, LossFn, PyTree, Task


class Problem(NamedTuple):
    """A dataset with its model and measures.

    Attributes:
      init_params: ``init_params(key) -> params`` of the model.
      loss_fn: ``loss_fn(params, batch) -> loss``.
      sample_tasks: ``sample_tasks(key, num_tasks, shots, queries, split) -> Task`` (jit-able;
        ``split`` is ``"train"``, ``"val"`` or ``"test"``).
      metric_name: what :attr:`metric_fn` measures, e.g. ``"mse"``.
      metric_fn: ``metric_fn(params, batch) -> scalar`` reported at evaluation.
      has_validation: whether ``"val"`` is a held-out split (used to pick the best checkpoint).
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    sample_tasks: Callable[..., Task]
    metric_name: str
    metric_fn: Callable[[PyTree, Batch], jax.Array]
    has_validation: bool


def sinusoid_problem(config: Config) -> Problem:
    """Sinusoid regression with the MLP of Finn et al. (2017) and mean squared error."""
    model = MLP(hidden=(config.hidden,) * config.layers, outputs=1)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def sample_tasks(key, num_tasks, shots, queries, split="train"):
        del split  # every sinusoid is a fresh draw: no finite split to hold out
        return sinusoid.sample_tasks(key, num_tasks, shots, queries)

    return Problem(
        init_params=lambda key: model.init(key, jnp.zeros((1, 1))),
        loss_fn=loss_fn,
        sample_tasks=sample_tasks,
        metric_name="mse",
        metric_fn=loss_fn,
        has_validation=False,
    )


def build_problem(config: Config) -> Problem:
    """The :class:`Problem` for ``config.dataset``."""
    return {"sinusoid": sinusoid_problem}[config.dataset](config)


def build_learner(config: Config, loss_fn: LossFn) -> mj.Learner:
    """The meta-learner named by ``config.algorithm`` with its inner-loop settings."""
    lr, steps = config.inner_lr, config.inner_steps
    return {
        "maml": lambda: mj.maml(loss_fn, lr, steps),
        "fomaml": lambda: mj.maml(loss_fn, lr, steps, first_order=True),
        "reptile": lambda: mj.reptile(loss_fn, lr, steps),
        "metasgd": lambda: mj.metasgd(loss_fn, lr, steps),
        "anil": lambda: mj.anil(loss_fn, lr, steps),
    }[config.algorithm]()


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """The outer optimiser with its learning-rate schedule."""
    if config.outer_lr_schedule == "linear":
        lr = optax.linear_schedule(config.outer_lr, 0.0, config.steps)
    else:
        lr = config.outer_lr
    return {"adam": optax.adam, "sgd": optax.sgd}[config.outer_optimizer](lr)
