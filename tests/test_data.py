"""IDX reading and dataset loading in benchmarks.data, on tiny hand-written files."""

import gzip
import re
import struct

import numpy as np
import pytest

from benchmarks import data

_CODES = {
  np.dtype("u1"): 0x08,
  np.dtype("i1"): 0x09,
  np.dtype(">i2"): 0x0B,
  np.dtype(">i4"): 0x0C,
  np.dtype(">f4"): 0x0D,
  np.dtype(">f8"): 0x0E,
}


def idx_bytes(array, dtype):
  """Encodes `array` as an IDX file with big-endian element type `dtype`."""
  dtype = np.dtype(dtype)
  header = struct.pack(">BBBB", 0, 0, _CODES[dtype], array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + np.asarray(array, dtype=dtype).tobytes()


def write_idx(path, array, dtype="u1"):
  """Writes `array` as an IDX file at `path`, gzipped when it ends in .gz."""
  raw = idx_bytes(array, dtype)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(raw)
  return path


def write_dataset(directory, n_train=6, n_test=4, side=28, seed=0):
  """Writes the four standard IDX files (some gzipped) and returns their arrays."""
  rng = np.random.default_rng(seed)
  arrays = {
    "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
    "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  arrays["train-labels-idx1-ubyte"][0] = 9  # So num_classes is 10.
  arrays["train-images-idx3-ubyte.gz"][0, 0, :2] = (0, 255)  # Both ends of the range.
  for name, array in arrays.items():
    write_idx(directory / name, array)
  return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (3, 28, 28), (7,)], ids=str)
def test_read_idx_ubyte_round_trip(tmp_path, suffix, shape):
  array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  path = write_idx(tmp_path / f"a-idx{suffix}", array)
  out = data.read_idx(path)
  assert out.dtype == np.uint8 and out.shape == shape
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4", "i1"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_big_endian_types_round_trip(tmp_path, dtype, suffix):
  rng = np.random.default_rng(2)
  array = (rng.normal(size=(3, 5)) * 100).astype(np.dtype(dtype))
  path = write_idx(tmp_path / f"b-idx{suffix}", array, dtype)
  out = data.read_idx(str(path))
  assert out.shape == (3, 5)
  assert out.dtype == np.dtype(dtype).newbyteorder("=")
  assert out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_read_idx_float32_values_exact(tmp_path):
  array = np.array([[1.5, -2.25, 3e-7], [np.pi, 0.0, -1e30]], np.float32)
  out = data.read_idx(write_idx(tmp_path / "f", array, ">f4"))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
  "raw",
  [b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", b"\x00\x00\x42\x01\x00\x00\x00\x01\x07", b"\x00", b""],
  ids=["nonzero", "badtype", "short", "empty"],
)
def test_read_idx_bad_magic_names_file(tmp_path, raw):
  path = tmp_path / "bad-magic-idx"
  path.write_bytes(raw)
  with pytest.raises(ValueError, match=r"bad-magic-idx"):
    data.read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("cut", [1, 20], ids=["data", "header"])
def test_read_idx_truncated_raises(tmp_path, suffix, cut):
  raw = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "u1")
  raw = raw[:-1] if cut == 1 else raw[:10]
  path = tmp_path / f"trunc-idx{suffix}"
  with (gzip.open if suffix else open)(path, "wb") as f:
    f.write(raw)
  with pytest.raises(ValueError, match=r"trunc-idx"):
    data.read_idx(path)


def test_read_idx_trailing_bytes_raise(tmp_path):
  path = tmp_path / "long-idx"
  path.write_bytes(idx_bytes(np.arange(6, dtype=np.uint8), "u1") + b"\x00")
  with pytest.raises(ValueError, match=r"long-idx"):
    data.read_idx(path)


def test_find_idx_dir(tmp_path):
  assert data.find_idx_dir(tmp_path) is None
  assert data.find_idx_dir(tmp_path / "missing") is None
  write_dataset(tmp_path)
  found = data.find_idx_dir(tmp_path)
  assert set(found) == set(data.IDX_STEMS)
  assert found["train-images-idx3-ubyte"].endswith("train-images-idx3-ubyte.gz")
  assert found["train-labels-idx1-ubyte"].endswith("train-labels-idx1-ubyte")
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  assert data.find_idx_dir(tmp_path) is None


def check_matches(ds, arrays):
  x_train = arrays["train-images-idx3-ubyte.gz"]
  x_test = arrays["t10k-images-idx3-ubyte"]
  assert ds.x_train.shape == (len(x_train), 784) and ds.x_test.shape == (len(x_test), 784)
  for x in (ds.x_train, ds.x_test):
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  np.testing.assert_allclose(ds.x_train * 255, x_train.reshape(len(x_train), -1), atol=1e-4)
  np.testing.assert_allclose(ds.x_test * 255, x_test.reshape(len(x_test), -1), atol=1e-4)
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte.gz"])
  assert ds.num_classes == 10


def test_load_idx_dataset(tmp_path):
  arrays = write_dataset(tmp_path)
  ds = data.load_idx_dataset(tmp_path, "tiny")
  assert ds.name == "tiny" and str(tmp_path) in ds.source
  check_matches(ds, arrays)


def test_load_idx_dataset_missing_names_directory(tmp_path):
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    data.load_idx_dataset(tmp_path, "nothing")


def test_load_dataset_uses_data_dir(tmp_path):
  arrays = write_dataset(tmp_path)
  messages = []
  ds = data.load_dataset(tmp_path, log=messages.append, default_dir=tmp_path / "none")
  check_matches(ds, arrays)
  assert not messages


def test_load_dataset_explicit_missing_dir_raises(tmp_path):
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    data.load_dataset(tmp_path, log=lambda _msg: None)


def test_load_dataset_default_dir_is_fashion_mnist(tmp_path):
  arrays = write_dataset(tmp_path)
  ds = data.load_dataset(log=pytest.fail, default_dir=tmp_path)
  assert ds.name == "fashion-mnist"
  check_matches(ds, arrays)


def test_load_dataset_falls_back_to_digits(tmp_path):
  messages = []
  ds = data.load_dataset(log=messages.append, default_dir=tmp_path)
  assert ds.name == "sklearn-digits"
  assert len(messages) == 1
  assert "dataset-fashion-mnist" in messages[0] and "--data-dir" in messages[0]
  assert str(tmp_path) in messages[0]


def test_default_dir_is_debian_path():
  assert data.FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"


def test_load_digits():
  a, b = data.load_digits(), data.load_digits()
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.name == "sklearn-digits" and a.num_classes == 10
  assert len(a.x_train) + len(a.x_test) == 1797
  assert len(a.x_test) == round(0.2 * 1797)
  assert a.x_train.shape[1] == a.x_test.shape[1] == 64
  for x in (a.x_train, a.x_test):
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
  assert a.x_train.max() == 1.0
  assert a.y_train.dtype == np.int32 and a.y_test.dtype == np.int32
  assert set(np.unique(np.concatenate([a.y_train, a.y_test]))) == set(range(10))
