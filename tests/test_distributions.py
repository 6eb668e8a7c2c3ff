"""Distribution objects against torch.distributions and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaelab.distributions import Bernoulli, DiagonalGaussian, Gaussian, StandardNormal


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(16, 7, generator=g), torch.randn(16, 7, generator=g)
    q = DiagonalGaussian(mu, logvar)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(q.kl_standard_normal(), ref)
    # Doersch eq. 7 written out: 1/2 (tr S + mu^T mu - k - log det S)
    eq7 = 0.5 * (logvar.exp().sum(-1) + (mu**2).sum(-1) - 7 - logvar.sum(-1))
    torch.testing.assert_close(q.kl_standard_normal(), eq7)


def test_kl_between_gaussians_matches_torch():
    g = torch.Generator().manual_seed(1)
    a = DiagonalGaussian(torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g))
    b = DiagonalGaussian(torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g))
    ref = kl_divergence(Normal(a.mu, a.std), Normal(b.mu, b.std)).sum(-1)
    torch.testing.assert_close(a.kl(b), ref)


def test_gaussian_log_probs_match_torch():
    g = torch.Generator().manual_seed(2)
    mu, logvar, x = (torch.randn(4, 6, generator=g) for _ in range(3))
    q = DiagonalGaussian(mu, logvar)
    torch.testing.assert_close(q.log_prob(x), Normal(mu, torch.exp(0.5 * logvar)).log_prob(x).sum(-1))
    p = StandardNormal(6)
    torch.testing.assert_close(p.log_prob(x), Normal(0.0, 1.0).log_prob(x).sum(-1))
    loc, x3 = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    lik = Gaussian(loc, torch.tensor(math.log(0.3)))
    torch.testing.assert_close(lik.log_prob(x3), Normal(loc, 0.3).log_prob(x3).sum((1, 2, 3)))


def test_bernoulli_matches_torch_and_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 1, 4, 4, generator=g) * 3
    xb = torch.bernoulli(torch.full((8, 1, 4, 4), 0.5), generator=g)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(xb).sum((1, 2, 3))
    torch.testing.assert_close(Bernoulli(logits).log_prob(xb), ref)
    # on grey levels: the negative cross-entropy x log p + (1-x) log(1-p)
    xg = torch.rand(8, 1, 4, 4, generator=g)
    p = torch.sigmoid(logits)
    ce = (xg * p.log() + (1 - xg) * (1 - p).log()).sum((1, 2, 3))
    torch.testing.assert_close(Bernoulli(logits).log_prob(xg), ce, atol=1e-4, rtol=1e-5)
    # masked sums only count masked elements, in both code paths
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    torch.testing.assert_close(
        Bernoulli(logits).log_prob(xg, mask), Bernoulli(logits).log_prob_elements(xg)[..., :2].sum((1, 2, 3))
    )
    # one datapoint against many draws' logits (evaluation's k draws): broadcast, the same numbers
    one = xg[:1]
    torch.testing.assert_close(Bernoulli(logits).log_prob(one), (one * p.log() + (1 - one) * (1 - p).log()).sum((1, 2, 3)),
                               atol=1e-4, rtol=1e-5)
    assert torch.equal(Bernoulli(logits).log_prob(one), Bernoulli(logits).log_prob_elements(one).sum((1, 2, 3)))


def test_rsample_is_reparameterised_and_seeded():
    mu = torch.zeros(3, requires_grad=True)
    logvar = torch.zeros(3, requires_grad=True)
    q = DiagonalGaussian(mu, logvar)
    z1 = q.rsample(torch.Generator().manual_seed(5))
    z2 = q.rsample(torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)
    z1.sum().backward()
    assert mu.grad is not None and torch.allclose(mu.grad, torch.ones(3))


def test_reparameterised_gradient_matches_closed_form():
    """d/dmu E[|z|^2] = 2 mu and d/dlogvar E[|z|^2] = sigma^2 (E[|z|^2] = |mu|^2 + sum sigma^2)."""
    mu = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    logvar = torch.tensor([0.0, -1.0, 0.5], requires_grad=True)
    z = DiagonalGaussian(mu, logvar).rsample(torch.Generator().manual_seed(0), sample_shape=(200_000,))
    (z**2).sum(-1).mean().backward()
    torch.testing.assert_close(mu.grad, 2 * mu.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(logvar.grad, logvar.detach().exp(), atol=0.03, rtol=0)


@pytest.mark.parametrize("shape", [(2, 5), (3, 2, 4)])
def test_diagonal_gaussian_any_batch_shape(shape):
    q = DiagonalGaussian(torch.zeros(shape), torch.zeros(shape))
    assert q.log_prob(torch.zeros(shape)).shape == shape[:-1]
    assert q.kl_standard_normal().shape == shape[:-1]
