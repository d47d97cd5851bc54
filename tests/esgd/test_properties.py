"""Properties of the optimizers: scale invariance, resume, the estimator's statistics, dtypes, devices."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esgd import ESGD, AdaHessian, ESGDMax, PlainESGD, Sophia
from esgd._base import rademacher

from .reference import loss_fn, make_data

HESSIAN_OPTIMIZERS = [ESGD, PlainESGD]
# Resume is the base class's business, so every optimizer built on it is checked the same way.
RESUMABLE = HESSIAN_OPTIMIZERS + [AdaHessian, Sophia]


def train(make_opt, init, x, y, steps, *, loss_scale=1.0, param_scale=1.0):
    """Optimise q with p = q / param_scale; return the trajectory of p (what the model computes with)."""
    qs = [torch.nn.Parameter(p.clone() * param_scale) for p in init]
    opt = make_opt(qs)
    out = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn([q / param_scale for q in qs], x, y, t, loss_scale)
        loss.backward(create_graph=getattr(opt, "should_create_graph", lambda: False)())
        opt.step()
        out.append(torch.cat([q.detach().reshape(-1) / param_scale for q in qs]))
    return torch.stack(out)


def esgd_m(ps):
    # eps = 0: the claim is invariance "up to eps effects", so take eps out of the picture.
    return ESGD(ps, lr=0.3, eps=0.0, update_d_every=3, d_warmup=4, generator=torch.Generator().manual_seed(7))


log_factor = st.floats(min_value=-3, max_value=3).map(lambda e: 10.0 ** e)


@settings(max_examples=20, deadline=None)
@given(n=log_factor)
def test_esgd_m_invariant_to_loss_scale(n):
    x, y, init = make_data(0)
    base = train(esgd_m, init, x, y, 25)
    scaled = train(esgd_m, init, x, y, 25, loss_scale=n)
    torch.testing.assert_close(scaled, base, rtol=1e-7, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(n=log_factor)
def test_esgd_m_invariant_to_parameter_scale(n):
    x, y, init = make_data(0)
    base = train(esgd_m, init, x, y, 25)
    scaled = train(esgd_m, init, x, y, 25, param_scale=n)
    torch.testing.assert_close(scaled, base, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["loss_scale", "param_scale"])
def test_sgd_is_not_scale_invariant(kind):
    """The control: the same rescaling visibly changes SGD's trajectory, so the tests above can fail."""
    x, y, init = make_data(0)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    base = train(sgd, init, x, y, 25)
    scaled = train(sgd, init, x, y, 25, **{kind: 10.0})
    assert (scaled - base).abs().max() > 1e-2


def test_esgd_m_eps_breaks_invariance_only_slightly():
    """With the default eps, rescaling the loss by 1000 still gives nearly the same trajectory."""
    x, y, init = make_data(0)
    make = lambda ps: ESGD(ps, lr=0.3, generator=torch.Generator().manual_seed(7))  # noqa: E731
    base = train(make, init, x, y, 25)
    scaled = train(make, init, x, y, 25, loss_scale=1000.0)
    assert (scaled - base).abs().max() < 0.05 * base.abs().max()


# -- resume -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", RESUMABLE)
@pytest.mark.parametrize("save_at", [5, 23])
def test_resume_equals_uninterrupted_run(cls, save_at):
    x, y, init = make_data(1)
    steps = 40

    def make(ps):
        return cls(ps, lr=0.1, update_d_every=4, d_warmup=6, generator=torch.Generator().manual_seed(11))

    def run(params, opt, start, stop):
        for t in range(start, stop):
            opt.zero_grad(set_to_none=True)
            loss_fn(params, x, y, t).backward(create_graph=opt.should_create_graph())
            opt.step()

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    run(params, opt, 0, steps)
    uninterrupted = [p.detach().clone() for p in params]

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    run(params, opt, 0, save_at)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only=True is the default: the state must be plain data
    params = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt = make(params)
    opt.generator.manual_seed(999)  # the checkpoint's generator state must win over this
    opt.load_state_dict(ckpt["opt"])
    assert opt.steps_done == save_at
    run(params, opt, save_at, steps)
    for a, b in zip(params, uninterrupted):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("cls", [ESGD, ESGDMax])
