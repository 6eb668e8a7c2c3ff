"""Training cost of each model of the family relative to the one-layer VAE, measured side by side.

Every model trains on the same data (binarized Fashion-MNIST by default) with Burda et al.'s
networks (784-200-200-z50, tanh; two layers: z1 100 and z2 50 with 100-100 between them), batch 100.
Epochs are interleaved (epoch 1 of every model, then epoch 2 of every model, ...), so each model sees
the same machine state; we report each model's median seconds per epoch (training only, validation
excluded) and its ratio to the one-layer VAE under N(0, I).

    python benchmarks/models.py [--epochs 3] [--limit-train 10000] [--threads 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import vaelab
from vaelab.config import ModelConfig


def variants(k_components: int) -> dict[str, tuple[dict, dict]]:
    """name -> (model overrides, train overrides) on top of the one-layer VAE."""
    two = {"latent_dim": 100, "layers": 2, "upper_latent": (50,), "upper_hidden": (100, 100)}
    return {
        "VAE 1L, N(0, I)": ({}, {}),
        f"VAE 1L, MoG prior (K={k_components})": ({"prior": "mog"}, {}),
        f"VAE 1L, VampPrior (K={k_components})": ({"prior": "vamp"}, {}),
        "VAE 2L, N(0, I)": (two, {}),
        f"VAE 2L, VampPrior (K={k_components})": ({**two, "prior": "vamp"}, {}),
        "IWAE 1L, k=5": ({}, {"iwae_k": 5}),
        "IWAE 2L, k=5": (two, {"iwae_k": 5}),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--components", type=int, default=500, help="K of the mixture priors")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hidden", default="200,200")
    args = p.parse_args(argv)
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name=args.data, data_dir=args.data_dir, binarize="dynamic",
                               limit_train=args.limit_train, val_size=args.val_size),
        model=ModelConfig(latent_dim=50, hidden=tuple(int(h) for h in args.hidden.split(",")), activation="tanh",
                          prior_components=args.components),
        train=vaelab.TrainConfig(epochs=1, batch_size=100, lr=1e-3, adam_eps=1e-4, progress=False,
                                 threads=args.threads, device="cpu", eval_batch_size=500),
    )
    data = vaelab.load_data(base.data)
    models = variants(args.components)
    times: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(1, args.epochs + 1):
            for i, (name, (m, t)) in enumerate(models.items()):
                cfg = base.replace(model=replace(base.model, **m), train=replace(base.train, epochs=epoch, **t))
                with contextlib.redirect_stdout(io.StringIO()):  # the runs' own epoch lines
                    res = vaelab.train(cfg, Path(tmp) / str(i), data=data)
                rows = res.history
                before = 0.0 if epoch == 1 else _elapsed_before(Path(tmp) / str(i), epoch)
                times[name].append(rows[-1]["elapsed_s"] - before)
    ref = statistics.median(times["VAE 1L, N(0, I)"])
    print(f"{len(data.train)} training images of {args.data} (binarized), batch 100, {args.epochs} epochs "
          f"interleaved, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':34s} {'s/epoch':>8s} {'x VAE 1L':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34s} {med:8.2f} {med / ref:9.2f}")


def _elapsed_before(run: Path, epoch: int) -> float:
    """Training seconds at the end of epoch ``epoch - 1`` (from the run's metrics)."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r["elapsed_s"] for r in rows if r["epoch"] == epoch - 1)


if __name__ == "__main__":
    main()
