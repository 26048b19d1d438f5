"""Few-shot image classification in one call: :func:`fewshot`.

``fewshot("omniglot", ways=5, shots=1)`` loads a dataset with its published split, puts every
split on the device once and returns a :class:`FewShot`: per split a sampler of N-way K-shot
episodes (:mod:`metajax.data.episodes`, Vinyals et al. 2016) that runs inside ``jax.jit``,
plus the Conv4 of MAML (Finn et al. 2017) and its cross-entropy loss, as the presets use them::

    import jax, optax
    import metajax as mj

    fs = mj.data.fewshot("omniglot", ways=5, shots=1)        # reads $METAJAX_DATA_DIR
    learner = mj.maml(fs.loss_fn(), inner_lr=0.4, inner_steps=1, has_aux=True)
    meta_params = learner.init(fs.init_params(jax.random.PRNGKey(0)))
    opt = optax.adam(1e-3)
    opt_state = opt.init(meta_params)

    @jax.jit
    def meta_step(meta_params, opt_state, key):
        grads, metrics = learner.meta_grad(meta_params, fs.train.tasks(key, 32))
        updates, opt_state = opt.update(grads, opt_state, meta_params)
        return optax.apply_updates(meta_params, updates), opt_state, metrics

    evaluate = fs.evaluator(learner, inner_steps=3)       # 600 test episodes, mean and ci95

Datasets and protocols (the ones the ``omniglot-*`` and ``miniimagenet-*`` presets train on):

* ``"omniglot"``: :func:`metajax.data.omniglot.load_omniglot` at 28x28, split by
  :func:`metajax.data.omniglot.omniglot_splits`. Protocol ``"maml"`` (default; Vinyals et al.
  2016, Finn et al. 2017): 1200 training characters, of which 100 are held out for validation,
  and 423 test characters, each rotated by 0/90/180/270 degrees into four classes: 4400 / 400 /
  1692 classes of 20 drawings, ``[28, 28, 1]`` float32 with ink 1. Protocol ``"alphabets"``
  (Lake et al. 2015): background alphabets for training, evaluation alphabets for test, no
  rotations and no validation split.
* ``"miniimagenet"``: :func:`metajax.data.miniimagenet.load_miniimagenet`, the Ravi &
  Larochelle (2017) split: 64 / 16 / 20 classes of 600 images, ``[84, 84, 3]``, kept ``uint8``
  on the device and converted to float32 in [0, 1] per episode. It is never downloaded.

A sampled episode is a :class:`metajax.Task` of float32 images ``x [ways * shots, H, W, C]``
and int32 labels ``y`` in ``0..ways-1``, grouped by label (see :mod:`metajax.data.episodes`);
:meth:`FewShotSplit.tasks` stacks ``num_tasks`` of them on a leading task axis.

``metajax.data`` exports :func:`fewshot`, :class:`FewShot` and :class:`FewShotSplit` from
this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax._checks import check_int
from metajax.data import episodes
from metajax.types import Batch, Problem, PyTree, Task

DATASETS: tuple[str, ...] = ("omniglot", "miniimagenet")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Omniglot protocols, as :func:`metajax.data.omniglot.omniglot_splits` names them.
OMNIGLOT_PROTOCOLS: tuple[str, ...] = ("maml", "alphabets")
_OMNIGLOT_IMAGE_SIZE = 28  # Finn et al. 2017 (and the presets)


def _as_float(x: jax.Array) -> jax.Array:
    """uint8 images to float32 in [0, 1] (as the presets convert mini-ImageNet episodes)."""
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def _float_task(task: Task) -> Task:
    return jax.tree.map(_as_float, task)


# Compiled once per shape and sizes; the images are an argument, not a constant baked into
# the program, so a call outside jit is one fast compiled call (not one compile per op), and
# inside an outer jit these inline.
@functools.partial(jax.jit, static_argnames=("ways", "shots", "queries"))
def _sample_task(key, images, ways, shots, queries) -> Task:
    return _float_task(episodes.sample_episode(key, images, ways, shots, queries))


@functools.partial(jax.jit, static_argnames=("num_tasks", "ways", "shots", "queries"))
def _sample_tasks(key, images, num_tasks, ways, shots, queries) -> Task:
    return _float_task(episodes.sample_episodes(key, images, num_tasks, ways, shots, queries))


@dataclasses.dataclass(frozen=True, eq=False)
class FewShotSplit:
    """One split's classes on the device and its episode samplers.

    Attributes:
      name: ``"train"``, ``"val"`` or ``"test"``.
      images: the split, ``[classes, per_class, H, W, C]`` on the device, in its stored dtype
        (float32 for Omniglot, uint8 for mini-ImageNet).
      ways, shots, queries: the episode sizes (classes per episode, support and query images
        per class).

    :meth:`task` and :meth:`tasks` are pure functions of the key (the images are a constant
    they close over): call them inside ``jax.jit``, ``jax.vmap`` or a learner's ``meta_grad``.
    """

    name: str
    images: jax.Array = dataclasses.field(repr=False)
    ways: int
    shots: int
    queries: int

    @property
    def num_classes(self) -> int:
        """Classes in this split (``images.shape[0]``)."""
        return int(self.images.shape[0])

    @property
    def per_class(self) -> int:
        """Images per class (20 for Omniglot, 600 for mini-ImageNet)."""
        return int(self.images.shape[1])

    def task(self, key: jax.Array) -> Task:
        """One episode: ``Task(support=(x [ways*shots, H, W, C], y [ways*shots]),
        query=(x [ways*queries, H, W, C], y [ways*queries]))``, x float32, y int32.

        Example::

            task = jax.jit(fs.test.task)(jax.random.PRNGKey(0))
            fast = learner.adapt(meta_params, task.support, inner_steps=3)
        """
        return _sample_task(key, self.images, self.ways, self.shots, self.queries)

    def tasks(self, key: jax.Array, num_tasks: int) -> Task:
        """``num_tasks`` independent episodes stacked on a leading task axis ``T`` (a
        meta-batch): ``x [T, ways*shots, H, W, C]`` and so on.

        ``num_tasks`` fixes a shape, so it is a Python int: a constant inside a jitted
        function, or ``jax.jit(fs.train.tasks, static_argnums=1)``.

        Example::

            grads, metrics = learner.meta_grad(meta_params, fs.train.tasks(key, 32))
        """
        num_tasks = check_int("num_tasks", num_tasks)
        return _sample_tasks(key, self.images, num_tasks, self.ways, self.shots, self.queries)

    def __repr__(self) -> str:
        return (
            f"FewShotSplit({self.name!r}, classes={self.num_classes}, "
            f"per_class={self.per_class}, image_shape={tuple(self.images.shape[2:])}, "
            f"dtype={self.images.dtype}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries})"
        )


def classification_loss(
    apply: Callable[[PyTree, jax.Array], jax.Array],
) -> Callable[[PyTree, Batch], tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(params, (x, y)) -> (loss, {"accuracy": ...})`` for ``apply(params, x) ->
    logits``: mean softmax cross-entropy against integer labels, with the fraction of
    correct argmax predictions as ``aux``; the presets' classification loss. Use it with a
    learner's ``has_aux=True``.
    """
    import optax

    def loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return loss_fn


