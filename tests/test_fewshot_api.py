"""``mj.data.fewshot``: one call from a dataset name to on-device episode samplers.

On the tiny fake Omniglot of ``fixtures_omniglot`` (11 characters) and a tiny fake
mini-ImageNet; the real Omniglot only when ``METAJAX_DATA_DIR`` is set.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_omniglot import closed_port_url, make_fixture, write_fixture

import metajax as mj
from metajax.data import miniimagenet, omniglot
from metajax.data.sources import DataDirNotFoundError, DataNotFoundError

# 11 fixture characters: 8 for meta-training, of which 2 for validation, 3 for test; with
# four rotations each: 24 / 8 / 12 classes of 20 drawings.
SIZES = {"num_train": 8, "num_val": 2}
CLASSES = {"train": 24, "val": 8, "test": 12}
WAYS, SHOTS, QUERIES = 5, 2, 3

@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    """A folder holding ``data/omniglot/`` with the fixture archives, written once."""
    root = tmp_path_factory.mktemp("fewshot")
    fixture = make_fixture()
    write_fixture(root / "data" / "omniglot", fixture)
    return root, fixture


@contextlib.contextmanager
def fake_omniglot_env(root, fixture):
    """The fixture archives registered as the originals and named by ``$METAJAX_DATA_DIR``;
    downloads point at a closed port, caches go under ``root``. Undone on exit, so the real
    data test sees the real settings."""
    with pytest.MonkeyPatch.context() as patch:
        for subset, (_, _, spec) in fixture.items():
            patch.setitem(omniglot.FILES, subset, spec)
        patch.setenv("METAJAX_DATA_DIR", str(root / "data"))
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        patch.setenv("METAJAX_OMNIGLOT_URL", closed_port_url())
        patch.delenv("METAJAX_CACHE_DIR", raising=False)
        yield root / "data"


@pytest.fixture
def fake_omniglot(fixture_root):
    with fake_omniglot_env(*fixture_root) as data_dir:
        yield data_dir


@pytest.fixture(scope="module")
def fs(fixture_root):
    with fake_omniglot_env(*fixture_root):
        # data_dir not given: read from $METAJAX_DATA_DIR.
        return mj.data.fewshot("omniglot", ways=WAYS, shots=SHOTS, queries=QUERIES,
                               progress=False, **SIZES)


def drawing_index(split) -> dict[bytes, int]:
    """Each drawing's bytes -> its class in ``split``."""
    images = np.asarray(split.images)
    return {images[c, d].tobytes(): c for c in range(images.shape[0])
            for d in range(images.shape[1])}


def test_mj_data_is_an_attribute_after_import_metajax():
    # In a fresh interpreter: nothing but "import metajax" has run.
    code = "import metajax as mj; print(mj.data.fewshot.__name__, mj.data.FewShot.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["fewshot", "FewShot"]


def test_facts(fs):
    assert (fs.name, fs.protocol) == ("omniglot", "maml")
    assert (fs.ways, fs.shots, fs.queries) == (WAYS, SHOTS, QUERIES)
    assert fs.image_shape == (28, 28, 1)
    assert fs.num_classes == CLASSES
    for name in ("train", "val", "test"):
        split = fs.split(name)
        assert split is getattr(fs, name) and split.name == name
        assert split.images.shape == (CLASSES[name], 20, 28, 28, 1)
        assert isinstance(split.images, jax.Array)
    assert "num_classes={'train': 24, 'val': 8, 'test': 12}" in repr(fs)


def test_splits_match_the_loaders_protocol(fs, fake_omniglot):
    # The same classes, in the same order, as the loader's split of the same data.
    arrays = omniglot.load_omniglot(fake_omniglot, progress=False)
    expected = omniglot.omniglot_splits(arrays, "maml", **SIZES)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(fs.split(name).images), array)


def test_splits_share_no_drawing(fs):
    index = {name: set(drawing_index(fs.split(name))) for name in ("train", "val", "test")}
    assert all(len(v) > 0 for v in index.values())
    assert not index["train"] & index["val"]
    assert not index["train"] & index["test"]
    assert not index["val"] & index["test"]


