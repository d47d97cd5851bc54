"""Mixed precision: torch.amp.GradScaler's protocol, non-finite products, and low-precision parameters."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from esgd import ESGD, AdaHessian, ESGDMax, PlainESGD, Sophia

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

ALL = [ESGD, ESGDMax, PlainESGD, AdaHessian, Sophia]
# Learning rates at which each optimizer moves the MLP below visibly within 30 steps.
HYPER = {ESGD: dict(lr=0.3), ESGDMax: dict(lr=0.3), PlainESGD: dict(lr=0.1), AdaHessian: dict(lr=0.05),
         Sophia: dict(lr=0.02, rho=1.0)}
SCHEDULE = dict(update_d_every=4, d_warmup=3)    # products at t = 0, 1, 2, then 6, 10, 14, ...
# How the product reaches the optimizer: through .grad's graph in step(), folded in before step() as
# gradient accumulation does, or from a separate loss after a plain backward (the data-parallel route).
FLOWS = ["create-graph", "accumulate", "separate-loss"]
SCALE = 2.0 ** 16


def make_opt(cls, params, **kwargs):
    kwargs = {**HYPER[cls], **SCHEDULE, "generator": torch.Generator().manual_seed(1), **kwargs}
    return cls(params, **kwargs)


def mlp(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    y = torch.randn(32, 2, generator=gen, dtype=dtype)
    return model, x, y


def fixed_scaler():
    """A GradScaler whose scale never grows (it still halves after an overflow)."""
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10 ** 9)


def train_step(opt, model, x, y, t, *, scaler=None, flow="create-graph", poison=False):
    """One step on minibatch ``t % 4``; ``poison`` multiplies the loss by inf (an overflow)."""
    def loss():
        rows = slice((t % 4) * 8, (t % 4) * 8 + 8)
        value = ((model(x[rows]) - y[rows]) ** 2).mean()
        value = value * math.inf if poison else value
        return scaler.scale(value) if scaler is not None else value

    opt.zero_grad(set_to_none=True)
    if flow == "separate-loss":
        loss().backward()
        opt.accumulate_hvp(loss())
    else:
        loss().backward(create_graph=opt.should_create_graph())
        if flow == "accumulate":
            opt.accumulate_hvp()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_identical(a, b, where="state"):
    """Same structure, same values, tensors equal to the bit and of the same dtype."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# -- the GradScaler protocol ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL)
def test_grad_scaler_hands_its_scale_to_step_instead_of_unscaling(cls):
    """The scaler calls step() with grad_scale and found_inf set and the gradients still scaled; step()
    takes the scale out (and leaves .grad unscaled, as GradScaler.unscale_ would)."""
    assert cls._step_supports_amp_scaling is True
    model, x, y = mlp()
    params = list(model.parameters())
    opt = make_opt(cls, params)
    rows = slice(0, 8)
    want = torch.autograd.grad(((model(x[rows]) - y[rows]) ** 2).mean(), params)
    seen = {}
    real_step = opt.step

    def spy(*args, **kwargs):
        seen["grad_scale"] = getattr(opt, "grad_scale", None)
        seen["found_inf"] = getattr(opt, "found_inf", None)
        seen["grads"] = [p.grad.detach().clone() for p in params]
        return real_step(*args, **kwargs)

    opt.step = spy
    scaler = fixed_scaler()
    train_step(opt, model, x, y, 0, scaler=scaler)
    assert seen["grad_scale"] is not None and seen["grad_scale"].item() == SCALE
    assert seen["found_inf"] is not None and seen["found_inf"].item() == 0
    for got, g in zip(seen["grads"], want):
        assert torch.equal(got, g * SCALE)          # not unscaled by the scaler
    for p, g in zip(params, want):
        assert torch.equal(p.grad, g)               # unscaled by step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert opt.steps_done == 1 and opt.state


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cls", ALL)
def test_grad_scaler_at_a_fixed_scale_equals_the_unscaled_run(cls, dtype, flow):
    """Gradients and products of the scaled loss carry a power of two, which step() takes out exactly:
    30 steps (products and plain steps) under a GradScaler equal 30 steps without one, to the bit."""
    runs = []
    for scaled in (False, True):
        model, x, y = mlp(dtype)
        opt = make_opt(cls, model.parameters())
        scaler = fixed_scaler() if scaled else None
        trajectory = []
        for t in range(30):
            train_step(opt, model, x, y, t, scaler=scaler, flow=flow)
            trajectory.append(flat(model))
        runs.append(torch.stack(trajectory))
        assert opt.steps_done == 30 and opt.nonfinite_products == 0
        if scaled:
            assert scaler.get_scale() == SCALE
    assert torch.equal(runs[1], runs[0])
    assert (runs[0][-1] - runs[0][0]).abs().max() > 1e-2      # the comparison is of a moving model


