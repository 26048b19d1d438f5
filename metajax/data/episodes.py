"""On-device N-way K-shot episode sampling (Vinyals et al., 2016, "Matching Networks").

All images of one split live in a single device array ``images [classes, per_class, H, W, C]``
(per_class = 20 for Omniglot, 600 for mini-ImageNet), so a batch of episodes is drawn with a
few ``jax.random`` calls and one gather, inside the jitted meta-step of MAML (Finn et al., 2017)
with no host round trip. Images keep their stored dtype (often ``uint8`` to fit mini-ImageNet
in device memory); converting them to float is the caller's step.

Layout of an episode: support ``x [ways * shots, H, W, C]``, ``y [ways * shots]`` and query
``x [ways * queries, H, W, C]``, ``y [ways * queries]``, both *grouped by label in ascending
order*: ``y = [0]*shots + [1]*shots + ... + [ways-1]*shots`` (and likewise with ``queries``).
The randomness is in which class carries which label, not in the order, so learners must not
read anything into positions; MAML's losses are means over examples and ignore order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax._checks import check_int
from metajax.types import Task


def validate_episode_args(
    images_shape: tuple[int, ...], ways: int, shots: int, queries: int
) -> tuple[int, int, int]:
    """Check episode sizes against ``images_shape = (classes, per_class, H, W, C)``.

    Raises ``ValueError`` naming the bad value and the fix; returns ``(ways, shots, queries)``
    as Python ints. Runs in Python, so errors surface before any tracing.
    """
    if len(images_shape) != 5:
        raise ValueError(
            f"images must be [classes, per_class, H, W, C], got shape {tuple(images_shape)}; "
            "add a channel axis for grayscale images (images[..., None])."
        )
    ways = check_int("ways", ways)
    shots = check_int("shots", shots)
    queries = check_int("queries", queries)
    classes, per_class = images_shape[0], images_shape[1]
    if ways > classes:
        raise ValueError(
            f"ways={ways} exceeds the {classes} classes of this split; classes are drawn "
            f"without replacement, so use ways <= {classes}."
        )
    if shots + queries > per_class:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the "
            f"{per_class} images per class; support and query are disjoint, so use "
            f"shots + queries <= {per_class}."
        )
    return ways, shots, queries


def _episode(key: jax.Array, images: jax.Array, ways: int, shots: int, queries: int) -> Task:
    classes, per_class = images.shape[:2]
    k_class, k_image, k_label = jax.random.split(key, 3)
    # A permutation prefix draws classes (and below, images) without replacement.
    chosen = jax.random.permutation(k_class, classes)[:ways]
    # Sampled class i gets label perm[i]; reordering by argsort(perm) lists the classes by
    # label, so row j of the gather below is the class labelled j.
    perm = jax.random.permutation(k_label, ways)
    class_of_label = chosen[jnp.argsort(perm)]
    image_keys = jax.random.split(k_image, ways)
    idx = jax.vmap(lambda k: jax.random.permutation(k, per_class)[: shots + queries])(image_keys)
    x = images[class_of_label[:, None], idx]  # [ways, shots + queries, H, W, C]
    feat = x.shape[2:]
    labels = jnp.arange(ways, dtype=jnp.int32)
    support = (x[:, :shots].reshape(ways * shots, *feat), jnp.repeat(labels, shots))
    query = (x[:, shots:].reshape(ways * queries, *feat), jnp.repeat(labels, queries))
    return Task(support=support, query=query)


def sample_episode(key: jax.Array, images: jax.Array, ways: int, shots: int, queries: int) -> Task:
    """Draw one N-way K-shot episode (Vinyals et al., 2016) from ``images``.

    Args:
      key: a PRNG key; the episode is a deterministic function of it.
      images: ``[classes, per_class, H, W, C]``, any dtype (kept).
      ways: classes per episode, drawn without replacement (Python int; static under jit).
      shots: support images per class (Python int).
      queries: query images per class (Python int); support and query images of a class are
        distinct images, drawn without replacement.

    Returns:
      ``Task(support=(x [ways*shots, H, W, C], y [ways*shots] int32),
      query=(x [ways*queries, H, W, C], y [ways*queries] int32))`` with labels in
      ``0..ways-1``, grouped by label in ascending order; which sampled class carries which
      label is a uniformly random permutation.

    Raises:
      ValueError: ``ways`` > classes, ``shots + queries`` > per_class, non-positive sizes or
        ``images`` not of rank 5. TypeError: sizes that are not Python ints (e.g. traced).
    """
    ways, shots, queries = validate_episode_args(tuple(images.shape), ways, shots, queries)
    return _episode(key, images, ways, shots, queries)


def sample_episodes(
    key: jax.Array, images: jax.Array, num_tasks: int, ways: int, shots: int, queries: int
) -> Task:
    """Draw ``num_tasks`` independent episodes, stacked on a leading task axis ``T``.

    Same as :func:`sample_episode` (Vinyals et al., 2016) for each of ``jax.random.split(key,
    num_tasks)``, batched by ``vmap``; the meta-batch of MAML (Finn et al., 2017). Returns
    ``Task(support=(x [T, ways*shots, H, W, C], y [T, ways*shots]),
    query=(x [T, ways*queries, H, W, C], y [T, ways*queries]))``. Jit with
    ``static_argnames=("num_tasks", "ways", "shots", "queries")``.
    """
    num_tasks = check_int("num_tasks", num_tasks)
    ways, shots, queries = validate_episode_args(tuple(images.shape), ways, shots, queries)
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda k: _episode(k, images, ways, shots, queries))(keys)
