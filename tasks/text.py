"""Byte-level text for the language-model task: a corpus that is there offline, its splits, batches and
bits per byte.

The default corpus is real text that every Python installation carries: a fixed list of the standard
library's own source files (:data:`STDLIB_FILES`, each present in CPython 3.10 to 3.13), read from the
running interpreter and concatenated in the listed order.  The sources change between Python releases,
so the corpus is one per interpreter: its SHA-256 and the Python version go into the task's info, and
two runs are comparable when their digests match.  Any text file can replace it (``data_file``), and
uniform random bytes of the same size serve timing runs, labelled synthetic.

The corpus is cut into three contiguous blocks, 90% train, 5% validation and 5% test, in that order,
so no byte is in two splits.  Training batches are windows at random offsets of the train block, drawn
from a ``torch.Generator`` seeded with the run seed.  Evaluation uses fixed windows that tile a block:
window ``i`` predicts bytes ``i*C+1 .. i*C+C`` from the bytes before them, so every byte of the block
after the first is predicted once, with between 0 and ``C-1`` bytes of context.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import TaskDataError

__all__ = ["Corpus", "STDLIB_FILES", "stdlib_corpus", "file_corpus", "synthetic_corpus", "unigram_bpb",
           "window_batches", "tiling_windows", "bits_per_byte"]

# Modules that are one file in every CPython from 3.10 to 3.13: pathlib, re, zipfile and sysconfig,
# packages in some of those releases, are left out, as are the modules 3.12 and 3.13 removed and those
# that distributions package separately (tkinter, turtle).  About 2.3 MB; the order is fixed, so the
# held-out 10% is always the end of the last few files.
STDLIB_FILES = (
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "email/message.py",
    "enum.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py",
    "http/client.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py",
    "logging/__init__.py", "mailbox.py", "optparse.py", "pickle.py", "pprint.py", "pydoc.py", "queue.py",
    "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
    "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py",
    "unittest/case.py", "uuid.py", "weakref.py",
)
FRACTIONS = (0.90, 0.05, 0.05)
SYNTHETIC_SEED = 20260101      # fixed: the synthetic corpus is one stream, whatever the run seed
SYNTHETIC_BYTES = 2 ** 21


@dataclass
class Corpus:
    """A byte corpus cut into contiguous ``uint8`` blocks, with what identifies it."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    source: str
    synthetic: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> "Corpus":
        self.train, self.val, self.test = (t.to(device) for t in (self.train, self.val, self.test))
        return self


def _split(data: bytes, context: int, source: str, synthetic: bool, info: dict[str, Any]) -> Corpus:
    n = len(data)
    held = int(n * FRACTIONS[1])
    need = math.ceil((context + 1) / FRACTIONS[1])
    if held < context + 1:
        raise TaskDataError(f"charlm: {source} has {n:,} bytes, too few for context={context}: validation and "
                            f"test take 5% each and need a window of {context + 1} bytes, so at least "
                            f"{need:,} bytes; use a larger data_file or a smaller context")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    train, val, test = tokens[:n - 2 * held], tokens[n - 2 * held:n - held], tokens[n - held:]
    info = {**info, "bytes": n, "sha256": hashlib.sha256(data).hexdigest(),
            "split_bytes": {"train": len(train), "val": len(val), "test": len(test)}}
    return Corpus(train, val, test, source, synthetic, info)


@functools.lru_cache(maxsize=2)
def _stdlib_bytes(root: str) -> bytes:
    parts = []
    for name in STDLIB_FILES:
        path = Path(root) / name
        try:
            parts.append(path.read_bytes())
        except OSError as err:
            raise TaskDataError(f"charlm: this Python's standard library source {path} cannot be read "
                                f"({err.strerror or err}); point the data_file option at a text file "
                                "instead, or use --synthetic for timing") from None
    return b"".join(parts)


def stdlib_corpus(context: int) -> Corpus:
    """The listed standard-library sources of the running interpreter, concatenated."""
    data = _stdlib_bytes(sysconfig.get_paths()["stdlib"])
    version = platform.python_version()
    source = (f"Python {version} standard library source ({len(STDLIB_FILES)} files, {len(data) / 1e6:.2f} MB; "
              "90/5/5 contiguous train/val/test)")
    info = {"corpus": "python-stdlib", "python": version,
            "python_implementation": platform.python_implementation(), "files": list(STDLIB_FILES)}
    return _split(data, context, source, False, info)


def file_corpus(path: str | Path, context: int) -> Corpus:
    """Any UTF-8 text file, as its bytes."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TaskDataError(f"charlm: cannot read data_file {path} ({err.strerror or err})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"charlm: data_file {path} is not UTF-8 text (byte {err.start:,} is not valid "
                            "UTF-8)") from None
    return _split(data, context, f"data_file {path}", False, {"corpus": "file", "data_file": str(path.resolve())})


def synthetic_corpus(context: int) -> Corpus:
    """Uniform random bytes from a fixed seed: the real corpus's cost, and nothing to learn."""
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    data = torch.randint(0, 256, (SYNTHETIC_BYTES,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    return _split(data, context, "synthetic (uniform random bytes, nothing to learn: for timing only)", True,
                  {"corpus": "synthetic"})


def unigram_bpb(block: torch.Tensor) -> float:
    """Entropy of the block's byte frequencies in bits per byte: what a model that ignores context
    achieves at best, so the bar a language model has to clear."""
    p = torch.bincount(block.flatten().long().cpu(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def window_batches(block: torch.Tensor, context: int, batch_size: int,
                   seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(inputs, targets)`` batches of ``batch_size`` windows at random offsets of ``block``;
    targets are the inputs shifted by one byte.  A batch size below 1 raises here, when the task is built."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return _windows(block, context, batch_size, seed)


def _windows(block: torch.Tensor, context: int, batch_size: int,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1, device=block.device)
    while True:
        starts = torch.randint(0, len(block) - context, (batch_size, 1), generator=gen).to(block.device)
        window = block[starts + offsets].long()
        yield window[:, :-1], window[:, 1:]


def tiling_windows(block: torch.Tensor, context: int, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows that tile ``block`` (see the module docstring); with ``limit``, that many of them,
    evenly spaced through the block.  The same block always gives the same windows."""
    starts = torch.arange(0, len(block) - context, context, device=block.device)
    if 0 < limit < len(starts):
        starts = starts[torch.linspace(0, len(starts) - 1, limit, device=block.device).round().long()]
    window = block[starts[:, None] + torch.arange(context + 1, device=block.device)].long()
    return window[:, :-1], window[:, 1:]


def bits_per_byte(model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor], prefix: str,
                  chunk: int = 64) -> dict[str, float]:
    """Mean cross-entropy of the windows' targets in nats (``<prefix>_loss``) and in bits per byte
    (``<prefix>_bpb``), in eval mode and without gradients; restores the model's mode."""
    x, y = windows
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(x), chunk):
                logits = model(x[start:start + chunk])
                total += F.cross_entropy(logits.flatten(0, 1).float(), y[start:start + chunk].flatten(),
                                         reduction="sum").item()
    finally:
        model.train(was_training)
    nats = total / y.numel()
    return {f"{prefix}_bpb": nats / math.log(2), f"{prefix}_loss": nats}