def test_releasing_the_cached_denominator_before_a_product_changes_nothing(cls, foreach, monkeypatch):
    """ESGD-M frees its cached denominators before an HVP step's double backward (memory) and rebuilds
    them from d where that step did not replace them: a parameter without a gradient on the HVP step,
    and a step whose product raised.  The trajectory must equal one where the cache is never freed."""
    x, y, init = make_data(2)

    def run():
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = cls(params, lr=0.1, update_d_every=3, d_warmup=2, foreach=foreach,
                  generator=torch.Generator().manual_seed(5))
        for t in range(30):
            if t == 16:      # an HVP step that fails: backward without the graph
                assert opt.is_hvp_step()
                opt.zero_grad(set_to_none=True)
                loss_fn(params, x, y, t).backward()
                with pytest.raises(RuntimeError, match="create_graph"):
                    opt.step()
            opt.zero_grad(set_to_none=True)
            loss_fn(params, x, y, t).backward(create_graph=opt.should_create_graph())
            if t in (7, 8):  # the bias is left out of the HVP step at t=7 and of the next plain step
                params[1].grad = None
            opt.step()
        return params, opt

    released, opt = run()
    assert all(opt.state[p]["denom"] is not None for p in released)
    monkeypatch.setattr(cls, "_release_before_hvp", lambda self: None)
    kept, _ = run()
    for a, b in zip(released, kept):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("cls", RESUMABLE)
