"""Visualisation: PNG grids of samples, reconstructions, interpolations, manifolds and traversals."""

from .generate import (
    encode_means,
    encode_run,
    interpolate_images,
    interpolate_run,
    manifold_images,
    manifold_run,
    reconstruct_images,
    reconstruct_run,
    sample_images,
    sample_run,
    traverse_images,
    traverse_run,
)
from .grid import grid_array, save_grid

__all__ = [
    "encode_means",
    "encode_run",
    "grid_array",
    "interpolate_images",
    "interpolate_run",
    "manifold_images",
    "manifold_run",
    "reconstruct_images",
    "reconstruct_run",
    "sample_images",
    "sample_run",
    "save_grid",
    "traverse_images",
    "traverse_run",
]
