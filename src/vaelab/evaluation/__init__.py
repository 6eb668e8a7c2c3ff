"""Evaluation: one loop for the ELBO's terms, the importance-sampled log-likelihood with standard
error and active units, per stochastic layer."""

from .evaluate import EvalResult, describe_likelihood, evaluate_model, evaluate_run
from .loop import Evaluation, LayerStats, eval_mode, evaluate_batches

__all__ = [
    "EvalResult",
    "Evaluation",
    "LayerStats",
    "describe_likelihood",
    "eval_mode",
    "evaluate_batches",
    "evaluate_model",
    "evaluate_run",
]
