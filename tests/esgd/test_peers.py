"""AdaHessian and Sophia-H: step-by-step float64 references, kernels, schedule, resume, errors, training."""

from __future__ import annotations

import math

import pytest
import torch

import esgd
from esgd import AdaHessian, Sophia

from .peer_reference import adahessian_reference, conv_data, conv_loss, sophia_reference
from .reference import loss_fn, make_data

STEPS = 30
PEERS = [AdaHessian, Sophia]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def run_optimizer(make_opt, init, loss, *, steps=STEPS):
    """Train nn.Parameters with ``loss(params, t)``; return the trajectory, the probes and the HVP steps."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(params)
    probes, step_probes, hvp_steps = [], [], []
    draw = opt.draw_probe

    def recording_draw(p):
        z = draw(p)
        step_probes.append(z.clone())
        return z

    opt.draw_probe = recording_draw
    trajectory = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(params, t).backward(create_graph=opt.should_create_graph())
        opt.step()
        if step_probes:
            probes.append(list(step_probes))
            hvp_steps.append(t + 1)
            step_probes.clear()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, probes, hvp_steps


def assert_same_trajectory(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want)
    for t, (gs, ws) in enumerate(zip(got, want)):
        for g, w in zip(gs, ws):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"step {t + 1}: {m}")


def mlp_problem(seed):
    x, y, init = make_data(seed)
    return init, lambda ps, t: loss_fn(ps, x, y, t)


def conv_problem(seed):
    x, y, init = conv_data(seed)
    return init, lambda ps, t: conv_loss(ps, x, y, t)


# Multithreaded float64 convolutions sum in a varying order: last-digit differences of ~1e-10 relative
# then show up in the trajectories, so the convolution comparisons get a looser (still tight) tolerance.
CONV_TOL = dict(rtol=1e-8, atol=1e-10)


# -- AdaHessian against the reference -----------------------------------------------------------------

ADA_DEFAULT = dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0)

ADA_CONFIGS = {   # name: (problem, hyperparameters, schedule)
    "defaults": (mlp_problem, {}, {}),
    "weight-decay": (mlp_problem, dict(weight_decay=0.1, lr=0.1), {}),
    "hessian-power-0.5": (mlp_problem, dict(hessian_power=0.5, lr=0.02, betas=(0.8, 0.95)), {}),
    "every-3-warmup-2": (mlp_problem, dict(lr=0.1), dict(update_d_every=3, d_warmup=2)),
    "conv-spatial-average": (conv_problem, dict(lr=0.05), {}),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", list(ADA_CONFIGS))
def test_adahessian_matches_reference(name, foreach):
    problem, hyper, schedule = ADA_CONFIGS[name]
    init, loss = problem(1)
    got, probes, _ = run_optimizer(
        lambda ps: AdaHessian(ps, **hyper, **schedule, foreach=foreach, generator=torch.Generator().manual_seed(3)),
        init, loss)
    want = adahessian_reference(init, loss, steps=STEPS, probes=probes, groups=[([0, 1, 2], {**ADA_DEFAULT, **hyper})],
                                every=schedule.get("update_d_every", 1), d_warmup=schedule.get("d_warmup", 1))
    assert_same_trajectory(got, want, **(CONV_TOL if problem is conv_problem else {}))
    assert (got[-1][0] - init[0]).abs().max() > 1e-2   # the comparison is not of standing parameters


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_adahessian_two_param_groups_with_conv(foreach):
    init, loss = conv_problem(2)
    g0 = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05, hessian_power=0.5)
    g1 = dict(lr=0.1, betas=(0.95, 0.9))

    def make(ps):
        return AdaHessian([{"params": ps[:2], **g0}, {"params": ps[2:], **g1}], update_d_every=2, foreach=foreach)

    got, probes, _ = run_optimizer(make, init, loss)
    want = adahessian_reference(init, loss, steps=STEPS, probes=probes, every=2,
                                groups=[([0, 1], {**ADA_DEFAULT, **g0}), ([2], {**ADA_DEFAULT, **g1})])
    assert_same_trajectory(got, want, **CONV_TOL)


def test_spatial_averaging_changes_the_trajectory():
    """The control for the conv config: without the averaging the reference goes elsewhere."""
    init, loss = conv_problem(1)
    got, probes, _ = run_optimizer(lambda ps: AdaHessian(ps, lr=0.05), init, loss, steps=10)
    plain = adahessian_reference(init, loss, steps=10, probes=probes, spatial=False,
                                 groups=[([0, 1, 2], {**ADA_DEFAULT, "lr": 0.05})])
    assert (got[-1][0] - plain[-1][0]).abs().max() > 1e-3


# -- Sophia against the reference ---------------------------------------------------------------------

SOPHIA_DEFAULT = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.01, eps=1e-12, weight_decay=0.0)

SOPHIA_CONFIGS = {
    "defaults": ({}, {}),
    "lr-rho-mixed-clipping": (dict(lr=0.05, rho=2.0), {}),
    "weight-decay": (dict(lr=0.02, rho=1.0, weight_decay=0.2), {}),
    "every-3-warmup-2-betas": (dict(lr=0.03, rho=0.5, betas=(0.9, 0.9), eps=1e-3), dict(update_d_every=3, d_warmup=2)),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", list(SOPHIA_CONFIGS))
def test_sophia_matches_reference(name, foreach):
    hyper, schedule = SOPHIA_CONFIGS[name]
    init, loss = mlp_problem(1)
    got, probes, _ = run_optimizer(
        lambda ps: Sophia(ps, **hyper, **schedule, foreach=foreach, generator=torch.Generator().manual_seed(3)),
        init, loss)
    stats = {}
    want = sophia_reference(init, loss, steps=STEPS, probes=probes, stats=stats,
                            groups=[([0, 1, 2], {**SOPHIA_DEFAULT, **hyper})],
                            every=schedule.get("update_d_every", 10), d_warmup=schedule.get("d_warmup", 1))
    assert_same_trajectory(got, want)
    assert stats["clipped"] > 0
    if name != "defaults":   # at rho=0.01 nearly everything is clipped; elsewhere both regimes occur
        assert stats["unclipped"] > 0


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_sophia_two_param_groups_with_conv(foreach):
    init, loss = conv_problem(3)
    g0 = dict(lr=0.02, rho=1.0, weight_decay=0.1)
    g1 = dict(lr=0.05, rho=3.0, betas=(0.9, 0.95), eps=1e-6)

    def make(ps):
        return Sophia([{"params": ps[:1], **g0}, {"params": ps[1:], **g1}], update_d_every=4, foreach=foreach)

    got, probes, _ = run_optimizer(make, init, loss)
    want = sophia_reference(init, loss, steps=STEPS, probes=probes, every=4,
                            groups=[([0], {**SOPHIA_DEFAULT, **g0}), ([1, 2], {**SOPHIA_DEFAULT, **g1})])
    assert_same_trajectory(got, want, **CONV_TOL)


@pytest.mark.parametrize("cls,kwargs,expected", [
    (Sophia, {}, [1, 11, 21]),                                  # t mod k = 1, k = 10 (the paper)
    (Sophia, dict(update_d_every=1), list(range(1, 25))),
    (Sophia, dict(update_d_every=4, d_warmup=3), [1, 2, 3, 7, 11, 15, 19, 23]),
    (AdaHessian, {}, list(range(1, 25))),                      # every step (the paper)
    (AdaHessian, dict(update_d_every=5), [1, 6, 11, 16, 21]),
])
def test_hvp_schedule(cls, kwargs, expected):
    init, loss = mlp_problem(0)
    _, _, hvp_steps = run_optimizer(lambda ps: cls(ps, **kwargs), init, loss, steps=24)
    assert hvp_steps == expected


# -- kernels, resume, generator, dtypes -----------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs", [(AdaHessian, dict(lr=0.05, weight_decay=0.1)),
                                        (AdaHessian, dict(lr=0.05, hessian_power=0.5, update_d_every=3)),
                                        (Sophia, dict(lr=0.02, rho=1.0, weight_decay=0.1, update_d_every=3))])
def test_foreach_equals_single_tensor_float32(cls, kwargs):
    """Both kernels run the same operations, so the float32 trajectories agree exactly."""
    x, y, init = make_data(5)
    init = [p.float() for p in init]
    loss = lambda ps, t: loss_fn(ps, x.float(), y.float(), t)  # noqa: E731
    runs = []
    for foreach in (True, False):
        traj, _, _ = run_optimizer(lambda ps: cls(ps, **kwargs, foreach=foreach,
                                                  generator=torch.Generator().manual_seed(0)), init, loss, steps=15)
        runs.append(traj)
    for a, b in zip(*runs):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
    assert not torch.equal(runs[0][-1][0], init[0])


@pytest.mark.parametrize("hvp_step", [True, False])
@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_functional_kernels_agree_on_mixed_shapes_and_dtypes(name, hvp_step):
    """The entry points on a 4-D kernel, a matrix and a float64 bias at once: both kernels, same bits."""
    gen = torch.Generator().manual_seed(0)
    shapes = [((2, 3, 3, 3), torch.float32), ((4, 5), torch.float32), ((5,), torch.float64)]
    tensors = [[torch.randn(s, generator=gen).to(dt) for s, dt in shapes] for _ in range(5)]
    outs = []
    for foreach in (True, False):
        params, grads, m, v, est = [[t.clone() for t in ts] for ts in tensors]
        v = [t.abs() for t in v]
        if name == "adahessian":
            esgd.adahessian(params, grads, m, v, est if hvp_step else None, bias_corrections1=[0.1, 0.2, 0.3],
                            bias_corrections2=[0.01, 0.0, 0.02], beta1=0.9, beta2=0.99, lr=0.1, eps=1e-4,
                            weight_decay=0.1, hessian_power=0.7, foreach=foreach)
        else:
            esgd.sophia(params, grads, m, v, est if hvp_step else None, lr=0.1, beta1=0.9, beta2=0.99, rho=0.5,
                        eps=1e-3, weight_decay=0.1, foreach=foreach)
        outs.append(params + m + v)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    if name == "adahessian":   # the parameter without a product yet (bias correction 0) does not move
        assert torch.equal(outs[0][1], tensors[0][1])


# Resume: tests/esgd/test_properties.py::test_resume_equals_uninterrupted_run covers the peers too.


@pytest.mark.parametrize("cls", PEERS)
def test_same_generator_seed_same_trajectory_different_seed_differs(cls):
    init, loss = mlp_problem(2)
    kw = dict(rho=1.0) if cls is Sophia else {}   # at the default rho nearly every step is a clipped sign step
    runs = [run_optimizer(lambda ps: cls(ps, lr=0.05, update_d_every=1, **kw, generator=torch.Generator().manual_seed(s)),
                          init, loss, steps=8)[0][-1][0] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("cls", PEERS)
def test_finite_difference_products_follow_the_autograd_ones(cls):
    init, loss = mlp_problem(4)
    kw = dict(lr=0.02, update_d_every=2, generator=torch.Generator().manual_seed(5))
    exact, _, _ = run_optimizer(lambda ps: cls(ps, **kw), init, loss, steps=10)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, **{**kw, "generator": torch.Generator().manual_seed(5)}, hvp_method="finite-difference")
    for t in range(10):
        def closure(t=t):
            opt.zero_grad(set_to_none=True)
            value = loss(params, t)
            value.backward(create_graph=opt.should_create_graph())
            return value
        assert not opt.should_create_graph()
        opt.step(closure)
    # the forward difference's relative error is ~1e-5 in float64 (tests/esgd/test_hvp_methods.py);
    # AdaHessian divides by |z * Hz|, which amplifies it where that is small (measured 1.3e-3 here)
    for p, e in zip(params, exact[-1]):
        torch.testing.assert_close(p.detach(), e, rtol=1e-2, atol=1e-4)


def test_adahessian_parameter_first_used_between_products_waits_for_one():
    a = torch.nn.Parameter(torch.tensor([1.0]))
    late = torch.nn.Parameter(torch.tensor([2.0]))
    opt = AdaHessian([a, late], lr=0.1, update_d_every=3)
    for t in range(5):
        opt.zero_grad(set_to_none=True)
        ((a ** 4).sum() + ((late ** 4).sum() if t >= 1 else 0)).backward(create_graph=opt.should_create_graph())
        opt.step()
        assert torch.isfinite(late).all()
        assert (late.item() == 2.0) == (t < 3)   # products on steps 1 and 4 (t = 0, 3)


def test_sophia_steps_are_bounded_by_lr_and_fall_back_to_sign_where_curvature_is_negative():
    """On -x^2 the estimate is negative, so every step is -lr * sign(m): exactly lr per coordinate."""
    x = torch.nn.Parameter(torch.tensor([0.5, -1.5], dtype=torch.float64))
    opt = Sophia([x], lr=0.1, update_d_every=1)
    for _ in range(4):
        before = x.detach().clone()
        opt.zero_grad(set_to_none=True)
        (-(x ** 2).sum()).backward(create_graph=opt.should_create_graph())
        opt.step()
        torch.testing.assert_close((x.detach() - before).abs(), torch.full((2,), 0.1, dtype=torch.float64))
    assert opt.state[x]["hessian"].lt(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,lr", [(AdaHessian, 0.15), (Sophia, 0.01)])
def test_reduces_a_small_loss(cls, lr, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x = torch.randn(64, 4).to(dtype)   # the same problem in both precisions
    y = x[:, :1] * x[:, 1:2]
    opt = cls(model.parameters(), lr=lr)
    losses = []
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# -- errors -------------------------------------------------------------------------------------------

def param():
    return torch.nn.Parameter(torch.randn(3))


@pytest.mark.parametrize("cls,kwargs,name,value", [
    (AdaHessian, dict(lr=-1.0), "lr", "-1.0"),
    (AdaHessian, dict(betas=(1.0, 0.999)), "beta1", "1.0"),
    (AdaHessian, dict(betas=(0.9, -0.1)), "beta2", "-0.1"),
    (AdaHessian, dict(betas=(0.9,)), "betas", "(0.9,)"),
    (AdaHessian, dict(eps=-1e-4), "eps", "-0.0001"),
    (AdaHessian, dict(weight_decay=float("nan")), "weight_decay", "nan"),
    (AdaHessian, dict(hessian_power=1.5), "hessian_power", "1.5"),
    (AdaHessian, dict(hessian_power=-0.5), "hessian_power", "-0.5"),
    (AdaHessian, dict(update_d_every=0), "update_d_every", "0"),
    (AdaHessian, dict(d_warmup=1.5), "d_warmup", "1.5"),
    (AdaHessian, dict(hvp_method="magic"), "hvp_method", "'magic'"),
    (Sophia, dict(lr=float("inf")), "lr", "inf"),
    (Sophia, dict(betas=(0.965, 1.0)), "beta2", "1.0"),
    (Sophia, dict(rho=-0.01), "rho", "-0.01"),
    (Sophia, dict(eps=0.0), "eps", "0.0"),
    (Sophia, dict(eps=-1.0), "eps", "-1.0"),
    (Sophia, dict(weight_decay=-0.1), "weight_decay", "-0.1"),
    (Sophia, dict(update_d_every=True), "update_d_every", "True"),
    (Sophia, dict(generator=7), "generator", "7"),
])
def test_invalid_hyperparameter_names_argument_and_value(cls, kwargs, name, value):
    with pytest.raises(ValueError) as info:
        cls([param()], **kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid {name}") and f": {value} " in message + " ", message


@pytest.mark.parametrize("cls,group", [(AdaHessian, {"hessian_power": 2.0}), (Sophia, {"rho": -1.0})])
def test_invalid_hyperparameter_in_a_param_group(cls, group):
    key = next(iter(group))
    with pytest.raises(ValueError, match=rf"Invalid {key}: "):
        cls([{"params": [param()], **group}])
