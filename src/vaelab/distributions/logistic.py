"""8-bit likelihoods: the discretized logistic (Kingma et al. 2016, Sec. 5 / App. C) and the mixture of
discretized logistics of PixelCNN++ (Salimans et al. 2017, Sec. 2.1-2.2).

Pixels are 8-bit values k in 0..255, given to every likelihood as x = k/255 in [0, 1]. Bin k covers
[(k - 1/2)/255, (k + 1/2)/255) except the two edge bins, which extend to -inf and +inf, so that the
256 probabilities of a pixel sum to exactly one:

    P(k) = sigma((x + 1/510 - mu)/s) - sigma((x - 1/510 - mu)/s)      for 0 < k < 255
    P(0) = sigma((1/510 - mu)/s),    P(255) = 1 - sigma((1 - 1/510 - mu)/s)

-log P is therefore a true negative log-likelihood of the 8-bit data (nats), and NLL / (D ln 2) is the
bits/dim of the literature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .base import Distribution
from .likelihoods import LIKELIHOODS, LikelihoodHead

BINS = 256
HALF_BIN = 0.5 / (BINS - 1)  # half a bin in [0, 1] units
LOG_BIN = math.log(BINS - 1)  # -log(bin width)
MIN_LOG_SCALE = -7.0  # s >= 9e-4, a quarter of a bin: keeps gradients tame (PixelCNN++ clamps likewise)


def _log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigma(a) - sigma(b)) for a > b, accurate in both tails.

    sigma(a) - sigma(b) = sigma(-b) - sigma(-a), so we flip to the side where both arguments lie in
    the left tail and write log sigma(a) + log(1 - exp(log sigma(b) - log sigma(a))).
    """
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    la, lb = F.logsigmoid(a), F.logsigmoid(b)
    # clamp: where a ~ b in float precision the difference underflows; that branch is replaced by
    # the midpoint rule below, and the clamp keeps its (discarded) gradient finite.
    return la + torch.log(torch.clamp(-torch.expm1(lb - la), min=1e-30))


