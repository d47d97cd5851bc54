"""Scaled variants really scale: the loss variant multiplies the objective, the params variant is a
pure re-parametrisation (same function, stored parameters multiplied), both through double backward."""

from __future__ import annotations

import math

import pytest
import torch

import tasks
from esgd import hvp_attention
from tasks import scaled

from .helpers import build_small, train

BASE = [t.name for t in tasks.list_tasks(variants=False)]
FACTORS = [1000.0, 1e-3]


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("task", BASE)
def test_loss_variant_multiplies_the_loss(task: str, factor: float) -> None:
    spec = tasks.get_task(f"{task}-loss-x{scaled.format_factor(factor)}")
    base, variant = build_small(tasks.get_task(task)), build_small(spec)
    batch = next(base.batches)
    assert variant.loss_scale == factor and spec.base == task
    assert math.isclose(variant.loss(batch).item(), factor * base.loss(batch).item(), rel_tol=1e-5)


def _to_double(batch):
    """A batch with its floating tensors in float64 (labels and ``None`` batches as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_double(b) for b in batch)
    return batch


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("task", BASE)
def test_params_variant_is_a_reparametrisation(task: str, factor: float) -> None:
    """Same function, stored parameters multiplied, gradients divided (chain rule).

    The stored values are checked as built, in float32.  The function and its gradients are compared
    in float64, with the base model evaluated at exactly the point the variant computes with (q / n,
    divided here, not by the parametrisation): float32 is no place for this.  There the two graphs'
    rounding differs, and deep tasks amplify it (ResNet-20 on a batch of 8: BatchNorm backward cancels,
    a ReLU whose input is within rounding of 0 switches) to 5e-4 absolute on an AVX-512 CPU, an amount
    that depends on the kernels oneDNN picks; and even in float64 the float32 rounding of the stored
    q = n * p, relative 2**-24, reaches the loss times the task's conditioning (2e-7 on Rosenbrock).
    At the same point in float64 only kernel rounding is left: about 2**-53 times that amplification,
    <= 1e-12, so the tolerances below keep a margin of 100 and still see a chain rule off by 1e-8.
    """
    spec = tasks.get_task(f"{task}-params-x{scaled.format_factor(factor)}")
    base, variant = build_small(tasks.get_task(task)), build_small(spec)
    assert variant.param_scale == factor and variant.loss_scale == 1.0
    raw, ref = list(variant.model.parameters()), list(base.model.parameters())
    assert len(raw) == len(ref) and all(q.is_leaf and q.requires_grad for q in raw)
    for q, p in zip(raw, ref):
        # one float32 product each, correctly rounded on any CPU; no absolute slack, which would
        # swallow the whole value at factor 1e-3
        torch.testing.assert_close(q, p * factor, rtol=1e-6, atol=0)
    batch = _to_double(next(base.batches))
    base.model.double(), variant.model.double()
    raw, ref = list(variant.model.parameters()), list(base.model.parameters())
    assert all(t.dtype == torch.float64 for t in (*raw, *ref))
    with torch.no_grad():
        for q, p in zip(raw, ref):
            p.copy_(q / factor)
    with hvp_attention(True):      # attention's fused kernels cannot be differentiated twice
        loss, ref_loss = variant.loss(batch), base.loss(batch)
    assert loss.dtype == ref_loss.dtype == torch.float64
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-10)
    # gradients with respect to q are those with respect to p divided by the factor, and the
    # double-backward graph goes through the parametrisation
    grads = torch.autograd.grad(loss, raw, create_graph=True)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g * factor, r, rtol=1e-9, atol=1e-10)
    hvp = torch.autograd.grad(grads, raw, [torch.ones_like(q) for q in raw], allow_unused=True)
    assert all(h is None or torch.isfinite(h).all() for h in hvp)


@pytest.mark.parametrize("name", ["quadratic", "quadratic-loss-x1000", "quadratic-params-x0.001",
                                  "quadratic-params-x1000"])
def test_exact_hessian_is_exposed_and_scaled(name: str) -> None:
    problem = tasks.build_task(name)
    (q,) = problem.model.parameters()
    (key,) = dict(problem.model.named_parameters())      # "x", or the parametrisation's "original"
    x0 = q.detach().clone() + 0.1                         # a quadratic's Hessian is the same everywhere
    hessian = torch.autograd.functional.hessian(
        lambda x: torch.func.functional_call(problem.model, {key: x}, ()) * problem.loss_scale, x0)
    expected = problem.info["hessian"]
    assert not torch.allclose(expected, torch.diag(torch.diagonal(expected)))   # really non-diagonal
    torch.testing.assert_close(hessian, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["rosenbrock", "quadratic"])
def test_esgd_m_follows_the_same_path_on_scaled_variants(name: str) -> None:
    """End to end through the wrappers: ESGD-M is scale invariant up to eps effects, SGD is not.

    Factors are chosen so that eps stays negligible against the curvature (loss x1000, params x0.001).
    """
    def unscaled_path(task: str, opt: str) -> list[float]:
        problem = tasks.build_task(task)
        train(problem, task, opt, steps=30)
        return [p.detach() / problem.param_scale for p in problem.model.parameters()]

    for opt, invariant in [("esgd-m", True), ("sgd", False)]:
        ref = unscaled_path(name, opt)
        for variant in (f"{name}-loss-x1000", f"{name}-params-x0.001"):
            got = unscaled_path(variant, opt)
            same = all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(ref, got))
            assert same == invariant, f"{opt} on {variant}"


def test_names() -> None:
    assert scaled.parse_name("mnist-loss-x1e-3") == ("mnist", "loss", 0.001)
    assert scaled.parse_name("rosenbrock-params-x1000") == ("rosenbrock", "params", 1000.0)
    assert scaled.parse_name("mnist") is None
    assert tasks.get_task("mnist-loss-x1e-3").name == "mnist-loss-x0.001"
    assert tasks.get_task("cifar-params-x1e6").name == "cifar-params-x1000000"
    assert tasks.get_task("cifar-params-x1e-7").name == "cifar-params-x1e-7"
    for bad in ("mnist-loss-x0", "mnist-loss-xabc", "mnist-params-xinf"):
        with pytest.raises(tasks.UnknownTaskError, match="positive finite"):
            tasks.get_task(bad)
    with pytest.raises(ValueError, match="already a scaled variant"):
        scaled.scaled_task(tasks.get_task("mnist-loss-x10"), "params", 10.0)
    listed = {t.name for t in tasks.list_tasks()}
    for base in tasks.list_tasks(variants=False):
        assert {f"{base.name}-{k}-x{f}" for k in ("loss", "params") for f in ("1000", "0.001")} <= listed
