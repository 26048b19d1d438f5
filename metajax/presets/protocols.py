"""Published continual-learning protocols: the settings of each paper's stream, by name.

:data:`PROTOCOLS` maps a name (``gem_permuted_mnist``, ``agem_permuted_mnist``,
``lamaml_split_cifar100``, ...) to a :class:`Protocol`: the stream builder of
:mod:`metajax.data.streams` and its arguments, the epochs, the batch size and the tasks held
out for hyper-parameter search, with the paper and code each setting comes from.
:func:`protocol_stream` builds the stream of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from metajax.data.cifar100 import CIFAR100
from metajax.data.mnist import MNIST
from metajax.data.streams import (
    many_permutations_mnist,
    permuted_mnist,
    rotated_mnist,
    split_cifar100,
    split_omniglot,
)
from metajax.types import Stream


class Protocol(NamedTuple):
    """A published continual-learning setting.

    Attributes:
      benchmark: the stream builder (a key of :data:`BUILDERS`).
      kwargs: its arguments (``seed`` is given separately).
      epochs: passes over each task's training rows.
      batch_size: training examples per update.
      cv_tasks: leading tasks reserved for hyper-parameter search and left out of the
        reported metrics (A-GEM's protocol); 0 when none are.
      reference: the paper and code the setting comes from, and what is uncertain.
    """

    benchmark: str
    kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    cv_tasks: int
    reference: str


_GEM = "Lopez-Paz & Ranzato 2017 (GEM), run_experiments.sh and data/*.py"
_LAMAML = (
    "Gupta, Yadav & Paull 2020 (La-MAML), run_experiments.sh, on MER's prebuilt files "
    "(Riemer et al. 2019), taken to be built by GEM's scripts"
)

PROTOCOLS: dict[str, Protocol] = {
    "gem_permuted_mnist": Protocol(
        "permuted_mnist",
        {"num_tasks": 20, "train_per_task": 1000, "test_per_task": 10000},
        1,
        10,
        0,
        _GEM,
    ),
    "gem_rotated_mnist": Protocol(
        "rotated_mnist",
        {"num_tasks": 20, "train_per_task": 1000, "test_per_task": 10000, "angles": "gem"},
        1,
        10,
        0,
        _GEM,
    ),
    "gem_split_cifar100": Protocol(
        "split_cifar100", {"num_tasks": 20, "class_order": "sequential"}, 1, 10, 0, _GEM
    ),
    "lamaml_permuted_mnist": Protocol(
        "permuted_mnist",
        {"num_tasks": 20, "train_per_task": 1000, "test_per_task": 10000},
        1,
        10,
        0,
        _LAMAML,
    ),
    "lamaml_rotated_mnist": Protocol(
        "rotated_mnist",
        {"num_tasks": 20, "train_per_task": 1000, "test_per_task": 10000, "angles": "gem"},
        1,
        10,
        0,
        _LAMAML,
    ),
    "lamaml_many_permutations": Protocol(
        "many_permutations_mnist",
        {"num_tasks": 100, "train_per_task": 200, "test_per_task": 10000},
        1,
        10,
        0,
        _LAMAML + "; the test images per task in MER's file are not documented (we use all)",
    ),
    "lamaml_split_cifar100": Protocol(
        "split_cifar100",
        {"num_tasks": 20, "class_order": "random", "train_per_task": 2250},
        10,
        10,
        0,
        "Gupta, Yadav & Paull 2020 (La-MAML), run_experiments.sh, multiple-pass setting "
        "(--n_epochs 10; the single-pass setting uses 1); 10% of the training images held "
        "out for validation (--validation 0.1), approximated by 2250 random images per task",
    ),
    "agem_permuted_mnist": Protocol(
        "permuted_mnist",
        {
            "num_tasks": 20,
            "train_per_task": None,
            "test_per_task": 10000,
            "validation_size": 5000,
        },
        1,
        10,
        3,
        "Chaudhry, Ranzato, Rohrbach & Elhoseiny 2019 (A-GEM), fc_permute_mnist.py and "
        "utils/data_utils.py: every one of TensorFlow's 55,000 training images per task "
        "(the first 5000 are its validation split); 3.4 GB of float32 for 20 tasks",
    ),
}


def protocol_stream(name: str, data: MNIST | CIFAR100, *, seed: int = 0, **overrides) -> Stream:
    """The :class:`Stream` of the published protocol ``name`` (a key of :data:`PROTOCOLS`).

    Args:
      name: e.g. ``"gem_permuted_mnist"``; see :data:`PROTOCOLS` for the settings and their
        sources.
      data: the data set the benchmark needs (MNIST or CIFAR-100).
      seed: the stream's randomness.
      overrides: builder arguments replacing the protocol's (e.g. ``test_per_task=1000``).
    """
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r} is unknown; use one of {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    return BUILDERS[protocol.benchmark](data, seed=seed, **{**protocol.kwargs, **overrides})


BUILDERS: dict[str, Callable[..., Stream]] = {
    "permuted_mnist": permuted_mnist,
    "rotated_mnist": rotated_mnist,
    "many_permutations_mnist": many_permutations_mnist,
    "split_cifar100": split_cifar100,
    "split_omniglot": split_omniglot,
}
