"""Byte-level language model: a small GPT on real text, scored in bits per byte.

A decoder-only transformer after GPT-2 (Radford et al. 2019): token and learned position embeddings,
pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, a final LayerNorm, and an output layer
tied to the token embedding; 256 tokens, one per byte value.  The default (4 layers, width 128, 4 heads,
context 128) has 0.84 M parameters.  Attention goes through ``F.scaled_dot_product_attention``, so torch
picks its fastest kernel; the runner takes the math kernel on the steps that need a Hessian-vector
product (the fused kernels cannot be differentiated twice, see :mod:`esgd.attention`).

The text is the running Python's own standard-library source by default, available offline
(:mod:`tasks.text`), or any UTF-8 file through the ``data_file`` option; ``--synthetic`` replaces it with
2 MiB of uniform random bytes, labelled synthetic, for timing runs (nothing to learn: 8 bits per byte is
the best a model can do there).  The training loss is the mean cross-entropy of the next byte;
``evaluate()`` gives bits per byte on fixed validation windows (``eval_windows`` of them, 0 for the
whole block), and ``test()`` the same on the whole test block.  The info in ``meta.json`` names the
corpus (file list, SHA-256, Python version) and its unigram entropy ``unigram_bpb``, the score of a
model that ignores the context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import text
from .base import Problem, TaskConfig, TaskOptionError, TaskSpec, resolve_options
from .data import seeded_init

OPTIONS = {"layers": 4, "width": 128, "heads": 4, "context": 128, "data_file": "", "eval_windows": 128}
BATCH_SIZE = 32
VOCAB = 256


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (h.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for h in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Bytes ``(B, T)`` in, next-byte logits ``(B, T, 256)`` out, ``T`` up to ``context``."""

    def __init__(self, layers: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        # GPT-2's initialisation: N(0, 0.02), with the projections into the residual stream scaled down
        # by sqrt(2 * layers) so that the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T


def build(config: TaskConfig) -> Problem:
    opt = resolve_options("charlm", OPTIONS, config.options,
                          at_least={"layers": 0, "width": 1, "heads": 1, "context": 1, "eval_windows": 0})
    if opt["width"] % opt["heads"]:
        raise TaskOptionError(f"task 'charlm': width={opt['width']} must be a multiple of heads={opt['heads']}")
    context = opt["context"]
    if config.synthetic:
        corpus = text.synthetic_corpus(context)
    elif opt["data_file"]:
        corpus = text.file_corpus(opt["data_file"], context)
    else:
        corpus = text.stdlib_corpus(context)
    info = {"options": opt, **corpus.info, "unigram_bpb": text.unigram_bpb(corpus.train)}
    corpus.to(config.device)
    model = seeded_init(config.seed, lambda: CharGPT(opt["layers"], opt["width"], opt["heads"], context),
                        config.device)
    val = text.tiling_windows(corpus.val, context, opt["eval_windows"])
    test = text.tiling_windows(corpus.test, context)

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())

    batches = text.window_batches(corpus.train, context, config.batch_size or BATCH_SIZE, config.seed)
    return Problem(model=model, batches=batches, loss=loss,
                   evaluate=lambda: text.bits_per_byte(model, val, "val"),
                   test=lambda: text.bits_per_byte(model, test, "test"),
                   data_source=corpus.source, synthetic=corpus.synthetic, info=info,
                   reference=("the unigram entropy of the training text, the score of a model that ignores "
                              "the context", info["unigram_bpb"]))


TASK = TaskSpec(name="charlm", description="Byte-level GPT (4 layers, width 128, 0.84M params) on Python "
                "stdlib source, bits per byte; options layers, width, heads, context, data_file",
                build=build, default_steps=300, default_batch_size=BATCH_SIZE,
                data_source="real text offline: the running Python's standard-library source, or data_file",
                eval_metric="val_bpb", higher_is_better=False, target=3.5, default_eval_every=50,
                test_metric="test_bpb", options=OPTIONS)