@pytest.mark.parametrize("seeded", [True, False], ids=["generator", "global-rng"])
@pytest.mark.parametrize("bad_step", [6, 8], ids=["product-step", "plain-step"])
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("cls", ALL)
def test_overflowed_step_is_as_if_it_had_never_been_taken(cls, flow, bad_step, seeded):
    """An overflow (loss * inf) through the scaler changes nothing: parameters, state_dict (tensors,
    counters, generator state) and the global RNG are bit-identical after it, even where the step drew
    its probes before step() (the accumulate flows); the run then equals one that skipped that batch."""
    def run(bad):
        torch.manual_seed(123)     # the probes' stream when there is no generator
        model, x, y = mlp()
        generator = torch.Generator().manual_seed(1) if seeded else None
        opt = make_opt(cls, model.parameters(), generator=generator)
        scaler = fixed_scaler()
        trajectory = []
        for t in range(14):
            if t != bad_step:
                train_step(opt, model, x, y, t, scaler=scaler, flow=flow)
                trajectory.append(flat(model))
            elif bad:
                assert opt.is_hvp_step() == (bad_step == 6)
                before = (flat(model), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
                train_step(opt, model, x, y, t, scaler=scaler, flow=flow, poison=True)
                after = (flat(model), opt.state_dict(), torch.get_rng_state())
                assert_identical(after, before)
                assert scaler.get_scale() == SCALE / 2          # the scaler saw the overflow
                assert all(not p.grad.requires_grad for p in model.parameters())   # graph freed
        assert opt.steps_done == 13 and opt.nonfinite_products == 0
        return torch.stack(trajectory)

    with_overflow, without = run(True), run(False)
    assert torch.isfinite(with_overflow).all()
    assert torch.equal(with_overflow, without)


@pytest.mark.parametrize("cls", ALL)
def test_finite_difference_products_refuse_a_grad_scaler(cls):
    model, x, y = mlp()
    opt = make_opt(cls, model.parameters(), hvp_method="finite-difference")
    scaler = fixed_scaler()
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    with pytest.raises(ValueError, match=r"hvp_method='finite-difference'.*GradScaler"):
        scaler.step(opt)
    assert opt.steps_done == 0 and not opt.state


@pytest.mark.parametrize("cls", ALL)
def test_unscale_before_a_product_step_is_refused_and_fine_before_a_plain_step(cls):
    """GradScaler.unscale_ divides .grad but cannot reach the product: on a product step step() refuses,
    leaving the optimizer untouched; on plain steps the run equals one without unscale_."""
    model, x, y = mlp()
    opt = make_opt(cls, model.parameters())
    scaler = fixed_scaler()
    scaler.scale(((model(x) - y) ** 2).mean()).backward(create_graph=opt.should_create_graph())
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(opt\).*max_norm \* scaler\.get_scale\(\)"):
        scaler.step(opt)
    assert opt.steps_done == 0 and not opt.state and not opt._probes
    assert all(not p.grad.requires_grad for p in model.parameters())

    runs = []
    for unscale in (False, True):
        model, x, y = mlp()
        opt = make_opt(cls, model.parameters())
        scaler = fixed_scaler()
        for t in range(12):
            opt.zero_grad(set_to_none=True)
            rows = slice((t % 4) * 8, (t % 4) * 8 + 8)
            loss = ((model(x[rows]) - y[rows]) ** 2).mean()
            scaler.scale(loss).backward(create_graph=opt.should_create_graph())
            if unscale and not opt.is_hvp_step():
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cls", ALL)
def test_a_step_that_raises_leaves_no_scale_behind(cls):
    """GradScaler removes grad_scale and found_inf only after step() returns, and multiplies a leftover
    grad_scale into the next step's.  After a refused step (backward without the graph a product step
    needs) and a corrected loop, the run equals a clean one to the bit."""
    model, x, y = mlp()
    opt = make_opt(cls, model.parameters())
    scaler = fixed_scaler()
    opt.zero_grad(set_to_none=True)
    scaler.scale(((model(x[:8]) - y[:8]) ** 2).mean()).backward()     # create_graph forgotten
    with pytest.raises(RuntimeError, match="create_graph"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert opt.steps_done == 0 and not opt.state

    ref_model, _, _ = mlp()
    ref = make_opt(cls, ref_model.parameters())
    scaler = fixed_scaler()
    for t in range(8):
        train_step(opt, model, x, y, t, scaler=scaler)
        train_step(ref, ref_model, x, y, t)
    assert torch.equal(flat(model), flat(ref_model))


@pytest.mark.parametrize("flow", ["create-graph", "separate-loss"])
@pytest.mark.parametrize("cls", ALL)
def test_float16_products_do_not_overflow_at_the_default_scale(cls, flow):
    """The documented fp16 loop: autocast to float16, GradScaler at its default scale 65536.  |H z|
    exceeds 1 here, so a product taken through the scaled graph with the plain probe would overflow
    float16 on every step; with the probe divided by the scale none does, and the loss falls.  A
    product taken before the first step() has no scale to divide by yet: that one may overflow."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x[:, :1] * x[:, 1:2]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)
    except RuntimeError as err:     # older torch has no float16 autocast on CPU
        pytest.skip(f"float16 autocast on CPU: {err}")
    opt = cls(model.parameters(), **HYPER[cls], generator=torch.Generator().manual_seed(0))
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ((model(x) - y) ** 2).mean()
        if flow == "separate-loss":
            scaler.scale(loss).backward(retain_graph=True)
            opt.accumulate_hvp(scaler.scale(loss))
        else:
            scaler.scale(loss).backward(create_graph=opt.should_create_graph())
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert opt.nonfinite_products <= (1 if flow == "separate-loss" else 0)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses[::10]


# -- non-finite products ---------------------------------------------------------------------------------

CURVATURE = {ESGD: ("exp_avg_d_sq", "beta2_accum", "denom"), ESGDMax: ("exp_avg_d_sq", "beta2_accum", "denom"),
             PlainESGD: ("d_sum", "hvp_count"), AdaHessian: ("exp_avg_d_sq", "beta2_accum"),
             Sophia: ("hessian",)}


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("cls", ALL)
def test_nonfinite_product_never_reaches_the_state(cls, value, monkeypatch):
    """One entry of one product is made non-finite on the last warmup step (t = 2): the curvature
    estimate stays as it was, the update still happens with it, the drop is counted, and the next step
    takes the product the schedule owes (normally the next product would come at t = 6)."""
    model, x, y = mlp()
    params = list(model.parameters())
    opt = make_opt(cls, params)
    real = opt.hessian_vector_products
    corrupted = []

    def products(ps, grads, probes):
        hvps = real(ps, grads, probes)
        if opt.steps_done == 2:
            hvps[0] = hvps[0].clone()
            hvps[0].view(-1)[0] = value
            corrupted.append(opt.steps_done)
        return hvps

    monkeypatch.setattr(opt, "hessian_vector_products", products)
    for t in range(2):
        train_step(opt, model, x, y, t)

    def curvature():
        return [{k: copy.deepcopy(opt.state[p][k]) for k in CURVATURE[cls]} for p in params]

    before, theta = curvature(), flat(model)
    train_step(opt, model, x, y, 2)
    assert corrupted == [2]
    assert opt.nonfinite_products == 1
    assert opt.state_dict()["hessian_schedule"]["nonfinite_products"] == 1
    assert_identical(curvature(), before)
    for p in params:
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), theta)
    assert opt.is_hvp_step()                      # retried at once
    train_step(opt, model, x, y, 3)
    assert opt.nonfinite_products == 1
    changed = curvature()
    assert any(not torch.equal(a, b) if torch.is_tensor(a) else a != b
               for new, old in zip(changed, before) for a, b in ((new[k], old[k]) for k in new))
    assert not opt.is_hvp_step()                  # and then the usual schedule: next product at t = 7


# -- low-precision parameters ----------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("state_dtype", [torch.float32, None, torch.float64], ids=["float32", "own", "float64"])
@pytest.mark.parametrize("cls", ALL)
def test_state_has_the_state_dtype_for_narrower_parameters_only(cls, state_dtype):
    params = [torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=dt)) for dt in DTYPES]
    opt = cls(params, lr=0.01, state_dtype=state_dtype)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        sum((p.double() ** 4).sum() for p in params).backward(create_graph=opt.should_create_graph())
        opt.step()
    for p, dt in zip(params, DTYPES):
        want = dt if state_dtype is None or torch.finfo(dt).bits >= torch.finfo(state_dtype).bits else state_dtype
        tensors = [v for v in opt.state[p].values() if torch.is_tensor(v)]
        assert tensors and all(v.dtype == want for v in tensors), (dt, [v.dtype for v in tensors])
        assert p.dtype == dt and torch.isfinite(p).all()


# Settings in which the state's precision shows within a few hundred steps: a bfloat16 EMA cannot
# follow changes below 2**-9 of its value, so it stalls where beta is close to 1.  ESGDMax's running
# maximum only has to forget (and so only stalls) when the curvature shrinks; plain ESGD's running sum
# stalls once a product adds less than 2**-9 of it.
TRACKING = {ESGD: (dict(lr=0.05, lr_warmup=0.0), 150, None), ESGDMax: (dict(lr=0.05, lr_warmup=0.0), 150, 50),
            PlainESGD: (dict(lr=0.05), 300, None), AdaHessian: (dict(lr=0.05), 150, None),
            Sophia: (dict(lr=0.2, rho=4.0, betas=(0.9, 0.9)), 150, None)}


def quadratic_run(cls, param_dtype, **kwargs):
    """``0.5 * s_t * sum(a * p^2)`` from bfloat16-representable starting points, with the minimum at 0:
    floating point keeps its relative precision all the way down, so no update is lost to the
    parameter's rounding and what separates the runs is the state.  ``s_t`` halves every
    ``half_life`` steps (constant for ``None``).  Returns the trajectory in float32."""
    hyper, steps, half_life = TRACKING[cls]
    gen = torch.Generator().manual_seed(0)
    a = torch.exp(torch.empty(64).uniform_(-1, 1, generator=gen))
    p = torch.nn.Parameter(torch.randn(64, generator=gen).to(torch.bfloat16).to(param_dtype))
    opt = cls([p], **hyper, update_d_every=1, d_warmup=1, generator=torch.Generator().manual_seed(1), **kwargs)
    trajectory = []
    for t in range(steps):
        s = 1.0 if half_life is None else 2.0 ** (-t / half_life)
        opt.zero_grad(set_to_none=True)
        (0.5 * s * (a * p.float() ** 2).sum()).backward(create_graph=opt.should_create_graph())
        opt.step()
        trajectory.append(p.detach().float().clone())
    return torch.stack(trajectory)


@pytest.mark.parametrize("cls", ALL)
def test_float32_state_keeps_bfloat16_parameters_closer_to_the_float32_run(cls):
    reference = quadratic_run(cls, torch.float32)

    def relative_error(state_dtype):
        got = quadratic_run(cls, torch.bfloat16, state_dtype=state_dtype)
        return ((got - reference).norm(dim=1) / reference.norm(dim=1)).mean().item()

    wide, narrow = relative_error(torch.float32), relative_error(None)
    assert 1.5 * wide < narrow, (wide, narrow)


@pytest.mark.parametrize("state_dtype", [torch.float32, None], ids=["float32-state", "own-dtype-state"])
@pytest.mark.parametrize("cls", ALL)
def test_foreach_equals_single_tensor_for_low_precision_parameters(cls, state_dtype):
    """bfloat16 and float16 parameters next to a float32 one: both kernels, the same bits."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen).to(dt) for s, dt in (((5, 3), torch.bfloat16), ((3,), torch.float16),
                                                               ((4,), torch.float32))]
    runs = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make_opt(cls, params, foreach=foreach, state_dtype=state_dtype, weight_decay=0.1)
        for t in range(15):
            opt.zero_grad(set_to_none=True)
            loss = sum(((p.float() - 0.3) ** 4).sum() + (p.float() ** 2).sum() * (t % 3) for p in params)
            loss.backward(create_graph=opt.should_create_graph())
            opt.step()
        runs.append(([p.detach().clone() for p in params],
                     [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]))
    assert_identical(runs[0], runs[1])
    assert not torch.equal(runs[0][0][0], init[0])