def test_load_state_dict_rejects_wrong_shapes_naming_parameter_and_entry(cls):
    """A checkpoint of another model must fail at load time, not at the next step(), and leave the
    optimizer as it was."""
    def make(shapes):
        ps = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
        return ps, cls([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)

    ps, opt = make([(3,), (2, 2), (4,)])
    sum((p ** 4).sum() for p in ps).backward(create_graph=opt.should_create_graph())
    opt.step()
    _, other = make([(3,), (2, 2), (5,)])
    with pytest.raises(ValueError) as info:
        other.load_state_dict(opt.state_dict())
    message = str(info.value)
    assert "\n" not in message
    assert "param_groups[1]['params'][1]" in message, message
    assert "(5,)" in message and "(4,)" in message, message
    entry = re.search(r"state entry '(\w+)'", message)
    assert entry and torch.is_tensor(opt.state[ps[2]][entry.group(1)]), message
    assert not other.state and other.steps_done == 0


def test_load_state_dict_rejects_foreign_state():
    p = torch.nn.Parameter(torch.ones(2))
    adam_state = torch.optim.Adam([p]).state_dict()
    with pytest.raises(ValueError, match="hessian_schedule"):
        ESGD([p]).load_state_dict(adam_state)


# -- the estimator, statistically ---------------------------------------------------------------------

def quadratic(dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    hess = a @ a.T + torch.diag(torch.arange(1.0, dim + 1, dtype=torch.float64))  # SPD, non-diagonal
    return hess


def _estimate_moments(opt, x, hess, statistic, n: int = 4000):
    """Mean and standard error over ``n`` probes of ``statistic(z, H z)`` on ``0.5 x^T H x``, checking
    each product against the explicit Hessian."""
    samples = []
    for _ in range(n):
        (grad,) = torch.autograd.grad(0.5 * x @ hess @ x, [x], create_graph=True)
        z = opt.draw_probe(x)
        (h,) = opt.hessian_vector_products([x], [grad], [z])
        torch.testing.assert_close(h, hess @ z)  # the product itself is exact
        samples.append(statistic(z, h))
    samples = torch.stack(samples)
    return samples.mean(0), samples.std(0) / math.sqrt(n)


@pytest.mark.parametrize("cls,probe", [(ESGD, "rademacher"), (PlainESGD, "gaussian"),
                                       (PlainESGD, "rademacher")])
def test_mean_squared_hvp_matches_diag_h_squared(cls, probe):
    hess = quadratic()
    x = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    kwargs = {"probe": probe} if cls is PlainESGD else {}
    opt = cls([x], generator=torch.Generator().manual_seed(0), **kwargs)
    mean, sem = _estimate_moments(opt, x, hess, lambda z, h: h * h)
    target = torch.diag(hess @ hess)
    assert ((mean - target).abs() <= 5 * sem).all(), (mean, target, sem)


def test_mean_squared_hutchinson_estimate_is_diag_h_squared_not_diag_squared():
    """AdaHessian's second moment averages (z * H z)^2, whose mean is diag(H^2): the off-diagonal entries
    enter through the probe's cross terms, so it is not diag(H)^2."""
    hess = quadratic()
    x = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = AdaHessian([x], generator=torch.Generator().manual_seed(0))
    mean, sem = _estimate_moments(opt, x, hess, lambda z, h: (z * h) ** 2)
    assert ((mean - torch.diag(hess @ hess)).abs() <= 5 * sem).all()
    assert ((mean - torch.diag(hess) ** 2).abs() > 5 * sem).all()   # the control: off by 11-17 sem


def test_rademacher_probes_are_plus_minus_one_with_equal_frequency():
    opt = ESGD([torch.nn.Parameter(torch.zeros(3))], generator=torch.Generator().manual_seed(1))
    z = torch.stack([opt.draw_probe(torch.zeros(100, 10)) for _ in range(20)])
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    frac = (z == 1).double().mean().item()
    n = z.numel()
    assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(n)
    # every coordinate sees both signs: a probe stuck at one value per entry would fail here
    assert ((z == 1).any(0) & (z == -1).any(0)).all()


@pytest.mark.parametrize("shape", [(), (0,), (1,), (13,), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_draw_keeps_shape_and_dtype(shape, dtype):
    z = rademacher(torch.Size(shape), torch.Generator().manual_seed(0), torch.device("cpu"), dtype)
    assert z.shape == torch.Size(shape) and z.dtype == dtype
    assert set(z.unique().tolist()) <= {-1.0, 1.0}


def test_rademacher_signs_from_one_byte_are_unbiased_and_uncorrelated():
    # Eight signs come from each random byte: every bit position must be a fair coin, and
    # neighbouring signs (same byte, or across a byte boundary) independent.
    n = 8 * 40_000
    z = rademacher(torch.Size([n]), torch.Generator().manual_seed(3), torch.device("cpu"), torch.float64)
    tol = 5 / math.sqrt(n // 8)
    assert (z.view(-1, 8).mean(0).abs() < tol).all()
    for lag in (1, 7, 8):
        assert abs((z[lag:] * z[:-lag]).mean().item()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rademacher_sign_k_of_a_byte_is_its_bit_k(dtype):
    """The probe stream is fixed by the generator: element 8 i + k is +1 exactly where bit k of the i-th
    random byte is set, so a run is reproduced by its seed whatever the unpacking does."""
    n = 8 * 1000 + 5
    words = torch.empty((n + 7) // 8, dtype=torch.uint8).random_(generator=torch.Generator().manual_seed(4))
    want = [1.0 if (int(words[i // 8]) >> (i % 8)) & 1 else -1.0 for i in range(n)]
    z = rademacher(torch.Size([n]), torch.Generator().manual_seed(4), torch.device("cpu"), dtype)
    assert z.dtype == dtype and z.tolist() == want


def test_gaussian_probes_are_standard_normal():
    opt = PlainESGD([torch.nn.Parameter(torch.zeros(3))], generator=torch.Generator().manual_seed(1))
    z = opt.draw_probe(torch.zeros(200_000, dtype=torch.float64))
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 0.02


def test_same_generator_seed_same_trajectory_different_seed_differs():
    x, y, init = make_data(2)
    make = lambda seed: (lambda ps: ESGD(ps, lr=0.3, generator=torch.Generator().manual_seed(seed)))  # noqa
    a = train(make(1), init, x, y, 15)
    b = train(make(1), init, x, y, 15)
    c = train(make(2), init, x, y, 15)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- parameters, dtypes, devices ----------------------------------------------------------------------

@pytest.mark.parametrize("cls", RESUMABLE)
def test_parameter_without_gradient_is_left_alone_and_nothing_outlives_the_step(cls):
    used = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = torch.nn.Parameter(torch.tensor([3.0]))
    opt = cls([used, unused], lr=0.1 if cls in HESSIAN_OPTIMIZERS else 0.05)
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        (used ** 4).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
        assert not opt._probes and not getattr(opt, "_step_probes", None)   # AdaHessian's own cache
        assert not used.grad.requires_grad   # the double-backward graph does not outlive the step
    assert unused.item() == 3.0 and unused not in opt.state
    assert (used.detach().abs() < torch.tensor([1.0, 2.0])).all()


def test_parameter_first_used_after_warmup_waits_for_its_first_product():
    a = torch.nn.Parameter(torch.tensor([1.0]))
    late = torch.nn.Parameter(torch.tensor([2.0]))
    opt = ESGD([a, late], lr=0.1, update_d_every=3, d_warmup=1)
    for t in range(6):
        opt.zero_grad(set_to_none=True)
        hvp = opt.should_create_graph()
        loss = (a ** 4).sum() + ((late ** 4).sum() if t >= 1 else 0)
        loss.backward(create_graph=hvp)
        opt.step()
        assert torch.isfinite(late).all()
        if t < 3:  # steps 2-3 are plain; step 4 (t=3) is the next product (one every 3 steps)
            assert late.item() == 2.0
    assert late.item() < 2.0


# Sophia is left out on purpose: it starts from h = 0 and steps by sign until its first product.
WAIT_FOR_CURVATURE = [ESGD, ESGDMax, PlainESGD, AdaHessian]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls", WAIT_FOR_CURVATURE)
def test_weight_decay_waits_for_the_first_product_too(cls, foreach):
    """Without a curvature estimate a parameter does not move at all, decoupled weight decay included."""
    a = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    late = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = cls([a, late], lr=0.1, weight_decay=0.5, update_d_every=3, d_warmup=1, foreach=foreach)
    for t in range(4):
        opt.zero_grad(set_to_none=True)
        loss = (a ** 4).sum() + ((late ** 4).sum() if t >= 1 else 0)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        if t < 3:    # products on steps 1 and 4 (t = 0, 3): late has a gradient but no estimate before t = 3
            assert late.item() == 2.0, (t, late.item())
    assert late.item() < 2.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls", WAIT_FOR_CURVATURE)
def test_eps_zero_leaves_coordinates_without_curvature_where_they_are(cls, foreach, weight_decay):
    """With eps=0, a coordinate whose estimate is exactly zero has nothing to divide by: it must stay put
    (neither -inf from g / 0 nor NaN from 0 / 0) while the curved coordinate trains."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    # A probe stream of its own, so the outcome does not depend on the tests run before: with plain ESGD's
    # Gaussian probes a draw near zero lets p[0] overshoot past zero on about 3% of streams.
    opt = cls([p], lr=0.1, eps=0.0, weight_decay=weight_decay, update_d_every=2, d_warmup=2, foreach=foreach,
              generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        # p[1] has a gradient and p[2] none; neither has curvature
        (p[0] ** 4 + 3 * p[1] + 0 * p[2]).backward(create_graph=opt.should_create_graph())
        opt.step()
        assert p[1].item() == 2.0 and p[2].item() == -3.0, p
    assert 0 < p[0].item() < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", HESSIAN_OPTIMIZERS)
def test_trains_in_float32_and_float64(cls, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x = torch.randn(64, 4, dtype=dtype)
    y = x[:, :1] * x[:, 1:2]
    opt = cls(model.parameters())  # each optimizer's default learning rate
    losses = []
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_closure_step_matches_plain_loop():
    x, y, init = make_data(3)
    ref = train(lambda ps: ESGD(ps, lr=0.2, generator=torch.Generator().manual_seed(5)), init, x, y, 12)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ESGD(params, lr=0.2, generator=torch.Generator().manual_seed(5))
    for t in range(12):
        def closure(t=t):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(params, x, y, t)
            loss.backward(create_graph=opt.should_create_graph())
            return loss
        loss = opt.step(closure)
        assert loss is not None
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), ref[-1], rtol=0, atol=0)


def test_graph_does_not_outlive_the_step():
    """After an HVP step the gradients are plain tensors again: no cycle keeps the graph alive."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = ESGD([p])
    (p ** 3).sum().backward(create_graph=opt.should_create_graph())
    assert p.grad.requires_grad
    opt.step()
    assert not p.grad.requires_grad and p.grad.grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("cls", HESSIAN_OPTIMIZERS)
def test_cuda_matches_cpu(cls):
    """A CPU generator drives CUDA parameters too, so the same probes give the same float64 trajectory."""
    x, y, init = make_data(4)
    runs = []
    for device in ("cpu", "cuda"):
        qs = [torch.nn.Parameter(p.clone().to(device)) for p in init]
        opt = cls(qs, lr=0.1, generator=torch.Generator().manual_seed(0))
        for t in range(10):
            opt.zero_grad(set_to_none=True)
            loss_fn(qs, x.to(device), y.to(device), t).backward(create_graph=opt.should_create_graph())
            opt.step()
        runs.append(torch.cat([q.detach().cpu().reshape(-1) for q in qs]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-11)
