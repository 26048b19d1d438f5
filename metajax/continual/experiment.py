"""Continual-learning experiments from one flat configuration: stream, model, learner, run.

:class:`ContinualConfig` names everything a run of :func:`metajax.continual.run` needs
(the benchmark, the learner and its hyper-parameters, the model, the seeds); the presets of
:mod:`metajax.presets.continual` are instances of it and ``metajax continual PRESET --set
key=value`` overrides any field. :func:`run_experiment` builds the pieces, trains, and writes
the run directory:

- ``config.json``: the configuration;
- ``tasks.jsonl``: one line per finished task (its accuracy row), written as the run goes,
  so an interrupted run keeps what it measured;
- ``acc_matrix.json``: the accuracy matrix (per seed with several seeds) and the initial
  accuracies;
- ``acc_matrix.png``: a heatmap of the (seed-averaged) accuracy matrix;
- ``metrics.json``: every metric of :func:`metajax.continual.metrics` (mean, std and per seed
  with several seeds), the wall time, the learner's training metrics per task.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax._files import atomic_write
from metajax.continual.agem import agem
from metajax.continual.er import er
from metajax.continual.gem import gem
from metajax.continual.lamaml import lamaml
from metajax.continual.learners import ContinualLearner, cross_entropy_loss, finetune
from metajax.continual.mer import mer
from metajax.continual.run import run
from metajax.continual.stream import PROTOCOLS, Stream, protocol_stream, split_omniglot
from metajax.train.config import ConfigError, FlatConfig

LEARNERS = ("finetune", "er", "agem", "gem", "mer", "cmaml", "sync", "lamaml")
BENCHMARKS = (*sorted(PROTOCOLS), "split_omniglot")
MODELS = ("mlp", "conv4")


@dataclasses.dataclass(frozen=True)
class ContinualConfig(FlatConfig):
    """Everything that defines a continual run. ``metajax continual --set key=value`` sets
    any field; 0 (or -1 for ``cv_tasks``) means "the benchmark's protocol value".

    Attributes:
      preset: the preset this configuration started from.
      benchmark: a key of :data:`metajax.continual.PROTOCOLS` (e.g.
        ``lamaml_permuted_mnist``, ``agem_permuted_mnist``) or ``split_omniglot``.
      learner: ``finetune``, ``er``, ``agem``, ``gem``, ``mer``, ``cmaml``, ``sync`` or
        ``lamaml``.
      model: ``mlp`` (on flattened inputs) or ``conv4`` (images; no normalisation).
      hidden: width of every hidden layer of the MLP (filters of Conv4).
      layers: hidden layers of the MLP.
      lr: SGD rate of ``finetune``, ``er``, ``agem`` and ``gem``; MER's example-step rate.
      memory: replay memory in examples: the reservoir of ``er``, ``mer`` and the La-MAML
        family; ``agem`` and ``gem`` split it evenly over the tasks unless
        ``memory_per_task`` is set.
      memory_per_task: per-task episodic memory of ``agem`` and ``gem`` (0: memory // tasks).
      replay_batch: memories per update (``er``, ``mer``: ``k - 1``, La-MAML family).
      ref_batch: A-GEM's reference batch.
      memory_strength: GEM's margin.
      beta: MER's within-batch Reptile rate.
      gamma: MER's across-batch Reptile rate.
      batches_per_example: MER's ``s``.
      alpha_init: La-MAML family: initial (C-MAML: fixed) inner rate.
      lr_eta: La-MAML and Sync: SGD rate of the learned rates.
      outer_lr: Sync and C-MAML: fixed weight rate.
      glances: La-MAML family: updates per incoming batch.
      first_order: La-MAML family: first-order meta-gradient.
      multi_step_loss: La-MAML family: meta-loss averaged over the inner steps.
      replay_past_tasks: La-MAML family: replay only from the memory as it was when the
        current task began.
      grad_clip_norm: La-MAML family: clip both meta-gradients to this norm (0: no clipping).
      clip_inner_rates: La-MAML and Sync: inner steps with ``max(alpha, 0)``.
      tasks: tasks of the stream (0: the protocol's), counted before ``cv_tasks`` are removed.
      cv_tasks: leading tasks left out of the run (reserved for hyper-parameter search, as
        A-GEM's protocol); -1: the protocol's.
      train_per_task: training examples per task (0: the protocol's); for
        ``split_omniglot``, training drawings per character (default 15 of 20).
      test_per_task: test examples per task (0: the protocol's).
      batch_size: examples per update (0: the protocol's).
      epochs: passes over each task (0: the protocol's).
      lca_batches: LCA's beta, the mini-batches after which each task's own accuracy is
        measured (A-GEM uses 10); 0 skips LCA.
      seeds: independent runs, trained at once under ``vmap`` (model initialisation and the
        learner's randomness differ; the stream is the same).
      seed: seed of the stream and of the run's keys.
      data_dir: dataset folder (empty: ``$METAJAX_DATA_DIR``, else the user cache).
    """

    preset: str = "custom"
    benchmark: str = "lamaml_permuted_mnist"
    learner: str = "er"
    model: str = "mlp"
    hidden: int = 100
    layers: int = 2
    lr: float = 0.03
    memory: int = 200
    memory_per_task: int = 0
    replay_batch: int = 10
    ref_batch: int = 256
    memory_strength: float = 0.5
    beta: float = 0.03
    gamma: float = 1.0
    batches_per_example: int = 5
    alpha_init: float = 0.15
    lr_eta: float = 0.3
    outer_lr: float = 0.1
    glances: int = 1
    first_order: bool = True
    multi_step_loss: bool = True
    replay_past_tasks: bool = False
    grad_clip_norm: float = 2.0
    clip_inner_rates: bool = True
    tasks: int = 0
    cv_tasks: int = -1
    train_per_task: int = 0
    test_per_task: int = 0
    batch_size: int = 0
    epochs: int = 0
    lca_batches: int = 10
    seeds: int = 1
    seed: int = 0
    data_dir: str = ""

    def validate(self) -> ContinualConfig:
        """Check every field; raise :class:`ConfigError` naming the field and the fix."""
        self.check_types()
        self.check_bounds(
            choices={"benchmark": BENCHMARKS, "learner": LEARNERS, "model": MODELS},
            positive=(
                "hidden", "layers", "lr", "memory", "replay_batch", "ref_batch", "beta",
                "gamma", "batches_per_example", "alpha_init", "lr_eta", "outer_lr", "glances",
                "seeds",
            ),
            non_negative=(
                "memory_per_task", "memory_strength", "grad_clip_norm", "tasks",
                "train_per_task", "test_per_task", "batch_size", "epochs", "lca_batches", "seed",
            ),
        )
        if self.cv_tasks < -1:
            raise ConfigError(f"cv_tasks must be >= 0 (or -1: the protocol's), got {self.cv_tasks}")
        if self.benchmark == "split_omniglot" and self.test_per_task:
            raise ConfigError(
                "test_per_task does not apply to split_omniglot: its test set is the drawings "
                "left after train_per_task (of 20 per character)"
            )
        if self.model == "conv4" and self.benchmark != "split_omniglot":
            raise ConfigError("model=conv4 needs image inputs: use benchmark=split_omniglot")
        return self

    @property
    def protocol(self) -> dict[str, Any]:
        """The benchmark's published settings with this configuration's overrides applied:
        ``epochs``, ``batch_size``, ``cv_tasks`` and the builder's keyword arguments."""
        if self.benchmark == "split_omniglot":
            base = {"epochs": 1, "batch_size": 10, "cv_tasks": 0, "kwargs": {}}
        else:
            p = PROTOCOLS[self.benchmark]
            base = {"epochs": p.epochs, "batch_size": p.batch_size, "cv_tasks": p.cv_tasks,
                    "kwargs": dict(p.kwargs)}
        if self.epochs:
            base["epochs"] = self.epochs
        if self.batch_size:
            base["batch_size"] = self.batch_size
        if self.cv_tasks >= 0:
            base["cv_tasks"] = self.cv_tasks
        kwargs = base["kwargs"]
        if self.tasks:
            kwargs["num_tasks"] = self.tasks
        if self.train_per_task:
            key = "train_drawings" if self.benchmark == "split_omniglot" else "train_per_task"
            kwargs[key] = self.train_per_task
        if self.test_per_task and self.benchmark != "split_omniglot":
            kwargs["test_per_task"] = self.test_per_task
        return base


def build_stream(config: ContinualConfig, *, progress: bool = True) -> Stream:
    """The stream of ``config.benchmark`` (data from ``config.data_dir``), without its
    ``cv_tasks`` leading tasks."""
    protocol = config.protocol
    data_dir = config.data_dir or None
    if config.benchmark == "split_omniglot":
        from metajax.data.omniglot import load_omniglot

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


def build_model(
    config: ContinualConfig, stream: Stream
) -> tuple[Callable[[jax.Array], Any], Callable[[Any, jax.Array], jax.Array]]:
    """``(init(key) -> params, apply(params, x) -> logits)`` of ``config.model`` for
    ``stream``'s inputs and classes."""
    example = jnp.zeros((1, *stream.train_x.shape[2:]), jnp.float32)
    if config.model == "mlp":
        from metajax.nn.mlp import MLP

        module = MLP(hidden=(config.hidden,) * config.layers, outputs=stream.num_classes)

        def apply(params, x):
            return module.apply(params, x.reshape(x.shape[0], -1))

        def init(key):
            return module.init(key, example.reshape(1, -1))

        return init, apply
    from metajax.nn.conv4 import Conv4

    module = Conv4(num_classes=stream.num_classes, filters=config.hidden, norm="none")

    def init(key):
        return module.init(key, example)

    return init, module.apply


def build_learner(
    config: ContinualConfig, stream: Stream, apply_fn: Callable[[Any, jax.Array], jax.Array]
) -> ContinualLearner:
    """The :class:`ContinualLearner` of ``config.learner`` with its hyper-parameters, on the
    softmax cross-entropy of ``apply_fn`` (task-aware when the stream has class masks)."""
    loss = cross_entropy_loss(apply_fn, stream.class_mask)
    c = config
    per_task = c.memory_per_task or max(1, c.memory // stream.num_tasks)
    if c.learner == "finetune":
        return finetune(loss, optax.sgd(c.lr))
    if c.learner == "er":
        return er(loss, optax.sgd(c.lr), memory_size=c.memory, replay_batch=c.replay_batch)
    if c.learner == "agem":
        return agem(loss, optax.sgd(c.lr), memory_per_task=per_task, ref_batch=c.ref_batch)
    if c.learner == "gem":
        return gem(loss, optax.sgd(c.lr), memory_per_task=per_task,
                   memory_strength=c.memory_strength)
    if c.learner == "mer":
        return mer(loss, lr=c.lr, beta=c.beta, gamma=c.gamma,
                   batches_per_example=c.batches_per_example, memory_size=c.memory,
                   replay_batch=c.replay_batch)
    return lamaml(
        loss,
        alpha_init=c.alpha_init,
        memory_size=c.memory,
        replay_batch=c.replay_batch,
        lr_eta=None if c.learner == "cmaml" else c.lr_eta,
        outer_lr=None if c.learner == "lamaml" else c.outer_lr,
        variant=c.learner,
        glances=c.glances,
        first_order=c.first_order,
        multi_step_loss=c.multi_step_loss,
        replay_past_tasks=c.replay_past_tasks,
        grad_clip_norm=c.grad_clip_norm or None,
        clip_inner_rates=c.clip_inner_rates,
    )


CONFIG_FILE = "config.json"
TASKS_FILE = "tasks.jsonl"
MATRIX_FILE = "acc_matrix.json"
HEATMAP_FILE = "acc_matrix.png"
METRICS_FILE = "metrics.json"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value, np.float64).round(6).tolist()
    if isinstance(value, np.floating | float):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_experiment(
    config: ContinualConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build ``config``'s stream, model and learner, train, and write ``run_dir``.

    Returns the summary printed by ``metajax continual``: ``avg_accuracy`` (ACC, La-MAML's
    RA), ``forgetting`` (A-GEM's), ``bwt`` (BTI), ``fwt``, ``lca`` (when
    ``config.lca_batches``), their standard deviations over seeds (``std``), the seed-mean
    ``acc_matrix``, ``tasks``, ``seeds``, ``wall_s`` and ``run_dir``.
    """
    config.validate()
    say = log or (lambda message: None)
    stream = build_stream(config, progress=progress)
    protocol = config.protocol
    init, apply_fn = build_model(config, stream)
    learner = build_learner(config, stream, apply_fn)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / CONFIG_FILE, config.to_json())
    say(f"{config.preset}: {config.learner} on {config.benchmark}, {stream.num_tasks} tasks "
        f"of {stream.train_y.shape[1]} examples, {config.seeds} seed(s) -> {run_dir}")

    tasks_path = run_dir / TASKS_FILE
    tasks_path.write_text("")
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=stream.num_tasks, desc="tasks", unit="task")

    def on_task(t: int, row: np.ndarray) -> None:
        mean_row = row if row.ndim == 1 else row.mean(axis=0)
        record = {"task": t, "acc": _json_ready(row),
                  "mean_acc_so_far": round(float(mean_row[: t + 1].mean()), 6),
                  "wall_s": round(time.perf_counter() - start, 3)}
        with tasks_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(acc=f"{record['mean_acc_so_far']:.4f}")
            bar.update(1)

    seeds = list(range(config.seeds)) if config.seeds > 1 else None
    try:
        result = run(
            learner, stream, jax.random.PRNGKey(config.seed),
            params=init, apply_fn=apply_fn, batch_size=protocol["batch_size"],
            epochs=protocol["epochs"], lca_batches=config.lca_batches, seeds=seeds,
            on_task=on_task,
        )
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start

    R = result["acc_matrix"]
    mean_R = R if R.ndim == 2 else R.mean(axis=0)
    _write_text(run_dir / MATRIX_FILE, json.dumps(_json_ready({
        "acc_matrix": R,
        "random_init_acc": result["random_init_acc"],
        "rows": "after training task i", "columns": "accuracy on task j",
        "seeds": seeds or [None],
    })) + "\n")
    save_heatmap(mean_R, run_dir / HEATMAP_FILE,
                 title=f"{config.preset}: {config.learner}, ACC {mean_R[-1].mean():.3f}")
    names = ("acc", "bwt", "forgetting", "forgetting_since_learned", "fwt", "lca")
    summary: dict[str, Any] = {
        "avg_accuracy": result["acc"],
        "forgetting": result.get("forgetting"),
        "bwt": result.get("bwt"),
        "fwt": result.get("fwt"),
        "lca": result.get("lca"),
    }
    if seeds is not None:
        summary["std"] = {
            ("avg_accuracy" if k == "acc" else k): v
            for k, v in result["std"].items() if k in names
        }
    summary.update({
        "acc_matrix": mean_R, "tasks": stream.num_tasks, "seeds": config.seeds,
        "learner": config.learner, "benchmark": config.benchmark, "preset": config.preset,
        "wall_s": wall, "run_dir": str(run_dir),
    })
    full = {k: v for k, v in result.items() if k not in ("acc_matrix", "random_init_acc")}
    full["summary"] = {k: v for k, v in summary.items() if k != "acc_matrix"}
    _write_text(run_dir / METRICS_FILE, json.dumps(_json_ready(full), indent=1) + "\n")
    return _json_ready(summary)


def save_heatmap(matrix: np.ndarray, path: str | Path, *, title: str = "") -> None:
    """Write the accuracy matrix as a PNG heatmap (rows: after training task i; columns:
    task j), with values printed in the cells when they fit. Uses Pillow only."""
    from PIL import Image, ImageDraw

    R = np.asarray(matrix, np.float64)
    T = R.shape[0]
    cell = max(8, min(48, 960 // max(T, 1)))
    margin_left, margin_top = 60, 40
    width = max(margin_left + T * cell + 10, 7 * len(title) + 10)
    height = margin_top + T * cell + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 8), title, fill="black")
    for i in range(T):
        for j in range(T):
            v = float(np.clip(R[i, j], 0.0, 1.0))
            color = _viridis(v)
            x0, y0 = margin_left + j * cell, margin_top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color)
            if cell >= 32:
                ink = "black" if v > 0.6 else "white"
                draw.text((x0 + 3, y0 + cell // 3), f"{100 * R[i, j]:.0f}", fill=ink)
    draw.text((4, margin_top), "after\ntask i", fill="black")
    draw.text((margin_left, margin_top + T * cell + 8), "accuracy on task j ->", fill="black")
    atomic_write(path, lambda f: image.save(f, format="PNG"))


_VIRIDIS = np.array([
    [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
], np.float64)


def _viridis(v: float) -> tuple[int, int, int]:
    position = v * (len(_VIRIDIS) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(_VIRIDIS) - 1)
    mix = position - low
    rgb = (1 - mix) * _VIRIDIS[low] + mix * _VIRIDIS[high]
    return tuple(int(round(c)) for c in rgb)
