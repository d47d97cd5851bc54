"""Misuse gets one clear error that names the problem (and, for hyperparameters, the argument and value)."""

from __future__ import annotations

import math

import pytest
import torch

from esgd import ESGD, AdaHessian, ESGDMax, MissingGraphError, PlainESGD, Sophia


def param():
    return torch.nn.Parameter(torch.randn(3))


@pytest.mark.parametrize("kwargs,name,value", [
    (dict(lr=-1.0), "lr", "-1.0"),
    (dict(lr=float("nan")), "lr", "nan"),
    (dict(betas=(1.0, 0.999)), "beta1", "1.0"),
    (dict(betas=(-0.1, 0.999)), "beta1", "-0.1"),
    (dict(betas=(0.9, 1.0)), "beta2", "1.0"),
    (dict(betas=(0.9,)), "betas", "(0.9,)"),
    (dict(v=1.5), "v", "1.5"),
    (dict(v=-0.1), "v", "-0.1"),
    (dict(lr_warmup=1.0), "lr_warmup", "1.0"),
    (dict(lr_warmup=-0.5), "lr_warmup", "-0.5"),
    (dict(eps=-1e-8), "eps", "-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay", "-0.1"),
    (dict(update_d_every=0), "update_d_every", "0"),
    (dict(update_d_every=2.5), "update_d_every", "2.5"),
    (dict(d_warmup=0), "d_warmup", "0"),
    (dict(d_warmup=True), "d_warmup", "True"),
    (dict(generator=123), "generator", "123"),
])
def test_invalid_esgd_m_hyperparameter_names_argument_and_value(kwargs, name, value):
    with pytest.raises(ValueError) as info:
        ESGD([param()], **kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid {name}") and f": {value} " in message + " ", message


def test_invalid_hyperparameter_in_a_param_group():
    with pytest.raises(ValueError, match=r"Invalid v: 2\.0"):
        ESGD([{"params": [param()], "v": 2.0}])


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-0.1), "lr"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(probe="uniform"), "probe"), (dict(update_d_every=0), "update_d_every"), (dict(d_warmup=-1), "d_warmup"),
])
def test_invalid_plain_esgd_hyperparameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}"):
        PlainESGD([param()], **kwargs)


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_missing_graph_on_hvp_step_says_what_to_call(cls):
    p = param()
    opt = cls([p])
    (p ** 3).sum().backward()  # forgot create_graph on an HVP step
    with pytest.raises(MissingGraphError, match=r"backward\(create_graph=opt\.should_create_graph\(\)\)"):
        opt.step()


@pytest.mark.parametrize("cls", [ESGD, ESGDMax, PlainESGD, AdaHessian, Sophia])
def test_missing_graph_message_also_names_a_loss_linear_in_every_parameter(cls):
    """A loss linear in every parameter leaves gradients without a graph even with create_graph=True,
    so the message cannot just blame a missing create_graph."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters())
    assert opt.should_create_graph()
    (model(torch.randn(5, 3)) * torch.randn(5, 2)).sum().backward(create_graph=True)
    assert not any(p.grad.requires_grad for p in model.parameters())
    with pytest.raises(MissingGraphError) as info:
        opt.step()
    message = str(info.value)
    assert "\n" not in message
    assert "create_graph=True" in message and "loss.backward(create_graph=opt.should_create_graph())" in message
    assert "linear in every parameter" in message and "no curvature" in message, message


def test_plain_backward_is_fine_on_steps_without_product():
    p = param()
    opt = ESGD([p], d_warmup=1, update_d_every=5)
    (p ** 3).sum().backward(create_graph=opt.should_create_graph())
    opt.step()
    assert not opt.should_create_graph()
    opt.zero_grad(set_to_none=True)
    (p ** 3).sum().backward()
    opt.step()  # no error


def test_linear_parameters_without_graph_get_zero_curvature_rows_not_an_error():
    """A gradient that is constant in its parameter has no graph even with create_graph=True."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = ESGD([w, b], lr=0.1)
    ((w ** 2).sum() + 3 * b.sum()).backward(create_graph=True)
    assert not b.grad.requires_grad
    opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_sparse_gradients_are_rejected(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", [ESGD, PlainESGD])
def test_parameters_on_mixed_devices_are_rejected(cls):
    cpu = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="one device.*cpu.*meta|one device.*meta.*cpu"):
        cls([cpu, other])


def test_the_finiteness_check_tells_overflowing_squares_from_infinities():
    """A product of 1e30 is finite though its square overflows float32: it must not be dropped."""
    from esgd._base import _all_finite
    big = torch.full((4,), 1e30)
    assert _all_finite([big, torch.ones(3)]) and _all_finite([]) and _all_finite([torch.empty(0)])
    for bad in (math.inf, -math.inf, math.nan):
        assert not _all_finite([big, torch.tensor([1.0, bad])])
        assert not _all_finite([torch.ones(2), torch.tensor([bad])])
