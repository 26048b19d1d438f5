"""Named continual-learning configurations: ``metajax continual PRESET``.

Three families:

- ``{rot,perm,many}-mnist-LEARNER``: the MNIST protocols of La-MAML (Gupta et al. 2020;
  GEM's and MER's streams): 20 rotation or permutation tasks of 1,000 examples, or 100
  permutation tasks of 200 ("many"); MLP 784-100-100-10, one epoch, batch 10, every learner.
  The La-MAML family (``lamaml``, ``sync``, ``cmaml``) takes the settings of the authors'
  ``run_experiments.sh``. The authors' MNIST code also computes the meta-loss after every
  inner step (``multi_step_loss``), first order, with both meta-gradients clipped to norm 2
  (their default ``grad_clip_norm``) and inner steps taken with ``max(alpha, 0)``
  (``clip_inner_rates``), and it writes the incoming batch to memory during the first
  glance, as :func:`metajax.continual.lamaml` does. Their ``--use_old_task_memory`` switch
  does not take effect in that code (the "old" memory is the same list object as the
  current one), so it is off here. MER takes the settings of its authors'
  ``mer_examples.sh`` (Riemer et al. 2019) for the same benchmark and memory size:
  rotations (200) lr 0.1, beta 0.01, s=5, 10 memories per batch; permutations (200) lr
  0.03, beta 0.03, s=10, 10 memories; many permutations (500) lr 0.03, beta 0.03, s=10, 5
  memories; gamma 1 everywhere (that script streams one example at a time; MER here
  processes a batch's rows one by one, as its code does). The other baselines' SGD rate
  0.03 is our choice. All memory-based learners get the same total memory as La-MAML (200,
  or 500 for "many"): A-GEM and GEM split it evenly over the tasks, A-GEM as one ring per
  task (La-MAML's A-GEM baseline, ``model/agem.py``, keeps a per-task ring; 5 slots per
  task in "many" could not hold a class-balanced memory of 10 classes) with its reference
  batch drawn without replacement (the whole memory of the past tasks while it holds at
  most 256), GEM with the reference code's ridge of 1e-3 on its dual.
- ``agem-pmnist-LEARNER``: A-GEM's Permuted MNIST (Chaudhry et al. 2019): 20 tasks of all
  55,000 training images, the first 3 held out for hyper-parameter search (17 run), MLP
  784-256-256-10, one epoch, batch 10, SGD 0.1 for A-GEM (0.03 for fine-tuning, the rates of
  the authors' ``replicate_results_iclr19.sh``), A-GEM memory of 250 examples per task kept
  as 25 per class (``fc_permute_mnist.py``'s per-class rings) and a reference batch of 256
  drawn without replacement (the whole memory while it holds at most 256); LCA over the
  first 10 mini-batches.
- ``split-omniglot-LEARNER``: one task per Omniglot alphabet (50 tasks, 14 characters each,
  15 training and 5 test drawings per character), 10 passes per task (one pass of 21 batches
  leaves every learner near chance), task-aware heads, MLP 784-100-100 on the 28x28 images;
  our protocol (not a published one), same learner settings as ``rot-mnist``.

:class:`ContinualConfig` is the schema of every continual configuration;
:func:`metajax.presets.build_continual.run_experiment` builds and runs one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metajax.continual.agem import MEMORIES, REF_SAMPLINGS
from metajax.presets.build_continual import BENCHMARKS, LEARNERS, MODELS
from metajax.presets.protocols import PROTOCOLS
from metajax.train.config import ConfigError, FlatConfig

SPLIT_OMNIGLOT_ALPHABETS = 50
"""Tasks of ``split_omniglot`` when ``tasks`` is 0: Omniglot's alphabets (30 background, 20
evaluation)."""

SWEEPABLE: tuple[str, ...] = ("lr", "memory_strength", "ridge", "beta", "gamma", "alpha_init",
                               "lr_eta", "outer_lr")
"""The :class:`ContinualConfig` fields a ``sweep`` may vary: plain numbers the learners take
as traced values (step sizes and strengths). A sweep over a field the chosen learner does
not read is refused (its settings would all run the same)."""


@dataclasses.dataclass(frozen=True)
class ContinualConfig(FlatConfig):
    """Everything that defines a continual run. ``metajax continual --set key=value`` sets
    any field; 0 (or -1 for ``cv_tasks``) means "the benchmark's protocol value".

    Attributes:
      preset: the preset this configuration started from.
      benchmark: a key of :data:`metajax.presets.protocols.PROTOCOLS` (e.g.
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
      memory_layout: A-GEM's memory: ``per_task`` (one ring per task, its last examples;
        La-MAML's A-GEM baseline) or ``per_class`` (each task's slots split into a ring per
        class of the stream, as A-GEM's reference code; the slots per task must be a
        multiple of the classes).
      ref_sampling: how A-GEM draws its reference batch from the memory of past tasks:
        ``without_replacement`` (the reference code: distinct examples, the whole memory
        while it holds at most ``ref_batch``) or ``with_replacement``.
      memory_strength: GEM's margin.
      ridge: added to the diagonal of GEM's dual (the reference code's ``eps`` of 1e-3;
        0: the exact projection).
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
      tasks: tasks of the stream built (0, the default: the protocol's count, e.g. 20;
        negative values are refused), counted *before* the ``cv_tasks`` held out: A-GEM's
        protocol holds out its first 3, so ``tasks=8`` runs and reports 5 and ``tasks=5``
        runs 2 (the command line says so when ``tasks`` is set; ``metajax presets NAME`` and
        ``--dry-run`` print the count run). A value that leaves no task to run is refused.
      cv_tasks: leading tasks left out of the run (reserved for hyper-parameter search, as
        A-GEM's protocol); -1: the protocol's (3 for ``agem_permuted_mnist``, else 0).
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
      sweep: a grid of hyper-parameter values trained at once with the seeds, as
        ``name=v1,v2;name2=w1,w2`` (``--sweep name=v1,v2``, repeatable): every combination
        runs with every seed in one vmapped computation (sharded over the devices), and the
        summary reports each setting's mean and spread over its seeds. Only the float
        fields of :data:`SWEEPABLE` can vary (they change no array shape).
      devices: devices to spread the runs over (the seeds, times the settings of
        ``sweep``); the runs must be a multiple of it (0: the most visible devices that
        divide them evenly). The results do not depend on it.

    Where the data lives and the devices (:attr:`RUN_CONTROL`) may change when a run is
    resumed; every other
    field is part of the configuration's :meth:`fingerprint`, since each changes the result
    (``preset`` too: it names the run in its summary).
    """

    RUN_CONTROL = ("data_dir", "devices")

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
    memory_layout: str = "per_task"
    ref_sampling: str = "without_replacement"
    memory_strength: float = 0.5
    ridge: float = 1e-3
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
    sweep: str = ""
    devices: int = 0

    def validate(self) -> ContinualConfig:
        """Check every field; raise :class:`ConfigError` naming the field and the fix."""
        self.check_types()
        self.check_bounds(
            choices={"benchmark": BENCHMARKS, "learner": tuple(LEARNERS),
                     "model": tuple(MODELS), "memory_layout": MEMORIES,
                     "ref_sampling": REF_SAMPLINGS},
            positive=(
                "hidden", "layers", "lr", "memory", "replay_batch", "ref_batch", "beta",
                "gamma", "batches_per_example", "alpha_init", "lr_eta", "outer_lr", "glances",
                "seeds",
            ),
            non_negative=(
                "memory_per_task", "memory_strength", "ridge", "grad_clip_norm", "tasks",
                "train_per_task", "test_per_task", "batch_size", "epochs", "lca_batches", "seed",
                "devices",
            ),
        )
        if self.cv_tasks < -1:
            raise ConfigError(f"cv_tasks must be >= 0 (or -1: the protocol's), got {self.cv_tasks}")
        if self.benchmark == "split_omniglot" and self.test_per_task:
            raise ConfigError(
                "test_per_task does not apply to split_omniglot: its test set is the drawings "
                "left after train_per_task (of 20 per character)"
            )
        self.sweep_settings()  # checks the grid
        if self.model == "conv4" and self.benchmark != "split_omniglot":
            raise ConfigError("model=conv4 needs image inputs: use benchmark=split_omniglot")
        if self.benchmark == "split_omniglot" and self.tasks > SPLIT_OMNIGLOT_ALPHABETS:
            raise ConfigError(f"tasks={self.tasks}: Omniglot has {SPLIT_OMNIGLOT_ALPHABETS} "
                              "alphabets")
        counts = self.task_counts()
        if counts["cv_tasks"] >= counts["tasks"]:
            raise ConfigError(
                f"cv_tasks={counts['cv_tasks']} leaves none of the stream's {counts['tasks']} "
                f"tasks to run: tasks counts the stream's tasks before the {counts['cv_tasks']} "
                f"held out; set tasks to at least {counts['cv_tasks'] + 1}, or cv_tasks=0"
            )
        return self

    def task_counts(self) -> dict[str, int]:
        """The stream's task counts as a run resolves them: ``tasks`` (the stream built:
        :attr:`tasks`, or the protocol's count when it is 0), ``cv_tasks`` (its leading tasks
        held out) and ``run`` (trained, evaluated and reported: the difference)."""
        protocol = self.protocol
        total = protocol["kwargs"].get("num_tasks", SPLIT_OMNIGLOT_ALPHABETS)
        cv = protocol["cv_tasks"]
        return {"tasks": total, "cv_tasks": cv, "run": max(total - cv, 0)}

    def stream_description(self) -> str:
        """The resolved stream in words: how many tasks are built, held out and run, and
        which of these counts are the protocol's."""
        counts = self.task_counts()
        origin = "the protocol's" if not self.tasks else f"tasks={self.tasks}"
        text = f"{counts['tasks']} tasks ({origin})"
        if counts["cv_tasks"]:
            held = "the protocol's" if self.cv_tasks < 0 else f"cv_tasks={self.cv_tasks}"
            text += (f", the first {counts['cv_tasks']} held out for hyper-parameter search "
                     f"({held}): {counts['run']} run and reported")
        else:
            text += ", all run and reported"
        protocol = self.protocol
        return text + (f"; {protocol['epochs']} epoch(s), batch {protocol['batch_size']}")

    def field_notes(self) -> dict[str, str]:
        """What the fields holding a "the protocol's" / "none" value (0, -1, empty) resolve
        to, by field name: what ``metajax presets NAME`` prints beside them."""
        protocol, counts = self.protocol, self.task_counts()
        kwargs = protocol["kwargs"]
        notes = {}
        if not self.tasks:
            notes["tasks"] = f"0: the protocol's, {counts['tasks']}"
        if self.cv_tasks < 0:
            notes["cv_tasks"] = f"-1: the protocol's, {counts['cv_tasks']}"
        if self.tasks or counts["cv_tasks"]:
            notes.setdefault("tasks", f"{counts['tasks']}")
            notes["tasks"] += (f"; {counts['run']} run after the {counts['cv_tasks']} held out"
                               if counts["cv_tasks"] else "; all run")
        if not self.train_per_task:
            if self.benchmark == "split_omniglot":
                notes["train_per_task"] = "0: 15 training drawings per character (of 20)"
            else:
                rows = kwargs.get("train_per_task")
                held = kwargs.get("validation_size")
                every = "every training image" + (
                    f" but the {held} of the validation split" if held else "")
                notes["train_per_task"] = (f"0: the protocol's, {every}" if rows is None
                                           else f"0: the protocol's, {rows}")
        if not self.test_per_task:
            if self.benchmark == "split_omniglot":
                notes["test_per_task"] = "0: the drawings train_per_task leaves"
            else:
                rows = kwargs.get("test_per_task")
                notes["test_per_task"] = ("0: the protocol's, every test image" if rows is None
                                          else f"0: the protocol's, {rows}")
        if not self.batch_size:
            notes["batch_size"] = f"0: the protocol's, {protocol['batch_size']}"
        if not self.epochs:
            notes["epochs"] = f"0: the protocol's, {protocol['epochs']}"
        if not self.memory_per_task and self.learner in ("agem", "gem"):
            notes["memory_per_task"] = (f"0: memory // tasks run = "
                                        f"{max(1, self.memory // max(counts['run'], 1))}")
        if not self.lca_batches:
            notes["lca_batches"] = "0: no LCA"
        if not self.data_dir:
            notes["data_dir"] = "empty: $METAJAX_DATA_DIR, else the user cache"
        if not self.devices:
            notes["devices"] = "0: the most visible devices that divide the runs"
        if not self.sweep:
            notes["sweep"] = "empty: no sweep"
        for name, learners in _READ_BY.items():
            if self.learner not in learners:
                notes.setdefault(name, f"not used by {self.learner}")
        if self.learner in ("agem", "gem") and self.memory_per_task:
            notes.setdefault("memory", "not used: memory_per_task is set")
        return notes

    def sweep_settings(self) -> list[dict[str, float]]:
        """The settings of :attr:`sweep`, every combination of its values (the first key
        varying slowest); ``[]`` without a sweep. Raises :class:`ConfigError` naming a key
        that cannot be swept or a value the field does not accept."""
        if not self.sweep.strip():
            return []
        grid: dict[str, list[float]] = {}
        for part in self.sweep.split(";"):
            name, sep, values = part.partition("=")
            name = name.strip()
            if not sep or not values.strip():
                raise ConfigError(f"sweep: expected name=v1,v2,..., got {part!r}")
            if name not in SWEEPABLE:
                raise ConfigError(f"sweep: {name!r} cannot be swept; the fields that can are "
                                  f"{', '.join(SWEEPABLE)} (others change array shapes or "
                                  "the program: run them as separate runs)")
            if name in grid:
                raise ConfigError(f"sweep: {name!r} given twice")
            readers = _READ_BY.get(name, ())
            if self.learner not in readers:
                raise ConfigError(
                    f"sweep: {name!r} is not read by learner {self.learner!r}, so every "
                    f"setting would run the same; it is read by {', '.join(readers)}")
            grid[name] = []
            for text in values.split(","):
                one = dataclasses.replace(self, sweep="").with_overrides([f"{name}={text}"])
                one.validate()
                grid[name].append(getattr(one, name))
        settings: list[dict[str, float]] = [{}]
        for name, values in grid.items():
            settings = [{**s, name: v} for s in settings for v in values]
        return settings

    @property
    def runs(self) -> int:
        """Runs trained at once: the seeds times the settings of the sweep."""
        return self.seeds * max(len(self.sweep_settings()), 1)

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

