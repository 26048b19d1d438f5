"""From a :class:`~metajax.presets.config.Config` to the pieces a run needs.

This is the only place that knows which dataset, model and algorithm a name stands for; the
training loop receives the finished pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.data import episodes, sinusoid
from metajax.data.fewshot_benchmarks import classification_loss
from metajax.meta.mamlpp import norm_mask
from metajax.nn.conv4 import conv4_miniimagenet, conv4_omniglot
from metajax.nn.mlp import MLP
from metajax.nn.precision import in_compute_dtype
from metajax.presets.config import Config
from metajax.types import Problem


def sinusoid_problem(config: Config) -> Problem:
    """Sinusoid regression with the MLP of Finn et al. (2017) and mean squared error."""
    model = MLP(hidden=(config.hidden,) * config.layers, outputs=1)
    apply = in_compute_dtype(model.apply, config.compute_dtype)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((apply(params, x) - y) ** 2)

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
    2016), cross-entropy loss with accuracy as ``aux`` and as the reported metric; the model
    runs in ``config.compute_dtype`` (:func:`metajax.nn.precision.in_compute_dtype`), the
    loss in float32.

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

    loss_fn = classification_loss(in_compute_dtype(model.apply, config.compute_dtype))

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
    model = conv4_omniglot(config.ways, norm=config.norm, readout=config.readout,
                           pooled=config.pooling, norm_eps=config.norm_eps,
                           weight_init=config.weight_init)
    return classification_problem(config, splits, model)


def miniimagenet_problem(config: Config) -> Problem:
    """mini-ImageNet N-way K-shot (Ravi and Larochelle split) with the 32-filter Conv4."""
    from metajax.data.miniimagenet import load_miniimagenet

    images, _ = load_miniimagenet(config.data_dir or None)
    return classification_problem(
        config, images, conv4_miniimagenet(config.ways, norm=config.norm, readout=config.readout,
                                           norm_eps=config.norm_eps,
                                           weight_init=config.weight_init)
    )


def build_problem(config: Config) -> Problem:
    """The :class:`Problem` for ``config.dataset`` (loads and checks the data)."""
    return {
        "sinusoid": sinusoid_problem,
        "omniglot": omniglot_problem,
        "miniimagenet": miniimagenet_problem,
    }[config.dataset](config)


LEARNERS: dict[str, Callable[[Config, Problem], mj.Learner]] = {
    "maml": lambda c, p: mj.maml(p.loss_fn, c.inner_lr, c.inner_steps, has_aux=p.has_aux,
                                 remat=c.remat),
    "fomaml": lambda c, p: mj.maml(p.loss_fn, c.inner_lr, c.inner_steps, first_order=True,
                                   has_aux=p.has_aux),
    "reptile": lambda c, p: mj.reptile(p.loss_fn, c.inner_lr, c.inner_steps, has_aux=p.has_aux),
    "metasgd": lambda c, p: mj.metasgd(p.loss_fn, c.inner_lr, c.inner_steps, has_aux=p.has_aux),
    "anil": lambda c, p: mj.anil(p.loss_fn, c.inner_lr, c.inner_steps, has_aux=p.has_aux),
    "imaml": lambda c, p: mj.imaml(p.loss_fn, c.inner_lr, c.inner_steps, lam=c.lam,
                                   cg_steps=c.cg_steps, cg_damping=c.cg_damping,
                                   lam_damping=c.lam_damping, inner_solver=c.inner_solver,
                                   inner=c.inner_problem,
                                   eval_lam=None if c.eval_lam == -1.0 else c.eval_lam,
                                   linear_solve=(mj.gmres_solver(c.cg_steps)
                                                 if c.backward_solver == "gmres" else None),
                                   has_aux=p.has_aux),
    "mamlpp": lambda c, p: mj.mamlpp(
        p.loss_fn, c.inner_lr, c.inner_steps, multi_step_loss=c.msl, learnable_lrs=c.lslr,
        per_step=norm_mask if c.bnwb else None, frozen=None if c.bnwb else norm_mask,
        has_aux=p.has_aux, **mamlpp_schedules(c),
    ),
}
"""Meta-learners by name (``config.algorithm``): ``builder(config, problem) -> Learner``."""

ALGORITHMS: tuple[str, ...] = tuple(LEARNERS)


def build_learner(config: Config, problem: Problem) -> mj.Learner:
    """The meta-learner named by ``config.algorithm`` (its :data:`LEARNERS` entry) with its
    inner-loop settings."""
    return LEARNERS[config.algorithm](config, problem)


#: Folded into the run's seed for the tasks of :func:`build_diagnostics` (apart from every
#: key the training loop draws, so validation is the same with the check or without it).
DIAGNOSTIC_KEY = 0x6D6A


def build_diagnostics(config: Config, problem: Problem,
                      learner: mj.Learner) -> Callable[[object], dict] | None:
    """The check :func:`metajax.train.loop.train` runs at every validation, or ``None``.

    For iMAML with ``grad_report_tasks > 0``: :func:`metajax.implicit_gradient_report` on
    that many validation tasks (training shots and queries; the same tasks at every
    validation), at the phi of the training inner loop (not of ``eval_lam``).
    """
    if config.algorithm != "imaml" or not config.grad_report_tasks:
        return None
    train_adapt = build_learner(dataclasses.replace(config, eval_lam=-1.0), problem).adapt
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), DIAGNOSTIC_KEY)

    def diagnostics(meta_params):
        tasks = problem.sample_tasks(key, config.grad_report_tasks, config.shots,
                                     config.queries, "val")
        return mj.implicit_gradient_report(
            problem.loss_fn, learner, meta_params, tasks, config.lam, train_adapt=train_adapt,
            reference_hvps=config.grad_report_hvps, has_aux=problem.has_aux)

    return diagnostics


def mamlpp_schedules(config: Config) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """MAML++'s schedules of the meta-step, as :func:`metajax.mamlpp` takes them: the
    multi-step-loss weights of the current epoch (``step_weights``) and the derivative-order
    switch (``first_order``: 1 during the first ``first_order_epochs`` epochs). Both are
    traced values, so the compiled step never changes."""

    def step_weights(step):
        epoch = step // config.iters_per_epoch
        return mj.msl_weights(config.inner_steps, epoch, config.msl_anneal_epochs)

    def first_order(step):
        return (step // config.iters_per_epoch < config.first_order_epochs).astype(jnp.float32)

    return {"step_weights": step_weights, "first_order": first_order}


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """The outer optimiser with its learning-rate schedule, after clipping the meta-gradient
    to ``config.grad_clip_norm`` when that is set."""
    if config.outer_lr_schedule == "linear":
        lr = optax.linear_schedule(config.outer_lr, 0.0, config.steps)
    elif config.outer_lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.outer_lr, config.steps, alpha=0.01)
    else:
        lr = config.outer_lr
    if config.outer_optimizer == "adam":
        optimizer = optax.adam(lr, eps=config.adam_eps)
    else:
        optimizer = optax.sgd(lr)
    if config.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer
