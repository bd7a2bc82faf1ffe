"""Image classification datasets for the example scripts, loaded without any download.

MNIST-1D is generated locally by the ``mnist1d`` package and digits ship with scikit-learn.
CIFAR-10 and CIFAR-100 are read from the python-pickle archives (``cifar-10-python.tar.gz``
and ``cifar-100-python.tar.gz``) that the user has already downloaded and extracted.

Every loader returns a :class:`Dataset` with float32 images in channels-last layout and int32
labels in ``[0, num_classes)``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100")

DIGITS_NUM_TEST = 300

_CIFAR_IMAGE_SIZE = 32
_CIFAR_CHANNELS = 3
_CIFAR_ROW_LENGTH = _CIFAR_CHANNELS * _CIFAR_IMAGE_SIZE * _CIFAR_IMAGE_SIZE

# Errors a corrupt or foreign file can raise from pickle.load, besides UnpicklingError.
_PICKLE_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    """File names and label key of one CIFAR variant in the python-pickle archive."""

    name: str
    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes

    @property
    def all_files(self) -> tuple[str, ...]:
        """Training files followed by the test file."""
        return (*self.train_files, self.test_file)


_CIFAR10_LAYOUT = _CifarLayout(
    name="cifar10",
    num_classes=10,
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
)
_CIFAR100_LAYOUT = _CifarLayout(
    name="cifar100",
    num_classes=100,
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test split of an image classification dataset.

    Attributes:
        name: Dataset name, one of :data:`DATASETS`.
        train_images: float32 array of shape (N, ...features..., channels).
        train_labels: int32 array of shape (N,) with values in [0, num_classes).
        test_images: float32 array with the same per-image shape as ``train_images``.
        test_labels: int32 array of shape (M,) with values in [0, num_classes).
        num_classes: Number of classes.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")


def load_mnist1d(seed: int = 0, num_samples: int | None = None) -> Dataset:
    """Generate MNIST-1D with the ``mnist1d`` package, without downloading it.

    The package's default arguments apply, except the seed. In mnist1d 0.0.2.post1 they give
    5000 samples, 80% of them for training, of 40 time steps each. Its ``make_dataset`` seeds
    Python's and NumPy's global random generators, so this function saves their states and
    restores them afterwards.

    Args:
        seed: Seed for the generator, in [0, 2**32). The package's own default seed is 42,
            so the default 0 gives a different draw from the same distribution.
        num_samples: Total number of train and test samples. The package makes
            ``num_samples // 10`` samples per class, so the count is rounded down to a
            multiple of 10. Defaults to the package default of 5000.

    Returns:
        A dataset with images of shape (N, 40, 1), standardized by the package to zero mean and
        unit standard deviation over all samples, and 10 classes.

    Raises:
        TypeError: If ``seed`` or ``num_samples`` is not an int.
        ValueError: If ``seed`` is out of range or ``num_samples`` is less than 10.
    """
    _check_seed(seed)
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise TypeError(
                f"num_samples must be an int or None, got {type(num_samples).__name__} "
                f"{num_samples!r}."
            )
        if num_samples < 10:
            raise ValueError(
                f"num_samples must be at least 10 (one sample per class), got {num_samples}."
            )

    # Imported here because mnist1d imports matplotlib and requests, which the other loaders
    # do not need.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(seed)
    if num_samples is not None:
        args.num_samples = int(num_samples)

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    return Dataset(
        name="mnist1d",
        train_images=np.asarray(data["x"], dtype=np.float32)[..., None],
        train_labels=np.asarray(data["y"], dtype=np.int32),
        test_images=np.asarray(data["x_test"], dtype=np.float32)[..., None],
        test_labels=np.asarray(data["y_test"], dtype=np.int32),
        num_classes=10,
    )


def load_digits(seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits and split them into train and test sets.

    The 1797 images are shuffled with ``np.random.default_rng(seed)``, and the first 300 in
    that order form the test set, as in ``quickstart_linen.py``.

    Args:
        seed: Seed of the shuffle, in [0, 2**32).

    Returns:
        A dataset with 1497 training and 300 test images of shape (8, 8, 1), scaled from the
        range 0..16 to [0, 1], and 10 classes.

    Raises:
        TypeError: If ``seed`` is not an int.
        ValueError: If ``seed`` is out of range.
    """
    _check_seed(seed)

    # Imported here so that the MNIST-1D and CIFAR loaders do not need scikit-learn.
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)

    order = np.random.default_rng(seed).permutation(len(images))
    test_index = order[:DIGITS_NUM_TEST]
    train_index = order[DIGITS_NUM_TEST:]

    return Dataset(
        name="digits",
        train_images=images[train_index],
        train_labels=labels[train_index],
        test_images=images[test_index],
        test_labels=labels[test_index],
        num_classes=10,
    )


