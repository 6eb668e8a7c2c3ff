"""Encoder and decoder networks, chosen by name from the registries."""

from . import conv, mlp  # noqa: F401  (registers "conv", "resnet", "mlp")
from .base import ACTIVATIONS, DECODERS, ENCODERS, build_decoder, build_encoder

__all__ = ["ACTIVATIONS", "DECODERS", "ENCODERS", "build_decoder", "build_encoder"]