_FAMILY = ("cmaml", "sync", "lamaml")
_READ_BY: dict[str, tuple[str, ...]] = {
    # field: the learners whose builder (build_continual.LEARNERS) reads it
    "lr": ("finetune", "er", "agem", "gem", "mer"),
    "memory": ("er", "agem", "gem", "mer", *_FAMILY),
    "memory_per_task": ("agem", "gem"),
    "replay_batch": ("er", "mer", *_FAMILY),
    "ref_batch": ("agem",),
    "memory_layout": ("agem",),
    "ref_sampling": ("agem",),
    "memory_strength": ("gem",),
    "ridge": ("gem",),
    "beta": ("mer",),
    "gamma": ("mer",),
    "batches_per_example": ("mer",),
    "alpha_init": _FAMILY,
    "lr_eta": ("sync", "lamaml"),
    "outer_lr": ("cmaml", "sync"),
    "glances": _FAMILY,
    "first_order": _FAMILY,
    "multi_step_loss": _FAMILY,
    "replay_past_tasks": _FAMILY,
    "grad_clip_norm": _FAMILY,
    "clip_inner_rates": _FAMILY,
}

_LAMAML_SCRIPTS = {
    # benchmark: {variant: settings of the authors' run_experiments.sh}
    "rot": {
        "cmaml": dict(alpha_init=0.1, outer_lr=0.1, glances=5),
        "sync": dict(alpha_init=0.15, lr_eta=0.1, outer_lr=0.3, glances=5),
        "lamaml": dict(alpha_init=0.15, lr_eta=0.3, glances=5),
    },
    "perm": {
        "cmaml": dict(alpha_init=0.03, outer_lr=0.1, glances=5),
        "sync": dict(alpha_init=0.15, lr_eta=0.1, outer_lr=0.1, glances=5),
        "lamaml": dict(alpha_init=0.15, lr_eta=0.3, glances=5),
    },
    "many": {
        "cmaml": dict(alpha_init=0.03, outer_lr=0.15, glances=5),
        "sync": dict(alpha_init=0.03, lr_eta=0.1, outer_lr=0.03, glances=10),
        "lamaml": dict(alpha_init=0.1, lr_eta=0.1, glances=10),
    },
}
_MER_SCRIPT = {
    # benchmark: MER (Algorithm 1, meralg1) in the authors' mer_examples.sh at this memory size
    "rot": dict(lr=0.1, beta=0.01, gamma=1.0, replay_batch=10, batches_per_example=5),
    "perm": dict(lr=0.03, beta=0.03, gamma=1.0, replay_batch=10, batches_per_example=10),
    "many": dict(lr=0.03, beta=0.03, gamma=1.0, replay_batch=5, batches_per_example=10),
}


