"""Evaluation: ELBO, importance-sampled log-likelihood with standard error, active units."""

from .evaluate import EvalResult, describe_likelihood, evaluate_model, evaluate_run

__all__ = ["EvalResult", "describe_likelihood", "evaluate_model", "evaluate_run"]
