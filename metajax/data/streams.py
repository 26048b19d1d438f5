"""Continual-learning streams as fixed-shape arrays: one leading task axis, nothing ragged.

A :class:`Stream` holds every task's training and test examples in arrays of one shape
(``train_x [tasks, n_train, *features]``), so a learner can run a whole task inside one
``lax.scan`` over ``train_x[t]`` and evaluate every task with one ``vmap``. Builders:

- :func:`permuted_mnist`: a fixed random pixel permutation per task (GEM, A-GEM, MER).
- :func:`rotated_mnist`: a fixed rotation per task, angles in [0, 180) (GEM, MER).
- :func:`many_permutations_mnist`: 100 permutation tasks of 200 examples (MER, La-MAML).
- :func:`split_cifar100`: 20 tasks of 5 classes, task-aware logit masks (GEM, A-GEM,
  La-MAML).
- :func:`split_omniglot`: one task per alphabet, task-aware logit masks.

:data:`metajax.presets.protocols.PROTOCOLS` names the published settings (tasks, examples per
task, epochs, batch size, tasks reserved for hyper-parameter search) and
:func:`metajax.presets.protocols.protocol_stream` builds one. The :class:`~metajax.types.Stream`
type lives in :mod:`metajax.types`, the image rotation in :mod:`metajax.data.transforms`.

Conventions shared by all builders:

* Arrays are numpy (host) arrays; ``train_x``/``test_x`` float32 with pixels scaled to
  [0, 1], ``train_y``/``test_y`` int32. ``num_classes`` is a Python int (keep it static
  under ``jit``). ``class_mask [tasks, num_classes]`` (bool) marks the classes of each task
  for task-aware ("multi-head") evaluation; ``None`` means one shared head over all classes.
* Randomness comes only from ``seed``, through a separate numpy generator per purpose and
  task (``np.random.default_rng([seed, purpose, task])``): the same seed gives the same
  stream. The permutation and the rows of task ``t`` do not depend on ``num_tasks`` (the
  rotation bins and the class groups do, by construction).
* Training rows of a task are in random order, the order a single pass sees them; test rows
  keep the data set's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from metajax._checks import check_int
from metajax.data.cifar100 import CIFAR100, NUM_CLASSES
from metajax.data.mnist import MNIST
from metajax.data.omniglot import OmniglotArrays
from metajax.data.transforms import RESAMPLES, rotate_images
from metajax.types import Stream

ANGLE_SCHEMES = ("gem", "even")
CLASS_ORDERS = ("sequential", "random")

# Purposes of the per-task random generators (see the module docstring).
_PERMUTATION, _ANGLE, _TRAIN, _TEST, _CLASSES, _CHARACTERS, _DRAWINGS = range(7)


# --- MNIST streams --------------------------------------------------------------------------


def task_permutations(
    num_tasks: int, num_features: int = 784, *, seed: int = 0, identity_first: bool = False
) -> np.ndarray:
    """One fixed random permutation of the input features per task (Permuted MNIST).

    Permuted MNIST (Goodfellow et al. 2013, "An Empirical Investigation of Catastrophic
    Forgetting in Gradient-Based Neural Networks"; Kirkpatrick et al. 2017, EWC) applies the
    same pixel shuffle to every image of a task. GEM (Lopez-Paz and Ranzato 2017,
    ``data/mnist_permutations.py``) and A-GEM (Chaudhry et al. 2019, ``construct_permute_mnist``)
    draw a random permutation for every task, the first included; MER and La-MAML use those
    data. ``identity_first=True`` keeps task 0 unpermuted instead (plain MNIST first, as in
    some EWC-style setups).

    Returns:
      int32 ``[num_tasks, num_features]``; row ``t`` is a permutation of ``range(num_features)``
      and feature ``j`` of task ``t`` is pixel ``perm[t, j]`` of the image.
    """
    check_int("num_tasks", num_tasks)
    check_int("num_features", num_features)
    check_int("seed", seed, minimum=0)
    perms = np.stack(
        [_rng(seed, _PERMUTATION, t).permutation(num_features) for t in range(num_tasks)]
    )
    if identity_first:
        perms[0] = np.arange(num_features)
    return perms.astype(np.int32)


def rotation_angles(
    num_tasks: int,
    *,
    seed: int = 0,
    scheme: str = "gem",
    angle_range: tuple[float, float] = (0.0, 180.0),
) -> np.ndarray:
    """The rotation of each task of Rotated MNIST, in degrees, counter-clockwise.

    ``scheme="gem"`` follows GEM's ``data/mnist_rotations.py`` (Lopez-Paz and Ranzato 2017,
    run with ``--min_rot 0 --max_rot 180 --n_tasks 20``): the range is cut into ``num_tasks``
    equal bins and task ``t`` draws its angle uniformly from bin ``t``, so angles increase
    with the task index and cover the range evenly. MER (Riemer et al. 2019) and La-MAML
    (Gupta et al. 2020) train on MER's prebuilt files, which we take to come from this
    script (their papers describe "a fixed angle between 0 and 180 degrees" per task; the
    files themselves could not be inspected). GEM seeds only torch but draws the angles from
    Python's unseeded ``random``, so its exact angles cannot be reproduced; ours follow from
    ``seed``. ``scheme="even"`` takes the left bin edges instead, ``lo + t * (hi - lo) / T``
    (0, 9, ..., 171 degrees for 20 tasks): task 0 unrotated, no randomness.

    Returns:
      float64 ``[num_tasks]`` angles in ``[angle_range[0], angle_range[1])``.
    """
    check_int("num_tasks", num_tasks)
    check_int("seed", seed, minimum=0)
    lo, hi = (float(a) for a in angle_range)
    if not lo < hi:
        raise ValueError(f"angle_range={angle_range!r}: give (low, high) with low < high")
    width = (hi - lo) / num_tasks
    if scheme == "gem":
        offsets = np.array([_rng(seed, _ANGLE, t).random() for t in range(num_tasks)])
    elif scheme == "even":
        offsets = np.zeros(num_tasks)
    else:
        raise ValueError(f"scheme={scheme!r}: use one of {ANGLE_SCHEMES}")
    return lo + (np.arange(num_tasks) + offsets) * width


def permuted_mnist(
    mnist: MNIST,
    num_tasks: int = 20,
    train_per_task: int | None = 1000,
    test_per_task: int | None = 10000,
    *,
    seed: int = 0,
    identity_first: bool = False,
    validation_size: int = 0,
) -> Stream:
    """Permuted MNIST: every task the ten digits under its own fixed pixel permutation.

    Protocol of GEM (Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory for Continual
    Learning"; ``run_experiments.sh``): 20 tasks, each training on a random sample of 1000 of
    the 60,000 training images (``--samples_per_task 1000``, drawn independently for every
    task, so tasks may share underlying images) and tested on all 10,000 test images under
    its permutation; one epoch, batch size 10. MER (Riemer et al. 2019) and La-MAML (Gupta et
    al. 2020) use the same setting. A-GEM (Chaudhry et al. 2019) trains on every training
    image: ``train_per_task=None`` with ``validation_size=5000`` (TensorFlow's
    ``read_data_sets`` holds out the first 5000 training images, leaving 55,000).
    Single head: ``num_classes=10`` and no ``class_mask``. Permutations:
    :func:`task_permutations`.

    Args:
      mnist: :func:`metajax.data.mnist.load_mnist` output (``[N, 28, 28]`` uint8 images).
      num_tasks: number of permutations.
      train_per_task: training images per task, drawn without replacement from the training
        pool; ``None``: the whole pool, shuffled.
      test_per_task: test images per task (a random subset, in data set order); ``None``
        or 10000: all of them. Memory: ``20 x 10000 x 784`` float32 is 627 MB.
      seed: the stream's only source of randomness.
      identity_first: leave task 0 unpermuted (GEM and A-GEM do not).
      validation_size: training images ``[0, validation_size)`` are left out of the pool.

    Returns:
      :class:`Stream` with ``train_x [num_tasks, train_per_task, 784]`` float32 in [0, 1].
    """
    train_pool, test_pool = _mnist_pools(mnist, validation_size)
    train_n = _count_or_all("train_per_task", train_per_task, len(train_pool))
    test_n = _count_or_all("test_per_task", test_per_task, len(test_pool))
    features = int(np.prod(mnist.train_x.shape[1:]))
    perms = task_permutations(num_tasks, features, seed=seed, identity_first=identity_first)

    def transform(images: np.ndarray, t: int) -> np.ndarray:
        return images.reshape(len(images), features)[:, perms[t]]

    return _mnist_stream(mnist, train_pool, test_pool, train_n, test_n, seed, num_tasks, transform)


def rotated_mnist(
    mnist: MNIST,
    num_tasks: int = 20,
    train_per_task: int | None = 1000,
    test_per_task: int | None = 10000,
    *,
    seed: int = 0,
    angles: str | Sequence[float] = "gem",
    angle_range: tuple[float, float] = (0.0, 180.0),
    resample: str = "nearest",
    validation_size: int = 0,
) -> Stream:
    """Rotated MNIST: every task the ten digits rotated by its own fixed angle.

    Protocol of GEM (Lopez-Paz and Ranzato 2017; ``data/mnist_rotations.py`` with
    ``--min_rot 0 --max_rot 180 --n_tasks 20``, ``--samples_per_task 1000``): 20 tasks, angle
    of task ``t`` uniform in ``[9t, 9t + 9)`` degrees (:func:`rotation_angles`, scheme
    ``"gem"``), images rotated with PIL's nearest-neighbour ``Image.rotate`` (GEM's default),
    1000 random training images per task, all 10,000 test images; used as well by MER and
    La-MAML. Images are rotated before scaling to [0, 1] and flattened row-major to 784.
    Single head, ``num_classes=10``. Arguments as :func:`permuted_mnist`, and:

    Args:
      angles: ``"gem"`` or ``"even"`` (see :func:`rotation_angles`), or one angle per task in
        degrees (counter-clockwise).
      angle_range: ``(low, high)`` degrees for the two schemes.
      resample: ``"nearest"`` (GEM) or ``"bilinear"`` (:func:`rotate_images`).

    Returns:
      :class:`Stream` with ``train_x [num_tasks, train_per_task, 784]`` float32 in [0, 1].
    """
    if isinstance(angles, str):
        task_angles = rotation_angles(num_tasks, seed=seed, scheme=angles, angle_range=angle_range)
    else:
        task_angles = np.asarray(angles, dtype=np.float64)
        if task_angles.shape != (num_tasks,) or not np.isfinite(task_angles).all():
            raise ValueError(
                f"angles={list(angles)!r}: give {num_tasks} finite angles in degrees (one per "
                f"task), or a scheme name from {ANGLE_SCHEMES}"
            )
    if resample not in RESAMPLES:
        raise ValueError(f"resample={resample!r}: use one of {tuple(RESAMPLES)}")
    train_pool, test_pool = _mnist_pools(mnist, validation_size)
    train_n = _count_or_all("train_per_task", train_per_task, len(train_pool))
    test_n = _count_or_all("test_per_task", test_per_task, len(test_pool))

    def transform(images: np.ndarray, t: int) -> np.ndarray:
        rotated = rotate_images(images, task_angles[t], resample=resample)
        return rotated.reshape(len(images), -1)

    return _mnist_stream(mnist, train_pool, test_pool, train_n, test_n, seed, num_tasks, transform)


def many_permutations_mnist(
    mnist: MNIST,
    num_tasks: int = 100,
    train_per_task: int | None = 200,
    test_per_task: int | None = 10000,
    *,
    seed: int = 0,
    identity_first: bool = False,
) -> Stream:
    """Many Permutations: Permuted MNIST with 100 tasks of 200 training images each.

    Introduced by MER (Riemer et al. 2019, "Learning to Learn without Forgetting by
    Maximizing Transfer and Minimizing Interference": "5 times more tasks (100 total) and 5
    times less training examples per task (200 each)") and used by La-MAML (Gupta et al.
    2020; ``run_experiments.sh``: ``--samples_per_task 200`` on ``mnist_manypermutations``).
    Otherwise as :func:`permuted_mnist`. How many test images MER's prebuilt file holds per
    task is not documented; we keep all 10,000 (3.1 GB as float32 for 100 tasks) by default,
    pass a smaller ``test_per_task`` to save memory.
    """
    return permuted_mnist(
        mnist,
        num_tasks,
        train_per_task,
        test_per_task,
        seed=seed,
        identity_first=identity_first,
    )


def _mnist_pools(mnist: MNIST, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
    if mnist.train_x.ndim != 3 or mnist.test_x.ndim != 3:
        raise ValueError(
            f"mnist images of shapes {mnist.train_x.shape} and {mnist.test_x.shape}: give "
            "[N, H, W] arrays, e.g. from metajax.data.mnist.load_mnist"
        )
    n_train = len(mnist.train_x)
    if not isinstance(validation_size, int | np.integer) or not 0 <= validation_size < n_train:
        raise ValueError(
            f"validation_size={validation_size!r}: give an int in [0, {n_train}) (A-GEM: 5000)"
        )
    return np.arange(validation_size, n_train), np.arange(len(mnist.test_x))


def _mnist_stream(
    mnist: MNIST,
    train_pool: np.ndarray,
    test_pool: np.ndarray,
    train_n: int,
    test_n: int,
    seed: int,
    num_tasks: int,
    transform: Callable[[np.ndarray, int], np.ndarray],
) -> Stream:
    check_int("num_tasks", num_tasks)
    check_int("seed", seed, minimum=0)
    features = int(np.prod(mnist.train_x.shape[1:]))
    stream = Stream(
        train_x=np.empty((num_tasks, train_n, features), np.float32),
        train_y=np.empty((num_tasks, train_n), np.int32),
        test_x=np.empty((num_tasks, test_n, features), np.float32),
        test_y=np.empty((num_tasks, test_n), np.int32),
        num_classes=10,
    )
    for t in range(num_tasks):
        train_rows = _rng(seed, _TRAIN, t).permutation(train_pool)[:train_n]
        test_rows = _subset(test_pool, test_n, _rng(seed, _TEST, t))
        for x, y, rows, images, labels in (
            (stream.train_x, stream.train_y, train_rows, mnist.train_x, mnist.train_y),
            (stream.test_x, stream.test_y, test_rows, mnist.test_x, mnist.test_y),
        ):
            # Division, not multiplication by 1/255, so that 255 maps to exactly 1.0.
            x[t] = transform(images[rows], t) / np.float32(255)
            y[t] = labels[rows]
    return stream


# --- Split CIFAR-100 ------------------------------------------------------------------------


def split_cifar100(
    cifar: CIFAR100,
    num_tasks: int = 20,
    *,
    class_order: str | Sequence[int] = "sequential",
    seed: int = 0,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
) -> Stream:
    """Split CIFAR-100: the 100 classes dealt into ``num_tasks`` tasks of equal size.

    GEM (Lopez-Paz and Ranzato 2017, ``data/cifar100.py``): 20 tasks, task ``t`` holding fine
    classes ``5t .. 5t+4`` (``class_order="sequential"``), every training image of those
    classes (2500, ``--samples_per_task 2500``), all 500 test images, outputs masked to the
    task's classes (task-aware). La-MAML (Gupta et al. 2020; ``--class_order random
    --increment 5``) shuffles the classes first (``class_order="random"``) and holds 10% of
    the training images out for validation (``--validation 0.1``; approximated by
    ``train_per_task=2250``, a random subset). A-GEM (Chaudhry et al. 2019) also uses 20
    tasks of 5 classes with masked outputs, the first 3 for hyper-parameter search; it trains
    on the first 40,000 training images only and subtracts their mean, which gives tasks of
    unequal size, so it is not reproduced exactly here.

    Labels stay the global fine labels (``num_classes=100``) and ``class_mask[t]`` marks the
    task's classes. Images are kept as ``[32, 32, 3]`` float32 in [0, 1] (no normalisation).

    Args:
      cifar: :func:`metajax.data.cifar100.load_cifar100` output.
      num_tasks: a divisor of 100.
      class_order: ``"sequential"``, ``"random"`` (a permutation drawn from ``seed``), or a
        permutation of ``range(100)``; task ``t`` takes the next ``100 // num_tasks``.
      seed: randomness of the class order and of the rows.
      train_per_task: training images per task (a random subset); ``None``: all, which needs
        equally many in every task (true of CIFAR-100: 500 per class).
      test_per_task: likewise for the test images.

    Returns:
      :class:`Stream` with ``train_x [num_tasks, train_per_task, 32, 32, 3]`` and
      ``class_mask [num_tasks, 100]``.
    """
    check_int("num_tasks", num_tasks)
    check_int("seed", seed, minimum=0)
    classes = NUM_CLASSES
    if classes % num_tasks:
        raise ValueError(f"num_tasks={num_tasks}: give a divisor of {classes}, e.g. 20 or 10")
    if isinstance(class_order, str):
        if class_order == "sequential":
            order = np.arange(classes)
        elif class_order == "random":
            order = _rng(seed, _CLASSES, 0).permutation(classes)
        else:
            raise ValueError(f"class_order={class_order!r}: use one of {CLASS_ORDERS} or a list")
    else:
        order = np.asarray(class_order)
        if sorted(order.tolist()) != list(range(classes)):
            raise ValueError(
                f"class_order={list(class_order)!r}: give a permutation of range({classes})"
            )
    task_classes = order.reshape(num_tasks, classes // num_tasks)
    mask = np.zeros((num_tasks, classes), bool)
    np.put_along_axis(mask, task_classes, True, axis=1)
    return _class_split(
        (cifar.train_x, cifar.train_y, cifar.test_x, cifar.test_y),
        task_classes,
        mask,
        train_per_task,
        test_per_task,
        seed,
    )


def _class_split(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    task_classes: np.ndarray,
    mask: np.ndarray,
    train_per_task: int | None,
    test_per_task: int | None,
    seed: int,
) -> Stream:
    """Rows of each task's classes, as a :class:`Stream` with global labels and ``mask``."""
    parts = []
    for split, (images, labels) in enumerate((data[:2], data[2:])):
        name = ("train_per_task", "test_per_task")[split]
        wanted = (train_per_task, test_per_task)[split]
        rows = [np.flatnonzero(np.isin(labels, c)) for c in task_classes]
        counts = [len(r) for r in rows]
        if wanted is None and len(set(counts)) > 1:
            raise ValueError(
                f"{name}=None needs equally many images in every task, but the tasks have "
                f"{counts}; pass {name}={min(counts)} (a random subset of each task)"
            )
        n = _count_or_all(name, wanted, min(counts))
        x = np.empty((len(rows), n, *images.shape[1:]), np.float32)
        y = np.empty((len(rows), n), np.int32)
        for t, task_rows in enumerate(rows):
            rng = _rng(seed, (_TRAIN, _TEST)[split], t)
            picked = rng.permutation(task_rows)[:n] if split == 0 else _subset(task_rows, n, rng)
            x[t] = images[picked] / np.float32(255)
            y[t] = labels[picked]
        parts += [x, y]
    return Stream(*parts, num_classes=mask.shape[1], class_mask=mask)


