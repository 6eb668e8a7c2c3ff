"""Distribution objects: the posterior, the prior and the decoder likelihoods."""

from .base import Distribution, Noise, NoiseSource, standard_normal
from .bernoulli import Bernoulli
from .gaussian import Gaussian
from .kl import KL, kl_divergence, monte_carlo_kl, register_kl
from .likelihoods import LIKELIHOODS, LikelihoodHead, build_likelihood
from .logistic import DiscretizedLogistic, DiscretizedLogisticMixture  # registers the 8-bit likelihoods
from .mixture import GaussianMixture
from .normal import DiagonalGaussian, StandardNormal

__all__ = [
    "KL",
    "LIKELIHOODS",
    "Bernoulli",
    "DiagonalGaussian",
    "DiscretizedLogistic",
    "DiscretizedLogisticMixture",
    "Distribution",
    "Gaussian",
    "GaussianMixture",
    "LikelihoodHead",
    "Noise",
    "NoiseSource",
    "StandardNormal",
    "build_likelihood",
    "kl_divergence",
    "monte_carlo_kl",
    "register_kl",
    "standard_normal",
]
