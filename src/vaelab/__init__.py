"""vaelab: variational autoencoders as in Doersch's tutorial (2016), with honest evaluation.

Typical use::

    import vaelab
    cfg = vaelab.RunConfig(data=vaelab.DataConfig("fashion-mnist"), train=vaelab.TrainConfig(epochs=5))
    result = vaelab.train(cfg, "runs/fmnist")
    print(vaelab.evaluate_run("runs/fmnist", k=1000).table())
"""

__version__ = "0.1.0"

from .conditioning import CONDITIONS, Condition, build_condition
from .config import DataConfig, DataSpec, ModelConfig, RunConfig, TrainConfig
from .data import DATASETS, DataSplits, ImageSet, load_data
from .distributions import LIKELIHOODS, Bernoulli, DiagonalGaussian, Gaussian, StandardNormal
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DatasetNotFoundError,
    NonFiniteError,
    RunLockedError,
    VaelabError,
    VaelabWarning,
)
from .evaluation import EvalResult, evaluate_model, evaluate_run
from .models import CVAE, MODELS, VAE, LatentModel, ModelOutput, Regressor, StochasticLayer, build_model
from .objectives import ELBOObjective, ELBOTerms, elbo, iwae_bound
from .pipeline import BatchPipeline
from .runs import Run, RunDir, load_run
from .training import TrainResult, train, train_step
from .viz import encode_run, interpolate_run, manifold_run, reconstruct_run, sample_run
from .viz.complete import Completion, complete_images, complete_run

__all__ = [
    "CONDITIONS",
    "CVAE",
    "DATASETS",
    "LIKELIHOODS",
    "MODELS",
    "VAE",
    "BatchPipeline",
    "Bernoulli",
    "CheckpointError",
    "Completion",
    "Condition",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DataSpec",
    "DataSplits",
    "DatasetNotFoundError",
    "DiagonalGaussian",
    "ELBOObjective",
    "ELBOTerms",
    "EvalResult",
    "Gaussian",
    "ImageSet",
    "LatentModel",
    "ModelConfig",
    "ModelOutput",
    "NonFiniteError",
    "Regressor",
    "Run",
    "RunConfig",
    "RunDir",
    "RunLockedError",
    "StandardNormal",
    "StochasticLayer",
    "TrainConfig",
    "TrainResult",
    "VaelabError",
    "VaelabWarning",
    "build_condition",
    "build_model",
    "complete_images",
    "complete_run",
    "elbo",
    "encode_run",
    "evaluate_model",
    "evaluate_run",
    "interpolate_run",
    "iwae_bound",
    "load_data",
    "load_run",
    "manifold_run",
    "reconstruct_run",
    "sample_run",
    "train",
    "train_step",
]
