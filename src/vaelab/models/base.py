"""The contract between a latent-variable model and everything that trains, evaluates or draws it.

A model's ``forward`` returns its likelihood P(X|z) and a list of stochastic layers, each holding its
posterior q, its prior p (fixed, learned, or conditional on the layer above) and its reparameterised
draw z, as the blocks of openai/vdvae return their own stats and Pyro's Trace_ELBO reads a model's
sample sites. The one objective (:mod:`vaelab.objectives`) needs nothing else:

    log w = log P(X|z) + sum_l log p_l(z_l) - sum_l log q_l(z_l),
    ELBO  = E_q[log w] = E_q[log P(X|z)] - sum_l KL(q_l || p_l),

each KL in closed form where a formula is known and the layer's prior does not depend on its own draw
(``StochasticLayer.prior_depends_on_z``), else the Monte Carlo term at the draw.

Shapes: with ``k`` draws per datapoint, each layer's z is (B, L_l) for k = 1 and (k, B, L_l)
otherwise; q and p have any batch shape that broadcasts against z ((B,), (k, B) or () for a learned
prior); the likelihood covers the k*B rows sample-major (row i*B + b is draw i of datapoint b).

Distributions are given float32 parameters (cast at the networks' outputs), so that under bf16/fp16
autocast the networks run in low precision while log-densities, KLs and their sums stay in float32.

Layers are listed bottom-up: ``layers[0]`` is nearest the data, ``layers[-1]`` the top layer, whose
prior is unconditional and whose latent space is the one pictures travel through (interpolation,
manifold). A model with no latent variables (the regressor) has no layers: its KL is 0 by structure.

Optional, for a hierarchy: ``decode_layers(zs, c)``, P(X | z_l, ..., z_L) for codes of the top
``len(zs)`` layers (bottom-up list, the last z_top; the layers below l take their prior's mean;
``decode(z)`` is ``decode_layers([z])``). With it, a traversal can sweep a lower layer's units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution
from ..errors import ConfigError
from ..registry import Registry


@dataclass
class StochasticLayer:
    """One stochastic layer of a forward pass."""

    name: str  # e.g. "z", "z1", "z2"
    q: Distribution  # posterior Q(z_l | X, layers below/above), event (L_l,)
    p: Distribution  # prior P(z_l | layer above) or P(z_l), event (L_l,)
    z: torch.Tensor  # reparameterised draw from q: (B, L_l) or (k, B, L_l)
    # True when p's parameters come from a draw that itself depends on this z: the prior p(z1 | z2) of a
    # bottom-up hierarchy, where z2 ~ q(z2 | z1) was drawn from this very z1. KL(q || p) in closed form
    # would then average over a z independent of p, a different (looser) quantity than this layer's
    # term of E_q[log w]; the objective takes the Monte Carlo term log q(z) - log p(z) at the draw instead.
    # A top-down model (p(z_l | z_{l+1}) and q(z_l | x, z_{l+1}) given the draw above) leaves it False.
    prior_depends_on_z: bool = False


@dataclass
class ModelOutput:
    likelihood: Distribution  # P(X|z): batch (B,) for k = 1, (k*B,) sample-major otherwise
    layers: list[StochasticLayer]  # bottom-up; empty for a model without latent variables
    k: int = 1  # draws of z per datapoint


@runtime_checkable
class LatentModel(Protocol):
    """What vaelab's training, evaluation, pictures and completion use of a model."""

    config: ModelConfig
    spec: DataSpec  # image shape, class count, condition size

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """Size of each stochastic layer, bottom-up; () for a model without latent variables."""
        ...

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        """Encode x (B, C, H, W), draw k reparameterised z per datapoint through every layer, decode."""
        ...

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        """The posterior of each layer, bottom-up; a layer that depends on the one below is given
        that layer's posterior mean (a deterministic code, for pictures and active units)."""
        ...

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        """P(X | z_top) for top-layer codes z (N, L_top): layers below take their prior's mean."""
        ...

    def prior(self) -> Distribution:
        """The top layer's prior P(z_top) (batch shape broadcastable; has ``sample_n``)."""
        ...

    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        """n images (n, C, H, W) drawn from the model's own prior: the likelihood's mean, or a draw.
        ``temperature`` scales every layer's spread, or is one factor per stochastic layer, bottom-up
        like ``latent_dims`` (see :func:`layer_temperatures`)."""
        ...


