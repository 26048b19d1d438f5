"""Continual-learning streams (``metajax.data.streams``, the rotation of
``metajax.data.transforms``, the protocols of ``metajax.presets.protocols``) on tiny synthetic
MNIST, CIFAR-100 and Omniglot arrays."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from metajax.data.cifar100 import CIFAR100
from metajax.data.mnist import MNIST
from metajax.data.omniglot import OmniglotArrays
from metajax.data.streams import (
    many_permutations_mnist,
    permuted_mnist,
    rotated_mnist,
    rotation_angles,
    split_cifar100,
    split_omniglot,
    task_permutations,
)
from metajax.data.transforms import rotate_images
from metajax.presets import protocols as st
from metajax.presets.protocols import PROTOCOLS, protocol_stream
from metajax.types import Stream

N_TRAIN, N_TEST = 60, 25


@pytest.fixture(scope="module")
def mnist() -> MNIST:
    """Random 28x28 'digits', every image distinct, labels cycling through 0-9."""
    rng = np.random.default_rng(0)
    return MNIST(
        train_x=rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        train_y=(np.arange(N_TRAIN) % 10).astype(np.uint8),
        test_x=rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        test_y=(np.arange(N_TEST) * 3 % 10).astype(np.uint8),
    )


def source_rows(images: np.ndarray) -> dict[bytes, int]:
    """Flattened image bytes -> row index, to find where a stream row came from."""
    return {image.tobytes(): i for i, image in enumerate(images.reshape(len(images), -1))}


def back_to_uint8(x: np.ndarray) -> np.ndarray:
    restored = np.rint(x * 255)
    np.testing.assert_allclose(x * 255, restored, atol=1e-3)  # exact multiples of 1/255
    return restored.astype(np.uint8)


def assert_same_stream(a: Stream, b: Stream) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# --- Permuted MNIST -------------------------------------------------------------------------


def test_permuted_shapes_dtypes_and_provenance(mnist):
    stream = permuted_mnist(mnist, 4, 12, 7, seed=3)
    assert stream.train_x.shape == (4, 12, 784) and stream.train_x.dtype == np.float32
    assert stream.train_y.shape == (4, 12) and stream.train_y.dtype == np.int32
    assert stream.test_x.shape == (4, 7, 784) and stream.test_y.dtype == np.int32
    assert stream.num_classes == 10 and stream.class_mask is None and stream.num_tasks == 4
    assert 0.0 <= stream.train_x.min() and stream.train_x.max() <= 1.0
    perms = task_permutations(4, seed=3)
    splits = (("train", mnist.train_x, mnist.train_y), ("test", mnist.test_x, mnist.test_y))
    for split, images, labels in splits:
        index = source_rows(images)
        x, y = getattr(stream, f"{split}_x"), getattr(stream, f"{split}_y")
        for t in range(4):
            unpermuted = np.empty_like(x[t])
            unpermuted[:, perms[t]] = x[t]  # feature j of task t is pixel perms[t, j]
            rows = [index[r.tobytes()] for r in back_to_uint8(unpermuted)]
            assert len(set(rows)) == len(rows)  # drawn without replacement
            np.testing.assert_array_equal(y[t], labels[rows])
            if split == "test":
                assert rows == sorted(rows)  # test rows keep the data set's order


def test_permutations_are_permutations_and_differ(mnist):
    perms = task_permutations(5, seed=0)
    assert perms.shape == (5, 784) and perms.dtype == np.int32
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(784))
    assert len({p.tobytes() for p in perms}) == 5
    assert not np.array_equal(perms[0], np.arange(784))  # GEM: task 0 is permuted too
    first = task_permutations(5, seed=0, identity_first=True)
    np.testing.assert_array_equal(first[0], np.arange(784))
    np.testing.assert_array_equal(first[1:], perms[1:])
    # Task t does not depend on how many tasks there are.
    np.testing.assert_array_equal(task_permutations(2, seed=0), perms[:2])
    assert not np.array_equal(task_permutations(5, seed=1), perms)


def test_identity_first_keeps_task_zero_plain(mnist):
    stream = permuted_mnist(mnist, 2, None, None, seed=0, identity_first=True)
    index = source_rows(mnist.test_x)
    rows = [index[r.tobytes()] for r in back_to_uint8(stream.test_x[0])]
    assert rows == list(range(N_TEST))


def test_determinism_and_seed(mnist):
    a = permuted_mnist(mnist, 3, 10, 5, seed=7)
    assert_same_stream(a, permuted_mnist(mnist, 3, 10, 5, seed=7))
    b = permuted_mnist(mnist, 3, 10, 5, seed=8)
    assert not np.array_equal(a.train_x, b.train_x)
    # More tasks or more rows leave the earlier tasks' permutations and row choice alone.
    longer = permuted_mnist(mnist, 4, 10, 5, seed=7)
    np.testing.assert_array_equal(longer.train_x[:3], a.train_x)


def test_all_rows_and_validation_holdout(mnist):
    stream = permuted_mnist(mnist, 2, None, None, seed=0, validation_size=20)
    assert stream.train_x.shape == (2, N_TRAIN - 20, 784)
    assert stream.test_x.shape == (2, N_TEST, 784)
    perms = task_permutations(2, seed=0)
    index = source_rows(mnist.train_x)
    unpermuted = np.empty_like(stream.train_x[1])
    unpermuted[:, perms[1]] = stream.train_x[1]
    rows = [index[r.tobytes()] for r in back_to_uint8(unpermuted)]
    assert sorted(rows) == list(range(20, N_TRAIN))  # every pool image once, none held out
    assert rows != sorted(rows)  # shuffled: the order a single pass sees


def test_many_permutations_defaults(mnist):
    small = many_permutations_mnist(mnist, train_per_task=3, test_per_task=2)
    assert small.train_x.shape == (100, 3, 784)
    assert_same_stream(small, permuted_mnist(mnist, 100, 3, 2, seed=0))
    with pytest.raises(ValueError, match="train_per_task=200: only 60"):
        many_permutations_mnist(mnist)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_tasks": 0}, ValueError, "num_tasks must be a Python int >= 1, got 0"),
        ({"train_per_task": N_TRAIN + 1}, ValueError, "only 60 are available"),
        ({"test_per_task": 0}, ValueError, "test_per_task must be a Python int >= 1, got 0"),
        ({"seed": -1}, ValueError, "seed must be a Python int >= 0, got -1"),
        ({"seed": 1.5}, TypeError, "seed must be a Python int >= 0, got 1.5"),
        ({"validation_size": N_TRAIN}, ValueError,
         r"validation_size=60: give an int in \[0, 60\)"),
    ],
)
def test_permuted_bad_arguments(mnist, kwargs, error, match):
    args = {"num_tasks": 2, "train_per_task": 5, "test_per_task": 5, **kwargs}
    with pytest.raises(error, match=match):
        permuted_mnist(mnist, **args)


# --- Rotated MNIST --------------------------------------------------------------------------


def test_rotation_angles():
    gem = rotation_angles(20, seed=0)
    assert gem.shape == (20,)
    bins = np.arange(20) * 9.0
    assert np.all(gem >= bins) and np.all(gem < bins + 9.0)  # one angle in each 9-degree bin
    assert len(set((gem - bins).round(6))) == 20  # drawn, not fixed
    np.testing.assert_array_equal(rotation_angles(20, seed=0), gem)
    assert not np.array_equal(rotation_angles(20, seed=1), gem)
    np.testing.assert_allclose(rotation_angles(4, scheme="even"), [0, 45, 90, 135])
    np.testing.assert_allclose(
        rotation_angles(3, scheme="even", angle_range=(-30, 30)), [-30, -10, 10]
    )
    with pytest.raises(ValueError, match="scheme='linear'"):
        rotation_angles(3, scheme="linear")
    with pytest.raises(ValueError, match="low < high"):
        rotation_angles(3, angle_range=(10, 10))


@pytest.mark.parametrize("angle", [0.0, 9.4, 33.3, 90.0, 123.45, 179.9])
def test_rotate_images_equals_pil_nearest(mnist, angle):
    images = mnist.test_x[:8]
    expected = [np.asarray(Image.fromarray(im).rotate(angle)) for im in images]  # GEM's call
    np.testing.assert_array_equal(rotate_images(images, angle), np.stack(expected))


def test_rotate_images_bilinear_is_pil_before_truncation(mnist):
    images = mnist.test_x[:8]
    ours = rotate_images(images, 33.3, resample="bilinear")
    pil = np.stack(
        [np.asarray(Image.fromarray(im).rotate(33.3, resample=Image.BILINEAR)) for im in images]
    )
    assert np.abs(ours - pil).max() < 1.0  # PIL truncates the 8-bit result
    assert not np.array_equal(ours, rotate_images(images, 33.3))


def test_rotation_direction():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 2, 20] = 255  # top right
    turned = rotate_images(image, 90.0)
    np.testing.assert_array_equal(turned[0], np.rot90(image[0]))  # counter-clockwise
    assert turned[0, 7, 2] == 255  # now top left


def test_rotated_stream(mnist):
    stream = rotated_mnist(mnist, 2, 6, None, seed=1, angles=[0.0, 90.0])
    assert stream.train_x.shape == (2, 6, 784) and stream.test_x.shape == (2, N_TEST, 784)
    plain = mnist.test_x.reshape(N_TEST, 784) / np.float32(255)
    np.testing.assert_array_equal(stream.test_x[0], plain)
    turned = np.rot90(mnist.test_x, axes=(1, 2)).reshape(N_TEST, 784) / np.float32(255)
    np.testing.assert_array_equal(stream.test_x[1], turned)
    np.testing.assert_array_equal(stream.test_y, np.stack([mnist.test_y] * 2))
    index = source_rows(mnist.train_x)
    rows = [index[r.tobytes()] for r in back_to_uint8(stream.train_x[0])]
    np.testing.assert_array_equal(stream.train_y[0], mnist.train_y[rows])


def test_rotated_stream_uses_gem_angles(mnist):
    stream = rotated_mnist(mnist, 3, 4, 3, seed=5)
    angles = rotation_angles(3, seed=5)
    for t in range(3):
        images = mnist.test_x[np.sort(np.random.default_rng([5, 3, t]).choice(N_TEST, 3, False))]
        expected = rotate_images(images, angles[t]).reshape(3, 784) / np.float32(255)
        np.testing.assert_array_equal(stream.test_x[t], expected)
    assert_same_stream(stream, rotated_mnist(mnist, 3, 4, 3, seed=5))


def test_rotated_bad_arguments(mnist):
    with pytest.raises(ValueError, match="give 3 finite angles"):
        rotated_mnist(mnist, 3, 4, 4, angles=[0.0, 10.0])
    with pytest.raises(ValueError, match="resample='bicubic'"):
        rotated_mnist(mnist, 3, 4, 4, resample="bicubic")


# --- Split CIFAR-100 ------------------------------------------------------------------------


def tiny_cifar(train_per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> CIFAR100:
    rng = np.random.default_rng(seed)

    def split(per_class):
        labels = rng.permutation(np.repeat(np.arange(100), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        return images, labels, labels // 5

    train, test = split(train_per_class), split(test_per_class)
    return CIFAR100(*train, *test, tuple(f"c{i}" for i in range(100)), tuple(range(20)))


@pytest.fixture(scope="module")
def cifar() -> CIFAR100:
    return tiny_cifar()


def test_split_cifar100_sequential(cifar):
    stream = split_cifar100(cifar)
    assert stream.train_x.shape == (20, 15, 32, 32, 3) and stream.train_x.dtype == np.float32
    assert stream.test_x.shape == (20, 10, 32, 32, 3) and stream.test_y.dtype == np.int32
    assert stream.num_classes == 100 and stream.class_mask.shape == (20, 100)
    for t in range(20):
        np.testing.assert_array_equal(np.flatnonzero(stream.class_mask[t]), np.arange(5) + 5 * t)
        assert set(stream.train_y[t].tolist()) == set(range(5 * t, 5 * t + 5))
        assert stream.class_mask[t, stream.test_y[t]].all()
    # Every training image once, with its own label.
    index = source_rows(cifar.train_x)
    rows = [index[r.tobytes()] for r in back_to_uint8(stream.train_x.reshape(300, -1))]
    assert sorted(rows) == list(range(300))
    np.testing.assert_array_equal(stream.train_y.ravel(), cifar.train_y[rows])


def test_split_cifar100_random_and_explicit_order(cifar):
    stream = split_cifar100(cifar, 10, class_order="random", seed=4)
    mask = stream.class_mask
    assert mask.shape == (10, 100) and (mask.sum(axis=1) == 10).all()
    assert (mask.sum(axis=0) == 1).all()  # tasks are disjoint and cover all classes
    assert not np.array_equal(mask, split_cifar100(cifar, 10).class_mask)
    assert_same_stream(stream, split_cifar100(cifar, 10, class_order="random", seed=4))
    assert not np.array_equal(mask, split_cifar100(cifar, 10, class_order="random", seed=5)[5])
    order = np.arange(100)[::-1]
    reverse = split_cifar100(cifar, 20, class_order=order)
    np.testing.assert_array_equal(np.flatnonzero(reverse.class_mask[0]), [95, 96, 97, 98, 99])


def test_split_cifar100_subsets_and_unequal_tasks(cifar):
    sub = split_cifar100(cifar, train_per_task=4, test_per_task=3, seed=2)
    assert sub.train_x.shape == (20, 4, 32, 32, 3) and sub.test_x.shape == (20, 3, 32, 32, 3)
    assert all(sub.class_mask[t, sub.train_y[t]].all() for t in range(20))
    uneven = cifar._replace(train_y=cifar.train_y.copy())
    uneven.train_y[uneven.train_y == 0] = 7  # task 0 has 12 training images, task 1 has 18
    with pytest.raises(ValueError, match=r"tasks have \[12, 18,.*pass train_per_task=12"):
        split_cifar100(uneven)
    assert split_cifar100(uneven, train_per_task=12).train_x.shape[1] == 12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tasks": 30}, "divisor of 100"),
        ({"class_order": "shuffled"}, "class_order='shuffled'"),
        ({"class_order": [0] * 100}, "permutation of range"),
        ({"train_per_task": 16}, "only 15 are available"),
    ],
)
def test_split_cifar100_bad_arguments(cifar, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_cifar100(cifar, **kwargs)


# --- Split Omniglot -------------------------------------------------------------------------

ALPHABETS = {"Beta": 4, "Alpha": 3, "Gamma": 5}


@pytest.fixture(scope="module")
def omniglot() -> OmniglotArrays:
    """Characters whose drawings are 4x4 images of one value: 1000 * character + drawing."""
    names = np.array([a for a, n in ALPHABETS.items() for _ in range(n)])
    total = len(names)
    codes = 1000 * np.arange(total)[:, None] + np.arange(20)
    images = np.broadcast_to(codes[..., None, None], (total, 20, 4, 4)).astype(np.float32)
    character = np.array([f"character{i:02d}" for a, n in ALPHABETS.items() for i in range(n)])
    return OmniglotArrays(images, names, character, np.full(total, "background"), {})


def decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(character row, drawing) of each image of ``x [n, 4, 4, 1]``."""
    codes = x[:, 0, 0, 0].astype(np.int64)
    assert (x == x[:, :1, :1, :1]).all()
    return codes // 1000, codes % 1000