def _script_settings(short: str, learner: str) -> dict[str, Any]:
    """The authors' script settings of ``learner`` on benchmark ``short`` (none for the
    learners whose settings are ours)."""
    if learner == "mer":
        return dict(_MER_SCRIPT[short])
    return dict(_LAMAML_SCRIPTS[short].get(learner, {}))


_MNIST = {
    "rot": ("lamaml_rotated_mnist", 200, "MNIST Rotations (20 tasks x 1,000)"),
    "perm": ("lamaml_permuted_mnist", 200, "MNIST Permutations (20 tasks x 1,000)"),
    "many": ("lamaml_many_permutations", 500, "Many Permutations (100 tasks x 200)"),
}
_NOTES = {
    "finetune": "plain SGD 0.03, no memory (the lower bound)",
    "er": "experience replay, reservoir of {memory}, 10 replayed per batch, SGD 0.03",
    "agem": "A-GEM, {memory} examples split over the tasks in one ring per task, reference "
    "batch {ref_batch} drawn without replacement (the whole memory of past tasks while it "
    "holds at most {ref_batch}), SGD 0.03",
    "gem": "GEM, {memory} examples split over the tasks, margin {memory_strength:g}, ridge "
    "{ridge:g} on the dual (the reference code's eps), SGD 0.03",
    "mer": "MER, reservoir of {memory}, the example plus {replay_batch} memories per batch, "
    "s={batches_per_example}, lr {lr:g}, beta {beta:g}, gamma {gamma:g}",
    "cmaml": "C-MAML, fixed inner rate {alpha_init}, weight rate {outer_lr}, {glances} glances",
    "sync": "Sync-La-MAML, rates from {alpha_init} learned at {lr_eta}, weight rate "
    "{outer_lr}, {glances} glances",
    "lamaml": "La-MAML, rates from {alpha_init} learned at {lr_eta} and used for the weights, "
    "{glances} glances",
}