@pytest.mark.parametrize("name", ["train", "val", "test"])
def test_one_episode_per_split(fs, name):
    split = fs.split(name)
    task = split.task(jax.random.PRNGKey(3))
    (xs, ys), (xq, yq) = task.support, task.query
    assert isinstance(task, mj.Task)
    assert xs.shape == (WAYS * SHOTS, 28, 28, 1) and xq.shape == (WAYS * QUERIES, 28, 28, 1)
    assert xs.dtype == xq.dtype == jnp.float32 and ys.dtype == yq.dtype == jnp.int32
    assert sorted(np.bincount(np.asarray(ys), minlength=WAYS)) == [SHOTS] * WAYS
    assert sorted(np.bincount(np.asarray(yq), minlength=WAYS)) == [QUERIES] * WAYS
    assert set(np.asarray(ys).tolist()) == set(np.asarray(yq).tolist()) == set(range(WAYS))

    # Every image is a drawing of this split; one label is one class, labels are distinct
    # classes, and support and query images of a class are different drawings.
    index = drawing_index(split)
    xs, xq, ys, yq = map(np.asarray, (xs, xq, ys, yq))
    class_of = {}
    for x, y in [*zip(xs, ys, strict=True), *zip(xq, yq, strict=True)]:
        c = index[x.tobytes()]
        assert class_of.setdefault(int(y), c) == c
    assert len(set(class_of.values())) == WAYS
    for label in range(WAYS):
        support = {x.tobytes() for x in xs[ys == label]}
        query = {x.tobytes() for x in xq[yq == label]}
        assert not support & query


def test_samplers_jit_and_vmap(fs):
    key = jax.random.PRNGKey(7)
    eager = fs.train.task(key)
    jitted = jax.jit(fs.train.task)(key)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)

    keys = jax.random.split(key, 4)
    mapped = jax.vmap(fs.val.task)(keys)
    batch = jax.jit(fs.val.tasks, static_argnums=1)(key, 4)
    assert batch.support[0].shape == (4, WAYS * SHOTS, 28, 28, 1)
    assert batch.query[1].shape == (4, WAYS * QUERIES)
    # tasks(key, T) is the vmapped task over split(key, T).
    jax.tree.map(np.testing.assert_array_equal, mapped, batch)
    # Different keys give different episodes.
    assert not np.array_equal(batch.support[0][0], batch.support[0][1])


def test_model_loss_and_accuracy(fs):
    model = fs.model()
    assert model.num_classes == WAYS and model.filters == 64 and model.variant == "omniglot"
    assert fs.model(filters=8).filters == 8
    params = fs.init_params(jax.random.PRNGKey(0), model)
    task = fs.test.task(jax.random.PRNGKey(1))
    # One compiled call (op-by-op flax on CPU compiles every op).
    logits, (loss, aux), accuracy = jax.jit(lambda p, b: (
        model.apply(p, b[0]), fs.loss_fn(model)(p, b), fs.accuracy_fn(model)(p, b)
    ))(params, task.query)
    assert logits.shape == (WAYS * QUERIES, WAYS)
    logits, y = np.asarray(logits, np.float64), np.asarray(task.query[1])
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -log_p[np.arange(y.size), y].mean(), rtol=1e-5)
    assert float(aux["accuracy"]) == float(accuracy)
    np.testing.assert_allclose(accuracy, np.mean(logits.argmax(-1) == y), rtol=1e-6)


class Linear(nn.Module):
    """A linear classifier on the pixels: compiles in a fraction of the Conv4's time."""

    ways: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.ways)(x.reshape(x.shape[0], -1))


