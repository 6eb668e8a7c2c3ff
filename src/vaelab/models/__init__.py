"""Models: the VAE (and its conditional use) built from a :class:`ModelConfig`."""

from .regressor import Regressor
from .vae import CVAE, MODELS, VAE, VAEOutput, build_model

__all__ = ["CVAE", "MODELS", "VAE", "Regressor", "VAEOutput", "build_model"]
