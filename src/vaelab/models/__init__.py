"""Models: the VAE (and its conditional use) built from a :class:`ModelConfig`."""

from .vae import MODELS, VAE, VAEOutput, build_model

__all__ = ["MODELS", "VAE", "VAEOutput", "build_model"]
