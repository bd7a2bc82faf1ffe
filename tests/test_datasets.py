"""Tests for the dataset loaders in examples/datasets.py.

CIFAR tests write tiny batch files in the python-pickle format under tmp_path, so nothing is
downloaded.
"""

from __future__ import annotations

import pathlib
import pickle
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import datasets

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
ROW_LENGTH = 32 * 32 * 3
ROWS_PER_BATCH = 4


# Generating the default 5000 MNIST-1D samples takes about 2 s, so only one fixture does it.
# The other tests generate 200 samples or fewer.
@pytest.fixture(scope="module")
def mnist1d_seed0() -> datasets.Dataset:
    return datasets.load_mnist1d(seed=0)


@pytest.fixture(scope="module")
def mnist1d_small() -> datasets.Dataset:
    return datasets.load_mnist1d(seed=0, num_samples=200)


def test_mnist1d_shapes_and_dtypes(mnist1d_seed0):
    data = mnist1d_seed0
    assert data.name == "mnist1d"
    assert data.num_classes == 10
    assert data.train_images.shape == (4000, 40, 1)
    assert data.test_images.shape == (1000, 40, 1)
    assert data.train_labels.shape == (4000,)
    assert data.test_labels.shape == (1000,)
    assert data.train_images.dtype == np.float32
    assert data.test_images.dtype == np.float32
    assert data.train_labels.dtype == np.int32
    assert data.test_labels.dtype == np.int32


def test_mnist1d_label_range(mnist1d_seed0):
    labels = np.concatenate([mnist1d_seed0.train_labels, mnist1d_seed0.test_labels])
    assert labels.min() == 0
    assert labels.max() == 9
    assert np.all(np.bincount(labels) == 500)


def test_mnist1d_deterministic_for_seed(mnist1d_small):
    again = datasets.load_mnist1d(seed=0, num_samples=200)

    np.testing.assert_array_equal(again.train_images, mnist1d_small.train_images)
    np.testing.assert_array_equal(again.train_labels, mnist1d_small.train_labels)
    np.testing.assert_array_equal(again.test_images, mnist1d_small.test_images)
    np.testing.assert_array_equal(again.test_labels, mnist1d_small.test_labels)


def test_mnist1d_restores_global_random_state():
    saved_python_state = random.getstate()
    saved_numpy_state = np.random.get_state()
    try:
        # Seeds that differ from the generation seed, so a leaked reseed changes the state.
        random.seed(12345)
        np.random.seed(12345)
        python_state = random.getstate()
        numpy_state = np.random.get_state()

        datasets.load_mnist1d(seed=0, num_samples=20)

        assert random.getstate() == python_state
        after = np.random.get_state()
        np.testing.assert_array_equal(after[1], numpy_state[1])
        assert after[2] == numpy_state[2]
    finally:
        random.setstate(saved_python_state)
        np.random.set_state(saved_numpy_state)


def test_mnist1d_num_samples_sets_size(mnist1d_small, mnist1d_seed0):
    assert mnist1d_small.train_images.shape == (160, 40, 1)
    assert mnist1d_small.test_images.shape == (40, 40, 1)
    assert mnist1d_small.train_labels.shape == (160,)
    assert mnist1d_small.test_labels.shape == (40,)
    assert not np.array_equal(mnist1d_small.train_images, mnist1d_seed0.train_images[:160])


@pytest.mark.parametrize("num_samples", [0, 9, -5])
def test_mnist1d_rejects_small_num_samples(num_samples):
    with pytest.raises(ValueError, match="num_samples must be at least 10"):
        datasets.load_mnist1d(num_samples=num_samples)


def test_mnist1d_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed must be in"):
        datasets.load_mnist1d(seed=-1)


def test_digits_shapes_and_split():
    data = datasets.load_digits(seed=0)
    assert data.name == "digits"
    assert data.num_classes == 10
    assert data.train_images.shape == (1497, 8, 8, 1)
    assert data.test_images.shape == (300, 8, 8, 1)
    assert data.train_labels.shape == (1497,)
    assert data.test_labels.shape == (300,)
    assert data.train_images.dtype == np.float32
    assert data.train_labels.dtype == np.int32
    assert data.train_images.min() >= 0.0
    assert data.train_images.max() == 1.0
    assert set(np.unique(data.test_labels)) == set(range(10))


def test_digits_deterministic_for_seed():
    first = datasets.load_digits(seed=3)
    second = datasets.load_digits(seed=3)
    other = datasets.load_digits(seed=4)

    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)
    assert not np.array_equal(first.test_images, other.test_images)


def write_batch(path: pathlib.Path, rows: np.ndarray, labels, label_key: bytes) -> None:
    """Write one batch file in the CIFAR python-pickle format."""
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": rows, label_key: labels}, f)


