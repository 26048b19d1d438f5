"""Named continual-learning configurations: ``metajax continual PRESET``.

Three families:

- ``{rot,perm,many}-mnist-LEARNER``: the MNIST protocols of La-MAML (Gupta et al. 2020;
  GEM's and MER's streams): 20 rotation or permutation tasks of 1,000 examples, or 100
  permutation tasks of 200 ("many"); MLP 784-100-100-10, one epoch, batch 10, every learner.
  The La-MAML family (``lamaml``, ``sync``, ``cmaml``) takes the settings of the authors'
  ``run_experiments.sh``. The authors' MNIST code also computes the meta-loss after every
  inner step (``multi_step_loss``), first order, with both meta-gradients clipped to norm 2
  (their default ``grad_clip_norm``) and inner steps taken with ``max(alpha, 0)``
  (``clip_inner_rates``). Their ``--use_old_task_memory`` switch does not take
  effect in that code (the "old" memory is the same list object as the current one), so it
  is off here. The baselines' rates are our choice (SGD 0.03, MER beta 0.03, gamma 1, s=5)
  and all memory-based learners get the same total memory as La-MAML (200, or 500 for
  "many"): A-GEM and GEM split it evenly over the tasks.
- ``agem-pmnist-LEARNER``: A-GEM's Permuted MNIST (Chaudhry et al. 2019): 20 tasks of all
  55,000 training images, the first 3 held out for hyper-parameter search (17 run), MLP
  784-256-256-10, one epoch, batch 10, SGD 0.1 for A-GEM (0.03 for fine-tuning, the rates of
  the authors' ``replicate_results_iclr19.sh``), A-GEM memory of 250 examples per task and
  a reference batch of 256; LCA over the first 10 mini-batches.
- ``split-omniglot-LEARNER``: one task per Omniglot alphabet (50 tasks, 14 characters each,
  15 training and 5 test drawings per character), 10 passes per task (one pass of 21 batches
  leaves every learner near chance), task-aware heads, MLP 784-100-100 on the 28x28 images;
  our protocol (not a published one), same learner settings as ``rot-mnist``.
"""

from __future__ import annotations

import dataclasses

from metajax.continual.experiment import LEARNERS, ContinualConfig
from metajax.train.config import ConfigError

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
_MNIST = {
    "rot": ("lamaml_rotated_mnist", 200, "MNIST Rotations (20 tasks x 1,000)"),
    "perm": ("lamaml_permuted_mnist", 200, "MNIST Permutations (20 tasks x 1,000)"),
    "many": ("lamaml_many_permutations", 500, "Many Permutations (100 tasks x 200)"),
}
_NOTES = {
    "finetune": "plain SGD 0.03, no memory (the lower bound)",
    "er": "experience replay, reservoir of {memory}, 10 replayed per batch, SGD 0.03",
    "agem": "A-GEM, {memory} examples split over the tasks, reference batch 256, SGD 0.03",
    "gem": "GEM, {memory} examples split over the tasks, margin 0.5, SGD 0.03",
    "mer": "MER, reservoir of {memory}, the example plus 10 memories per batch, s=5, lr 0.03, "
    "beta 0.03, gamma 1",
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
            settings = dict(_LAMAML_SCRIPTS[short].get(learner, {}))
            config = ContinualConfig(benchmark=benchmark, learner=learner, memory=memory,
                                     **settings)
            if short == "many":
                # 100 x 100 evaluations of 10,000 images each would dominate the run.
                config = dataclasses.replace(config, test_per_task=1000)
            fields = dataclasses.asdict(config)
            note = _NOTES[learner].format(**fields)
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
            dataclasses.replace(base, learner="agem"),
            "A-GEM protocol, Permuted MNIST (17 tasks x 55,000 after 3 held out), MLP "
            "256-256, batch 10, one epoch: A-GEM, 250 per task, reference batch 256, SGD 0.1.",
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
        settings = dict(_LAMAML_SCRIPTS["rot"].get(learner, {}))
        config = ContinualConfig(benchmark="split_omniglot", learner=learner, memory=500,
                                 epochs=10, **settings)
        note = _NOTES[learner].format(**dataclasses.asdict(config))
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
        raise ConfigError(
            f"unknown continual preset {name!r}; valid presets: "
            f"{', '.join(sorted(CONTINUAL_PRESETS))}"
        )
    return dataclasses.replace(CONTINUAL_PRESETS[name][0], preset=name)
