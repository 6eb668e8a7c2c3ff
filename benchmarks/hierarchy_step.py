"""What a training step of each model of the hierarchy table costs (issue 26): the one-layer VAE, the
bottom-up two-layer VAE and the Ladder VAE, as ``experiments/reproduce.py hierarchy --budget small``
trains them (batch normalisation, batch 128, the ladder's one-layer blocks), in one process, rounds
alternated model by model.

For each model: the median milliseconds of vaelab's eager step (:func:`vaelab.training.step.take_step`
with the run's kernel plan), its ratio to the one-layer VAE's, the GEMM floor (its linear layers'
forward and backward products timed alone, with the faster fp32 kernel), the ratio to that floor, and
the aten operations one step dispatches. At equal wall-clock the step ratio decides how many epochs
each model gets; the distance to the floor says how much of a step is overhead rather than arithmetic.

    python benchmarks/hierarchy_step.py [--rounds 5] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _floors import floor_seconds

from vaelab.accel import Accelerator
from vaelab.conditioning import Batch
from vaelab.config import DataSpec
from vaelab.models import build_model
from vaelab.objectives import ELBOObjective
from vaelab.training.step import running_statistics, take_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from reproduce import entry_config, load_table  # noqa: E402


def _products(model: torch.nn.Module, rows: int) -> list[tuple[int, int, int, str]]:
    """Every linear layer's forward product and its two backward ones (the data-facing first layer of
    the encoder has no input gradient)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out += [(rows, m.in_features, m.out_features, kind) for kind in ("fwd", "dw", "dx")
                    if not (kind == "dx" and name == "encoder.net.0")]
    return out


def _aten_ops(step) -> int:
    with torch.profiler.profile() as p:
        step()
    return sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps timed per round and model")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    table = load_table("hierarchy")
    budget = table["budget"]["small"]
    rows = 128
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, 1, 28, 28, generator=g) > 0.5).float()
    models = {}
    for entry in table["entry"]:
        cfg = entry_config(entry, budget, "fashion-mnist", None, "cpu", [], "small", 0)
        torch.manual_seed(0)
        model = build_model(cfg.model, DataSpec())
        Accelerator.for_model("auto", model, rows=rows).prepare(model)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
        stats = running_statistics(model)
        noise = torch.Generator().manual_seed(1)

        def step(model=model, opt=opt, stats=stats, noise=noise) -> None:
            take_step(model, opt, ELBOObjective(), Batch(x, None, None), 1.0, generator=noise, statistics=stats)

        for _ in range(10):  # warm-up: kernel plans, allocator
            step()
        models[entry["name"]] = (model, step)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(a.rounds):
        for name, (_, step) in models.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    first = next(iter(models))
    base = statistics.median(times[first])
    print(f"{a.threads} threads, batch {rows}, {a.rounds} rounds x {a.steps} steps, median ms per step")
    print(f"{'model':10s} {'ms/step':>8s} {'x ' + first:>9s} {'floor ms':>9s} {'x floor':>8s} {'aten ops':>9s} "
          f"{'tensors':>8s} {'weights':>9s}")
    for name, (model, step) in models.items():
        ms = statistics.median(times[name])
        floor = min(floor_seconds(_products(model, rows), 20, k) for k in ("fp32 MKL", "fp32 oneDNN")) / 20 * 1e3
        params = list(model.parameters())
        print(f"{name:10s} {ms:8.2f} {ms / base:9.2f} {floor:9.2f} {ms / floor:8.2f} {_aten_ops(step):9d} "
              f"{len(params):8d} {sum(p.numel() for p in params):9d}")


if __name__ == "__main__":
    main()