class LatentModelBase(nn.Module):
    """Conveniences shared by vaelab's models (not required by the contract)."""

    config: ModelConfig
    spec: DataSpec

    @property
    def device(self) -> torch.device:
        return device_of(self)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        z = self.prior().sample_n(n, generator, layer_temperatures(temperature, 1)[0])  # type: ignore[attr-defined]  (n, L_top)
        px = self.decode(z, c)  # type: ignore[attr-defined]
        return px.mean if mean else px.sample(generator)


def layer_temperatures(temperature: float | Sequence[float], n_layers: int) -> list[float]:
    """One sampling temperature per stochastic layer, bottom-up: a number applies to every layer; a
    sequence gives one factor per layer (NVAE's and VDVAE's per-group temperatures), as many as the
    model has layers."""
    if isinstance(temperature, int | float):
        temps = [float(temperature)] * n_layers
    else:
        temps = [float(t) for t in temperature]
        if len(temps) != n_layers:
            raise ConfigError(f"temperature: {len(temps)} values for a model with {n_layers} stochastic layer(s); "
                              "give one number, or one per layer bottom-up")
    if not all(math.isfinite(t) and t >= 0 for t in temps):
        raise ConfigError(f"temperature: {temps} must be finite and >= 0")
    return temps


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters live (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generator_for(model: nn.Module, seed: int) -> torch.Generator:
    """A seeded random generator on the model's device (draws follow the model wherever it runs)."""
    return torch.Generator(device=device_of(model)).manual_seed(seed)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A network output as a distribution's parameter: bf16/fp16 (autocast) raised to float32;
    float32 and float64 pass through unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def repeat_rows(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """(B, ...) -> (k*B, ...), sample-major, for k draws per row; a broadcast batch of 1 stays as is."""
    if t is None or k == 1 or t.shape[0] == 1:
        return t
    return t.expand(k, *t.shape).reshape(k * t.shape[0], *t.shape[1:])


def flat_draws(z: torch.Tensor, k: int) -> torch.Tensor:
    """A layer's draws as decoder rows: (B, L) stays, (k, B, L) -> (k*B, L) sample-major."""
    return z if k == 1 else z.flatten(0, 1)


#: name -> model class (or factory) taking (ModelConfig, DataSpec); what it builds follows :class:`LatentModel`
MODELS: Registry[Callable[[ModelConfig, DataSpec], nn.Module]] = Registry("model")


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The registered model ``cfg.model`` for data described by ``spec`` (a :class:`LatentModel`)."""
    return MODELS.get(cfg.model)(cfg, spec)


_CONTRACT = ("config", "spec", "latent_dims", "forward", "encode", "decode", "prior", "sample")


def check_model_object(model: object) -> None:
    """A module given in place of a registered model follows the latent contract, or one line says what
    it lacks."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model=: expected a torch.nn.Module following vaelab's latent contract, got "
                          f"{type(model).__name__}")
    missing = [name for name in _CONTRACT if not hasattr(model, name)]
    if missing:
        raise ConfigError(f"model=: {type(model).__name__} does not follow the latent contract "
                          f"(vaelab.models.LatentModel): it has no {', '.join(missing)}")
    if not isinstance(model.config, ModelConfig) or not isinstance(model.spec, DataSpec):
        raise ConfigError(f"model=: {type(model).__name__}.config must be a vaelab.ModelConfig and .spec a "
                          "vaelab.DataSpec (what the run records to describe the model)")


def own_model(model: nn.Module, spec: DataSpec, where: str = "model=") -> nn.Module:
    """The user's module, checked against the data (or checkpoint) it is used with."""
    check_model_object(model)
    if model.spec != spec:
        raise ConfigError(f"{where}: {type(model).__name__} was built for {model.spec.describe()}; the data give "
                          f"{spec.describe()}")
    return model
