"""Hessian-vector products through scaled_dot_product_attention: every second-order optimizer trains a
small causal transformer under ``esgd.hvp_attention``, the product equals a float64 reference, the plain
loop's failure names the remedy in one line, and steps without a product keep the fused kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esgd
from bench.optimizers import list_optimizers, parse_optimizer
from esgd import ESGD, DoubleBackwardUnsupportedError

pytestmark = pytest.mark.usefixtures("one_thread")

SECOND_ORDER = [s.name for s in list_optimizers() if s.second_order]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
VOCAB, WIDTH, HEADS, CONTEXT = 16, 16, 2, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (h.view(b, t, HEADS, -1).transpose(1, 2) for h in self.qkv(self.ln1(x)).chunk(3, -1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.block, self.ln = Block(), nn.LayerNorm(WIDTH)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.block(x)) @ self.tok.weight.T


def copy_task(device: str) -> tuple[TinyGPT, torch.Tensor, torch.Tensor]:
    """Sequences that repeat their first half: the second half is predictable from the context."""
    gen = torch.Generator().manual_seed(0)
    half = torch.randint(0, VOCAB, (16, CONTEXT // 2 + 1), generator=gen)
    seq = torch.cat([half, half], 1)[:, :CONTEXT + 1]
    torch.manual_seed(0)
    return TinyGPT().to(device), seq[:, :-1].to(device), seq[:, 1:].to(device)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SECOND_ORDER)
def test_every_second_order_optimizer_trains_through_attention(name: str, device: str) -> None:
    model, x, y = copy_task(device)
    opt = parse_optimizer(name).create(model.parameters(), seed=0)
    with torch.no_grad():
        before = lm_loss(model, x, y).item()
    for _ in range(12):          # past the products of the warm-up and the first plain steps
        opt.zero_grad(set_to_none=True)
        with esgd.hvp_attention(opt):
            loss = lm_loss(model, x, y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = lm_loss(model, x, y).item()
    assert math.isfinite(after) and after < before, (name, before, after)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention written out, the definition the kernels implement."""
    t = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_product_through_the_math_kernel_equals_a_float64_reference(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    w0 = torch.randn(8, 24, generator=gen, dtype=torch.float64) / 3
    z = torch.randn(8, 24, generator=gen, dtype=torch.float64)

    def loss_of(w: torch.Tensor, attention) -> torch.Tensor:
        q, k, v = (h.view(2, 6, 2, 4).transpose(1, 2) for h in (x.to(w.dtype) @ w).chunk(3, -1))
        out = attention(q, k, v)
        return (out.tanh() * out).sum()

    _, expected = torch.func.jvp(torch.func.grad(lambda w: loss_of(w, reference_attention)), (w0,), (z,))

    w = nn.Parameter(w0.to(dtype))
    opt = ESGD([w])
    with esgd.hvp_attention(opt):
        loss = loss_of(w, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    loss.backward(create_graph=opt.should_create_graph())
    (hvp,) = opt.hessian_vector_products([w], [w.grad], [z.to(dtype)])
    w.grad = None
    torch.testing.assert_close(hvp.double(), expected, rtol=tol, atol=tol)


def fused_by_default() -> bool:
    q = torch.randn(1, 1, 4, 4, requires_grad=True)
    return "Attention" in F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn.name()


@pytest.mark.skipif(not fused_by_default(), reason="this torch takes the math kernel by default on the CPU")
def test_the_plain_loop_fails_with_one_line_that_names_the_helper() -> None:
    model, x, y = copy_task("cpu")
    opt = ESGD(model.parameters())
    lm_loss(model, x, y).backward(create_graph=opt.should_create_graph())
    with pytest.raises(DoubleBackwardUnsupportedError) as info:
        opt.step()
    message = str(info.value)
    assert "with esgd.hvp_attention(opt): loss = " in message and "\n" not in message, message
    assert "scaled_dot_product" in message
    for p in model.parameters():
        p.grad = None


@pytest.mark.skipif(not fused_by_default(), reason="this torch takes the math kernel by default on the CPU")
def test_only_graph_building_steps_take_the_math_kernel() -> None:
    q = torch.randn(1, 2, 4, 4, requires_grad=True)

    def kernel(opt) -> str:
        with esgd.hvp_attention(opt):
            name = F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn.name()
        return "fused" if "Attention" in name else "math"

    p = nn.Parameter(torch.ones(3))
    opt = ESGD([p], d_warmup=1, update_d_every=10)
    assert opt.should_create_graph() and kernel(opt) == "math"
    (p ** 3).sum().backward(create_graph=True)
    opt.step()
    p.grad = None
    assert not opt.should_create_graph() and kernel(opt) == "fused"
    assert kernel(ESGD([p], hvp_method="finite-difference")) == "fused"     # never builds a graph
    assert kernel(torch.optim.Adam([p])) == "fused"                          # no should_create_graph
    assert kernel(True) == "math" and kernel(False) == "fused"
    assert kernel(None) == "fused"
    # the selection ends with the context: the next forward is back on the fused kernel
    assert "Attention" in F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn.name()