@pytest.mark.parametrize("cls", ALL)
def test_resume_keeps_float32_state_of_bfloat16_parameters(cls):
    """Optimizer.load_state_dict casts state to the parameter's dtype; the float32 state must come back
    as float32, and the resumed run equal the uninterrupted one to the bit."""
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in ((6, 4), (4,))]

    def run(params, opt, start, stop):
        for t in range(start, stop):
            opt.zero_grad(set_to_none=True)
            sum(((p.float() - 0.2 * t) ** 4).sum() for p in params).backward(create_graph=opt.should_create_graph())
            opt.step()

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(cls, params)
    run(params, opt, 0, 20)
    uninterrupted = [p.detach().clone() for p in params]

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(cls, params)
    run(params, opt, 0, 7)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)       # weights_only: a dtype in the param groups is plain data
    params = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt = make_opt(cls, params)
    opt.load_state_dict(ckpt["opt"])
    assert all(g["state_dtype"] is torch.float32 for g in opt.param_groups)
    assert all(v.dtype == torch.float32 for p in params for v in opt.state[p].values() if torch.is_tensor(v))
    run(params, opt, 7, 20)
    for a, b in zip(params, uninterrupted):
        assert torch.equal(a.detach(), b)


def test_checkpoint_without_state_dtype_keeps_the_optimizers_choice():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    opt = ESGD([p], lr=0.1)
    (p.float() ** 4).sum().backward(create_graph=True)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["state_dtype"]
    other = ESGD([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    other.load_state_dict(saved)
    assert other.param_groups[0]["state_dtype"] is torch.float32
    q = other.param_groups[0]["params"][0]
    assert other.state[q]["exp_avg_d_sq"].dtype == torch.float32
    assert torch.equal(other.state[q]["exp_avg_d_sq"], opt.state[p]["exp_avg_d_sq"])


@pytest.mark.parametrize("value", [torch.int32, torch.complex64, "float32", torch.float8_e4m3fn],
                         ids=["int32", "complex64", "string", "float8"])
@pytest.mark.parametrize("cls", ALL)
def test_invalid_state_dtype_names_argument_and_value(cls, value):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^Invalid state_dtype: ") as info:
        cls([p], state_dtype=value)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=r"^Invalid state_dtype: "):
        cls([{"params": [p], "state_dtype": value}])
