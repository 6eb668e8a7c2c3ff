"""Distribution objects: the posterior, the prior and the decoder likelihoods."""

from .base import Distribution
from .bernoulli import Bernoulli
from .gaussian import Gaussian
from .likelihoods import LIKELIHOODS, LikelihoodHead, build_likelihood
from .normal import DiagonalGaussian, StandardNormal

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "DiagonalGaussian",
    "Distribution",
    "Gaussian",
    "LikelihoodHead",
    "StandardNormal",
    "build_likelihood",
]
