"""Dataset loading for the experiment scripts: IDX files or scikit-learn's digits.

Fashion-MNIST (or MNIST) is read from the four standard IDX files, plain or
gzipped. Without them, scikit-learn's bundled 8x8 digits stand in, so the
scripts run with no download. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package installs the gzipped IDX files."""

IDX_STEMS = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
"""The four file names (without `.gz`) that make a directory an IDX dataset."""

_IDX_DTYPES = {
  0x08: np.dtype("u1"),
  0x09: np.dtype("i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification dataset split into train and test arrays.

  Attributes:
    name: short name, e.g. "fashion-mnist" or "sklearn-digits".
    x_train: float32 features of shape (n_train, features), in [0, 1] for images.
    y_train: int32 labels of shape (n_train,).
    x_test: float32 features of shape (n_test, features).
    y_test: int32 labels of shape (n_test,).
    num_classes: number of classes; labels lie in [0, num_classes).
    source: a human-readable sentence saying where the data came from.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str


def _read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the raw contents of `path`, gunzipped when the name ends in `.gz`."""
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (plain or `.gz`) into a numpy array of its stored shape.

  Args:
    path: the file; names ending in `.gz` are decompressed with gzip.

  Returns:
    An array in native byte order with the file's element type and dimensions.

  Raises:
    ValueError: on a bad magic number, an unknown type code, or when the data
      size does not match the dimensions in the header.
  """
  raw = _read_bytes(path)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(
      f"{os.fspath(path)}: not an IDX file (bad magic number {raw[:4].hex() or 'missing'})"
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(
      f"{os.fspath(path)}: truncated IDX header ({len(raw)} bytes, "
      f"expected {header} for {ndim} dimensions)"
    )
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
      f"{os.fspath(path)}: IDX size mismatch: shape {shape} needs "
      f"{expected} data bytes, file has {len(raw) - header}"
    )
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def find_idx_dir(data_dir: str | os.PathLike) -> dict[str, str] | None:
  """Finds the four standard IDX files in `data_dir`, each plain or gzipped.

  Args:
    data_dir: the directory to look in.

  Returns:
    A dict from each stem in `IDX_STEMS` to its path (the plain file preferred
    when both exist), or None if any of the four is missing.
  """
  found = {}
  for stem in IDX_STEMS:
    candidates = [os.path.join(data_dir, stem + suffix) for suffix in ("", ".gz")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
      return None
    found[stem] = path
  return found


def _images_to_features(images: np.ndarray, scale: float) -> np.ndarray:
  """Flattens images to (n, features) float32 and divides by `scale`."""
  return images.reshape(len(images), -1).astype(np.float32) / np.float32(scale)


def load_idx_dataset(data_dir: str | os.PathLike, name: str) -> Dataset:
  """Loads an MNIST-style dataset from the four IDX files in `data_dir`.

  Args:
    data_dir: directory holding the files named in `IDX_STEMS` (each may be `.gz`).
    name: the name to give the dataset.

  Returns:
    A `Dataset` with images flattened to float32 in [0, 1] and int32 labels.

  Raises:
    ValueError: if a file is missing or malformed, or images and labels disagree.
  """
  paths = find_idx_dir(data_dir)
  if paths is None:
    raise ValueError(
      f"{os.fspath(data_dir)}: expected the IDX files {', '.join(IDX_STEMS)} (each optionally .gz)"
    )
  arrays = {stem: read_idx(path) for stem, path in paths.items()}
  splits = []
  for prefix in ("train", "t10k"):
    images = arrays[f"{prefix}-images-idx3-ubyte"]
    labels = arrays[f"{prefix}-labels-idx1-ubyte"].reshape(-1)
    if len(images) != len(labels):
      raise ValueError(
        f"{os.fspath(data_dir)}: {prefix} has {len(images)} images but {len(labels)} labels"
      )
    splits += [_images_to_features(images, 255.0), labels.astype(np.int32)]
  x_train, y_train, x_test, y_test = splits
  num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
  return Dataset(
    name, x_train, y_train, x_test, y_test, num_classes, f"IDX files in {os.fspath(data_dir)}"
  )


def load_digits(test_fraction: float = 0.2) -> Dataset:
  """Loads scikit-learn's bundled 8x8 digits, a fallback needing no download.

  The rows are permuted with `numpy.random.default_rng(0)` and the last
  `test_fraction` of them form the test set, so the split is deterministic.

  Args:
    test_fraction: share of the 1797 rows held out as the test set.

  Returns:
    A `Dataset` named "sklearn-digits" with 64 features in [0, 1].
  """
  from sklearn import datasets as sk_datasets  # Deferred: only needed here.

  digits: Any = sk_datasets.load_digits()  # a Bunch (typed as a tuple by sklearn's stubs)
  x = _images_to_features(digits.images, 16.0)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  n_train = len(x) - round(test_fraction * len(x))
  train, test = order[:n_train], order[n_train:]
  return Dataset(
    "sklearn-digits",
    x[train],
    y[train],
    x[test],
    y[test],
    10,
    "scikit-learn's bundled digits (sklearn.datasets.load_digits)",
  )


def load_dataset(
  data_dir: str | os.PathLike | None = None,
  *,
  log: Callable[[str], object] = print,
  default_dir: str | os.PathLike = FASHION_MNIST_DIR,
) -> Dataset:
  """Loads the experiment dataset: `data_dir`, else Fashion-MNIST, else digits.

  Args:
    data_dir: a directory with the four IDX files; if given, it must hold them.
    log: called with a message when falling back to scikit-learn's digits.
    default_dir: where to look for Fashion-MNIST when `data_dir` is None.

  Returns:
    The loaded `Dataset`.

  Raises:
    ValueError: if `data_dir` is given but lacks the IDX files.
  """
  if data_dir is not None:
    name = os.path.basename(os.path.normpath(os.fspath(data_dir))) or "idx"
    return load_idx_dataset(data_dir, name)
  if find_idx_dir(default_dir) is not None:
    return load_idx_dataset(default_dir, "fashion-mnist")
  log(
    f"Fashion-MNIST not found at {os.fspath(default_dir)}; install it with "
    "`apt-get install dataset-fashion-mnist` (as root) or pass --data-dir with "
    "the standard IDX files. Falling back to scikit-learn's digits."
  )
  return load_digits()


CIFAR_LAYOUTS = {
  # variant: (train files, test files, label key, classes, sub-folder of the archive)
  "cifar10": (
    [f"data_batch_{i}" for i in range(1, 6)],
    ["test_batch"],
    b"labels",
    10,
    "cifar-10-batches-py",
  ),
  "cifar100": (["train"], ["test"], b"fine_labels", 100, "cifar-100-python"),
}


def _read_cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  """One python-pickle batch: NHWC float32 images in [0, 1] and int32 labels."""
  with open(path, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  try:
    raw, labels = batch[b"data"], batch[label_key]
  except (KeyError, TypeError):
    raise ValueError(f"{path}: not a CIFAR python batch (no b'data' / {label_key!r})") from None
  raw = np.asarray(raw, np.uint8)
  if raw.ndim != 2 or raw.shape[1] != 3072 or len(raw) != len(labels):
    raise ValueError(
      f"{path}: expected (n, 3072) images and n labels, got {raw.shape} and {len(labels)}"
    )
  images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
  return images, np.asarray(labels, np.int32)


def load_cifar(data_dir: str | os.PathLike, variant: str = "cifar10") -> Dataset:
  """Loads CIFAR-10 or CIFAR-100 from the standard python-pickle batches.

  Args:
    data_dir: the folder holding the batches (``data_batch_1..5`` and
      ``test_batch``, or ``train`` and ``test``), or the folder above the
      archive's own ``cifar-10-batches-py`` / ``cifar-100-python``.
    variant: ``"cifar10"`` or ``"cifar100"`` (fine labels).

  Returns:
    A `Dataset` with NHWC float32 images of shape (n, 32, 32, 3) in [0, 1].

  Raises:
    ValueError: for an unknown variant, missing files or malformed batches.
  """
  if variant not in CIFAR_LAYOUTS:
    raise ValueError(f"unknown CIFAR variant {variant!r}; use one of {sorted(CIFAR_LAYOUTS)}")
  train_files, test_files, label_key, classes, folder = CIFAR_LAYOUTS[variant]
  root = os.fspath(data_dir)
  if not os.path.exists(os.path.join(root, train_files[0])) and os.path.isdir(
    os.path.join(root, folder)
  ):
    root = os.path.join(root, folder)
  missing = [f for f in train_files + test_files if not os.path.exists(os.path.join(root, f))]
  if missing:
    raise ValueError(f"{root}: missing {variant} batches {missing}")
  parts = {}
  for split, files in (("train", train_files), ("test", test_files)):
    xs, ys = zip(*(_read_cifar_batch(os.path.join(root, f), label_key) for f in files), strict=True)
    parts[split] = (np.concatenate(xs), np.concatenate(ys))
  return Dataset(
    variant,
    *parts["train"],
    *parts["test"],
    num_classes=classes,
    source=f"python-pickle batches in {root}",
  )
