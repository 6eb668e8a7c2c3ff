"""The README's main job: train the tutorial's VAE on Fashion-MNIST, evaluate it honestly and
write pictures, in a few minutes on two CPU cores."""

from __future__ import annotations

from pathlib import Path

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .evaluation import evaluate_run
from .runs import RunDir, load_checkpoint
from .training import train
from .viz import interpolate_run, manifold_run, reconstruct_run, sample_run


def demo_config(epochs: int = 10, data_dir: str | None = None, progress: bool = True,
                device: str = "auto") -> RunConfig:
    return RunConfig(
        data=DataConfig(name="fashion-mnist", data_dir=data_dir),
        model=ModelConfig(latent_dim=20, hidden=(400,), likelihood="bernoulli"),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=1e-3, progress=progress, device=device),
    )


def _train(cfg: RunConfig, run_dir: Path, what: str) -> None:
    """Train ``cfg`` into ``run_dir``, or say that the run there is already trained (a re-run of the demo)."""
    latest = RunDir.of(run_dir).latest
    done = int(load_checkpoint(latest).state.get("epoch", 0)) if latest.exists() else 0
    epochs = cfg.train.epochs
    if done >= epochs:
        print(f"== {run_dir} already holds {what}, trained for {done} epochs: reusing it")
        return
    verb = f"continuing from epoch {done}" if done else "training"
    print(f"== {verb}: {what}, {epochs} epochs, into {run_dir}")
    train(cfg, run_dir)


def run_demo(run_dir: Path, epochs: int = 10, k: int = 256, data_dir: str | None = None,
             progress: bool = True, device: str = "auto") -> dict[str, Path]:
    cfg = demo_config(epochs, data_dir, progress, device)
    _train(cfg, run_dir, "a VAE (784-400-20, Bernoulli) on Fashion-MNIST")
    print(f"== evaluating on the test set with k={k} importance samples")
    res = evaluate_run(run_dir, k=k, progress=progress, device=device)
    print(res.table())
    # a 2-D manifold needs a 2-D latent: train a small one alongside (Kingma & Welling Fig. 4)
    run2 = run_dir / "latent2"
    cfg2 = cfg.replace(model=ModelConfig(latent_dim=2, hidden=(400,)),
                       train=TrainConfig(epochs=max(1, epochs // 2), progress=progress, device=device))
    _train(cfg2, run2, "a 2-D latent model for the manifold picture")
    out = {
        "evaluation": Path(res.extra["written"]),
        "samples": sample_run(run_dir, run_dir / "samples.png", n=64, device=device),
        "reconstructions": reconstruct_run(run_dir, run_dir / "reconstructions.png", n=32, device=device),
        "interpolation": interpolate_run(run_dir, run_dir / "interpolation.png", a=0, b=1, steps=10, device=device),
        "manifold": manifold_run(run2, run_dir / "manifold.png", n=20, device=device),
    }
    from .app.report import write_report

    out["report"] = write_report(run_dir, device=device)
    print("== outputs")
    for k_, v in out.items():
        print(f"  {k_:16s} {v}")
    print(f"== the report: {out['report'].resolve()}")
    return out