def _mnist_presets() -> dict[str, tuple[ContinualConfig, str]]:
    presets = {}
    for short, (benchmark, memory, where) in _MNIST.items():
        for learner in LEARNERS:
            settings = _script_settings(short, learner)
            config = ContinualConfig(benchmark=benchmark, learner=learner, memory=memory,
                                     **settings)
            if short == "many":
                # 100 x 100 evaluations of 10,000 images each would dominate the run.
                config = dataclasses.replace(config, test_per_task=1000)
            fields = dataclasses.asdict(config)
            note = _NOTES[learner].format(**fields)
            if learner == "mer":
                note += f" (the authors' mer_examples.sh, memory {memory})"
            extra = "; 1,000 test images per task" if short == "many" else ""
            presets[f"{short}-mnist-{learner}"] = (
                config, f"La-MAML protocol, {where}, MLP 100-100: {note}{extra}."
            )
    return presets


def _agem_presets() -> dict[str, tuple[ContinualConfig, str]]:
    base = ContinualConfig(
        benchmark="agem_permuted_mnist", hidden=256, memory=250 * 17, memory_per_task=250,
        ref_batch=256, lr=0.1, lca_batches=10,
    )
    return {
        "agem-pmnist-agem": (
            dataclasses.replace(base, learner="agem", memory_layout="per_class",
                                ref_sampling="without_replacement"),
            "A-GEM protocol, Permuted MNIST (17 tasks x 55,000 after 3 held out), MLP "
            "256-256, batch 10, one epoch: A-GEM, 250 per task kept as 25 per class (the "
            "reference's per-class rings), reference batch 256 drawn without replacement "
            "(the whole memory while it holds at most 256), SGD 0.1.",
        ),
        "agem-pmnist-finetune": (
            dataclasses.replace(base, learner="finetune", lr=0.03),
            "A-GEM protocol, Permuted MNIST: plain SGD 0.03 (the paper's VAN).",
        ),
        "agem-pmnist-er": (
            dataclasses.replace(base, learner="er", memory=250 * 17, replay_batch=10, lr=0.1),
            "A-GEM protocol, Permuted MNIST: ER with a reservoir of 4,250 (A-GEM's total), "
            "10 replayed per batch, SGD 0.1 (our choice).",
        ),
    }


