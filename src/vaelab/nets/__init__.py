"""Encoder and decoder networks, chosen by name from the registries."""

from . import mlp  # noqa: F401  (registers "mlp")
from .base import ACTIVATIONS, DECODERS, ENCODERS, build_decoder, build_encoder

__all__ = ["ACTIVATIONS", "DECODERS", "ENCODERS", "build_decoder", "build_encoder"]
