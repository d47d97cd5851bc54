"""Scaled variants really scale: the loss variant multiplies the objective, the params variant is a
pure re-parametrisation (same function, stored parameters multiplied), both through double backward."""

from __future__ import annotations

import math

import pytest
import torch

import tasks
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


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("task", BASE)
def test_params_variant_is_a_reparametrisation(task: str, factor: float) -> None:
    spec = tasks.get_task(f"{task}-params-x{scaled.format_factor(factor)}")
    base, variant = build_small(tasks.get_task(task)), build_small(spec)
    assert variant.param_scale == factor and variant.loss_scale == 1.0
    batch = next(base.batches)
    assert math.isclose(variant.loss(batch).item(), base.loss(batch).item(), rel_tol=1e-5)
    raw, ref = list(variant.model.parameters()), list(base.model.parameters())
    assert len(raw) == len(ref) and all(q.is_leaf and q.requires_grad for q in raw)
    for q, p in zip(raw, ref):
        torch.testing.assert_close(q, p * factor)
    # gradients with respect to q are those with respect to p divided by the factor (chain rule), and
    # the double-backward graph goes through the parametrisation
    loss = variant.loss(batch)
    grads = torch.autograd.grad(loss, raw, create_graph=True)
    ref_grads = torch.autograd.grad(base.loss(batch), ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g * factor, r, rtol=1e-4, atol=1e-6)
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