def test_evaluator_matches_a_direct_computation(fs):
    model = Linear(WAYS)
    learner = mj.maml(fs.loss_fn(model), inner_lr=0.4, inner_steps=1, has_aux=True)
    meta_params = learner.init(fs.init_params(jax.random.PRNGKey(0), model))
    key = jax.random.PRNGKey(5)
    result = fs.evaluator(learner, inner_steps=2, num_tasks=3, split="val", model=model,
                          queries=4)(meta_params, key)

    @jax.jit
    def direct(key):  # task i comes from fold_in(key, i), adapted with 2 steps
        task = jax.tree.map(lambda x: x[0], fs.replace(queries=4).val.tasks(key, 1))
        fast = learner.adapt(meta_params, task.support, inner_steps=2)
        return fs.accuracy_fn(model)(fast, task.query)

    expected = [float(direct(jax.random.fold_in(key, i))) for i in range(3)]
    assert result["tasks"] == 3
    np.testing.assert_allclose(result["mean"], np.mean(expected), rtol=1e-6)
    np.testing.assert_allclose(result["ci95"], 1.96 * np.std(expected, ddof=1) / np.sqrt(3),
                               rtol=1e-6)
    with pytest.raises(KeyError, match="no split 'dev'"):
        fs.evaluator(learner, split="dev")
    with pytest.raises(ValueError, match="exceeds the 20 images per class"):
        fs.evaluator(learner, queries=19)

    problem = fs.problem(model)
    assert problem.has_aux and problem.has_validation and problem.metric_name == "accuracy"
    tasks = problem.sample_tasks(jax.random.PRNGKey(0), 3, 1, 4, split="test")
    assert tasks.support[0].shape == (3, WAYS, 28, 28, 1)
    assert tasks.query[1].shape == (3, WAYS * 4)


def test_replace_reuses_the_data_and_rechecks(fs):
    other = fs.replace(queries=1, ways=3)
    assert (other.ways, other.shots, other.queries) == (3, SHOTS, 1)
    assert other.train.images is fs.train.images
    assert other.test.task(jax.random.PRNGKey(0)).query[1].shape == (3,)
    assert other.model().num_classes == 3
    with pytest.raises(ValueError, match="omniglot val split: ways=9 exceeds the 8 classes"):
        fs.replace(ways=9)


def test_alphabets_protocol_has_no_validation_split(fake_omniglot):
    fs = mj.data.fewshot("omniglot", ways=3, shots=1, queries=1, protocol="alphabets",
                         progress=False)
    # Background characters (7) for training, evaluation characters (4) for test, no rotation.
    assert fs.num_classes == {"train": 7, "test": 4}
    with pytest.raises(KeyError, match="'alphabets' protocol has no validation split"):
        fs.val  # noqa: B018 (the property raises)
    assert fs.test.tasks(jax.random.PRNGKey(0), 2).support[0].shape == (2, 3, 28, 28, 1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "cifar"}, ValueError, "choose one of 'omniglot', 'miniimagenet'"),
        ({"ways": 0}, ValueError, "ways must be a Python int >= 1, got 0"),
        ({"shots": -1}, ValueError, "shots must be a Python int >= 1"),
        ({"queries": 1.5}, TypeError, "queries must be a Python int"),
        ({"ways": "5"}, TypeError, "ways must be a Python int"),
        ({"ways": 9}, ValueError, "omniglot val split: ways=9 exceeds the 8 classes"),
        ({"shots": 10, "queries": 11}, ValueError, "exceeds the 20 images per class"),
        ({"protocol": "vinyals"}, ValueError, "Omniglot's protocols are 'maml', 'alphabets'"),
        ({"expect_counts": False}, ValueError, "expect_counts is a mini-ImageNet option"),
        ({"protocol": "alphabets"}, ValueError, "num_train and num_val size the 'maml'"),
        ({"num_train": 100}, ValueError, "num_train=100 with 11 characters"),
        ({"name": "miniimagenet", "protocol": "maml", "num_train": None, "num_val": None},
         ValueError, "protocol: Omniglot options"),
    ],
)
def test_bad_arguments_are_refused(fake_omniglot, kwargs, error, message):
    args = {"name": "omniglot", "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
            "progress": False, **SIZES, **kwargs}
    name = args.pop("name")
    with pytest.raises(error, match=message):
        mj.data.fewshot(name, **{k: v for k, v in args.items() if v is not None})


def test_num_tasks_must_be_static(fs):
    with pytest.raises(TypeError, match="static"):
        jax.jit(fs.train.tasks)(jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="num_tasks must be a Python int >= 1"):
        fs.train.tasks(jax.random.PRNGKey(0), 0)
    with pytest.raises(KeyError, match=r"no split 'valid'; its splits: \('train', 'val', 'test'\)"):
        fs.split("valid")


