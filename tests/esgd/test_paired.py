"""The paired estimate of (H z)^2 (``accumulate_hvp_pair``): against the float64 reference built from
explicit Hessians, its special cases, its expectation, the loss scale, and its refusals."""

from __future__ import annotations

import pytest
import torch

from esgd import ESGD, AdaHessian, ESGDMax, PlainESGD, Sophia
from esgd._base import paired_estimate

from .reference import esgd_m_reference, esgd_plain_reference, loss_fn, make_data, paired_squares
from .test_reference import assert_same_trajectory

STEPS = 30
HALVES = (slice(0, 1), slice(1, 2))      # two disjoint rows of each 4-row minibatch
COVERS = 0.5


def run_paired(make_opt, init, x, y, *, halves=HALVES, covers=COVERS, steps=STEPS, scale=1.0, loss_scale=None):
    """Train with a plain backward of the whole minibatch and, on HVP steps, the pair of ``halves``;
    ``loss_scale`` drives the step the way GradScaler does (scaled losses, ``grad_scale`` handed over)."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(params)
    probes, current = [], []
    draw = opt.draw_probe
    opt.draw_probe = lambda p: current.append(draw(p).clone()) or current[-1]
    s = 1.0 if loss_scale is None else loss_scale
    trajectory = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        (s * loss_fn(params, x, y, t, scale)).backward()
        if opt.is_hvp_step():
            opt.accumulate_hvp_pair(s * loss_fn(params, x, y, t, scale, halves[0]),
                                    s * loss_fn(params, x, y, t, scale, halves[1]), covers)
        if loss_scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(float(s)), torch.tensor(0.0)
        opt.step()
        for name in ("grad_scale", "found_inf"):
            if hasattr(opt, name):
                delattr(opt, name)
        if current:
            probes.append(list(current))
            current.clear()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, probes


HYPER = {"lr": 0.1, "betas": (0.9, 0.99), "v": None, "lr_warmup": 0.9, "eps": 1e-4, "weight_decay": 0.0}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("d_max", [False, True])
def test_esgd_m_pair_matches_reference(foreach, d_max):
    x, y, init = make_data(0)
    cls = ESGDMax if d_max else ESGD
    make = lambda ps: cls(ps, lr=0.1, betas=(0.9, 0.99), lr_warmup=0.9, update_d_every=3, d_warmup=4,  # noqa: E731
                          foreach=foreach, generator=torch.Generator().manual_seed(3))
    got, probes = run_paired(make, init, x, y)
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, groups=[([0, 1, 2], HYPER)],
                            update_d_every=3, d_warmup=4, d_max=d_max, squares=paired_squares(HALVES, COVERS))
    assert_same_trajectory(got, want)


def test_plain_esgd_pair_matches_reference():
    x, y, init = make_data(1)
    make = lambda ps: PlainESGD(ps, lr=0.05, eps=1e-4, update_d_every=4, d_warmup=3,  # noqa: E731
                                generator=torch.Generator().manual_seed(5))
    got, probes = run_paired(make, init, x, y)
    want = esgd_plain_reference(init, x, y, steps=STEPS, probes=probes, lr=0.05, eps=1e-4, update_d_every=4,
                                d_warmup=3, squares=paired_squares(HALVES, COVERS))
    assert_same_trajectory(got, want)


def test_where_the_halves_disagree_in_sign_the_estimate_is_floored_at_the_noise_term():
    """The reference comparisons above mean something only if both cases occurred."""
    x, y, init = make_data(0)
    params = [p.clone() for p in init]
    probes = [torch.ones_like(p) for p in params]
    from .reference import hvp
    a = torch.cat([h.reshape(-1) for h in hvp(params, x, y, 0, probes, part=HALVES[0])])
    b = torch.cat([h.reshape(-1) for h in hvp(params, x, y, 0, probes, part=HALVES[1])])
    e = paired_estimate([a.clone()], [b.clone()], COVERS)[0] ** 2
    noise = COVERS * ((a - b) / 2) ** 2
    disagree = a * b < 0
    assert disagree.any() and (~disagree).any()
    torch.testing.assert_close(e[disagree], noise[disagree], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(e[~disagree], (a * b + noise)[~disagree], rtol=1e-12, atol=0.0)
    assert (e[disagree] > 0).all()


def test_halves_covering_the_batch_give_the_whole_batch_square_where_they_agree_in_sign():
    """covers=1: e = ((a + b) / 2)^2, the whole batch's own squared product, where a b >= 0; where they
    disagree the floor ((a - b) / 2)^2 is above it."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    e = paired_estimate([a.clone()], [b.clone()], 1.0)[0] ** 2
    agree = a * b >= 0
    torch.testing.assert_close(e[agree], ((a + b) / 2)[agree] ** 2, rtol=1e-12, atol=1e-15)
    assert (e[~agree] > ((a + b) / 2)[~agree] ** 2).all() and agree.any() and (~agree).any()


