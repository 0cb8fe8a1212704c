"""Data set loaders on tiny files written here, the corrupt variants, the seeded splits, and
memory-mapped images (uncompressed IDX, stored npz) that stay on disk through training."""

from __future__ import annotations

import gzip
import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aet.config import ConfigError
from aet.training.data import DATASETS, DataError, default_mnist_dir, load_dataset, read_idx
from aet.training.mapped import MappedImages
from aet.training.models import ModelConfig, build_autoencoder
from aet.training.train import Trainer, TrainingConfig

# --- helpers: tiny files in the real formats ---------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008DD, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, payload: bytes, compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".gz") if compress else path
    target.write_bytes(gzip.compress(payload) if compress else payload)
    return target


def numbered_images(count: int, side: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with pixel value i (so it can be identified after a split); label i % 3."""
    images = np.repeat(np.arange(count, dtype=np.uint8), side * side).reshape(count, side, side)
    return images, (np.arange(count) % 3).astype(np.uint8)


def write_idx_part(
    folder: Path, part: str, images: np.ndarray, labels: np.ndarray, compress: bool
) -> None:
    write_file(folder / f"{part}-images-idx3-ubyte", idx_bytes(images), compress)
    write_file(folder / f"{part}-labels-idx1-ubyte", idx_bytes(labels), compress)


def image_ids(x: np.ndarray) -> np.ndarray:
    """Undo `numbered_images`: the pixel value of each image, as an int."""
    return np.rint(x[:, 0, 0, 0] * 255).astype(int)


# --- digits and the splits ---------------------------------------------------------------------


def test_digits_shapes_ranges_and_70_30_split():
    data = load_dataset("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1131, 126, 540)
    assert len(data.fit) == 1257  # train + val: the 70 % of the 70/30 split
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10 and data.raw_max == 16.0
    for split in (data.train, data.val, data.test, data.fit):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.y.dtype == np.int64 and len(split.y) == len(split.x)
        assert split.x.min() == 0.0 and split.x.max() == 1.0
    # 1797 digits hold 174..183 per class: stratified 30 % gives 52..55 per class in the test part
    assert np.bincount(data.test.y).min() >= 52 and np.bincount(data.test.y).max() <= 55
    assert data.source["sizes"] == {"train": 1131, "val": 126, "test": 540}
    assert data.source["seed"] == 0 and data.source["test_fraction"] == 0.3
    json.dumps(data.source)  # goes into model.json as is


def test_same_seed_same_split_other_seed_other_split():
    first, again = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    other = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(first.test.x, again.test.x)
    np.testing.assert_array_equal(first.train.y, again.train.y)
    assert not np.array_equal(first.test.x, other.test.x)


def test_splits_partition_the_data_and_are_stratified(tmp_path):
    images, _ = numbered_images(200)
    labels = np.repeat(np.arange(4), 50)
    np.savez(tmp_path / "numbered.npz", x=images, y=labels)
    data = load_dataset("npz", tmp_path / "numbered.npz", test_fraction=0.2, val_fraction=0.25)
    ids = [image_ids(split.x) for split in (data.train, data.val, data.test)]
    assert sorted(np.concatenate(ids).tolist()) == list(range(200))
    assert [len(i) for i in ids] == [120, 40, 40]
    np.testing.assert_array_equal(np.bincount(data.test.y), [10, 10, 10, 10])
    np.testing.assert_array_equal(np.bincount(data.val.y), [10, 10, 10, 10])
    for split, split_ids in zip((data.train, data.val, data.test), ids, strict=True):
        np.testing.assert_array_equal(split.y, split_ids // 50)  # labels stay with their images


def test_limit_keeps_a_seeded_subset():
    data = load_dataset("digits", limit=100)
    again = load_dataset("digits", limit=100)
    assert len(data.fit) + len(data.test) == 100 and len(data.test) == 30
    np.testing.assert_array_equal(data.fit.x, again.fit.x)
    assert data.source["limit"] == 100


def test_limit_on_an_official_split_keeps_its_share(tmp_path):
    images, labels = numbered_images(40)
    write_idx_part(tmp_path, "train", images[:30], labels[:30], compress=False)
    write_idx_part(tmp_path, "t10k", images[30:], labels[30:], compress=False)
    data = load_dataset("mnist-idx", tmp_path, limit=20)
    assert (len(data.fit), len(data.test)) == (15, 5)
    assert set(image_ids(data.test.x).tolist()) <= set(range(30, 40))


def test_too_few_examples_to_split():
    with pytest.raises(ConfigError, match="test_fraction: 1 example.s. are too few"):
        load_dataset("digits", limit=1)
    tiny = load_dataset("digits", limit=12)  # too few to stratify: a plain seeded cut, recorded
    assert tiny.source["stratified"] == {"test": False, "val": False}
    assert (len(tiny.train), len(tiny.val), len(tiny.test)) == (7, 1, 4)


def test_unknown_data_set_lists_the_valid_ones():
    with pytest.raises(DataError) as error:
        load_dataset("cifar")
    for name in DATASETS:
        assert name in str(error.value)
    assert "'cifar'" in str(error.value)


@pytest.mark.parametrize(
    "arguments, field",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"limit": 0}, "limit"),
        ({"image_size": 16}, "image_size"),
        ({"channels": 3}, "channels"),
    ],
)
def test_invalid_arguments_name_the_field(arguments, field):
    with pytest.raises(ConfigError, match=field):
        load_dataset("digits", **arguments)


# --- mnist-idx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("layout", [".", "raw", "FashionMNIST/raw"])
def test_idx_folder_layouts(tmp_path, compress, layout):
    images, labels = numbered_images(20)
    write_idx_part(tmp_path / layout, "t10k", images, labels, compress)
    data = load_dataset("mnist-idx", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (14, 2, 4)  # 20 % test, 10 % val
    assert data.image_shape == (1, 4, 4) and data.raw_max == 255.0 and data.num_classes == 3
    for split in (data.fit, data.test):
        np.testing.assert_array_equal(split.y, image_ids(split.x) % 3)
    assert data.source["path"] == str((tmp_path / layout).resolve())


def test_idx_train_and_t10k_give_the_official_split(tmp_path):
    train_images, train_labels = numbered_images(30)
    test_images, test_labels = numbered_images(40)
    write_idx_part(tmp_path, "train", train_images, train_labels, compress=True)
    write_idx_part(tmp_path, "t10k", test_images[30:], test_labels[30:], compress=False)
    data = load_dataset("mnist-idx", tmp_path)
    assert sorted(image_ids(data.test.x).tolist()) == list(range(30, 40))
    assert sorted(image_ids(data.fit.x).tolist()) == list(range(30))
    assert data.source["test_fraction"] == "official"
    resplit = load_dataset("mnist-idx", tmp_path, test_fraction=0.5)
    assert len(resplit.test) == 20


def test_mnist_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AET_MNIST_DIR", str(tmp_path))
    assert default_mnist_dir() == tmp_path
    write_idx_part(tmp_path, "t10k", *numbered_images(10), compress=False)
    assert len(load_dataset("mnist-idx").test) == 2


@pytest.mark.parametrize(
    "corrupt, fault",
    [
        (lambda b: b"\x00\x00\x07\x03" + b[4:], "bad magic number 0x00000703"),
        (lambda b: b"\x08\x03\x00\x00" + b[4:], "bad magic number 0x08030000"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:9], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
    ],
)
def test_read_idx_names_the_file_and_the_fault(tmp_path, corrupt, fault):
    path = write_file(
        tmp_path / "t10k-images-idx3-ubyte",
        corrupt(idx_bytes(numbered_images(5)[0])),
        compress=False,
    )
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert str(path) in str(error.value) and fault in str(error.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(numbered_images(5)[0]))[:-10])
    with pytest.raises(DataError, match=f"{path}: truncated or corrupt gzip"):
        read_idx(path)


def test_idx_count_mismatch_names_the_labels_file(tmp_path):
    images, labels = numbered_images(6)
    write_idx_part(tmp_path, "t10k", images, labels[:5], compress=False)
    with pytest.raises(
        DataError,
        match="t10k-labels-idx1-ubyte: 5 labels, but t10k-images-idx3-ubyte holds 6 images",
    ):
        load_dataset("mnist-idx", tmp_path)


def test_idx_labels_in_an_images_file_are_rejected(tmp_path):
    images, labels = numbered_images(6)
    write_file(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(labels), compress=False)
    write_file(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels), compress=False)
    with pytest.raises(DataError, match=r"images-idx3-ubyte: expected uint8 images \(N, H, W\)"):
        load_dataset("mnist-idx", tmp_path)


def test_idx_missing_files(tmp_path):
    write_file(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(numbered_images(5)[0]), True)
    with pytest.raises(DataError, match="missing file t10k-labels-idx1-ubyte"):
        load_dataset("mnist-idx", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MNIST-format IDX files"):
        load_dataset("mnist-idx", tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("mnist-idx", tmp_path / "absent")


def test_idx_several_folders_are_ambiguous(tmp_path):
    for name in ("MNIST", "KMNIST"):
        write_idx_part(tmp_path / name / "raw", "t10k", *numbered_images(5), compress=True)
    with pytest.raises(DataError, match="several folders"):
        load_dataset("mnist-idx", tmp_path)


@pytest.mark.skipif(
    not (default_mnist_dir() / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="the real MNIST test set is not on this machine",
)
def test_real_mnist_test_set():
    labels = read_idx(default_mnist_dir() / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    data = load_dataset("mnist-idx")
    assert (len(data.fit), len(data.test)) == (8000, 2000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert data.fit.x.max() == 1.0 and data.fit.x.min() == 0.0


# --- npz -----------------------------------------------------------------------------------------


def test_npz_uint8_with_labels(tmp_path):
    images, labels = numbered_images(20)
    np.savez(tmp_path / "d.npz", x=images, y=labels.astype(np.int32))
    data = load_dataset("npz", tmp_path / "d.npz")
    assert data.raw_max == 255.0 and data.image_shape == (1, 4, 4) and data.num_classes == 3
    assert data.fit.y.dtype == np.int64
    np.testing.assert_array_equal(data.test.y, image_ids(data.test.x) % 3)


@pytest.mark.parametrize(
    "shape, image_shape",
    [
        ((10, 3, 2, 2), (3, 2, 2)),
        ((10, 5, 6), (1, 5, 6)),
    ],
)
def test_npz_float_without_labels(tmp_path, shape, image_shape):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.savez(tmp_path / "f.npz", x=x)
    data = load_dataset("npz", tmp_path / "f.npz")
    assert data.raw_max == 1.0 and data.image_shape == image_shape
    assert data.num_classes is None and data.train.y is None and data.test.y is None
    assert len(data.fit) + len(data.test) == 10
    loaded = np.concatenate([data.fit.x, data.test.x]).reshape(10, -1)
    assert sorted(loaded.sum(axis=1).tolist()) == pytest.approx(
        sorted(x.reshape(10, -1).sum(axis=1).tolist())
    )


@pytest.mark.parametrize(
    "arrays, fault",
    [
        (
            {"x": np.array([[[0.5, np.nan], [0.1, 0.2]]])},
            r"1 NaN/Inf values \(first: nan at index \(0, 0, 1\)\)",
        ),
        ({"x": np.array([[[0.5, 0.1], [np.inf, 0.2]]])}, r"NaN/Inf values \(first: inf"),
        ({"x": np.array([[[0.5, 1.5], [0.0, 0.2]]])}, r"values in \[0.0, 1.5\]"),
        ({"x": np.array([[[-0.5, 0.5], [0.0, 0.2]]])}, r"values in \[-0.5, 0.5\]"),
        ({"x": np.zeros((2, 5, 2, 2, 2))}, r"expected images \(N, H, W\) or \(N, C, H, W\)"),
        ({"x": np.zeros((2, 2, 2), np.int64)}, "dtype int64; expected uint8"),
        (
            {"x": np.full((3, 2, 2), 9, np.uint8), "y": np.zeros(2, np.int64)},
            "'y' holds 2 labels, but 'x' holds 3",
        ),
        (
            {"x": np.full((2, 2, 2), 9, np.uint8), "y": np.array([0.5, 1.0])},
            "array 'y': label 0.5 is not a class index; expected integers >= 0",
        ),
        (
            {"x": np.full((2, 2, 2), 9, np.uint8), "y": np.array([np.nan, 1.0])},
            r"array 'y': 1 of 2 labels missing \(NaN\)",
        ),
        (
            {"x": np.array([[[0, 1], [1, 0]], [[1, 0], [0, 1]]], np.uint8)},
            r"uint8 with every value in \{0, 1\}.*x \* 255 \(uint8\) or as float32",
        ),
        ({"x": np.full((2, 2, 2), 200, np.uint16)}, "dtype uint16; expected uint8"),
        ({"x": np.full((2, 2, 2), 3, np.int32)}, "dtype int32; expected uint8"),
        ({"x": np.zeros((0, 2, 2), np.uint8)}, r"holds no rows \(shape \(0, 2, 2\)\)"),
        ({"images": np.zeros((2, 4), np.uint8)}, r"no array 'x'; found arrays: \['images'\]"),
    ],
)
def test_npz_faults_name_the_file_and_the_array(tmp_path, arrays, fault):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=fault) as error:
        load_dataset("npz", path)
    assert str(error.value).startswith(f"{path}: ")


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError, match=f"{path}: not a readable .npz archive"):
        load_dataset("npz", path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset("npz", tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("npz")


# --- image-folder --------------------------------------------------------------------------------


def write_png(path: Path, mode: str, colour, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path)


def test_image_folder_grey_resized(tmp_path):
    for i in range(5):
        write_png(tmp_path / "cat" / f"{i}.png", "L", 51)
        write_png(tmp_path / "dog" / f"{i}.png", "L", 204)
    (tmp_path / "dog" / "notes.txt").write_text("not an image extension: skipped")
    data = load_dataset("image-folder", tmp_path, image_size=4, test_fraction=0.4)
    assert data.image_shape == (1, 4, 4) and data.raw_max == 255.0 and data.num_classes == 2
    assert data.source["classes"] == ["cat", "dog"]
    assert len(data.fit) + len(data.test) == 10
    np.testing.assert_array_equal(np.bincount(data.test.y), [2, 2])
    for split in (data.fit, data.test):  # each image keeps its class: cat 0.2, dog 0.8
        np.testing.assert_allclose(
            split.x.mean(axis=(1, 2, 3)), np.where(split.y, 0.8, 0.2), atol=1e-6
        )


def test_image_folder_rgb_inferred_and_forced_grey(tmp_path):
    for i in range(3):
        write_png(tmp_path / "red" / f"{i}.png", "RGB", (255, 0, 0))
        write_png(tmp_path / "grey" / f"{i}.png", "L", 0)
    data = load_dataset("image-folder", tmp_path, test_fraction=0.34)
    assert data.image_shape == (3, 28, 28)  # one colour image makes the folder RGB
    red = data.fit.x[data.fit.y == 1]
    np.testing.assert_array_equal(red.mean(axis=(0, 2, 3)), [1.0, 0.0, 0.0])
    grey = load_dataset("image-folder", tmp_path, channels=1, image_size=8, test_fraction=0.34)
    assert grey.image_shape == (1, 8, 8)
    assert 0.29 < grey.fit.x[grey.fit.y == 1].max() < 0.31  # ITU-R 601 luma of pure red


def test_image_folder_faults(tmp_path):
    write_png(tmp_path / "a" / "0.png", "L", 0)
    (tmp_path / "a" / "broken.png").write_text("this is text")
    with pytest.raises(DataError, match=f"{tmp_path / 'a' / 'broken.png'}: not an image"):
        load_dataset("image-folder", tmp_path)
    (tmp_path / "a" / "broken.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: class folder holds no image"):
        load_dataset("image-folder", tmp_path)
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("image-folder", tmp_path / "a")
    with pytest.raises(ConfigError, match="channels: expected 1 .grey. or 3"):
        load_dataset("image-folder", tmp_path, channels=2)


def test_image_folder_truncated_png_names_the_file(tmp_path):
    for i in range(2):
        write_png(tmp_path / "a" / f"{i}.png", "L", 10 * i, size=64)
    png = tmp_path / "a" / "1.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(DataError, match=f"{png}: "):
        load_dataset("image-folder", tmp_path, channels=1)


# --- memory-mapped images: uncompressed IDX and stored npz stay on disk ------------------------

MLP = ModelConfig(architecture="mlp", hidden_sizes=(16,), code_size=4)
ONE_EPOCH = TrainingConfig(
    epochs=1, batch_size=64, noise="masking", noise_level=0.25, progress=False
)


def npz_pair(tmp_path, x, y):
    """The same arrays stored (mappable) and deflated (read whole)."""
    stored, deflated = tmp_path / "stored.npz", tmp_path / "deflated.npz"
    np.savez(stored, x=x, y=y)
    np.savez_compressed(deflated, x=x, y=y)
    return stored, deflated


def assert_same_cut(mapped, loaded):
    for name in ("train", "val", "test", "fit"):
        a, b = getattr(mapped, name), getattr(loaded, name)
        assert isinstance(a.x, MappedImages) and isinstance(b.x, np.ndarray)
        np.testing.assert_array_equal(np.asarray(a.x), b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert a.x.shape == b.x.shape and a.x.dtype == b.x.dtype == np.float32


def test_uncompressed_idx_files_are_mapped_and_cut_like_compressed_ones(tmp_path):
    images, labels = numbered_images(120)
    test_images, test_labels = numbered_images(30)
    for compress, folder in ((False, tmp_path / "plain"), (True, tmp_path / "gz")):
        write_idx_part(folder, "train", images, labels, compress)
        write_idx_part(folder, "t10k", test_images, test_labels, compress)
    mapped = load_dataset("mnist-idx", tmp_path / "plain", limit=100)
    loaded = load_dataset("mnist-idx", tmp_path / "gz", limit=100)
    assert_same_cut(mapped, loaded)
    assert mapped.source["sizes"] == loaded.source["sizes"]


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_stored_npz_images_are_mapped_and_read_like_deflated_ones(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (90, *shape)).astype(np.uint8)
    x = x if dtype == np.uint8 else (x / 255).astype(dtype)
    stored, deflated = npz_pair(tmp_path, x, np.arange(90) % 3)
    mapped, loaded = load_dataset("npz", stored), load_dataset("npz", deflated)
    assert_same_cut(mapped, loaded)
    assert mapped.raw_max == loaded.raw_max == (255.0 if dtype == np.uint8 else 1.0)
    rows = mapped.train.x
    np.testing.assert_array_equal(rows[3], loaded.train.x[3])  # one image
    np.testing.assert_array_equal(rows[2:5, 0, 1], loaded.train.x[2:5, 0, 1])  # and within


def test_mapped_rows_pickle_as_a_file_reference(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (2000, 28, 28)).astype(np.uint8)
    stored, _ = npz_pair(tmp_path, x, np.arange(2000) % 10)
    rows = load_dataset("npz", stored).train.x
    assert isinstance(rows, MappedImages)
    np.asarray(rows[:3])  # the mapping is open here: it must not travel
    payload = pickle.dumps(rows)
    assert len(payload) < x.nbytes / 50  # row positions, not pixels
    np.testing.assert_array_equal(pickle.loads(payload)[:], rows[:])


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_a_mapped_file_equals_training_on_it_read_whole(tmp_path, workers):
    x = np.random.default_rng(2).integers(0, 256, (300, 6, 6)).astype(np.uint8)
    stored, deflated = npz_pair(tmp_path, x, np.arange(300) % 3)
    losses = []
    for path in (stored, deflated):
        torch.manual_seed(0)
        data = load_dataset("npz", path)
        model = build_autoencoder(MLP, data.image_shape)
        config = TrainingConfig(**{**ONE_EPOCH.__dict__, "loader_workers": workers})
        trainer = Trainer(model, data, config, tmp_path / path.stem / str(workers), {})
        history = trainer.fit()["train"]
        losses.append((history["train_loss"], history["val_loss"]))
    assert losses[0] == losses[1]


def peak_numpy_bytes(path, run_dir) -> int:
    """Peak traced memory (numpy's arrays included) of loading `path` and one training epoch."""
    tracemalloc.start()
    try:
        data = load_dataset("npz", path, val_fraction=0.05)
        torch.manual_seed(0)
        Trainer(build_autoencoder(MLP, data.image_shape), data, ONE_EPOCH, run_dir, {}).fit()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_mapped_training_set_is_never_read_whole(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (4000, 28, 28)).astype(np.uint8)
    stored, deflated = npz_pair(tmp_path, x, np.arange(4000) % 10)
    as_floats = x.size * 4  # what reading the images whole costs: float32 pixels
    # The control: read whole, the loader holds every pixel as float32 at once.
    assert peak_numpy_bytes(deflated, tmp_path / "deflated") > as_floats
    # Mapped: the validation rows (5 %) and one batch at a time.
    assert peak_numpy_bytes(stored, tmp_path / "stored") < as_floats / 4