def test_split_omniglot(omniglot):
    stream = split_omniglot(omniglot, seed=3)
    k = 3  # the smallest alphabet, Alpha
    assert stream.train_x.shape == (3, k * 15, 4, 4, 1) and stream.test_x.shape == (
        3,
        k * 5,
        4,
        4,
        1,
    )
    assert stream.num_classes == 9 and stream.class_mask.shape == (3, 9)
    np.testing.assert_array_equal(stream.class_mask, np.kron(np.eye(3, dtype=bool), np.ones(3)))
    starts = {"Beta": 0, "Alpha": 4, "Gamma": 7}  # tasks in row order: Beta, Alpha, Gamma
    for t, alphabet in enumerate(["Beta", "Alpha", "Gamma"]):
        train_char, train_drawing = decode(stream.train_x[t])
        test_char, test_drawing = decode(stream.test_x[t])
        chars = np.unique(train_char)
        assert len(chars) == k and set(omniglot.alphabet[chars]) == {alphabet}
        assert set(test_char) == set(chars) and chars.min() >= starts[alphabet]
        for local, c in enumerate(chars):  # classes in folder order, 15 + 5 drawings each
            train_d = train_drawing[train_char == c]
            test_d = test_drawing[test_char == c]
            assert len(train_d) == 15 and len(test_d) == 5
            assert sorted([*train_d, *test_d]) == list(range(20))
            assert (stream.train_y[t][train_char == c] == 3 * t + local).all()
            assert (stream.test_y[t][test_char == c] == 3 * t + local).all()
    # The drawing split is random per character, the training order shuffled.
    first = decode(stream.test_x[2])
    assert len({tuple(first[1][first[0] == c]) for c in np.unique(first[0])}) > 1
    assert not np.array_equal(np.sort(stream.train_y[0]), stream.train_y[0])
    assert_same_stream(stream, split_omniglot(omniglot, seed=3))


