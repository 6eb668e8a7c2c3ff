"""The 8-bit likelihoods against a straightforward reference: normalisation over all 256 values,
values, finite gradients at the edge bins, sampling frequencies, mean/mode, masks, the heads."""

from __future__ import annotations

import math

import pytest
import torch

from vaelab import ModelConfig, RunConfig
from vaelab.distributions import LIKELIHOODS, DiscretizedLogistic, DiscretizedLogisticMixture
from vaelab.evaluation.evaluate import describe_likelihood

VALUES = torch.arange(256, dtype=torch.float64) / 255


def ref_log_prob(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The textbook formula in float64: CDF differences, edge bins to +-inf."""
    x, loc, s = x.double(), loc.double(), log_scale.double().clamp(min=-7).exp()
    cdf = lambda v: torch.sigmoid((v - loc) / s)  # noqa: E731
    p = cdf(x + 0.5 / 255) - cdf(x - 0.5 / 255)
    p = torch.where(x < 0.5 / 255, cdf(x + 0.5 / 255), p)
    p = torch.where(x > 1 - 0.5 / 255, 1 - cdf(x - 0.5 / 255), p)
    return p.log()


def ref_mixture_log_prob(x, logits, loc, log_scale, coeffs):
    """Per pixel log sum_i pi_i prod_c P_c, looping over components and channels (float64)."""
    b, m, c, h, w = loc.shape
    out = torch.zeros(b, m, h, w, dtype=torch.float64)
    for i in range(m):
        idx = 0
        for ch in range(c):
            mu = loc[:, i, ch].double()
            for j in range(ch):
                mu = mu + coeffs[:, i, idx].double() * x[:, j].double()
                idx += 1
            out[:, i] += ref_log_prob(x[:, ch], mu, log_scale[:, i, ch])
    return torch.logsumexp(out + torch.log_softmax(logits.double(), 1), 1)


def random_params(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    loc = torch.rand(shape, generator=g, dtype=dtype) * 1.6 - 0.3  # includes means outside [0, 1]
    log_scale = torch.rand(shape, generator=g, dtype=dtype) * 9 - 7.5  # s from ~5e-4 (clamped) to ~4
    return loc, log_scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_256_probabilities_sum_to_one(dtype):
    loc, log_scale = random_params((4, 3, 5, 5), 0, dtype)
    loc[0, 0, 0, :3] = torch.tensor([-4.0, 5.0, 0.5])  # far outside, and a huge scale next
    log_scale[0, 0, 0, 2] = 6.0
    p = DiscretizedLogistic(loc, log_scale).probs_all()  # (4, 3, 5, 5, 256)
    assert p.shape[-1] == 256 and (p >= 0).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=dtype), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 2e-4)])
def test_matches_reference(dtype, tol):
    loc, log_scale = random_params((2000,), 1, dtype)
    x = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(2)).to(dtype) / 255
    x[:100], x[100:200] = 0.0, 1.0  # the edge bins
    got = DiscretizedLogistic(loc, log_scale).log_prob_elements(x).double()
    want = ref_log_prob(x, loc, log_scale)
    # The textbook difference of CDFs cancels catastrophically in the tails (absolute error ~1e-16
    # in float64), so compare logs where P > e^-10 and probabilities everywhere.
    ok = want > -10
    assert ok.sum() > 800
    assert torch.allclose(got[ok], want[ok], atol=tol, rtol=tol)
    assert torch.allclose(got.exp(), want.exp(), atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
    assert torch.isfinite(got).all()


def test_far_tails_match_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    cases = [(100, 0.0, -6.0), (250, 0.1, -5.0), (3, 0.9, -4.5), (0, 0.95, -5.0), (255, 0.02, -4.0), (128, 0.5, -7.0)]
    for k, mu, ls in cases:
        s = mpmath.exp(ls)
        cdf = lambda v: 1 / (1 + mpmath.exp(-(v - mu) / s))  # noqa: B023, E731
        lo, hi = (mpmath.mpf(k) - 0.5) / 255, (mpmath.mpf(k) + 0.5) / 255
        p = cdf(hi) if k == 0 else (1 - cdf(lo) if k == 255 else cdf(hi) - cdf(lo))
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            got = DiscretizedLogistic(torch.tensor([mu], dtype=dtype), torch.tensor([ls], dtype=dtype))
            lp = float(got.log_prob_elements(torch.tensor([k / 255], dtype=dtype)))
            want = float(mpmath.log(p))
            assert abs(lp - want) <= tol * max(1.0, abs(want)), (k, mu, ls, dtype, lp, want)


def test_far_tails_stay_finite_and_ordered():
    # Bins ~100 scale units from the mean: the naive difference of sigmoids is 0, log(0) = -inf.
    loc = torch.zeros(3)
    d = DiscretizedLogistic(loc, torch.full((3,), -6.0))
    lp = d.log_prob_elements(torch.tensor([100 / 255, 150 / 255, 200 / 255]))
    assert torch.isfinite(lp).all() and lp[0] > lp[1] > lp[2]


@pytest.mark.parametrize("x", [0.0, 1.0, 128 / 255])
def test_gradients_finite_at_edges(x):
    loc = torch.tensor([-3.0, -0.01, 0.0, 0.5, 1.0, 1.01, 4.0], requires_grad=True)
    log_scale = torch.tensor([-9.0, -7.0, -3.0, 0.0, 2.0, 6.0, -7.0], requires_grad=True)
    lp = DiscretizedLogistic(loc, log_scale).log_prob_elements(torch.full((7,), x))
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_gradient_against_finite_differences():
    loc, log_scale = random_params((40,), 3, torch.float64)
    log_scale = log_scale.clamp(min=-6.5)  # away from the clamp's kink
    x = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4)).double() / 255
    x[:5], x[5:10] = 0.0, 1.0
    f = lambda m, s: DiscretizedLogistic(m, s).log_prob_elements(x)  # noqa: E731
    assert torch.autograd.gradcheck(f, (loc.requires_grad_(), log_scale.requires_grad_()))


def test_mean_and_mode_are_exact():
    loc, log_scale = random_params((300,), 5)
    d = DiscretizedLogistic(loc.double(), log_scale.double())
    p = d.probs_all()
    assert torch.allclose(d.mean, (p * VALUES).sum(-1), atol=1e-9)
    assert torch.equal(d.mode(), VALUES[p.argmax(-1)])


def _hist(samples: torch.Tensor) -> torch.Tensor:
    k = torch.round(samples * 255).long()
    assert torch.allclose(k.double() / 255, samples.double())  # draws are on the 8-bit grid
    return torch.bincount(k.flatten(), minlength=256).double() / k.numel()


@pytest.mark.parametrize("loc,log_scale", [(0.5, math.log(0.03)), (0.01, math.log(0.02)), (1.2, math.log(0.2))])
def test_sampling_histogram_matches_probabilities(loc, log_scale):
    n = 200_000
    d = DiscretizedLogistic(torch.full((n,), loc), torch.full((n,), log_scale))
    freq = _hist(d.sample(torch.Generator().manual_seed(0)))
    p = DiscretizedLogistic(torch.tensor([loc]), torch.tensor([log_scale])).probs_all()[0].double()
    assert 0.5 * (freq - p).abs().sum() < 0.01  # total variation distance


# ---------------------------------------------------------------- the mixture


def mixture_params(b, m, c, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, m, h, w, generator=g, dtype=dtype)
    loc, log_scale = random_params((b, m, c, h, w), seed + 1, dtype)
    coeffs = torch.tanh(torch.randn(b, m, c * (c - 1) // 2, h, w, generator=g, dtype=dtype))
    return logits, loc, log_scale, coeffs


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 3e-4)])
def test_mixture_matches_reference(channels, dtype, tol):
    logits, loc, log_scale, coeffs = mixture_params(3, 4, channels, 5, 6, 7, dtype)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (3, channels, 5, 6), generator=g).to(dtype) / 255
    x[0, :, 0] = 0.0
    x[1, :, 1] = 1.0
    # Components centred near the data (after the channel shifts), so that every channel's term is
    # where the textbook reference is accurate; far tails are checked against mpmath above.
    idx, shift = 0, torch.zeros_like(loc)
    for c in range(1, channels):
        for j in range(c):
            shift[:, :, c] += coeffs[:, :, idx] * x[:, None, j]
            idx += 1
    loc = x[:, None] - shift + 0.05 * torch.randn(loc.shape, generator=g, dtype=dtype)
    log_scale = log_scale.clamp(-5, 0)
    params = (logits, loc, log_scale, coeffs)
    got = DiscretizedLogisticMixture(*params).log_prob_elements(x)
    assert got.shape == (3, 5, 6)
    assert torch.allclose(got.double(), ref_mixture_log_prob(x, *params), atol=tol, rtol=tol)


def test_mixture_sums_to_one_over_every_colour():
    # Two channels: all 256^2 joint values of each pixel (the coefficients couple the channels).
    logits, loc, log_scale, coeffs = mixture_params(1, 3, 2, 1, 2, 11)
    grid = torch.cartesian_prod(VALUES, VALUES)  # (65536, 2)
    x = grid.T.reshape(2, 65536, 1).permute(1, 0, 2)[..., None].expand(65536, 2, 1, 2)  # (N, C, H, W)
    d = DiscretizedLogisticMixture(*(t.expand(65536, *t.shape[1:]) for t in (logits, loc, log_scale, coeffs)))
    total = d.log_prob_elements(x).exp().sum(0)  # per pixel
    assert torch.allclose(total, torch.ones(1, 2, dtype=torch.float64), atol=1e-10)
    # one channel: the 256 values
    logits, loc, log_scale, coeffs = mixture_params(1, 5, 1, 2, 2, 12)
    d = DiscretizedLogisticMixture(*(t.expand(256, *t.shape[1:]) for t in (logits, loc, log_scale, coeffs)))
    total = d.log_prob_elements(VALUES.view(256, 1, 1, 1).expand(256, 1, 2, 2)).exp().sum(0)
    assert torch.allclose(total, torch.ones(2, 2, dtype=torch.float64), atol=1e-12)


def test_mixture_gradients_finite_at_edges():
    logits, loc, log_scale, coeffs = (t.float().requires_grad_() for t in mixture_params(2, 3, 3, 2, 2, 13))
    x = torch.zeros(2, 3, 2, 2)
    x[1] = 1.0
    x[0, 1, 0, 0] = 1.0
    lp = DiscretizedLogisticMixture(logits, loc, log_scale, coeffs).log_prob(x)
    lp.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (logits, loc, log_scale, coeffs))


def test_mixture_sampling_matches_enumeration():
    n = 200_000
    logits, loc, log_scale, coeffs = mixture_params(1, 3, 2, 1, 1, 14, torch.float32)
    log_scale = log_scale.clamp(min=math.log(0.02))
    d = DiscretizedLogisticMixture(*(t.expand(n, *t.shape[1:]) for t in (logits, loc, log_scale, coeffs)))
    s = d.sample(torch.Generator().manual_seed(1))  # (n, 2, 1, 1)
    grid = torch.cartesian_prod(VALUES, VALUES).float()
    e = DiscretizedLogisticMixture(*(t.expand(65536, *t.shape[1:]) for t in (logits, loc, log_scale, coeffs)))
    joint = e.log_prob_elements(grid.view(65536, 2, 1, 1)).exp().view(256, 256).double()
    for ch, marginal in ((0, joint.sum(1)), (1, joint.sum(0))):
        # groups of 8 values: broad marginals would need millions of draws for a per-value check
        tv = 0.5 * (_hist(s[:, ch]).view(32, 8).sum(1) - marginal.view(32, 8).sum(1)).abs().sum()
        assert tv < 0.015
    # the mixture mean with zero coefficients is exact
    zero = DiscretizedLogisticMixture(logits[:1], loc[:1], log_scale[:1], torch.zeros_like(coeffs[:1]))
    ez = DiscretizedLogisticMixture(logits.expand(65536, -1, -1, -1), loc.expand(65536, -1, -1, -1, -1),
                                    log_scale.expand(65536, -1, -1, -1, -1), torch.zeros(65536, 3, 1, 1, 1))
    pz = ez.log_prob_elements(grid.view(65536, 2, 1, 1)).exp().double()
    want = (pz.view(65536, 1) * grid.double()).sum(0)
    assert torch.allclose(zero.mean.flatten().double(), want, atol=1e-5)
    mode = zero.mode()
    assert mode.shape == (1, 2, 1, 1) and torch.equal(torch.round(mode * 255), mode * 255)


def test_mixture_masks():
    params = mixture_params(2, 3, 3, 4, 4, 15)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(16)).double() / 255
    d = DiscretizedLogisticMixture(*params)
    terms = d.log_prob_elements(x)
    mask = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(17)) > 0.5).double()
    want = (terms * mask[:, 0]).flatten(1).sum(-1)
    assert torch.allclose(d.log_prob(x, mask), want)
    assert torch.allclose(d.log_prob(x, mask.expand(2, 3, 4, 4)), want)
    assert torch.allclose(d.log_prob(x, mask[:, 0]), want)
    bad = mask.expand(2, 3, 4, 4).clone()
    bad[0, 1] = 1 - bad[0, 1]
    with pytest.raises(ValueError, match="whole pixels"):
        d.log_prob(x, bad)


# ---------------------------------------------------------------- the registered heads


@pytest.mark.parametrize("name", ["discretized-logistic", "discretized-logistic-mixture"])
@pytest.mark.parametrize("channels", [1, 3])
def test_heads(name, channels):
    cfg = ModelConfig(likelihood=name, n_mixtures=4)
    head_cls = LIKELIHOODS.get(name)
    assert head_cls.discrete
    k = head_cls.num_params(channels, cfg)
    want = 2 * channels if name == "discretized-logistic" else 4 * (1 + 2 * channels + channels * (channels - 1) // 2)
    assert k == want  # RGB mixture: 10 per component as in PixelCNN++
    d = head_cls(cfg, channels)(torch.randn(7, k, 6, 5))
    x = torch.randint(0, 256, (7, channels, 6, 5)).float() / 255
    lp = d.log_prob(x)
    assert lp.shape == (7,) and torch.isfinite(lp).all() and (lp < 0).all()
    g = torch.Generator().manual_seed(0)
    for img in (d.sample(g), d.mean, d.mode()):
        assert img.shape == (7, channels, 6, 5) and img.min() >= 0 and img.max() <= 1
    exact, meaning = describe_likelihood(RunConfig(model=cfg))
    assert exact and "bits/dim" in meaning


def test_edge_bins_take_the_tails():
    # A huge scale spreads the logistic far beyond [0, 1]: the two edge bins hold almost everything.
    p = DiscretizedLogistic(torch.tensor([0.5]), torch.tensor([12.0])).probs_all()[0]
    assert abs(float(p[0]) - 0.5) < 1e-4 and abs(float(p[255]) - 0.5) < 1e-4
    assert float(p[1:255].sum()) < 1e-4


def test_reference_mixture_against_brute_force():
    # The loop reference equals brute-force enumeration of a one-pixel RGB mixture's components.
    logits, loc, log_scale, coeffs = mixture_params(1, 2, 3, 1, 1, 18)
    x = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    total = 0.0
    for i in range(2):
        w = torch.softmax(logits[0, :, 0, 0], 0)[i]
        r, gch, b = x.flatten()
        a, bb, cc = coeffs[0, i, :, 0, 0]
        mus = [loc[0, i, 0, 0, 0], loc[0, i, 1, 0, 0] + a * r, loc[0, i, 2, 0, 0] + bb * r + cc * gch]
        p = w
        for ch, v in enumerate((r, gch, b)):
            p = p * ref_log_prob(v, mus[ch], log_scale[0, i, ch, 0, 0]).exp()
        total = total + p
    assert torch.allclose(ref_mixture_log_prob(x, logits, loc, log_scale, coeffs).flatten(), total.log().flatten())
