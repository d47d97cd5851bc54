"""The paired estimate of (H z)^2 (``accumulate_hvp_pair``): against the float64 reference built from
explicit Hessians, its special cases, its expectation, the loss scale, and its refusals."""

from __future__ import annotations

import pytest
import torch

from esgd import ESGD, AdaHessian, ESGDMax, PlainESGD, Sophia
from esgd._base import paired_estimate

from .reference import (esgd_m_reference, esgd_plain_reference, exact_squares, loss_fn, make_data,
                        paired_squares)
from .test_reference import assert_same_trajectory

STEPS = 30
HALVES = (slice(0, 1), slice(1, 2))      # two disjoint rows of each 4-row minibatch
COVERS = 0.5


def run_paired(make_opt, init, x, y, *, halves=HALVES, covers=COVERS, steps=STEPS, scale=1.0, loss_scale=None,
               start=0, exact_steps=()):
    """Train with a plain backward of the whole minibatch and, on HVP steps, the pair of ``halves``
    (on those in ``exact_steps``, the whole minibatch's exact product instead); ``loss_scale`` drives the
    step the way GradScaler does (scaled losses, ``grad_scale`` handed over)."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(params)
    probes, current = [], []
    draw = opt.draw_probe
    opt.draw_probe = lambda p: current.append(draw(p).clone()) or current[-1]
    s = 1.0 if loss_scale is None else loss_scale
    trajectory = []
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        exact = t in exact_steps
        (s * loss_fn(params, x, y, t, scale)).backward(create_graph=exact and opt.should_create_graph())
        if opt.is_hvp_step() and not exact:
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


def mixed_squares(paired_steps):
    """The reference's estimate: the pair's on ``paired_steps``, the exact square on other product steps."""
    pair = paired_squares(HALVES, COVERS)
    return lambda params, x, y, t, probes, scale: (
        pair if t in paired_steps else exact_squares)(params, x, y, t, probes, scale)


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


def test_both_the_average_and_its_floor_set_denominators_in_the_reference_runs():
    """The reference comparisons above mean something only if single estimates went negative and, at
    the end, some elements' denominators come from the floor and others from the average."""
    x, y, init = make_data(0)
    params = [p.clone() for p in init]
    probes = [torch.ones_like(p) for p in params]
    from .reference import hvp
    a = torch.cat([h.reshape(-1) for h in hvp(params, x, y, 0, probes, part=HALVES[0])])
    b = torch.cat([h.reshape(-1) for h in hvp(params, x, y, 0, probes, part=HALVES[1])])
    squares, floors = paired_estimate([a.clone()], [b.clone()], COVERS)
    torch.testing.assert_close(floors[0], COVERS * ((a - b) / 2) ** 2, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(squares[0], a * b + floors[0], rtol=1e-12, atol=0.0)
    assert (squares[0] < 0).any() and (squares[0] > 0).any()
    opt = None

    def make(ps):
        nonlocal opt
        opt = ESGD(ps, lr=0.1, betas=(0.9, 0.99), lr_warmup=0.9, update_d_every=3, d_warmup=4,
                   generator=torch.Generator().manual_seed(3))
        return opt
    run_paired(make, init, x, y)
    d = torch.cat([s["exp_avg_d_sq"].reshape(-1) for s in opt.state.values()])
    floor = torch.cat([s["exp_avg_d_floor"].reshape(-1) for s in opt.state.values()])
    assert (d < floor).any() and (d > floor).any()


def test_halves_covering_the_batch_give_the_whole_batch_square():
    """covers=1: a b + ((a - b) / 2)^2 = ((a + b) / 2)^2, the whole batch's own squared product,
    whatever the signs."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    squares, floors = paired_estimate([a.clone()], [b.clone()], 1.0)
    torch.testing.assert_close(squares[0], ((a + b) / 2) ** 2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(floors[0], ((a - b) / 2) ** 2, rtol=1e-12, atol=1e-15)
    assert (a * b < 0).any()


def test_exact_products_after_paired_ones_match_the_reference():
    """A loop may pair some steps and take the exact product on others: exact squares go into the
    average, nothing into the floor, which keeps decaying."""
    x, y, init = make_data(2)
    paired_steps = {0, 2, 3, 9}
    product_steps = {t for t in range(STEPS) if t < 4 or (t - 3) % 3 == 0}     # d_warmup=4, every 3
    assert paired_steps <= product_steps
    make = lambda ps: ESGD(ps, lr=0.1, betas=(0.9, 0.99), lr_warmup=0.9, update_d_every=3, d_warmup=4,  # noqa: E731
                           generator=torch.Generator().manual_seed(3))
    got, probes = run_paired(make, init, x, y, exact_steps=product_steps - paired_steps)
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, groups=[([0, 1, 2], HYPER)],
                            update_d_every=3, d_warmup=4, squares=mixed_squares(paired_steps))
    assert_same_trajectory(got, want)


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_a_paired_run_resumes_exactly(cls):
    """The floor is state: saved and loaded with the rest, the resumed run is the uninterrupted one."""
    x, y, init = make_data(0)
    make = lambda ps: cls(ps, lr=0.05, update_d_every=3, d_warmup=4,  # noqa: E731
                          generator=torch.Generator().manual_seed(3))
    whole, _ = run_paired(make, init, x, y, steps=16)
    holder = {}

    def keep(ps):
        holder["opt"] = make(ps)
        return holder["opt"]
    first, _ = run_paired(keep, init, x, y, steps=8)
    saved = holder["opt"].state_dict()
    resumed_init = first[-1]

    def restore(ps):
        opt = make(ps)
        opt.load_state_dict(saved)
        return opt
    rest, _ = run_paired(restore, resumed_init, x, y, steps=8, start=8)
    assert_same_trajectory(first + rest, whole, rtol=0.0, atol=0.0)


def test_a_power_of_two_loss_scale_changes_nothing():
    """The two products are unscaled before they are multiplied, so GradScaler's scale drops out."""
    x, y, init = make_data(0)
    make = lambda ps: ESGD(ps, lr=0.1, update_d_every=3, d_warmup=4,  # noqa: E731
                           generator=torch.Generator().manual_seed(3))
    base, _ = run_paired(make, init, x, y)
    scaled, _ = run_paired(make, init, x, y, loss_scale=2.0 ** 12)
    assert_same_trajectory(scaled, base, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mu", [6.0, 0.3, 0.0])
@pytest.mark.parametrize("rows,covers", [(4, 0.25), (16, 0.5), (32, 1.0)])
def test_the_estimate_has_the_expectation_of_the_whole_batch_square(rows, covers, mu):
    """Rows' products drawn i.i.d. (mean mu, sd sigma): the halves a, b are means of n rows each, the
    whole batch has B = 2n / covers rows, and E[a b + covers ((a - b) / 2)^2] = mu^2 + sigma^2 / B,
    also where the curvature is below the noise and single estimates are often negative.  The floor's
    expectation is the noise term alone, sigma^2 / B."""
    gen = torch.Generator().manual_seed(0)
    trials, n = 200_000, rows // 2
    sigma = 2.0
    a = mu + sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64).mean(1)
    b = mu + sigma * torch.randn(trials, n, generator=gen, dtype=torch.float64).mean(1)
    squares, floors = paired_estimate([a.clone()], [b.clone()], covers)
    e, f = squares[0], floors[0]
    whole = 2 * n / covers
    want = mu ** 2 + sigma ** 2 / whole
    stderr = e.std().item() / trials ** 0.5
    assert abs(e.mean().item() - want) < 4 * stderr
    assert abs(f.mean().item() - sigma ** 2 / whole) < 4 * f.std().item() / trials ** 0.5
    # and the square of one half's product, or a clamped estimate, is visibly inflated, so the check
    # can fail
    assert (a * a).mean().item() - want > 8 * stderr
    if mu < 1 and covers < 1:       # with covers=1 the estimate is ((a + b) / 2)^2, never negative
        assert (e < 0).float().mean() > 0.05
        assert torch.maximum(e, f).mean().item() - want > 8 * stderr


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
    d = [torch.maximum(opt.state[p]["exp_avg_d_sq"], opt.state[p]["exp_avg_d_floor"]) for p in model.parameters()]
    assert all(x.gt(0).any() for x in d) and opt.steps_done == 6


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_a_parameter_first_used_between_paired_steps_waits_for_its_product(cls):
    """Its state starts without a floor; it stays put until a product reaches it, then moves."""
    used = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    late = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = cls([used, late], lr=0.1, update_d_every=3, d_warmup=1)     # products at steps 0, 3, 6

    def loss(t, w):
        return w * (used ** 4).sum() + (w * (late ** 4).sum() if t >= 2 else 0.0)
    for t in range(7):
        opt.zero_grad(set_to_none=True)
        loss(t, 1.0).backward()
        if opt.is_hvp_step():
            opt.accumulate_hvp_pair(loss(t, 0.9), loss(t, 1.1), 0.5)
        opt.step()
        assert torch.isfinite(used).all() and torch.isfinite(late).all()
        if t < 3:
            assert late.item() == 3.0
    assert late.item() < 3.0


@pytest.mark.parametrize("cls", [ESGD, ESGDMax])
def test_a_dropped_product_after_paired_ones_keeps_the_denominator_to_the_bit(cls):
    """A product step whose pair is not finite is dropped: the denominator released for it is rebuilt
    from the averages and their floor, equal to the one it replaced, and the parameters stay finite."""
    x, y, init = make_data(0)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, lr=0.1, betas=(0.9, 0.99), update_d_every=3, d_warmup=4,
              generator=torch.Generator().manual_seed(3))
    for t in range(8):                                   # products at 0-3 and 6
        opt.zero_grad(set_to_none=True)
        loss_fn(params, x, y, t).backward()
        if opt.is_hvp_step():
            opt.accumulate_hvp_pair(loss_fn(params, x, y, t, 1.0, HALVES[0]),
                                    loss_fn(params, x, y, t, 1.0, HALVES[1]), COVERS)
        opt.step()
    if cls is ESGD:
        d = torch.cat([s["exp_avg_d_sq"].reshape(-1) for s in opt.state.values()])
        assert (d < 0).any()                  # so a denominator rebuilt from d alone would not be finite
    before = [opt.state[p]["denom"].clone() for p in params]
    assert not opt.is_hvp_step()
    opt.zero_grad(set_to_none=True)
    loss_fn(params, x, y, 8).backward()
    opt.step()
    assert opt.is_hvp_step()
    opt.zero_grad(set_to_none=True)
    loss_fn(params, x, y, 9).backward()
    opt.accumulate_hvp_pair(loss_fn(params, x, y, 9, 1.0, HALVES[0]) * float("inf"),
                            loss_fn(params, x, y, 9, 1.0, HALVES[1]), COVERS)
    opt.step()
    assert opt.nonfinite_products == 1
    for p, want in zip(params, before):
        assert torch.equal(opt.state[p]["denom"], want) and torch.isfinite(p).all()