def test_a_power_of_two_loss_scale_changes_nothing():
    """The two products are unscaled before they are multiplied, so GradScaler's scale drops out."""
    x, y, init = make_data(0)
    make = lambda ps: ESGD(ps, lr=0.1, update_d_every=3, d_warmup=4,  # noqa: E731
                           generator=torch.Generator().manual_seed(3))
    base, _ = run_paired(make, init, x, y)
    scaled, _ = run_paired(make, init, x, y, loss_scale=2.0 ** 12)
    assert_same_trajectory(scaled, base, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rows,covers", [(4, 0.25), (16, 0.5), (32, 1.0)])
def test_the_estimate_has_the_expectation_of_the_whole_batch_square(rows, covers):
    """Rows' products drawn i.i.d. (mean mu, sd sigma): the halves a, b are means of n rows each, the
    whole batch has B = 2n / covers rows, and E[a b + covers ((a - b) / 2)^2] = mu^2 + sigma^2 / B.
    The mean is far enough from zero that a b is almost never negative, so the floor does not bind."""
    gen = torch.Generator().manual_seed(0)
    trials, n = 200_000, rows // 2
    mu, sigma = 6.0, 2.0
    a = mu + sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64).mean(1)
    b = mu + sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64).mean(1)
    e = paired_estimate([a.clone()], [b.clone()], covers)[0] ** 2
    assert (a * b < 0).float().mean() < 1e-3
    whole = 2 * n / covers
    want = mu ** 2 + sigma ** 2 / whole
    stderr = e.std().item() / trials ** 0.5
    assert abs(e.mean().item() - want) < 4 * stderr
    # and the square of one half's product is visibly inflated, so the check can fail
    assert (a * a).mean().item() - want > 8 * stderr


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_optimizers_whose_curvature_is_not_the_square_refuse_the_pair(cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p])
    with pytest.raises(ValueError, match="paired estimate"):
        opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 3).sum(), 0.5)


@pytest.mark.parametrize("covers", [0, -0.5, 1.5, float("nan"), True])
def test_covers_is_a_fraction_of_the_batch(covers):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="covers"):
        ESGD([p]).accumulate_hvp_pair((p ** 3).sum(), (p ** 3).sum(), covers)


def test_one_pair_per_step_and_no_other_product():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ESGD([p])
    (p ** 3).sum().backward()
    opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 4).sum(), 0.5)
    with pytest.raises(RuntimeError, match="one pair per step"):
        opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 4).sum(), 0.5)
    with pytest.raises(RuntimeError, match="already has a paired estimate"):
        opt.accumulate_hvp((p ** 3).sum())
    opt.step()                                   # the pair is the step's estimate
    assert opt.state[p]["exp_avg_d_sq"].gt(0).all()


def test_no_pair_off_the_product_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ESGD([p], update_d_every=5, d_warmup=1)
    (p ** 3).sum().backward(create_graph=True)
    opt.step()
    p.grad = None
    (p ** 3).sum().backward()
    assert not opt.is_hvp_step()
    opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 4).sum(), 0.5)    # a no-op
    d = opt.state[p]["exp_avg_d_sq"].clone()
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg_d_sq"], d)


def test_the_documented_loop_runs():
    """docs/optimizer.md's paired-estimate loop, run as written on a small model."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parents[2] / "docs" / "optimizer.md").read_text()
    section = text[text.index("A paired estimate from two halves"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    loader = [(torch.randn(32, 4), torch.randint(0, 2, (32,))) for _ in range(6)]
    opt = ESGD(model.parameters(), lr=0.03, update_d_every=2, d_warmup=1)
    scope = {"model": model, "loader": loader, "opt": opt, "loss_fn": torch.nn.functional.cross_entropy}
    exec(compile("\n".join(line[2:] if line.startswith("  ") else line for line in code.splitlines()),
                 "optimizer.md", "exec"), scope)
    d = [opt.state[p]["exp_avg_d_sq"] for p in model.parameters()]
    assert all(x.gt(0).any() for x in d) and opt.steps_done == 6