@dataclasses.dataclass(frozen=True, eq=False)
class FewShot:
    """A few-shot classification benchmark ready to sample from, as :func:`fewshot` returns.

    Attributes:
      name: ``"omniglot"`` or ``"miniimagenet"``.
      ways, shots, queries: episode sizes (N classes, K support and Q query images per class).
      image_shape: ``(H, W, C)`` of one image: ``(28, 28, 1)`` or ``(84, 84, 3)``.
      splits: split name -> :class:`FewShotSplit` (``"val"`` is absent under Omniglot's
        ``"alphabets"`` protocol).
      protocol: the split protocol (``"maml"`` or ``"alphabets"`` for Omniglot,
        ``"ravi-larochelle"`` for mini-ImageNet).

    ``fs.train``, ``fs.val``, ``fs.test`` are the splits; ``fs.train.task(key)`` draws one
    episode and ``fs.train.tasks(key, num_tasks)`` a meta-batch. :meth:`model`,
    :meth:`init_params`, :meth:`loss_fn` and :meth:`accuracy_fn` give the presets' Conv4 and
    loss; :meth:`problem` bundles them for :mod:`metajax.train`.
    """

    name: str
    ways: int
    shots: int
    queries: int
    image_shape: tuple[int, int, int]
    splits: Mapping[str, FewShotSplit] = dataclasses.field(repr=False)
    protocol: str

    @property
    def num_classes(self) -> dict[str, int]:
        """Split name -> number of classes, e.g. ``{"train": 4400, "val": 400, "test": 1692}``."""
        return {name: s.num_classes for name, s in self.splits.items()}

    def split(self, name: str) -> FewShotSplit:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in self.splits:
            why = (
                f" (the {self.protocol!r} protocol has no validation split)"
                if name == "val" and name in SPLITS
                else ""
            )
            raise KeyError(
                f"{self.name} has no split {name!r}{why}; its splits: {tuple(self.splits)}"
            )
        return self.splits[name]

    @property
    def train(self) -> FewShotSplit:
        """The meta-training split."""
        return self.split("train")

    @property
    def val(self) -> FewShotSplit:
        """The validation split (held-out classes for model selection)."""
        return self.split("val")

    @property
    def test(self) -> FewShotSplit:
        """The test split (classes never seen in training)."""
        return self.split("test")

    def replace(
        self, *, ways: int | None = None, shots: int | None = None, queries: int | None = None
    ) -> FewShot:
        """The same data (no reload, no copy) with other episode sizes, checked as in
        :func:`fewshot`; e.g. ``fs.replace(queries=1)`` for another test protocol."""
        ways = self.ways if ways is None else ways
        shots = self.shots if shots is None else shots
        queries = self.queries if queries is None else queries
        images = {name: s.images for name, s in self.splits.items()}
        return _build(self.name, images, ways, shots, queries, self.protocol)

    def model(self, **kwargs: Any):
        """The presets' Conv4 (Finn et al. 2017) with ``ways`` outputs.

        Omniglot: :func:`metajax.nn.conv4.conv4_omniglot` (64 filters, stride-2 convs);
        mini-ImageNet: :func:`metajax.nn.conv4.conv4_miniimagenet` (32 filters, max-pool).
        ``kwargs`` (``filters``, ``norm``, ``readout``, ``norm_eps``, ``pooled`` for Omniglot,
        ...) go to that function. Batch norm uses the current batch's statistics, as in the
        MAML reference, so predictions depend on the other images of a batch.
        """
        from metajax.nn.conv4 import conv4_miniimagenet, conv4_omniglot

        build = conv4_omniglot if self.name == "omniglot" else conv4_miniimagenet
        return build(self.ways, **kwargs)

    def init_params(self, key: jax.Array, model=None) -> PyTree:
        """``model.init(key, x)`` for one image of this dataset (default model: :meth:`model`)."""
        model = self.model() if model is None else model
        # One compiled call: flax's init run op by op compiles every op on its own (seconds).
        return jax.jit(model.init)(key, jnp.zeros((1, *self.image_shape), jnp.float32))

    def loss_fn(self, model=None, *, compute_dtype: str = "float32"):
        """``loss_fn(params, (x, y)) -> (loss, {"accuracy": ...})`` for ``model`` (default:
        :meth:`model`): cross-entropy with accuracy as ``aux`` (:func:`classification_loss`),
        the model run in ``compute_dtype`` (``"float32"`` or ``"bfloat16"``,
        :func:`metajax.nn.precision.in_compute_dtype`). Pass ``has_aux=True`` to the learner.
        """
        from metajax.nn.precision import in_compute_dtype

        model = self.model() if model is None else model
        return classification_loss(in_compute_dtype(model.apply, compute_dtype))

    def accuracy_fn(self, model=None, *, compute_dtype: str = "float32"):
        """``accuracy(params, (x, y)) -> scalar``: the fraction of ``x`` that ``model``
        (default: :meth:`model`) classifies as ``y``; e.g. on ``task.query`` after
        ``learner.adapt``."""
        loss_fn = self.loss_fn(model, compute_dtype=compute_dtype)
        return lambda params, batch: loss_fn(params, batch)[1]["accuracy"]

    def problem(self, model=None, *, compute_dtype: str = "float32") -> Problem:
        """A :class:`metajax.Problem` (model, loss, samplers) for :mod:`metajax.train`'s loop
        and evaluators (:func:`metajax.train.loop.make_evaluator`). Its ``sample_tasks(key,
        num_tasks, shots, queries, split)`` takes other shots and queries than this object's.
        """
        model = self.model() if model is None else model
        loss_fn = self.loss_fn(model, compute_dtype=compute_dtype)
        images = {name: s.images for name, s in self.splits.items()}
        ways = self.ways

        def sample_tasks(key, num_tasks, shots, queries, split="train"):
            if split not in images:
                self.split(split)  # raises the error naming the splits
            num_tasks = check_int("num_tasks", num_tasks)
            return _sample_tasks(key, images[split], num_tasks, ways, shots, queries)

        return Problem(
            init_params=lambda key: self.init_params(key, model),
            loss_fn=loss_fn,
            sample_tasks=sample_tasks,
            metric_name="accuracy",
            metric_fn=lambda params, batch: loss_fn(params, batch)[1]["accuracy"],
            has_validation="val" in images,
            has_aux=True,
        )

    def evaluator(
        self,
        learner,
        *,
        inner_steps: int | None = None,
        num_tasks: int = 600,
        split: str = "test",
        queries: int | None = None,
        model=None,
        compute_dtype: str = "float32",
        batch_tasks: int = 20,
    ) -> Callable[[PyTree, jax.Array], dict[str, float]]:
        """``evaluate(meta_params, key) -> {"mean", "ci95", "tasks"}``: query accuracy after
        ``learner.adapt`` on the support set, over ``num_tasks`` episodes of ``split``.

        The usual test protocol: mean accuracy over 600 test episodes with the half-width of
        its normal 95% confidence interval (:func:`metajax.train.loop.mean_ci95`). Episodes
        come from ``key`` alone, so two models evaluated with one key see the same tasks.
        ``inner_steps`` (default: the learner's) is often more at test than in training
        (MAML: 3 for Omniglot 5-way, 10 for mini-ImageNet). ``queries`` defaults to this
        object's. ``model`` must be the one the learner's loss uses (default :meth:`model`).
        Compiled on the first call; tasks run in vmapped batches of ``batch_tasks``
        (:func:`metajax.train.loop.make_evaluator`).

        Example::

            evaluate = fs.evaluator(learner, inner_steps=3)
            print(evaluate(meta_params, jax.random.PRNGKey(1)))  # {'mean': ..., 'ci95': ...}
        """
        from metajax.evaluation import make_evaluator, mean_ci95

        self.split(split)
        num_tasks = check_int("num_tasks", num_tasks)
        batch_tasks = check_int("batch_tasks", batch_tasks)
        if inner_steps is not None:
            inner_steps = check_int("inner_steps", inner_steps, minimum=0)
        queries = self.queries if queries is None else check_int("queries", queries)
        episodes.validate_episode_args(
            tuple(self.split(split).images.shape), self.ways, self.shots, queries
        )
        run = make_evaluator(learner, self.problem(model, compute_dtype=compute_dtype),
                             batch_tasks=min(batch_tasks, num_tasks))
        shots = self.shots

        def evaluate(meta_params: PyTree, key: jax.Array) -> dict[str, float]:
            values = run(meta_params, key, num_tasks, shots, queries, inner_steps, split)
            return {**mean_ci95(jax.device_get(values)), "tasks": num_tasks}

        return evaluate

    def __repr__(self) -> str:
        return (
            f"FewShot({self.name!r}, protocol={self.protocol!r}, ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


def fewshot(
    name: str,
    *,
    ways: int,
    shots: int,
    queries: int = 15,
    data_dir: str | os.PathLike | None = None,
    protocol: str | None = None,
    num_train: int | None = None,
    num_val: int | None = None,
    expect_counts: bool | None = None,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FewShot:
    """Load a few-shot image benchmark and return its on-device episode samplers.

    Args:
      name: ``"omniglot"`` or ``"miniimagenet"``.
      ways: classes per episode (N); at most the classes of every split.
      shots: support images per class (K).
      queries: query images per class; ``shots + queries`` must not exceed the images per
        class (20 for Omniglot, 600 for mini-ImageNet). The MAML reference tests Omniglot
        with as many queries as shots, and its batch norm makes the count matter.
      data_dir: the data directory; default ``$METAJAX_DATA_DIR``, else the user cache
        ``~/.cache/metajax``. Omniglot is read from ``<data_dir>/omniglot/``, mini-ImageNet
        from ``<data_dir>/miniimagenet/``.
      protocol: Omniglot only: ``"maml"`` (default) or ``"alphabets"`` (see the module
        docstring).
      num_train, num_val: Omniglot ``"maml"`` protocol only: training characters (1200) and
        how many of them are held out for validation (100); smaller for subsets.
      expect_counts: mini-ImageNet only: check 64/16/20 classes of 600 images (default
        ``True``); ``False`` for subsets.
      download: Omniglot only: fetch missing archives (mini-ImageNet is never downloaded).
      cache_dir: where preprocessed arrays are cached (see the loaders).
      progress: Omniglot only: report downloads and preprocessing on stderr.

    Returns:
      :class:`FewShot` with ``.train``, ``.val``, ``.test`` samplers, ``ways``, ``shots``,
      ``queries``, ``image_shape``, ``num_classes`` and the matching :meth:`FewShot.model`,
      :meth:`FewShot.loss_fn` and :meth:`FewShot.accuracy_fn`.

    Raises:
      ValueError: an unknown ``name`` or ``protocol``, an option of the other dataset, or
        episode sizes the splits cannot supply. TypeError: sizes that are not ints.
      DataNotFoundError, FileNotFoundError: the dataset is missing; the message names the
        files and where they go (and, for Omniglot, where to download them).

    Example::

        fs = mj.data.fewshot("omniglot", ways=5, shots=1)
        task = fs.train.task(jax.random.PRNGKey(0))      # support x [5, 28, 28, 1]
        batch = fs.train.tasks(jax.random.PRNGKey(1), 32) # support x [32, 5, 28, 28, 1]
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(
            f"unknown few-shot dataset {name!r}; choose one of {', '.join(map(repr, DATASETS))}"
        )
    ways = check_int("ways", ways)
    shots = check_int("shots", shots)
    queries = check_int("queries", queries)
    if name == "omniglot":
        if expect_counts is not None:
            raise ValueError("expect_counts is a mini-ImageNet option; Omniglot does not take it")
        protocol = "maml" if protocol is None else protocol
        if protocol not in OMNIGLOT_PROTOCOLS:
            raise ValueError(
                f"protocol={protocol!r}: Omniglot's protocols are "
                f"{', '.join(map(repr, OMNIGLOT_PROTOCOLS))}"
            )
        if protocol != "maml" and (num_train is not None or num_val is not None):
            raise ValueError(
                "num_train and num_val size the 'maml' protocol; the 'alphabets' protocol "
                "splits by alphabet"
            )
        sizes = {}
        if num_train is not None:
            sizes["num_train"] = check_int("num_train", num_train)
        if num_val is not None:
            sizes["num_val"] = check_int("num_val", num_val, minimum=0)
        images = _load_omniglot(data_dir, protocol, sizes, download, cache_dir, progress)
    else:
        given = {"protocol": protocol, "num_train": num_train, "num_val": num_val}
        wrong = [k for k, v in given.items() if v is not None]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: Omniglot options; mini-ImageNet has the one Ravi & "
                "Larochelle split"
            )
        from metajax.data.miniimagenet import load_miniimagenet

        protocol = "ravi-larochelle"
        images, _ = load_miniimagenet(
            data_dir,
            cache_dir=cache_dir,
            expect_counts=True if expect_counts is None else bool(expect_counts),
        )
    return _build(name, images, ways, shots, queries, protocol)


def _load_omniglot(data_dir, protocol, sizes, download, cache_dir, progress):
    from metajax.data.omniglot import load_omniglot, omniglot_splits

    arrays = load_omniglot(
        data_dir,
        image_size=_OMNIGLOT_IMAGE_SIZE,
        download=download,
        cache_dir=cache_dir,
        progress=progress,
    )
    return omniglot_splits(arrays, protocol, **sizes)


def _build(
    name: str,
    images: Mapping[str, np.ndarray | jax.Array],
    ways: int,
    shots: int,
    queries: int,
    protocol: str,
) -> FewShot:
    """Check the episode sizes against every split, place the splits on the device."""
    ways = check_int("ways", ways)
    shots = check_int("shots", shots)
    queries = check_int("queries", queries)
    for split, array in images.items():
        try:
            episodes.validate_episode_args(tuple(array.shape), ways, shots, queries)
        except ValueError as err:
            raise ValueError(f"{name} {split} split: {err}") from None
    splits = {
        split: FewShotSplit(split, jnp.asarray(images[split]), ways, shots, queries)
        for split in SPLITS
        if split in images
    }
    shape = tuple(int(d) for d in splits["train"].images.shape[2:])
    return FewShot(name, ways, shots, queries, shape, MappingProxyType(splits), protocol)