def test_plain_esgd_exact_products_after_paired_ones_match_the_reference():
    x, y, init = make_data(1)
    paired_steps = {0, 1, 10}
    product_steps = {t for t in range(STEPS) if t < 3 or (t - 2) % 4 == 0}     # d_warmup=3, every 4
    assert paired_steps <= product_steps
    make = lambda ps: PlainESGD(ps, lr=0.05, eps=1e-4, update_d_every=4, d_warmup=3,  # noqa: E731
                                generator=torch.Generator().manual_seed(5))
    got, probes = run_paired(make, init, x, y, exact_steps=product_steps - paired_steps)
    want = esgd_plain_reference(init, x, y, steps=STEPS, probes=probes, lr=0.05, eps=1e-4, update_d_every=4,
                                d_warmup=3, squares=mixed_squares(paired_steps))
    assert_same_trajectory(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_state_folds_with_single_tensor_operations(dtype):
    """State kept in bfloat16 or float16 (``state_dtype=None``) takes the single-tensor operations, as
    the kernels do, whichever kernel is asked for: a multi-tensor operation would round its scalars
    (beta2, 1 - beta2) to the state's dtype."""
    x, y, init = make_data(0)
    runs = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(p.clone().to(dtype)) for p in init]
        opt = ESGD(params, lr=0.1, betas=(0.9, 0.99), update_d_every=3, d_warmup=4, foreach=foreach,
                   state_dtype=None, generator=torch.Generator().manual_seed(3))
        for t in range(12):
            opt.zero_grad(set_to_none=True)
            loss_fn(params, x.to(dtype), y.to(dtype), t).backward()
            if opt.is_hvp_step():
                opt.accumulate_hvp_pair(loss_fn(params, x.to(dtype), y.to(dtype), t, 1.0, HALVES[0]),
                                        loss_fn(params, x.to(dtype), y.to(dtype), t, 1.0, HALVES[1]), COVERS)
            opt.step()
        runs.append([(opt.state[p]["exp_avg_d_sq"], opt.state[p]["exp_avg_d_floor"]) for p in params])
        assert all(d.dtype == dtype for d, _ in runs[-1])
    for (d1, f1), (d2, f2) in zip(*runs):
        assert torch.equal(d1, d2) and torch.equal(f1, f2)


def test_a_graph_beside_the_pair_drops_the_step_and_the_next_one_runs():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ESGD([p], update_d_every=5, d_warmup=2)
    (p ** 3).sum().backward(create_graph=True)
    opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 4).sum(), 0.5)
    with pytest.raises(RuntimeError, match="already has a paired estimate"):
        opt.step()
    assert opt._hvp_pair is None and opt.steps_done == 0 and not p.grad.requires_grad
    p.grad = None
    (p ** 3).sum().backward()
    opt.accumulate_hvp_pair((p ** 3).sum(), (p ** 4).sum(), 0.5)
    opt.step()
    assert opt.steps_done == 1 and torch.isfinite(p).all()
