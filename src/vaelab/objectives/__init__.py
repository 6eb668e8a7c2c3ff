"""Objectives: the ELBO (once, for every model) and the importance-weighted bound."""

from .elbo import (
    ELBOObjective,
    ELBOTerms,
    LayerKL,
    Objective,
    elbo,
    elbo_terms,
    iwae_bound,
    iwae_estimate,
    iwae_loss,
    kl_balance_coefficients,
    log_importance_weights,
)

__all__ = [
    "ELBOObjective",
    "ELBOTerms",
    "LayerKL",
    "Objective",
    "elbo",
    "elbo_terms",
    "iwae_bound",
    "iwae_estimate",
    "iwae_loss",
    "kl_balance_coefficients",
    "log_importance_weights",
]
