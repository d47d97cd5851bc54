"""The other routes to H z: accumulated micro-batches, finite differences, and the torch.compile error."""

from __future__ import annotations

import pytest
import torch

from esgd import ESGD, DoubleBackwardUnsupportedError, PlainESGD

from .reference import loss_fn, make_data


def micro_loss(params, x, y, t, k, parts):
    """The mean loss of micro-batch k of step t's 4-row minibatch, divided by the number of parts."""
    rows = torch.arange((t % 4) * 4, (t % 4) * 4 + 4).chunk(parts)[k]
    w1, b1, w2 = params
    return ((torch.tanh(x[rows] @ w1.T + b1) @ w2.T - y[rows]) ** 2).mean() / parts


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
@pytest.mark.parametrize("parts", [2, 4])
def test_accumulated_micro_batches_equal_one_big_batch(cls, parts):
    x, y, init = make_data(7)
    make = lambda ps: cls(ps, lr=0.2, update_d_every=3, d_warmup=4, generator=torch.Generator().manual_seed(1))  # noqa

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    for t in range(20):
        opt.zero_grad(set_to_none=True)
        loss_fn(params, x, y, t).backward(create_graph=opt.should_create_graph())
        opt.step()
    whole = torch.cat([p.detach().reshape(-1) for p in params])

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    for t in range(20):
        opt.zero_grad(set_to_none=True)
        for k in range(parts):
            micro_loss(params, x, y, t, k, parts).backward(create_graph=opt.should_create_graph())
            if k < parts - 1:  # step() folds in the last micro-batch itself
                opt.accumulate_hvp()
                assert all(not p.grad.requires_grad for p in params)  # one graph alive at a time
        opt.step()
    accumulated = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(accumulated, whole, rtol=1e-10, atol=1e-12)
    assert (whole - torch.cat([p.reshape(-1) for p in init])).abs().max() > 1e-2


