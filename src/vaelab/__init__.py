"""vaelab: variational autoencoders as in Doersch's tutorial (2016), with honest evaluation.

Typical use::

    import vaelab
    cfg = vaelab.RunConfig(data=vaelab.DataConfig("fashion-mnist"), train=vaelab.TrainConfig(epochs=5))
    result = vaelab.train(cfg, "runs/fmnist")
    print(vaelab.evaluate_run("runs/fmnist", k=1000).table())

The public names below are imported on first use (PEP 562), so ``vaelab --version`` and the
configuration layer start without importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: the public API: submodule -> the names it provides
_EXPORTS: dict[str, tuple[str, ...]] = {
    "app.report": ("write_report",),
    "conditioning": ("CONDITIONS", "Condition", "build_condition"),
    "config": ("DataConfig", "DataSpec", "ModelConfig", "RunConfig", "TrainConfig"),
    "data": ("DATASETS", "DataSplits", "ImageSet", "load_data"),
    "data.python": ("TrainData",),
    "distributions": ("LIKELIHOODS", "Bernoulli", "DiagonalGaussian", "Gaussian", "StandardNormal"),
    "errors": ("CheckpointError", "ConfigError", "DataError", "DatasetNotFoundError", "DistributedError",
               "Interrupted", "NonFiniteError", "RunLockedError", "VaelabError", "VaelabWarning"),
    "evaluation": ("EvalResult", "evaluate_model", "evaluate_run"),
    "models": ("CVAE", "MODELS", "VAE", "LatentModel", "ModelOutput", "Regressor", "StochasticLayer", "build_model"),
    "objectives": ("ELBOObjective", "ELBOTerms", "elbo", "iwae_bound"),
    "pipeline": ("BatchPipeline",),
    "runs": ("Run", "RunDir", "from_pretrained", "load_run"),
    "export": ("ExportResult", "export_run"),
    "training": ("Callback", "TrainResult", "train", "train_step"),
    "viz": ("encode_run", "interpolate_run", "manifold_run", "reconstruct_run", "sample_run", "traverse_run"),
    "viz.complete": ("Completion", "complete_images", "complete_run"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """A public name (or a submodule such as ``vaelab.training``), imported when first asked for."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