def _omniglot_presets() -> dict[str, tuple[ContinualConfig, str]]:
    presets = {}
    for learner in LEARNERS:
        settings = _script_settings("rot", learner)
        config = ContinualConfig(benchmark="split_omniglot", learner=learner, memory=500,
                                 epochs=10, **settings)
        note = _NOTES[learner].format(**dataclasses.asdict(config))
        if learner == "mer":
            note += " (rot-mnist's, from the authors' mer_examples.sh)"
        if learner in ("cmaml", "sync", "lamaml"):
            note += ("; a row is offered to the reservoir on every pass (the authors' code: "
                     "on the first only)")
        presets[f"split-omniglot-{learner}"] = (
            config, f"Split Omniglot, 50 alphabets x 14 characters, 10 passes per task, "
            f"task-aware, MLP 100-100: {note}; our protocol."
        )
    return presets


CONTINUAL_PRESETS: dict[str, tuple[ContinualConfig, str]] = {
    **_mnist_presets(),
    **_agem_presets(),
    **_omniglot_presets(),
}


def get_continual_preset(name: str) -> ContinualConfig:
    """The configuration of continual preset ``name``, or :class:`ConfigError` listing them."""
    if name not in CONTINUAL_PRESETS:
        from metajax.presets import PRESETS, _suggest

        if name in PRESETS:
            raise ConfigError(f"{name!r} is a meta-learning preset: run `metajax train {name}`")
        raise ConfigError(
            f"unknown continual preset {name!r}; valid presets: "
            f"{', '.join(sorted(CONTINUAL_PRESETS))}" + _suggest(name, CONTINUAL_PRESETS)
        )
    return dataclasses.replace(CONTINUAL_PRESETS[name][0], preset=name)