def _resolve_cifar_dir(data_dir: str | os.PathLike, layout: _CifarLayout) -> Path:
    """Return the folder that should contain the batch files of ``layout``.

    ``data_dir`` may be that folder itself or its parent containing ``layout.folder``.
    """
    root = Path(data_dir)
    expected = ", ".join(layout.all_files)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{layout.name} data directory not found: {root}. Expected a folder containing "
            f"{expected}, or its parent containing {layout.folder}/. Extract the python "
            f"version of the {layout.name} archive and pass that folder as data_dir."
        )

    nested = root / layout.folder
    has_direct_files = any((root / name).is_file() for name in layout.all_files)
    if not has_direct_files and nested.is_dir():
        return nested
    return root


def _read_cifar_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR batch and return its uint8 rows and int32 labels.

    NOTE: pickle.load can run arbitrary code from the file, so read only files you trust.
    """
    expected_files = ", ".join(layout.all_files)
    if not path.is_file():
        raise FileNotFoundError(
            f"{layout.name} batch file not found: {path}. Expected {expected_files} in "
            f"{path.parent}. Extract the complete python version of the {layout.name} archive."
        )

    expected_format = (
        f"a pickled dict with b'data' (uint8 array of shape (N, {_CIFAR_ROW_LENGTH})) and "
        f"{layout.label_key!r} (N ints in [0, {layout.num_classes}))"
    )
    with path.open("rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except _PICKLE_LOAD_ERRORS as error:
            raise ValueError(
                f"Invalid {layout.name} batch file {path}: it could not be unpickled "
                f"({type(error).__name__}: {error}). Expected {expected_format}."
            ) from error

    if not isinstance(batch, dict):
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: it contains a {type(batch).__name__}, "
            f"expected {expected_format}."
        )
    missing_keys = [key for key in (b"data", layout.label_key) if key not in batch]
    if missing_keys:
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: missing keys "
            f"{', '.join(repr(key) for key in missing_keys)}. Expected {expected_format}."
        )

    data = batch[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_ROW_LENGTH
    ):
        description = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: b'data' is a {description}, expected a "
            f"uint8 array of shape (N, {_CIFAR_ROW_LENGTH})."
        )

    labels = np.asarray(batch[layout.label_key])
    if labels.ndim != 1 or (labels.size > 0 and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: {layout.label_key!r} has dtype "
            f"{labels.dtype} and shape {labels.shape}, expected a flat sequence of ints."
        )
    if len(labels) != len(data):
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: {len(labels)} labels for {len(data)} "
            f"rows of b'data', expected one label per row."
        )
    if labels.size > 0 and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise ValueError(
            f"Invalid {layout.name} batch file {path}: labels range from {labels.min()} to "
            f"{labels.max()}, expected values in [0, {layout.num_classes})."
        )

    return data, labels.astype(np.int32)


def _read_cifar_split(
    directory: Path, file_names: Sequence[str], layout: _CifarLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate batch files, returning float32 NHWC images in [0, 1] and labels."""
    batches = [_read_cifar_batch(directory / name, layout) for name in file_names]
    rows = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([batch_labels for _, batch_labels in batches])

    # Each row stores the red, then green, then blue 32x32 plane in row-major order.
    images = rows.reshape(-1, _CIFAR_CHANNELS, _CIFAR_IMAGE_SIZE, _CIFAR_IMAGE_SIZE)
    images = images.transpose(0, 2, 3, 1).astype(np.float32)
    images /= 255.0
    return images, labels


