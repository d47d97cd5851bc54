"""Snapshots of a running cell, so a preempted or interrupted cell continues where it was, not at step 0.

A snapshot holds everything the rest of the run depends on: the step reached, the rows logged so far,
the model's and the optimizer's state (the probe generator included), the loss scaler's, the random
states (torch, CUDA, numpy, Python) and how many batches the data stream has handed out, so the stream
is replayed to the same place.  A cell continued from its snapshot therefore logs the same curve as one
that was never stopped, on a deterministic task.  Files are written atomically and read with
``torch.load(weights_only=True)``: they hold tensors and plain values only, never pickled objects.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Snapshots", "capture_rng", "restore_rng"]


def capture_rng(device: str) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}


def restore_rng(state: dict[str, Any], device: str) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Snapshots:
    """The snapshot file of one cell: saved at most every ``every`` seconds, read back once."""

    def __init__(self, path: str | os.PathLike, every: float, identity: dict[str, Any]) -> None:
        self.path, self.every, self.identity = Path(path), every, identity
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none or it belongs to another configuration."""
        try:
            state = torch.load(self.path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("identity") == self.identity else None

    def maybe_save(self, capture: Callable[[], dict[str, Any]]) -> bool:
        """Save ``capture()`` if ``every`` seconds have passed since the last save (or the start)."""
        if time.monotonic() - self._last < self.every:
            return False
        self.save(capture())
        return True

    def save(self, state: dict[str, Any]) -> None:
        state = {**state, "identity": self.identity}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last = time.monotonic()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