def test_finite_difference_product_is_close_to_the_exact_one():
    """Relative error of the forward difference on a small float64 and float32 MLP (measured: 7.5e-6
    and 5.9e-3 with r = eps ** (1/3) * (1 + |theta|) / |z|)."""
    for dtype, bound in ((torch.float64, 5e-5), (torch.float32, 2e-2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(dtype)
        x = torch.randn(64, 6, dtype=dtype)
        y = torch.randn(64, 3, dtype=dtype)
        params = list(model.parameters())

        def closure():
            for p in params:
                p.grad = None
            loss = ((model(x) - y) ** 2).mean()
            loss.backward(create_graph=False)
            return loss

        exact_opt = ESGD(params, generator=torch.Generator().manual_seed(3))
        fd_opt = ESGD(params, generator=torch.Generator().manual_seed(3), hvp_method="finite-difference")
        z = [exact_opt.draw_probe(p) for p in params]
        grads = torch.autograd.grad(((model(x) - y) ** 2).mean(), params, create_graph=True)
        exact = torch.cat([h.reshape(-1) for h in exact_opt.hessian_vector_products(params, list(grads), z)])
        closure()
        fd_opt._probes = dict(zip(params, z))
        rng = (torch.get_rng_state(), None)
        approx = torch.cat([h.reshape(-1) for h in fd_opt._finite_difference_hvps(params, closure, rng)])
        rel = ((approx - exact).norm() / exact.norm()).item()
        assert rel < bound, (dtype, rel)


def test_finite_difference_trajectory_tracks_the_exact_one():
    x, y, init = make_data(8)
    runs = []
    for method in ("autograd", "finite-difference"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = ESGD(params, lr=0.3, hvp_method=method, generator=torch.Generator().manual_seed(2))
        for t in range(30):
            def closure(t=t):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(params, x, y, t)
                loss.backward(create_graph=opt.should_create_graph())
                return loss
            opt.step(closure)
        runs.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=1e-5)


def test_finite_difference_needs_a_closure_and_no_graph():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ESGD([p], hvp_method="finite-difference")
    assert not opt.should_create_graph() and opt.is_hvp_step()
    (p ** 3).sum().backward()
    with pytest.raises(RuntimeError, match=r"step\(closure\)"):
        opt.step()


def test_finite_difference_replays_dropout_masks():
    """The second gradient evaluation sees the same dropout mask, so H z stays meaningful."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(64, 1)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    opt = ESGD(model.parameters(), hvp_method="finite-difference", generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt._probes = {p: opt.draw_probe(p) for p in params}
    torch.manual_seed(5)
    state = (torch.get_rng_state(), None)  # as step() captures it, before the first evaluation
    closure()
    approx = opt._finite_difference_hvps(params, closure, state)
    # exact product with the same mask
    torch.manual_seed(5)
    loss = model(x).pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    exact = torch.autograd.grad(grads, params, grad_outputs=[opt._probes[p] for p in params])
    a = torch.cat([h.reshape(-1) for h in approx])
    e = torch.cat([h.reshape(-1) for h in exact])
    assert ((a - e).norm() / e.norm()).item() < 1e-5


def test_compiled_model_with_exact_products_gets_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    compiled = torch.compile(model)
    opt = ESGD(model.parameters())
    compiled(torch.randn(5, 4)).pow(2).mean().backward(create_graph=opt.should_create_graph())
    with pytest.raises(DoubleBackwardUnsupportedError, match="hvp_method='finite-difference'"):
        opt.step()


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_product_from_a_separate_loss_equals_the_create_graph_loop(cls):
    """accumulate_hvp(loss) after a plain backward gives the same step as backward(create_graph=True)."""
    x, y, init = make_data(9)
    runs = []
    for separate in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = cls(params, lr=0.2, update_d_every=3, d_warmup=4, generator=torch.Generator().manual_seed(4))
        for t in range(20):
            opt.zero_grad(set_to_none=True)
            if separate:
                loss_fn(params, x, y, t).backward()
                opt.accumulate_hvp(loss_fn(params, x, y, t))
                assert all(not p.grad.requires_grad for p in params)
            else:
                loss_fn(params, x, y, t).backward(create_graph=opt.should_create_graph())
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-12)


def test_product_from_a_sub_batch_is_a_different_estimate():
    """The product of a half batch is used as given (the cheaper estimate): the step changes."""
    x, y, init = make_data(9)
    outs = []
    for rows in (slice(0, 16), slice(0, 8)):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = ESGD(params, lr=0.2, generator=torch.Generator().manual_seed(4))
        w1, b1, w2 = params
        loss = lambda r: ((torch.tanh(x[r] @ w1.T + b1) @ w2.T - y[r]) ** 2).mean()  # noqa: E731
        loss(slice(0, 16)).backward()
        opt.accumulate_hvp(loss(rows))
        opt.step()
        outs.append(torch.cat([p.detach().reshape(-1) for p in params]))
    assert not torch.allclose(outs[0], outs[1])


def _fd_step_d(model, closure_model, keep=None):
    """One finite-difference HVP step of ESGD-M; returns d (the squared-product EMA) per parameter."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ESGD(model.parameters(), hvp_method="finite-difference", generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = ((closure_model(x) - y) ** 2).mean()
        loss.backward()
        if keep is not None:     # the tensors themselves, and their values at this moment
            keep.append([(p.grad, p.grad.clone()) for p in model.parameters()])
        return loss

    closure()
    opt.step(closure)
    return [opt.state[p]["exp_avg_d_sq"].clone() for p in model.parameters()]


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("bucket_view", [False, True])
def test_finite_difference_under_ddp_equals_plain_model(bucket_view, tmp_path):
    # With gradient_as_bucket_view the second gradient is written into the memory the first one
    # lived in; the product must still be g(theta + r z) - g(theta), not zero.
    import torch.distributed as dist
    plain = _small_model()
    want = _fd_step_d(plain, plain)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _small_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        got = _fd_step_d(model, ddp)
    finally:
        dist.destroy_process_group()
    assert all(g.abs().max() > 0 for g in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_finite_difference_leaves_the_closures_gradients_alone():
    model = _small_model()
    kept = []
    _fd_step_d(model, model, keep=kept)
    assert len(kept) == 3                      # at theta (twice: before and in step) and at theta + r z
    for grads in kept:                         # nothing the closure handed out was changed in place
        for tensor, value in grads:
            assert torch.equal(tensor, value)