def random_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, ROW_LENGTH), dtype=np.uint8)


def write_cifar10(folder: pathlib.Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """Write all six CIFAR-10 batch files to ``folder`` and return their rows and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {}
    for name in (*CIFAR10_TRAIN_FILES, "test_batch"):
        rows = random_rows(rng, ROWS_PER_BATCH)
        labels = [int(label) for label in rng.integers(0, 10, size=ROWS_PER_BATCH)]
        write_batch(folder / name, rows, labels, b"labels")
        contents[name] = (rows, labels)
    return contents


def write_cifar100(folder: pathlib.Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """Write the CIFAR-100 train and test files to ``folder`` and return their contents."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {}
    for name, count in (("train", 6), ("test", 3)):
        rows = random_rows(rng, count)
        labels = [int(label) for label in rng.integers(0, 100, size=count)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": labels, b"coarse_labels": [0] * count}, f)
        contents[name] = (rows, labels)
    return contents


def to_unit_nhwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float64) / 255.0


def check_standardized(data: datasets.Dataset, raw_train: np.ndarray, raw_test: np.ndarray):
    train = to_unit_nhwc(raw_train)
    mean = train.mean(axis=(0, 1, 2))
    std = train.std(axis=(0, 1, 2))

    np.testing.assert_allclose(data.train_images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.train_images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(data.train_images, (train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(data.test_images, (to_unit_nhwc(raw_test) - mean) / std, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["batch_folder", "parent_folder"])
def test_cifar10_reads_batches(tmp_path, nested):
    batch_folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    contents = write_cifar10(batch_folder)

    data = datasets.load_cifar(tmp_path, num_classes=10)

    assert data.name == "cifar10"
    assert data.num_classes == 10
    assert data.train_images.shape == (5 * ROWS_PER_BATCH, 32, 32, 3)
    assert data.test_images.shape == (ROWS_PER_BATCH, 32, 32, 3)
    assert data.train_images.dtype == np.float32
    assert data.test_images.dtype == np.float32
    assert data.train_labels.dtype == np.int32
    expected_train_labels = [label for name in CIFAR10_TRAIN_FILES for label in contents[name][1]]
    np.testing.assert_array_equal(data.train_labels, expected_train_labels)
    np.testing.assert_array_equal(data.test_labels, contents["test_batch"][1])

    raw_train = np.concatenate([contents[name][0] for name in CIFAR10_TRAIN_FILES])
    check_standardized(data, raw_train, contents["test_batch"][0])


@pytest.mark.parametrize("nested", [False, True], ids=["batch_folder", "parent_folder"])
def test_cifar100_reads_fine_labels(tmp_path, nested):
    batch_folder = tmp_path / "cifar-100-python" if nested else tmp_path
    contents = write_cifar100(batch_folder)

    data = datasets.load_cifar(str(tmp_path), num_classes=100)

    assert data.name == "cifar100"
    assert data.num_classes == 100
    assert data.train_images.shape == (6, 32, 32, 3)
    assert data.test_images.shape == (3, 32, 32, 3)
    assert data.test_labels.dtype == np.int32
    np.testing.assert_array_equal(data.train_labels, contents["train"][1])
    np.testing.assert_array_equal(data.test_labels, contents["test"][1])
    check_standardized(data, contents["train"][0], contents["test"][0])


def test_cifar_channel_order_is_rgb(tmp_path):
    # Red plane 10, green plane 20, blue plane 30 in every row, plus one brighter row so that
    # the standard deviation is not zero.
    rows = np.zeros((2, ROW_LENGTH), dtype=np.uint8)
    rows[:, :1024] = 10
    rows[:, 1024:2048] = 20
    rows[:, 2048:] = 30
    rows[1] += 100
    write_batch(tmp_path / "train", rows, [0, 1], b"fine_labels")
    write_batch(tmp_path / "test", rows[:1], [0], b"fine_labels")

    data = datasets.load_cifar(tmp_path, num_classes=100)

    # Every channel of row 0 is one standard deviation below its training mean.
    np.testing.assert_allclose(data.train_images[0], -1.0, atol=1e-5)
    np.testing.assert_allclose(data.train_images[1], 1.0, atol=1e-5)


def test_cifar_rejects_bad_num_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes must be 10"):
        datasets.load_cifar(tmp_path, num_classes=20)


def test_cifar_missing_directory(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError) as excinfo:
        datasets.load_cifar(missing)

    message = str(excinfo.value)
    assert str(missing) in message
    assert "data_batch_1" in message
    assert "test_batch" in message


def test_cifar_missing_batch_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()

    with pytest.raises(FileNotFoundError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(tmp_path / "data_batch_3") in message
    assert "test_batch" in message


def test_cifar100_missing_test_file(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").unlink()

    with pytest.raises(FileNotFoundError) as excinfo:
        datasets.load_cifar(tmp_path, num_classes=100)

    assert str(tmp_path / "cifar-100-python" / "test") in str(excinfo.value)


def test_cifar_file_not_a_pickle(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_2"
    bad_file.write_text("this is not a pickle\n")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "could not be unpickled" in message


def test_cifar_empty_file(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "test_batch"
    bad_file.write_bytes(b"")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    assert str(bad_file) in str(excinfo.value)


def test_cifar_pickle_not_a_dict(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_1"
    with bad_file.open("wb") as f:
        pickle.dump([1, 2, 3], f)

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "list" in message


def test_cifar_pickle_missing_labels(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_4"
    with bad_file.open("wb") as f:
        pickle.dump({b"data": random_rows(np.random.default_rng(1), ROWS_PER_BATCH)}, f)

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "b'labels'" in message


def test_cifar100_pickle_with_cifar10_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    rows = random_rows(np.random.default_rng(1), 2)
    write_batch(folder / "train", rows, [1, 2], b"labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path, num_classes=100)

    message = str(excinfo.value)
    assert str(folder / "train") in message
    assert "b'fine_labels'" in message


def test_cifar_wrong_row_length(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_5"
    rows = np.zeros((ROWS_PER_BATCH, 32 * 32), dtype=np.uint8)
    write_batch(bad_file, rows, [0] * ROWS_PER_BATCH, b"labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "(4, 1024)" in message
    assert "3072" in message


def test_cifar_wrong_data_dtype(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_1"
    rows = np.zeros((ROWS_PER_BATCH, ROW_LENGTH), dtype=np.float32)
    write_batch(bad_file, rows, [0] * ROWS_PER_BATCH, b"labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "float32" in message


def test_cifar_label_count_mismatch(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "test_batch"
    rows = random_rows(np.random.default_rng(2), ROWS_PER_BATCH)
    write_batch(bad_file, rows, [0] * (ROWS_PER_BATCH - 1), b"labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "3 labels for 4 rows" in message


def test_cifar_label_out_of_range(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "data_batch_2"
    rows = random_rows(np.random.default_rng(3), ROWS_PER_BATCH)
    write_batch(bad_file, rows, [0, 1, 2, 10], b"labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path)

    message = str(excinfo.value)
    assert str(bad_file) in message
    assert "[0, 10)" in message


def test_cifar_constant_training_images(tmp_path):
    rows = np.full((2, ROW_LENGTH), 7, dtype=np.uint8)
    write_batch(tmp_path / "train", rows, [0, 1], b"fine_labels")
    write_batch(tmp_path / "test", rows, [0, 1], b"fine_labels")

    with pytest.raises(ValueError, match="standard deviation"):
        datasets.load_cifar(tmp_path, num_classes=100)


def test_cifar_empty_training_batches(tmp_path):
    rows = np.zeros((0, ROW_LENGTH), dtype=np.uint8)
    write_batch(tmp_path / "train", rows, [], b"fine_labels")
    write_batch(tmp_path / "test", random_rows(np.random.default_rng(4), 2), [0, 1], b"fine_labels")

    with pytest.raises(ValueError) as excinfo:
        datasets.load_cifar(tmp_path, num_classes=100)

    message = str(excinfo.value)
    assert str(tmp_path) in message
    assert "contain no images" in message


def test_load_dataset_dispatches(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    write_cifar100(tmp_path / "cifar-100-python")

    assert datasets.load_dataset("digits", seed=1).name == "digits"
    assert datasets.load_dataset("cifar10", data_dir=tmp_path).num_classes == 10
    assert datasets.load_dataset("cifar100", data_dir=tmp_path).num_classes == 100


def test_load_dataset_mnist1d(mnist1d_small):
    data = datasets.load_dataset("mnist1d", seed=0, num_samples=200)
    np.testing.assert_array_equal(data.train_images, mnist1d_small.train_images)


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        datasets.load_dataset("mnist")

    message = str(excinfo.value)
    assert "'mnist'" in message
    for name in datasets.DATASETS:
        assert name in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_dataset_cifar_needs_data_dir(name):
    with pytest.raises(ValueError) as excinfo:
        datasets.load_dataset(name)

    message = str(excinfo.value)
    assert "data_dir" in message
    assert "--data-dir" in message


def test_load_dataset_num_samples_only_mnist1d():
    with pytest.raises(ValueError, match="applies only to mnist1d"):
        datasets.load_dataset("digits", num_samples=100)