def test_missing_data_says_where_files_go(tmp_path, fake_omniglot):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        mj.data.fewshot("omniglot", ways=5, shots=1, data_dir=empty, download=False)
    text = str(info.value)
    assert str(empty / "omniglot") in text and "images_background.zip" in text
    assert "download them from" in text

    with pytest.raises(FileNotFoundError, match="mini-ImageNet not found") as info:
        mj.data.fewshot("miniimagenet", ways=5, shots=1, data_dir=empty)
    assert str(empty / "miniimagenet") in str(info.value)
    assert "does not download" in str(info.value)

    with pytest.raises(DataDirNotFoundError, match="does not exist"):
        mj.data.fewshot("omniglot", ways=5, shots=1, data_dir=tmp_path / "nowhere")


def _write_fake_miniimagenet(root, classes, per_class, seed=0):
    """``mini-imagenet-cache-<split>.pkl`` files of random uint8 84x84x3 images."""
    rng = np.random.default_rng(seed)
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    for offset, (split, count) in enumerate(classes.items()):
        data = rng.integers(0, 256, (count * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n0{offset}{c:07d}": list(range(c * per_class, (c + 1) * per_class))
                      for c in range(count)}
        obj = {"image_data": data, "class_dict": class_dict}
        name = miniimagenet.PICKLE_NAME.format(split=split)
        (folder / name).write_bytes(pickle.dumps(obj, protocol=4))


def test_fake_miniimagenet(tmp_path):
    _write_fake_miniimagenet(tmp_path, {"train": 3, "val": 2, "test": 2}, per_class=4)
    with pytest.raises(ValueError, match="Ravi & Larochelle split has 64"):
        mj.data.fewshot("miniimagenet", ways=2, shots=1, queries=2, data_dir=tmp_path)
    fs = mj.data.fewshot("miniimagenet", ways=2, shots=1, queries=2, data_dir=tmp_path,
                         expect_counts=False)
    assert (fs.protocol, fs.image_shape) == ("ravi-larochelle", (84, 84, 3))
    assert fs.num_classes == {"train": 3, "val": 2, "test": 2}
    assert fs.train.images.dtype == jnp.uint8  # kept small on the device
    task = fs.val.task(jax.random.PRNGKey(0))
    x = np.asarray(task.support[0])
    assert x.shape == (2, 84, 84, 3) and x.dtype == np.float32
    stored = np.asarray(fs.val.images).reshape(-1, 84, 84, 3)
    matches = [np.flatnonzero((np.abs(stored / 255.0 - image) < 1e-6).all(axis=(1, 2, 3)))
               for image in x]
    assert all(m.size == 1 for m in matches)  # each is one stored image, divided by 255
    model = fs.model(filters=4)
    assert model.variant == "miniimagenet" and model.num_classes == 2
    # Initialisation and loss in one compiled call.
    loss, aux = jax.jit(lambda key, batch: fs.loss_fn(model)(fs.init_params(key, model), batch))(
        jax.random.PRNGKey(0), task.query)
    assert np.isfinite(float(loss)) and 0.0 <= float(aux["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="miniimagenet train split: ways=4 exceeds the 3"):
        fs.replace(ways=4)


@pytest.mark.data
def test_real_omniglot_maml_protocol():
    root = os.environ.get("METAJAX_DATA_DIR")
    if not root:
        pytest.skip("METAJAX_DATA_DIR is not set (e.g. METAJAX_DATA_DIR=../shared/data)")
    folder = Path(root) / "omniglot"
    needed = [omniglot.FILES[s].filename for s in ("background", "evaluation")]
    if not all((folder / name).is_file() for name in needed):
        pytest.skip(f"{folder} lacks {needed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", omniglot.ModifiedArchiveWarning)  # a repacked copy
        fs = mj.data.fewshot("omniglot", ways=20, shots=5, queries=15, download=False,
                             progress=False)
    # 1200 training characters (100 for validation) and 423 test ones, four rotations each.
    assert fs.num_classes == {"train": 4400, "val": 400, "test": 1692}
    assert fs.image_shape == (28, 28, 1)
    task = fs.test.task(jax.random.PRNGKey(0))
    assert task.support[0].shape == (100, 28, 28, 1) and task.query[0].shape == (300, 28, 28, 1)
    assert set(np.unique(np.asarray(task.support[0])).tolist()) == {0.0, 1.0}  # binary ink
