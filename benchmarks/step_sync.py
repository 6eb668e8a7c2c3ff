"""Where a training step is decided, and what it costs: the host deciding each step (it reads the
step's loss and gradient norm, then skips or takes the update: on a GPU one wait per step) against
the step decided on the device (the update skipped inside the optimizer's kernel, the host reading
the steps' numbers every ``train.sync_every`` steps), in one run, alternated.

The model is the PyTorch examples' VAE (MLP 784-400-20, Bernoulli, batch 128, Adam 1e-3) on
Fashion-MNIST when it is installed (else random images of its shape). Variants alternate run by run
(host, device, host, ...), each a fresh ``vaelab.train`` of ``--epochs`` epochs; s/epoch is vaelab's
own training time (validation excluded), the median over every epoch after each run's first. Both
variants must give the same model bit for bit: the script checks it. "reads/epoch" counts the host's
reads of the steps' numbers (each one waits for the device).

    python benchmarks/step_sync.py [--runs 4] [--epochs 3] [--device cpu|cuda] [--limit-train N] [--data-dir D]
                                    [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import vaelab
import vaelab.training.loop as loop
from vaelab.accel import Accelerator
from vaelab.data import DataSplits, ImageSet


def _data(limit: int | None, data_dir: str | None) -> DataSplits:
    try:
        return vaelab.load_data(vaelab.DataConfig(name="fashion-mnist", data_dir=data_dir, limit_train=limit,
                                                  val_size=1000, limit_test=1000, download=False))
    except Exception:  # noqa: BLE001  (no data set here: random images of the same shape)
        n = limit or 20000
        images = torch.randint(0, 256, (n + 2000, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8)
        return DataSplits(ImageSet(images[:n]), ImageSet(images[n : n + 1000]), ImageSet(images[n + 1000 :]),
                          "random")


def tiny_step_us(masked: bool, steps: int = 3000) -> float:
    """Microseconds a step of a tiny model (4x4 images, latent 2, hidden 8, batch 8) takes, the step
    decided by the host or on the device, read back as the loop does: what the decision itself costs,
    the model's compute being next to nothing."""
    from vaelab.conditioning import Batch
    from vaelab.objectives import ELBOObjective
    from vaelab.training.step import StepGuard, read_steps, take_step

    torch.manual_seed(0)
    model = vaelab.build_model(vaelab.ModelConfig(latent_dim=2, hidden=(8,)), vaelab.DataSpec((1, 4, 4)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    guard = StepGuard(masked, 16, 20, 0, torch.device("cpu"))
    batch, g, objective = Batch(torch.rand(8, 1, 4, 4), None, None), torch.Generator().manual_seed(0), ELBOObjective()
    pending = []
    t0 = time.perf_counter()
    for i in range(steps):
        p = take_step(model, opt, objective, batch, 1.0, generator=g, masked=masked, frozen=guard.frozen)
        guard.follow(p)
        pending.append(p)
        if (i + 1) % guard.every == 0:
            read_steps(pending)
            pending.clear()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4, help="runs of each variant, alternated")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--data-dir", default=None, help="where Fashion-MNIST is (else found as vaelab finds it)")
    ap.add_argument("--sync-every", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="the compiled step (on a GPU: in CUDA graphs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data(args.limit_train, args.data_dir)
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name=data.name, val_size=1000),
        model=vaelab.ModelConfig(latent_dim=20, hidden=(400,), likelihood="bernoulli"),
        train=vaelab.TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, progress=False, device=args.device,
                                 threads=args.threads, sync_every=args.sync_every, compile=args.compile),
    )
    reads: list[int] = []
    real = loop.read_steps

    def counted(steps):
        reads.append(len(steps))
        return real(steps)

    loop.read_steps = counted
    times: dict[str, list[float]] = {"host": [], "device": []}
    n_reads: dict[str, int] = {"host": 0, "device": 0}
    models: dict[str, dict[str, torch.Tensor]] = {}
    steps = 0
    for _ in range(args.runs):
        for name in ("host", "device"):
            Accelerator.device_guard = name == "device"
            reads.clear()
            with tempfile.TemporaryDirectory() as tmp:
                res = vaelab.train(cfg, f"{tmp}/run", data=data)
            epochs = [r["elapsed_s"] for r in res.history]
            per = [b - a for a, b in zip([0.0, *epochs], epochs, strict=False)]
            times[name] += per[1:] if len(per) > 1 else per
            n_reads[name] = len(reads)
            steps = res.state.step
            state = {k: v.detach().cpu().clone() for k, v in res.model.state_dict().items()}
            if name in models:
                assert all(torch.equal(models[name][k], v) for k, v in state.items()), f"{name}: not reproducible"
            models[name] = state
    loop.read_steps = real
    Accelerator.device_guard = None
    same = all(torch.equal(models["host"][k], v) for k, v in models["device"].items())
    host, dev = statistics.median(times["host"]), statistics.median(times["device"])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"step_sync: {len(data.train)} training images, MLP 784-400-20, batch 128, {args.epochs} epochs x "
          f"{args.runs} runs each, {args.device} ({where}), torch {torch.__version__}"
          f"{', --compile' if args.compile else ''}")
    print(f"{'':34s} {'s/epoch':>8s} {'reads/epoch':>12s} {'steps/epoch':>12s}  epochs (s)")
    for name, med in (("host decides each step", host), (f"device decides, read every {args.sync_every}", dev)):
        key = "host" if name.startswith("host") else "device"
        print(f"{name:34s} {med:8.3f} {n_reads[key] / args.epochs:12.1f} {steps / args.epochs:12.0f}  "
              + " ".join(f"{t:.3f}" for t in times[key]))
    if args.device == "cpu":
        tiny = {m: statistics.median(tiny_step_us(m) for _ in range(3)) for m in (False, True)}
        print(f"a tiny model's whole step (what the decision costs): host {tiny[False]:.0f} us, "
              f"device {tiny[True]:.0f} us")
    q = sorted(d / h for d, h in zip(times["device"], times["host"], strict=False))
    print(f"device / host: {dev / host:.3f} (epoch by epoch, paired: median {statistics.median(q):.3f}, "
          f"range {q[0]:.3f}-{q[-1]:.3f}); the same model bit for bit: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