def load_cifar(data_dir: str | os.PathLike, num_classes: int = 10) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 from the extracted python-pickle archive.

    ``data_dir`` may be the folder with the batch files (``cifar-10-batches-py`` or
    ``cifar-100-python``) or its parent. CIFAR-10 needs ``data_batch_1`` to ``data_batch_5``
    and ``test_batch``. CIFAR-100 needs ``train`` and ``test`` and uses the 100 fine labels.
    Both splits are standardized with the per-channel mean and standard deviation of the
    training images. Nothing is downloaded.

    NOTE: The files are read with pickle, which can run arbitrary code, so read only files
    you trust.

    Args:
        data_dir: Folder with the batch files, or its parent.
        num_classes: 10 for CIFAR-10 or 100 for CIFAR-100.

    Returns:
        A dataset with images of shape (32, 32, 3) and ``num_classes`` classes.

    Raises:
        FileNotFoundError: If ``data_dir`` or one of the batch files does not exist.
        ValueError: If ``num_classes`` is not 10 or 100, if a batch file is not a pickled dict
            with the expected keys, data shape, dtype and labels, or if the training images
            are empty or have a constant channel.
    """
    if num_classes == 10:
        layout = _CIFAR10_LAYOUT
    elif num_classes == 100:
        layout = _CIFAR100_LAYOUT
    else:
        raise ValueError(
            f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}."
        )

    directory = _resolve_cifar_dir(data_dir, layout)
    train_images, train_labels = _read_cifar_split(directory, layout.train_files, layout)
    test_images, test_labels = _read_cifar_split(directory, (layout.test_file,), layout)

    if len(train_images) == 0:
        raise ValueError(
            f"Invalid {layout.name} data in {directory}: the training batch files contain no "
            f"images. Extract the complete python version of the {layout.name} archive."
        )

    # Computing the float64 statistics one channel at a time limits the float64 temporary
    # copy to one channel.
    for channel in range(_CIFAR_CHANNELS):
        values = train_images[..., channel]
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        if std == 0.0:
            raise ValueError(
                f"Invalid {layout.name} training images in {directory}: channel {channel} has "
                f"standard deviation 0, so it cannot be standardized. Check that the training "
                f"batch files contain real images."
            )
        for images in (train_images, test_images):
            images[..., channel] -= np.float32(mean)
            images[..., channel] /= np.float32(std)

    return Dataset(
        name=layout.name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=layout.num_classes,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_samples: int | None = None,
) -> Dataset:
    """Load the dataset called ``name``.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Folder of the extracted CIFAR archive, required for ``cifar10`` and
            ``cifar100`` and ignored by the other datasets.
        seed: Seed of MNIST-1D generation or of the digits split. CIFAR ignores it because its
            split is fixed.
        num_samples: MNIST-1D sample count; see :func:`load_mnist1d`. Only ``mnist1d``
            accepts it.

    Returns:
        The loaded dataset.

    Raises:
        ValueError: If ``name`` is unknown, ``data_dir`` is missing for CIFAR, or
            ``num_samples`` is given for a dataset other than ``mnist1d``. The loaders raise
            the other errors listed in their docstrings.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(DATASETS)}.")
    if num_samples is not None and name != "mnist1d":
        raise ValueError(
            f"num_samples (--num-samples) applies only to mnist1d, got {num_samples} for "
            f"{name!r}. Leave it unset for {name}."
        )

    if name == "mnist1d":
        return load_mnist1d(seed=seed, num_samples=num_samples)
    if name == "digits":
        return load_digits(seed=seed)

    if data_dir is None:
        raise ValueError(
            f"Dataset {name!r} requires data_dir (--data-dir): the folder of the extracted "
            f"python version of the {name} archive, or its parent. It is never downloaded."
        )
    return load_cifar(data_dir, num_classes=100 if name == "cifar100" else 10)
