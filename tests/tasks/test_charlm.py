"""The byte-level language model task: its corpus (fixed, identified, split without overlap), the
data_file option and its errors, the unigram baseline, fixed evaluation windows, and bits per byte."""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tasks
from bench.train import train
from cli import app
from tasks import TaskConfig, TaskDataError, TaskOptionError, charlm, text

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"layers": 1, "width": 32, "heads": 2, "context": 16, "eval_windows": 32}


def build(**options) -> tasks.Problem:
    return tasks.build_task("charlm", TaskConfig(batch_size=4, options={**SMALL, **options}))


def test_the_stdlib_corpus_is_the_listed_files_in_order() -> None:
    """The digest in the info is that of the listed files read afresh, so it is stable across builds."""
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = b"".join((root / name).read_bytes() for name in text.STDLIB_FILES)
    first, second = build(), build(context=32)
    for problem in (first, second):
        info = problem.info
        assert info["corpus"] == "python-stdlib" and info["files"] == list(text.STDLIB_FILES)
        assert info["sha256"] == hashlib.sha256(expected).hexdigest() and info["bytes"] == len(expected)
        assert info["python"] and "standard library" in problem.data_source and not problem.synthetic
    assert len(expected) > 1_500_000


def test_splits_are_contiguous_disjoint_and_cover_the_corpus() -> None:
    corpus = text.stdlib_corpus(context=16)
    whole = torch.cat([corpus.train, corpus.val, corpus.test])
    assert hashlib.sha256(whole.numpy().tobytes()).hexdigest() == corpus.info["sha256"]
    n = len(whole)
    assert len(corpus.val) == len(corpus.test) == int(n * 0.05)
    assert len(corpus.train) == n - 2 * len(corpus.val)
    assert corpus.info["split_bytes"] == {"train": len(corpus.train), "val": len(corpus.val),
                                          "test": len(corpus.test)}


def marked_file(tmp_path: Path) -> Path:
    """A file whose train, validation and test blocks are told apart by their bytes."""
    body = b"abcdefghijklmnopqrstuvwxyz\n" * 300
    held = int((len(body) / 0.9) * 0.05)
    path = tmp_path / "marked.txt"
    path.write_bytes(body + b"0123456789" * (held // 10) + b"ABCDEFGHIJ" * (held // 10))
    return path


def test_data_file_gives_its_own_corpus_and_windows_stay_in_their_split(tmp_path: Path) -> None:
    path = marked_file(tmp_path)
    problem = build(data_file=str(path))
    info = problem.info
    assert info["corpus"] == "file" and info["data_file"] == str(path.resolve())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in problem.data_source and not problem.synthetic
    corpus = text.file_corpus(path, 16)
    assert set(corpus.val.tolist()) == set(b"0123456789") and set(corpus.test.tolist()) == set(b"ABCDEFGHIJ")
    for _ in range(20):
        x, y = next(problem.batches)
        assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
        assert set(x.flatten().tolist()) <= set(b"abcdefghijklmnopqrstuvwxyz\n")
    vx, vy = text.tiling_windows(corpus.val, 16)
    assert set(vy.flatten().tolist()) <= set(b"0123456789")
    # the windows tile the block: every byte after the first is a target once
    assert torch.equal(vy.flatten(), corpus.val[1:1 + vy.numel()].long())


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read data_file"),
    (b"tiny text\n", "too few"),
    (b"\xff\xfe" + b"x" * 5000, "not UTF-8"),
])
def test_bad_data_file_is_one_clear_line(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TaskDataError, match=fragment) as info:
        build(data_file=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unigram_entropy_is_a_sane_baseline() -> None:
    problem = build()
    assert 3.0 < problem.info["unigram_bpb"] < 8.0
    synthetic = tasks.build_task("charlm", TaskConfig(synthetic=True, batch_size=4, options=SMALL))
    assert synthetic.synthetic and "synthetic" in synthetic.data_source
    assert 7.99 < synthetic.info["unigram_bpb"] <= 8.0
    assert problem.reference is not None and problem.reference[1] == problem.info["unigram_bpb"]


def test_run_prints_the_score_to_beat(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "charlm", "--opt", "adam", "--seeds", "1", "--steps", "2",
                                      "--batch-size", "4", "--out", str(tmp_path / "r"),
                                      *[f"--option={k}={v}" for k, v in SMALL.items()]])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "to beat" in x)
    value = float(line.split("to beat:")[1].split(",")[0])
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())["tasks"]["charlm"]
    assert meta["reference"]["value"] == pytest.approx(value, rel=1e-3)
    assert 3.0 < value < 8.0 and "unigram entropy" in line


def test_validation_and_test_windows_are_fixed() -> None:
    problem = build()
    first = problem.evaluate()
    for _ in range(3):
        next(problem.batches)          # drawing batches moves nothing that evaluation reads
    assert problem.evaluate() == first and set(first) == {"val_bpb", "val_loss"}
    assert math.isclose(first["val_bpb"], first["val_loss"] / math.log(2))
    result = problem.test()
    assert set(result) == {"test_bpb", "test_loss"} and problem.model.training
    assert problem.test() == result
    corpus = text.stdlib_corpus(16)
    a, b = text.tiling_windows(corpus.val, 16, 32), text.tiling_windows(corpus.val, 16, 32)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a[0]) == 32


def test_bits_per_byte_of_a_uniform_model_is_eight() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*idx.shape, 256)

    windows = text.tiling_windows(text.stdlib_corpus(16).test, 16, 10)
    assert math.isclose(text.bits_per_byte(Uniform(), windows, "x")["x_bpb"], 8.0, rel_tol=1e-6)


def test_attention_is_causal_and_the_head_is_tied() -> None:
    model = charlm.CharGPT(layers=2, width=32, heads=4, context=16)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])
    assert sum(p.numel() for p in model.parameters()) == 256 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    default = charlm.CharGPT(**{k: charlm.OPTIONS[k] for k in ("layers", "width", "heads", "context")})
    assert 0.83e6 < sum(p.numel() for p in default.parameters()) < 0.85e6    # as the description says


def test_width_must_split_into_heads() -> None:
    with pytest.raises(TaskOptionError, match="multiple of heads"):
        build(width=30, heads=4)


@pytest.mark.parametrize("opt", ["esgd-m", "adam"])
def test_the_runner_trains_it(opt: str) -> None:
    """Through the runner's step route, which takes the math kernel on product steps only."""
    result = train("charlm", opt, steps=4, eval_every=2, task_config=TaskConfig(batch_size=4, options=SMALL))
    assert result.summary["status"] == "ok", result.summary["error"]
    assert math.isfinite(result.summary["eval_value"])