def discretized_logistic_log_prob(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(x) of the discretized logistic; x = k/255, broadcast against loc/log_scale."""
    k = torch.round(x * (BINS - 1))  # bin index, robust to float error in k/255
    centre = k / (BINS - 1) - loc
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (centre + HALF_BIN), inv_s * (centre - HALF_BIN)
    log_cdf_plus = F.logsigmoid(plus)  # edge bin 0: log sigma(plus)
    log_sf_minus = F.logsigmoid(-minus)  # edge bin 255: log(1 - sigma(minus))
    interior = _log_sigmoid_diff(plus, minus)
    # Midpoint rule log(pdf(centre) * width) where a bin is narrow against s (< 0.02 scale units):
    # there the difference of two sigmoids loses precision in float32 while the midpoint rule's error
    # (about width^2 / 24, relative) is below 2e-5. In float64 the sigmoid difference stays exact far longer.
    mid = inv_s * centre
    log_mid = mid - log_scale - 2.0 * F.softplus(mid) - LOG_BIN
    narrow = 1e-5 if x.dtype == torch.float64 else 2e-2
    interior = torch.where(inv_s * (2 * HALF_BIN) < narrow, log_mid, interior)
    return torch.where(k <= 0, log_cdf_plus, torch.where(k >= BINS - 1, log_sf_minus, interior))


def _logistic_mean(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Exact E[x] of the discretized logistic: (1/255) sum_{k=1}^{255} P(K >= k), one bin at a time
    (memory of one image batch, not 255)."""
    inv_s = torch.exp(-log_scale)
    acc = torch.zeros_like(loc)
    for k in range(1, BINS):
        acc = acc + torch.sigmoid(inv_s * (loc - (k - 0.5) / (BINS - 1)))
    return acc / (BINS - 1)


def _logistic_mode(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Exact mode: the interior bin nearest loc, or an edge bin if its tail mass is larger."""
    k_in = torch.round(loc.clamp(0, 1) * (BINS - 1)).clamp(1, BINS - 2)
    cands = torch.stack([torch.zeros_like(k_in), k_in, torch.full_like(k_in, BINS - 1)]) / (BINS - 1)
    lp = discretized_logistic_log_prob(cands, loc, log_scale)  # (3, ...)
    return cands.gather(0, lp.argmax(0, keepdim=True)).squeeze(0)


def _sample_logistic(loc: torch.Tensor, log_scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draw of the continuous logistic, then rounded to its bin: a draw of the discretized one."""
    u = torch.rand(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device).clamp(1e-6, 1 - 1e-6)
    y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return torch.round(y.clamp(0, 1) * (BINS - 1)) / (BINS - 1)


class DiscretizedLogistic(Distribution):
    """Independent discretized logistics per element, ``loc`` and ``log_scale`` (B, C, H, W)."""

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, event_dims: int = 3) -> None:
        self.loc, self.log_scale, self.event_dims = loc, log_scale.clamp(min=MIN_LOG_SCALE), event_dims

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        return discretized_logistic_log_prob(x, self.loc, self.log_scale)

    def probs_all(self) -> torch.Tensor:
        """P(k) for all 256 values: (*shape, 256). For tests and small images."""
        values = torch.arange(BINS, dtype=self.loc.dtype, device=self.loc.device) / (BINS - 1)
        return discretized_logistic_log_prob(values, self.loc[..., None], self.log_scale[..., None]).exp()

    @property
    def mean(self) -> torch.Tensor:
        return _logistic_mean(self.loc, self.log_scale)

    def mode(self) -> torch.Tensor:
        return _logistic_mode(self.loc, self.log_scale)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return _sample_logistic(self.loc, self.log_scale, generator)


def n_coeffs(channels: int) -> int:
    """Linear channel-dependence coefficients per component: channel j depends on channels < j."""
    return channels * (channels - 1) // 2


class DiscretizedLogisticMixture(Distribution):
    """Per pixel, a mixture of M discretized logistics over the C channels jointly (PixelCNN++, eq. 3):

        P(x) = sum_i pi_i  prod_c  DLogistic(x_c | mu_ic + sum_{j<c} a_icj x_j, s_ic)

    (for RGB: mu_g + a x_r and mu_b + b x_r + c x_g), so colours within a pixel are correlated.
    Shapes: ``logits`` (B, M, H, W); ``loc``, ``log_scale`` (B, M, C, H, W); ``coeffs``
    (B, M, C(C-1)/2, H, W) in (-1, 1). The event is (H, W): the terms are per pixel.
    """

    event_dims = 2

    def __init__(
        self, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        self.logits, self.loc, self.coeffs = logits, loc, coeffs
        self.log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
        self.channels = loc.shape[2]

    def _adjusted_loc(self, x: torch.Tensor) -> torch.Tensor:
        """Component means after the linear dependence on the preceding channels' values x (B, C, H, W)."""
        locs = [self.loc[:, :, 0]]
        idx = 0
        for c in range(1, self.channels):
            m = self.loc[:, :, c]
            for j in range(c):
                m = m + self.coeffs[:, :, idx] * x[:, None, j]
                idx += 1
            locs.append(m)
        return torch.stack(locs, dim=2)  # (B, M, C, H, W)

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        """log P(pixel) per pixel: (B, H, W)."""
        lp = discretized_logistic_log_prob(x[:, None], self._adjusted_loc(x), self.log_scale)  # (B, M, C, H, W)
        return torch.logsumexp(lp.sum(2) + F.log_softmax(self.logits, dim=1), dim=1)

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over pixels. A mask must be the same for every channel of a pixel ((B, 1, H, W),
        (B, H, W), or (B, C, H, W) with equal channels): a mixture scores whole pixels."""
        terms = self.log_prob_elements(x)  # (B, H, W)
        if mask is not None:
            if mask.dim() == 4:
                if mask.shape[1] != 1 and not torch.equal(mask, mask[:, :1].expand_as(mask)):
                    raise ValueError(
                        "the discretized logistic mixture scores whole pixels: the mask must not differ "
                        "between channels"
                    )
                mask = mask[:, 0]
            terms = terms * mask
        return terms.flatten(1).sum(-1)

    def _pick_component(self, generator: torch.Generator | None) -> torch.Tensor:
        """One-hot (B, M, 1, H, W) of a component drawn per pixel from softmax(logits) (Gumbel-max)."""
        u = torch.rand(self.logits.shape, generator=generator, dtype=self.logits.dtype, device=self.logits.device)
        g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
        return F.one_hot((self.logits + g).argmax(1), self.logits.shape[1]).permute(0, 3, 1, 2)[:, :, None]

    def _sequential(self, onehot: torch.Tensor, draw) -> torch.Tensor:
        """Channels in order, each from the chosen component with its mean shifted by the earlier ones."""
        loc = (self.loc * onehot).sum(1)  # (B, C, H, W)
        log_s = (self.log_scale * onehot).sum(1)
        coeffs = (self.coeffs * onehot).sum(1)
        out: list[torch.Tensor] = []
        idx = 0
        for c in range(self.channels):
            m = loc[:, c]
            for j in range(c):
                m = m + coeffs[:, idx] * out[j]
                idx += 1
            out.append(draw(m, log_s[:, c]))
        return torch.stack(out, dim=1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            onehot = self._pick_component(generator).to(self.loc.dtype)
            return self._sequential(onehot, lambda m, s: _sample_logistic(m, s, generator))

    @property
    def mean(self) -> torch.Tensor:
        """Mixture of the components' means, each channel's component mean computed with the earlier
        channels' component means plugged into the linear dependence (exact when coefficients are 0)."""
        weights = F.softmax(self.logits, dim=1)[:, :, None]  # (B, M, 1, H, W)
        means: list[torch.Tensor] = []
        idx = 0
        for c in range(self.channels):
            m = self.loc[:, :, c]
            for j in range(c):
                m = m + self.coeffs[:, :, idx] * means[j]
                idx += 1
            means.append(_logistic_mean(m, self.log_scale[:, :, c]))
        return (torch.stack(means, dim=2) * weights).sum(1)

    def mode(self) -> torch.Tensor:
        """A sharp image: per pixel, the most probable component's channels, each at its mode given the
        earlier ones (not the exact joint mode of the mixture)."""
        onehot = F.one_hot(self.logits.argmax(1), self.logits.shape[1]).permute(0, 3, 1, 2)[:, :, None]
        return self._sequential(onehot.to(self.loc.dtype), _logistic_mode)


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogisticHead(LikelihoodHead):
    """A discretized logistic per channel and pixel: decoder outputs (mu, log s), 2C channels."""

    discrete = True
    meaning = "discretized logistic over 8-bit pixels: a true NLL (nats); bits/dim = NLL / (D ln 2)"

    @staticmethod
    def num_params(channels: int, cfg: ModelConfig) -> int:
        return 2 * channels

    def forward(self, h: torch.Tensor) -> Distribution:
        loc, log_scale = h.chunk(2, dim=1)  # (B, C, H, W) each
        return DiscretizedLogistic(loc, log_scale)


@LIKELIHOODS.register("discretized-logistic-mixture")
class DiscretizedLogisticMixtureHead(LikelihoodHead):
    """PixelCNN++'s mixture of ``n_mixtures`` discretized logistics per pixel; the decoder outputs, per
    component, a logit, C means, C log-scales and C(C-1)/2 channel coefficients (10 per component for RGB)."""

    discrete = True
    meaning = "mixture of discretized logistics over 8-bit pixels: a true NLL (nats); bits/dim = NLL / (D ln 2)"

    @staticmethod
    def num_params(channels: int, cfg: ModelConfig) -> int:
        return cfg.n_mixtures * (1 + 2 * channels + n_coeffs(channels))

    def forward(self, h: torch.Tensor) -> Distribution:
        m, c = self.cfg.n_mixtures, self.channels
        logits = h[:, :m]  # (B, M, H, W)
        # unflatten, not reshape(B, ...): no batch size is baked in when the graph is traced (ONNX export)
        rest = h[:, m:].unflatten(1, (m, 2 * c + n_coeffs(c)))  # (B, M, 2C + C(C-1)/2, H, W)
        loc, log_scale, coeffs = rest[:, :, :c], rest[:, :, c : 2 * c], torch.tanh(rest[:, :, 2 * c :])
        return DiscretizedLogisticMixture(logits, loc, log_scale, coeffs)
