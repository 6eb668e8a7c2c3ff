"""Objectives: the ELBO (once) and the importance-weighted bound."""

from .elbo import ELBOTerms, elbo, iwae_bound, iwae_loss, log_importance_weights

__all__ = ["ELBOTerms", "elbo", "iwae_bound", "iwae_loss", "log_importance_weights"]
