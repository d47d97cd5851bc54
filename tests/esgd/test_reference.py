"""ESGD-M and plain ESGD against the independent float64 references in tests/esgd/reference.py."""

from __future__ import annotations

import pytest
import torch

from esgd import ESGD, ESGDMax, PlainESGD

from .reference import esgd_m_reference, esgd_plain_reference, loss_fn, make_data

STEPS = 45


def run_optimizer(make_opt, init, x, y, *, steps=STEPS, scale=1.0):
    """Train nn.Parameters with the optimizer; return the trajectory and the probes it drew."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(params)
    probes, step_probes = [], []
    draw = opt.draw_probe

    def recording_draw(p):
        z = draw(p)
        step_probes.append(z.clone())
        return z

    opt.draw_probe = recording_draw
    trajectory = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(params, x, y, t, scale).backward(create_graph=opt.should_create_graph())
        opt.step()
        if step_probes:
            probes.append(list(step_probes))
            step_probes.clear()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, probes


def assert_same_trajectory(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want)
    for t, (gs, ws) in enumerate(zip(got, want)):
        for g, w in zip(gs, ws):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"step {t + 1}: {m}")


DEFAULT = dict(lr=1.0, betas=(0.9, 0.999), v=None, lr_warmup=0.99, eps=1e-4, weight_decay=0.0)

CONFIGS = {
    "defaults": ({}, {}),
    "qhm": (dict(betas=(0.999, 0.999), v=0.7), {}),
    "plain-momentum-v1": (dict(v=1.0), {}),
    "weight-decay": (dict(weight_decay=0.1, lr=0.5), {}),
    "custom-schedule": (dict(lr=0.3), dict(update_d_every=3, d_warmup=2)),
    "no-warmup": (dict(lr_warmup=0.0, lr=0.05), {}),
    "eps-zero-beta1-zero": (dict(eps=0.0, betas=(0.0, 0.99), lr=0.1), dict(update_d_every=4, d_warmup=5)),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_esgd_m_matches_reference(name, foreach):
    hyper, schedule = CONFIGS[name]
    x, y, init = make_data(1)
    got, probes = run_optimizer(
        lambda ps: ESGD(ps, **hyper, **schedule, foreach=foreach, generator=torch.Generator().manual_seed(3)),
        init, x, y)
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, groups=[([0, 1, 2], {**DEFAULT, **hyper})],
                            **schedule)
    assert_same_trajectory(got, want)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_esgd_m_two_param_groups(foreach):
    x, y, init = make_data(2)
    g0 = dict(lr=0.5, betas=(0.8, 0.99), v=0.6, eps=1e-3, weight_decay=0.05)
    g1 = dict(lr=0.2, betas=(0.95, 0.9), v=1.0, lr_warmup=0.9)

    def make(ps):
        return ESGD([{"params": ps[:2], **g0}, {"params": ps[2:], **g1}], update_d_every=4, d_warmup=3,
                    foreach=foreach)

    got, probes = run_optimizer(make, init, x, y)
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, update_d_every=4, d_warmup=3,
                            groups=[([0, 1], {**DEFAULT, **g0}), ([2], {**DEFAULT, **g1})])
    assert_same_trajectory(got, want)


def test_esgd_m_with_lr_scheduler_warmup_multiplies_on_top():
    """A scheduler changes group['lr']; the exponential warmup still multiplies it."""
    x, y, init = make_data(3)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ESGD(params, lr=0.4, update_d_every=5, d_warmup=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    probes, trajectory = [], []
    draw = opt.draw_probe
    current = []
    opt.draw_probe = lambda p: current.append(draw(p)) or current[-1]
    for t in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(params, x, y, t).backward(create_graph=opt.should_create_graph())
        opt.step()
        sched.step()
        if current:
            probes.append(list(current))
            current.clear()
        trajectory.append([p.detach().clone() for p in params])
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, update_d_every=5, d_warmup=4,
                            groups=[([0, 1, 2], {**DEFAULT, "lr": 0.4})],
                            lr_schedule=lambda t, gi: 0.4 * 0.5 ** (t // 7))
    assert_same_trajectory(trajectory, want)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_plain_esgd_matches_reference(probe, foreach):
    x, y, init = make_data(4)
    kw = dict(lr=0.05, eps=1e-3, weight_decay=0.01, update_d_every=6, d_warmup=3)
    got, probes = run_optimizer(lambda ps: PlainESGD(ps, probe=probe, foreach=foreach, **kw), init, x, y)
    want = esgd_plain_reference(init, x, y, steps=STEPS, probes=probes, **kw)
    assert_same_trajectory(got, want)


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_foreach_equals_single_tensor_float32(cls):
    """Both kernels run the same operations, so the trajectories agree exactly."""
    x, y, init = make_data(5)
    init = [p.float() for p in init]
    x, y = x.float(), y.float()
    runs = []
    for foreach in (True, False):
        traj, _ = run_optimizer(lambda ps: cls(ps, lr=0.1, foreach=foreach, generator=torch.Generator().manual_seed(0)),
                                init, x, y)
        runs.append(traj)
    for a, b in zip(*runs):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)


def test_reference_steps_actually_move():
    """Guard against a vacuous comparison: the trajectory changes, and the probes vary between steps."""
    x, y, init = make_data(1)
    got, probes = run_optimizer(lambda ps: ESGD(ps, generator=torch.Generator().manual_seed(3)), init, x, y)
    assert (got[-1][0] - init[0]).abs().max() > 1e-2
    # d_warmup=20 HVP steps, then one every 10 steps (9 plain steps in between): indices 29 and 39.
    assert len(probes) == 22
    assert not torch.equal(probes[0][0], probes[1][0])


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_esgd_m_max_matches_reference(foreach):
    x, y, init = make_data(6)
    hyper = dict(lr=0.3, betas=(0.9, 0.95))
    got, probes = run_optimizer(lambda ps: ESGDMax(ps, **hyper, update_d_every=3, d_warmup=2, foreach=foreach),
                                init, x, y)
    want = esgd_m_reference(init, x, y, steps=STEPS, probes=probes, update_d_every=3, d_warmup=2, d_max=True,
                            groups=[([0, 1, 2], {**DEFAULT, **hyper})])
    assert_same_trajectory(got, want)
