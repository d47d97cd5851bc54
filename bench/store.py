"""The results folder: what ``esgd-bench run`` writes, how it is kept whole, and how it is read back.

A results folder belongs to the suite.  ``manifest.json`` is written into it first; a folder that holds
files without one is never written into unless the user says so (``--force``), and a folder that already
holds results is only continued with ``--resume``.  While a run writes into a folder it holds an
exclusive lock (``.lock``), so a second run into the same folder stops at once with one line instead of
racing the first.

Each finished (or stopped) cell writes its own two files, ``cells/<cell>.csv`` (one metrics row per
step) and ``cells/<cell>.json`` (its summary row, written last: it is the cell's commit point).  The
merged views ``summary.csv`` and ``metrics.csv`` are rebuilt from the cell files after every cell, so
nothing a cell wrote can be lost by a later write, and a damaged merged file can always be rebuilt.
Every file is written to a temporary file in the same folder and moved into place with ``os.replace``,
which is atomic: a crash, Ctrl-C or a full disk leaves the old file or the new one, never half of one.

Reading a folder back, with its checks, is :mod:`bench.readers`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd

from .errors import BenchError, ResultsError, StoreWriteError

__all__ = ["METRICS_COLUMNS", "SUMMARY_COLUMNS", "CELL_KEY", "STATUSES", "FINISHED", "MANIFEST",
           "ResultsFolder", "write_text", "write_csv", "write_json", "write_figure", "check_folder",
           "check_output_file", "as_bool", "cell_key", "summary_frame", "metrics_frame", "read_json_object",
           "read_csv", "frames_from_cells", "read_cell_summaries", "is_results_folder"]

# The column contract (eval_<key> columns follow METRICS_COLUMNS, one per key of the task's evaluate()).
METRICS_COLUMNS = ["task", "optimizer", "lr", "seed", "step", "wall_time_s", "loss", "is_hvp_step",
                   "step_ms", "data_ms", "fwd_bwd_ms", "hvp_ms", "update_ms", "precision"]
SUMMARY_COLUMNS = ["task", "optimizer", "opt_name", "lr", "seed", "steps", "final_loss", "tail_loss", "eval_metric",
                   "eval_value", "test_metric", "test_value", "wall_time_s", "step_time_ms", "fwd_bwd_time_ms", "update_time_ms",
                   "hvp_time_ms", "mean_step_ms", "hvp_steps", "peak_mem_mb", "status", "data_source",
                   "synthetic", "device", "precision", "schedule", "error"]
CELL_KEY = ["task", "optimizer", "lr", "seed"]          # what identifies one cell of a grid
STATUSES = ("ok", "diverged", "interrupted", "error")
FINISHED = ("ok", "diverged")       # --resume keeps these; a diverged run is a result, not a failure
MANIFEST = "manifest.json"
FORMAT = 2
_CELLS = "cells"
_LOCK = ".lock"
_STORE_FILES = {MANIFEST, "meta.json", "summary.csv", "metrics.csv", _LOCK}
_UMASK = os.umask(0)
os.umask(_UMASK)

try:        # advisory locks; where fcntl is missing a run simply goes unlocked
    import fcntl
except ImportError:     # pragma: no cover - not POSIX
    fcntl = None


# -- writing files ------------------------------------------------------------------------------------
def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Write through a temporary file in the same folder and ``os.replace`` it onto ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    except OSError as err:
        raise StoreWriteError(f"cannot write {path}: {_why(err)}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)     # mkstemp's 0600 would make results private to the writer
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "",
                                                                         "encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise StoreWriteError(f"cannot write {path}: {_why(err)}") from None
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text))


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """``df`` without its index; the old file stays whole if anything fails on the way."""
    return _atomic(path, lambda fh: df.to_csv(fh, index=False))


def write_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """A matplotlib figure in the format its suffix names (``.png``, ``.svg``, ``.pdf``)."""
    fmt = Path(path).suffix.lower()[1:]
    return _atomic(path, lambda fh: fig.savefig(fh, format=fmt, bbox_inches="tight", **savefig), binary=True)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Indented JSON; non-finite floats become null so the file stays valid JSON."""
    text = json.dumps(_json_safe(obj), indent=2, default=str) + "\n"
    return write_text(path, text)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):    # numpy scalars
        return _json_safe(obj.item())
    return obj