# --- Split Omniglot -------------------------------------------------------------------------


def split_omniglot(
    arrays: OmniglotArrays,
    *,
    alphabets: Sequence[str] | None = None,
    characters_per_task: int | None = None,
    train_drawings: int = 15,
    seed: int = 0,
) -> Stream:
    """Split Omniglot: one task per alphabet, its characters as the task's classes.

    Alphabets as sequential tasks follow Schwarz et al. 2018 ("Progress & Compress: A
    scalable framework for continual learning"), evaluated task-aware. The per-character
    split and the equal task sizes are our choices, fixed so that every task has the same
    shape:

    * every task keeps ``characters_per_task`` characters of its alphabet (default: as many
      as the smallest chosen alphabet has, 14 over all 50), a random subset in folder order
      when the alphabet has more; nothing is padded, so every row is a real example;
    * each character's 20 drawings are split at random (per character, from ``seed``) into
      ``train_drawings`` for training and the rest for testing (default 15 / 5);
    * task ``t``'s classes are labels ``t * k .. t * k + k - 1`` (``k = characters_per_task``,
      characters in folder order), ``num_classes = tasks * k``, and ``class_mask[t]`` marks
      them: task-aware evaluation over disjoint output blocks, as in split CIFAR-100.

    Args:
      arrays: :func:`metajax.data.omniglot.load_omniglot` output (images
        ``[characters, 20, size, size]`` float32 with ink 1, and alphabet names).
      alphabets: the alphabets to use, in task order; default every alphabet of ``arrays`` in
        row order (background alphabets sorted, then evaluation alphabets sorted).
      characters_per_task: characters (classes) per task, at most the smallest alphabet's.
      train_drawings: drawings per character for training, 1-19.
      seed: randomness of the character subsets, the drawing split and the row order.

    Returns:
      :class:`Stream` with ``train_x [tasks, k * train_drawings, size, size, 1]``,
      ``test_x [tasks, k * (20 - train_drawings), size, size, 1]`` and
      ``class_mask [tasks, tasks * k]``.
    """
    check_int("seed", seed, minimum=0)
    images = np.asarray(arrays.images)
    names = np.asarray(arrays.alphabet)
    if images.ndim != 4 or len(names) != len(images):
        raise ValueError(
            f"arrays.images of shape {images.shape} with {len(names)} alphabet names: give "
            "load_omniglot output, [characters, drawings, size, size] and one name per row"
        )
    drawings = images.shape[1]
    if not isinstance(train_drawings, int | np.integer) or not 0 < train_drawings < drawings:
        raise ValueError(
            f"train_drawings={train_drawings!r}: give an int in [1, {drawings - 1}] (the rest "
            f"of the {drawings} drawings are for testing), e.g. 15"
        )
    present = list(dict.fromkeys(names.tolist()))
    chosen = present if alphabets is None else list(alphabets)
    unknown = sorted(set(chosen) - set(present))
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"alphabets={alphabets!r}: give distinct names of loaded alphabets; unknown: "
            f"{unknown}; loaded: {present}"
        )
    rows = [np.flatnonzero(names == a) for a in chosen]
    smallest = min(range(len(chosen)), key=lambda t: len(rows[t]))
    k = len(rows[smallest]) if characters_per_task is None else characters_per_task
    if not isinstance(k, int | np.integer) or not 0 < k <= len(rows[smallest]):
        raise ValueError(
            f"characters_per_task={characters_per_task!r}: give an int in [1, "
            f"{len(rows[smallest])}] ({chosen[smallest]!r} has {len(rows[smallest])} characters)"
        )
    num_tasks, size = len(chosen), images.shape[2:]
    test_drawings = drawings - train_drawings
    stream = Stream(
        train_x=np.empty((num_tasks, k * train_drawings, *size, 1), np.float32),
        train_y=np.empty((num_tasks, k * train_drawings), np.int32),
        test_x=np.empty((num_tasks, k * test_drawings, *size, 1), np.float32),
        test_y=np.empty((num_tasks, k * test_drawings), np.int32),
        num_classes=num_tasks * k,
        class_mask=np.kron(np.eye(num_tasks, dtype=bool), np.ones((1, k), bool)),
    )
    for t, task_rows in enumerate(rows):
        characters = np.sort(_rng(seed, _CHARACTERS, t).choice(task_rows, k, replace=False))
        split_rng = _rng(seed, _DRAWINGS, t)
        order = np.stack([split_rng.permutation(drawings) for _ in range(k)])
        labels = t * k + np.arange(k)
        train = images[characters[:, None], order[:, :train_drawings]]
        test = images[characters[:, None], np.sort(order[:, train_drawings:], axis=1)]
        shuffle = _rng(seed, _TRAIN, t).permutation(k * train_drawings)
        stream.train_x[t] = train.reshape(-1, *size, 1)[shuffle]
        stream.train_y[t] = np.repeat(labels, train_drawings)[shuffle]
        stream.test_x[t] = test.reshape(-1, *size, 1)
        stream.test_y[t] = np.repeat(labels, test_drawings)
    return stream


# --- helpers --------------------------------------------------------------------------------


def _rng(seed: int, purpose: int, task: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), purpose, task])


def _count_or_all(name: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    check_int(name, value)
    if value > available:
        raise ValueError(f"{name}={value}: only {available} are available; pass at most that")
    return int(value)


def _subset(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of ``pool`` at random, in pool order (all of it when ``n == len(pool)``)."""
    if n == len(pool):
        return pool
    return np.sort(rng.choice(pool, n, replace=False))
