"""Models: the latent-variable contract, the VAE (and its conditional use), the regressor baseline."""

from .base import (
    MODELS,
    LatentModel,
    LatentModelBase,
    ModelOutput,
    StochasticLayer,
    build_model,
    check_model_object,
    device_of,
    flat_draws,
    full_precision,
    generator_for,
    own_model,
    repeat_rows,
)
from .ladder import LadderVAE
from .priors import fixed_weights
from .regressor import Regressor
from .topdown import TopDownVAE
from .vae import CVAE, VAE

__all__ = [
    "CVAE",
    "LadderVAE",
    "MODELS",
    "VAE",
    "LatentModel",
    "LatentModelBase",
    "ModelOutput",
    "Regressor",
    "StochasticLayer",
    "TopDownVAE",
    "build_model",
    "check_model_object",
    "device_of",
    "fixed_weights",
    "flat_draws",
    "full_precision",
    "generator_for",
    "own_model",
    "repeat_rows",
]