def test_split_omniglot_options(omniglot):
    stream = split_omniglot(
        omniglot, alphabets=["Gamma", "Beta"], characters_per_task=4, train_drawings=18, seed=0
    )
    assert stream.train_x.shape == (2, 4 * 18, 4, 4, 1) and stream.test_x.shape == (2, 8, 4, 4, 1)
    assert set(omniglot.alphabet[decode(stream.train_x[0])[0]]) == {"Gamma"}
    chars = np.unique(decode(stream.train_x[1])[0])
    np.testing.assert_array_equal(chars, [0, 1, 2, 3])  # all of Beta


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alphabets": ["Delta"]}, r"unknown: \['Delta'\]"),
        ({"alphabets": ["Beta", "Beta"]}, "distinct"),
        ({"characters_per_task": 4}, "'Alpha' has 3 characters"),
        ({"train_drawings": 20}, r"train_drawings=20: give an int in \[1, 19\]"),
    ],
)
def test_split_omniglot_bad_arguments(omniglot, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_omniglot(omniglot, **kwargs)


# --- protocols and use under jit ------------------------------------------------------------


def test_protocols_build(mnist, cifar):
    for name, protocol in PROTOCOLS.items():
        assert protocol.benchmark in st.BUILDERS and protocol.reference
        assert protocol.epochs >= 1 and protocol.batch_size >= 1
        if protocol.benchmark == "split_cifar100":
            stream = protocol_stream(name, cifar, train_per_task=5, test_per_task=2)
            assert stream.class_mask.sum(axis=1).tolist() == [5] * 20
        else:
            small = {"train_per_task": 3, "test_per_task": 2}
            if "validation_size" in protocol.kwargs:
                small["validation_size"] = 10
            stream = protocol_stream(name, mnist, seed=1, **small)
            assert stream.num_classes == 10 and stream.class_mask is None
        assert stream.num_tasks == protocol.kwargs["num_tasks"]
    assert PROTOCOLS["agem_permuted_mnist"].cv_tasks == 3
    assert PROTOCOLS["gem_rotated_mnist"].kwargs["num_tasks"] == 20
    assert PROTOCOLS["lamaml_many_permutations"].kwargs["train_per_task"] == 200
    with pytest.raises(ValueError, match="unknown"):
        protocol_stream("gem_mnist", mnist)


def test_a_task_runs_in_one_scan(mnist):
    stream = permuted_mnist(mnist, 2, 20, 5, seed=0)

    @jax.jit
    def label_sums(x, y):  # batches of 10 of task t, consumed in one lax.scan
        batches = (x.reshape(-1, 10, 784), y.reshape(-1, 10))
        return jax.lax.scan(lambda c, b: (c + b[1].sum(), b[0].mean()), 0, batches)

    total, means = label_sums(jnp.asarray(stream.train_x[1]), jnp.asarray(stream.train_y[1]))
    assert int(total) == int(stream.train_y[1].sum()) and means.shape == (2,)


# --- real MNIST -----------------------------------------------------------------------------


@pytest.mark.data
def test_real_permuted_and_rotated_mnist():
    root = os.environ.get("METAJAX_DATA_DIR")
    if not root:
        pytest.skip("METAJAX_DATA_DIR is not set (e.g. METAJAX_DATA_DIR=../shared/data)")
    if not (Path(root) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{root}/mnist lacks the MNIST files")
    from metajax.data.mnist import load_mnist

    data = load_mnist(root, download=False, progress=False)
    perm = permuted_mnist(data, 3, 1000, 500, seed=0)
    assert perm.train_x.shape == (3, 1000, 784) and perm.test_x.shape == (3, 500, 784)
    # A permutation keeps every image's ink; the digits stay balanced.
    ink = np.sort(perm.train_x.sum(axis=2), axis=1)
    assert 90 < ink.mean() < 115  # 33.3 / 255 * 784 on average
    assert (np.bincount(perm.train_y[0], minlength=10) > 60).all()
    full = permuted_mnist(data, 1, 5, None, seed=0, validation_size=5000)
    assert full.test_x.shape == (1, 10000, 784)
    np.testing.assert_array_equal(full.test_y[0], data.test_y)
    rot = rotated_mnist(data, 2, 100, None, seed=0, angles=[0.0, 90.0])
    np.testing.assert_array_equal(rot.test_x[0], data.test_x.reshape(10000, 784) / np.float32(255))
    turned = np.rot90(data.test_x, axes=(1, 2)).reshape(10000, 784) / np.float32(255)
    np.testing.assert_array_equal(rot.test_x[1], turned)
    gem = rotated_mnist(data, 20, 50, 50, seed=0)
    assert gem.train_x.shape == (20, 50, 784)
    # Rotations by up to 180 degrees move little ink out of the 28x28 frame.
    assert abs(gem.test_x.mean() - perm.test_x.mean()) < 0.02