def check_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it writable with a probe file; one-line error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BenchError(f"cannot write to {what} {path}: {_why(err)}") from None
    return path


def is_results_folder(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or ((folder / "summary.csv").is_file()
                                             and (folder / "meta.json").is_file())


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str], option: str = "--out") -> Path:
    """An output file the user named: a known suffix, a folder that exists and is writable, and not
    one of a results folder's own files (writing a table over ``summary.csv`` would ruin the folder)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise BenchError(f"{option} {path}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(suffixes)}")
    if len(os.fsencode(path.name)) > 255:
        raise BenchError(f"{option} {path}: {os.strerror(errno.ENAMETOOLONG)}")
    try:
        if not path.parent.is_dir():
            raise BenchError(f"{option} {path}: folder {path.parent} does not exist")
        parent = path.parent
        cell_file = parent.name == _CELLS and is_results_folder(parent.parent)
        if cell_file or is_results_folder(parent) and (path.name in _STORE_FILES or path.name.startswith(".tmp-")):
            owner = parent.parent if cell_file else parent
            raise BenchError(f"{option} {path}: that is a file of the results folder {owner}; choose another name")
    except OSError as err:      # a path too long to look at, say
        raise BenchError(f"{option} {path}: {_why(err)}") from None
    check_folder(path.parent, f"the folder of {option} {path}:")
    return path


def as_bool(values: pd.Series) -> pd.Series:
    """Booleans as CSV files spell them (``True``, ``true``, ``1``, ``1.0``) back to ``bool``."""
    return values.astype(str).str.strip().str.lower().isin({"true", "1", "1.0"})


def cell_key(task: str, optimizer: str, lr: float, seed: int) -> tuple:
    """The identity of a cell; the lr rounded so a value read back from CSV matches the planned one."""
    return (str(task), str(optimizer), round(float(lr), 15), int(seed))


def _cell_file_stem(key: tuple) -> str:
    text = f"{key[0]}__{key[1]}__lr{key[2]:g}__s{key[3]}"
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:80]
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def summary_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    return df.reindex(columns=SUMMARY_COLUMNS + [c for c in df.columns if c not in SUMMARY_COLUMNS])


def metrics_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Metrics with the contract's columns first and the ``eval_*`` columns sorted after them."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    evals = sorted(c for c in df.columns if c.startswith("eval_"))
    extra = [c for c in df.columns if c not in METRICS_COLUMNS and c not in evals]
    return df.reindex(columns=METRICS_COLUMNS + evals + extra)


# -- the folder a run writes ---------------------------------------------------------------------------
class ResultsFolder:
    """A results folder opened for writing by one process: checked, marked and locked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells = path / _CELLS
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, resume: bool = False, force: bool = False) -> "ResultsFolder":
        """Check that ``path`` may be written as asked, create it, take its lock, write the manifest."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BenchError(f"cannot write to output folder {path}: it is a file")
        check_folder(path)
        folder = cls(path)
        folder._check(resume, force)      # before the lock file: a folder that is not ours stays as it was
        folder._lock()
        try:
            folder._check(resume, force)  # again, now that no other writer can change it
            if not (path / MANIFEST).is_file():
                write_json({"kind": "esgd-bench results", "format": FORMAT}, path / MANIFEST)
            folder.cells.mkdir(exist_ok=True)
        except BaseException:
            folder.close()
            raise
        return folder

    def _check(self, resume: bool, force: bool) -> None:
        path = self.path
        names = sorted(p.name for p in path.iterdir() if p.name not in (_LOCK,) and not p.name.startswith(".write-test-"))
        if not names:
            return
        if (path / MANIFEST).is_file():
            if self.summaries() and not resume:
                raise BenchError(f"{path} already holds results: pass --resume to continue it, or choose "
                                 "another --out")
            return
        if is_results_folder(path):
            raise BenchError(f"{path} holds results of an older esgd-bench (no {MANIFEST}); choose another "
                             "--out")
        if not force:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise BenchError(f"{path} holds files esgd-bench did not write ({shown}); choose a new or empty "
                             "--out, or pass --force to write into it anyway")

    def _lock(self) -> None:
        if fcntl is None:
            return
        lock = self.path / _LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as err:
            raise BenchError(f"cannot write to output folder {self.path}: {_why(err)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BenchError(f"{self.path} is being written by another esgd-bench process (pid {holder}); "
                             "wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    @contextlib.contextmanager
    def locked(self, timeout: float = 300.0) -> Iterator[None]:
        """Hold the folder's lock for a short write (a cluster task rebuilding the merged files), waiting
        for another writer to finish; a folder this object already holds is simply written."""
        if fcntl is None or self._lock_fd is not None:
            yield
            return
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > end:
                        raise StoreWriteError(f"{self.path} stayed locked by another writer for {timeout:g} s") \
                            from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # closing the descriptor releases the lock
            self._lock_fd = None

    def __enter__(self) -> "ResultsFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- cells --
    def write_cell(self, summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
        """One cell's metrics, then its summary (the commit point); a rerun replaces both."""
        stem = _cell_file_stem(cell_key(*(summary[k] for k in CELL_KEY)))
        write_csv(metrics_frame(rows) if rows else metrics_frame([]), self.cells / f"{stem}.csv")
        write_json({"format": FORMAT, "written": time.time(), "summary": summary}, self.cells / f"{stem}.json")

    def snapshot_path(self, key: tuple) -> Path:
        """Where a running cell keeps its snapshot (removed when the cell ends other than interrupted)."""
        return self.cells / f"{_cell_file_stem(cell_key(*key))}.snapshot"

    def summaries(self) -> list[dict[str, Any]]:
        """The summary row of every cell in the folder."""
        return [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_cell_summaries(self.path)]

    def rebuild(self, order: Sequence[tuple] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Write ``summary.csv`` and ``metrics.csv`` from the cell files; planned cells first, in
        ``order``, then any others the folder holds.  Returns ``(summary, metrics)``."""
        summary, metrics = frames_from_cells(self.path, order)
        write_csv(metrics, self.path / "metrics.csv")
        write_csv(summary, self.path / "summary.csv")
        return summary, metrics

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(meta, self.path / "meta.json")


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ResultsError(f"cannot read {path}: {_why(err)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} is not an esgd-bench file: expected a JSON object, found "
                           f"{type(data).__name__}")
    return data


def read_cell_summaries(folder: Path) -> list[dict[str, Any]]:
    out = []
    cells = folder / _CELLS
    for path in sorted(cells.glob("*.json")) if cells.is_dir() else []:
        data = read_json_object(path)
        row = data.get("summary")
        if not isinstance(row, dict) or any(k not in row for k in CELL_KEY + ["status"]):
            raise ResultsError(f"{path} is not an esgd-bench cell file (no summary with "
                               f"{', '.join(CELL_KEY + ['status'])})")
        out.append({**row, "_stem": path.stem, "_written": data.get("written", 0)})
    return out


def frames_from_cells(folder: Path, order: Sequence[tuple] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = read_cell_summaries(folder)
    rank = {key: i for i, key in enumerate(order)}
    rows.sort(key=lambda r: (rank.get(cell_key(*(r[k] for k in CELL_KEY)), len(rank)), r["_written"]))
    metrics = []
    for r in rows:
        r.pop("_written")
        path = folder / _CELLS / f"{r.pop('_stem')}.csv"
        part = read_csv(path, ("task", "optimizer", "lr", "seed", "step"), "metrics")
        if len(part):
            metrics.append(part)
    summary = summary_frame(rows) if rows else summary_frame([])
    frame = metrics_frame(pd.concat(metrics, ignore_index=True)) if metrics else metrics_frame([])
    return summary, frame


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def read_csv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """A CSV with ``required`` columns, every one of them filled in on every row, and whole: the suite
    ends every file it writes with a newline, so a last line without one was cut short."""
    try:
        whole = _ends_with_newline(path)
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ResultsError(f"no {path.name} in {path.parent} (not an esgd-bench results folder?)") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(required))
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not whole:
        raise ResultsError(f"{path} is damaged: line {len(df) + 1} is cut short (was the file cut off?)")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ResultsError(f"{path} is not an esgd-bench {what} file (no column {', '.join(missing)})")
    if len(df):
        bad = df[list(required)].isna().any(axis=1)
        if "status" in required:
            bad |= ~df["status"].isin(STATUSES)
        if "lr" in required:
            bad |= pd.to_numeric(df["lr"], errors="coerce").isna()
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2     # the header is line 1
            raise ResultsError(f"{path} is damaged: line {line} is incomplete or invalid (was the file "
                               "cut short?)")
    return df
