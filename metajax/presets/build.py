"""From a :class:`~metajax.train.config.Config` to the pieces a run needs.

This is the only place that knows which dataset, model and algorithm a name stands for; the
training loop receives the finished pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.data import episodes, sinusoid
from metajax.meta.mamlpp import norm_mask
from metajax.nn.conv4 import conv4_miniimagenet, conv4_omniglot
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
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      default_eval_steps: inner-step counts ``metajax evaluate`` reports by default.
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    sample_tasks: Callable[..., Task]
    metric_name: str
    metric_fn: Callable[[PyTree, Batch], jax.Array]
    has_validation: bool
    has_aux: bool = False
    default_eval_steps: tuple[int, ...] = (1, 5, 10)


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


def as_float_images(x: jax.Array) -> jax.Array:
    """uint8 images to float32 in [0, 1]; anything else unchanged.

    Splits stay uint8 on the device (mini-ImageNet's training split is 0.8 GB so, 3.3 GB as
    float32); only the sampled episodes are converted.
    """
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def classification_problem(
    config: Config, splits: dict[str, np.ndarray], model: nn.Module
) -> Problem:
    """N-way K-shot classification: episodes drawn on device from ``splits`` (Vinyals et al.
    2016), cross-entropy loss with accuracy as ``aux`` and as the reported metric.

    ``splits`` maps ``train``/``val``/``test`` to ``[classes, per_class, H, W, C]`` arrays; they
    are placed on the device once, and every episode is sampled there inside the jitted step.
    """
    images = {name: jnp.asarray(array) for name, array in splits.items()}
    for name, array in images.items():
        try:
            for queries in {config.queries, config.eval_queries}:
                episodes.validate_episode_args(tuple(array.shape), config.ways, config.shots,
                                               queries)
        except ValueError as err:
            raise ValueError(f"{config.dataset} {name} split: {err}") from None

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    def sample_tasks(key, num_tasks, shots, queries, split="train"):
        tasks = episodes.sample_episodes(key, images[split], num_tasks, config.ways, shots,
                                         queries)
        return jax.tree.map(as_float_images, tasks)

    example = as_float_images(images["train"][0, :1])
    return Problem(
        init_params=lambda key: model.init(key, example),
        loss_fn=loss_fn,
        sample_tasks=sample_tasks,
        metric_name="accuracy",
        metric_fn=lambda params, batch: loss_fn(params, batch)[1]["accuracy"],
        has_validation="val" in images,
        has_aux=True,
        default_eval_steps=(config.test_inner_steps,),
    )


def omniglot_problem(config: Config) -> Problem:
    """Omniglot N-way K-shot with the Conv4 of Finn et al. (2017), 28x28 images.

    ``config.split`` picks the protocol (see :func:`metajax.data.omniglot.omniglot_splits`).
    """
    from metajax.data.omniglot import load_omniglot, omniglot_splits

    arrays = load_omniglot(config.data_dir or None)
    splits = omniglot_splits(arrays, config.split)
    return classification_problem(config, splits, conv4_omniglot(config.ways, norm=config.norm,
                                                                readout=config.readout))


def miniimagenet_problem(config: Config) -> Problem:
    """mini-ImageNet N-way K-shot (Ravi and Larochelle split) with the 32-filter Conv4."""
    from metajax.data.miniimagenet import load_miniimagenet

    images, _ = load_miniimagenet(config.data_dir or None)
    return classification_problem(
        config, images, conv4_miniimagenet(config.ways, norm=config.norm, readout=config.readout)
    )


def build_problem(config: Config) -> Problem:
    """The :class:`Problem` for ``config.dataset`` (loads and checks the data)."""
    return {
        "sinusoid": sinusoid_problem,
        "omniglot": omniglot_problem,
        "miniimagenet": miniimagenet_problem,
    }[config.dataset](config)


def build_learner(config: Config, problem: Problem) -> mj.Learner:
    """The meta-learner named by ``config.algorithm`` with its inner-loop settings."""
    lr, steps, aux, loss_fn = config.inner_lr, config.inner_steps, problem.has_aux, problem.loss_fn
    return {
        "maml": lambda: mj.maml(loss_fn, lr, steps, has_aux=aux, remat=config.remat),
        "fomaml": lambda: mj.maml(loss_fn, lr, steps, first_order=True, has_aux=aux),
        "reptile": lambda: mj.reptile(loss_fn, lr, steps, has_aux=aux),
        "metasgd": lambda: mj.metasgd(loss_fn, lr, steps, has_aux=aux),
        "anil": lambda: mj.anil(loss_fn, lr, steps, has_aux=aux),
        "imaml": lambda: mj.imaml(loss_fn, lr, steps, lam=config.lam, cg_steps=config.cg_steps,
                                  cg_damping=config.cg_damping,
                                  lam_damping=config.lam_damping,
                                  inner_solver=config.inner_solver, has_aux=aux),
        "mamlpp": lambda: mj.mamlpp(
            loss_fn, lr, steps, multi_step_loss=config.msl, learnable_lrs=config.lslr,
            per_step=norm_mask if config.bnwb else None, has_aux=aux,
        ),
    }[config.algorithm]()


def build_meta_grad_schedule(config: Config) -> Callable[[jax.Array], dict] | None:
    """Keyword arguments of ``meta_grad`` as a function of the (traced) meta-step, or None.

    For MAML++: the multi-step-loss weights of the current epoch and the derivative-order
    switch (first order during the first ``first_order_epochs`` epochs); both are traced
    values, so the compiled step never changes.
    """
    if config.algorithm != "mamlpp":
        return None

    def schedule(step):
        epoch = step // config.iters_per_epoch
        return {
            "step_weights": mj.msl_weights(config.inner_steps, epoch, config.msl_anneal_epochs),
            "first_order": (epoch < config.first_order_epochs).astype(jnp.float32),
        }

    return schedule


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """The outer optimiser with its learning-rate schedule."""
    if config.outer_lr_schedule == "linear":
        lr = optax.linear_schedule(config.outer_lr, 0.0, config.steps)
    elif config.outer_lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.outer_lr, config.steps, alpha=0.01)
    else:
        lr = config.outer_lr
    return {"adam": optax.adam, "sgd": optax.sgd}[config.outer_optimizer](lr)
