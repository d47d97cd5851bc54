"""What the package says about itself: the documents it points to, and the maths its docstrings state."""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

import esgd

PACKAGE = pathlib.Path(esgd.__file__).parent
ROOT = PACKAGE.parent


def test_the_specification_is_in_the_repository():
    spec = (ROOT / "docs" / "esgd-m.md").read_text()
    assert "denom = sqrt(d) / sqrt(1 - b2) + eps" in spec
    assert "docs/esgd-m.md" in (PACKAGE / "esgd_m.py").read_text()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_sophia_first_version_converts_as_the_docstring_says(foreach):
    """lr1 * clip(m / max(h, eps1), rho) is the final form with lr = lr1 * rho and eps = eps1 * rho."""
    doc = importlib.import_module("esgd.sophia").__doc__
    assert "lr = lr1 * rho" in doc and "eps = eps1 * rho" in doc
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2000, generator=gen, dtype=torch.float64)
    h = torch.randn(2000, generator=gen, dtype=torch.float64) * 50   # negative, tiny and large estimates
    theta = torch.randn(2000, generator=gen, dtype=torch.float64)
    lr1, eps1, rho = 0.3, 0.05, 0.04
    ratio = m / torch.clamp(h, min=eps1)
    assert (ratio.abs() > rho).any() and (ratio.abs() < rho).any()   # both clipped and unclipped
    first_version = theta - lr1 * torch.clamp(ratio, -rho, rho)

    def final_form(lr, eps):
        p = theta.clone()
        esgd.sophia([p], [m.clone()], [m.clone()], [h.clone()], None, lr=lr, beta1=0.9, beta2=0.99, rho=rho,
                    eps=eps, weight_decay=0.0, foreach=foreach)
        return p

    torch.testing.assert_close(final_form(lr1 * rho, eps1 * rho), first_version, rtol=1e-12, atol=1e-14)
    # the control: dividing eps by rho instead is a different update
    assert not torch.allclose(final_form(lr1 * rho, eps1 / rho), first_version)
