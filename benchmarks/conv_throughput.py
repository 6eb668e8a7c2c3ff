"""Training throughput of a 32x32 colour convolutional VAE: vaelab's library loop (fp32, bf16, --compile)
vs a plain-PyTorch loop (fp32, channels_last, bf16 autocast), interleaved in one run.

Both train the same network (vaelab's "conv" encoder/decoder, hidden (32, 64), latent 32, a
discretized logistic likelihood, batch 128, Adam 1e-3) on the same random uint8 images (CIFAR-10 is
not available offline; throughput does not depend on the pixels). The reference is written the
plain way: a DataLoader over a TensorDataset, the loss spelled out, default Adam. Epochs alternate
(vaelab, reference, vaelab, ...) so both see the same machine state; each vaelab variant gets its own
fresh reference. Both run on ``--device`` (the reference copies each batch over as the PyTorch
examples do, from pinned memory on a GPU). We print the median seconds per epoch of each and the
throughput ratios.

    python benchmarks/conv_throughput.py [--n 10000] [--epochs 3] [--threads N] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time

import torch
from _floors import native_bf16
from _interleave import steady_median, train_interleaved
from torch.utils.data import DataLoader, TensorDataset

import vaelab
from vaelab.data import DataSplits, ImageSet, to_float
from vaelab.distributions.logistic import discretized_logistic_log_prob


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def reference_epoch(enc, dec, opt, loader, amp=None, device: torch.device = CPU,
                    memory_format=torch.contiguous_format) -> float:
    """One epoch the plain way: reparameterise, discretized-logistic NLL + closed-form KL (``amp``: the
    networks under that autocast, the loss in float32)."""
    enc.train()
    dec.train()
    amp = amp or contextlib.nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    for (x,) in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        opt.zero_grad()
        with amp:
            mu, logvar = enc(x).float().chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        with amp:
            out = dec(z).float()
        loc, log_scale = out.chunk(2, dim=1)
        nll = -discretized_logistic_log_prob(x, loc, log_scale.clamp(min=-7.0)).flatten(1).sum(1)
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(1)
        (nll + kl).mean().backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


VARIANTS = {  # name -> TrainConfig changes, run by vaelab's library loop (vaelab.train)
    "vaelab fp32": {},
    "vaelab bf16": {"precision": "bf16"},
    "vaelab fp32 --compile": {"compile": True},
    "vaelab bf16 --compile": {"precision": "bf16", "compile": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="training images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where vaelab and the reference run")
    ap.add_argument("--quick", action="store_true", help="1000 images, 2 epochs, fp32 (and bf16 where the CPU has it natively) only")
    args = ap.parse_args()
    if args.quick:
        args.n, args.epochs = min(args.n, 1000), min(args.epochs, 2)
        if "--variants" not in " ".join(sys.argv):
            args.variants = "vaelab fp32,vaelab bf16" if native_bf16() else "vaelab fp32"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in names):
        ap.error(f"known variants: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n + 200, 3, 32, 32), generator=g, dtype=torch.uint8)
    train_set = ImageSet(images[: args.n], source="random")
    data = DataSplits(train_set, ImageSet(images[args.n : args.n + 100]), ImageSet(images[args.n + 100 :]), "random")
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name="random", val_size=100),
        model=vaelab.ModelConfig(encoder="conv", decoder="conv", hidden=(32, 64),
                                 latent_dim=32, likelihood="discretized-logistic"),
        train=vaelab.TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, progress=False, threads=args.threads,
                                 device=args.device),  # both where the reference runs
    )
    x_all = to_float(train_set.images)

    def reference(memory_format=torch.contiguous_format, bf16: bool = False):
        torch.manual_seed(1)
        net = vaelab.build_model(base.model, vaelab.DataSpec((3, 32, 32)))
        enc, dec = copy.deepcopy(net.encoder).to(device), copy.deepcopy(net.decoder).to(device)
        enc.to(memory_format=memory_format)
        dec.to(memory_format=memory_format)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        loader = DataLoader(TensorDataset(x_all), batch_size=128, shuffle=True, pin_memory=gpu)
        amp = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
        return lambda: reference_epoch(enc, dec, opt, loader, amp, device, memory_format)

    rows = []
    with_bf16 = not args.quick or native_bf16() or gpu
    extra = {"reference channels_last": [], **({"reference bf16 autocast": []} if with_bf16 else {}),
             **({"reference bf16 channels_last": []} if gpu else {})}
    for name in names:
        cfg = base.replace(train=dataclasses.replace(base.train, **VARIANTS[name]))
        others = {"reference channels_last": reference(torch.channels_last)}
        if with_bf16:
            others["reference bf16 autocast"] = reference(bf16=True)
        if gpu:
            others["reference bf16 channels_last"] = reference(torch.channels_last, bf16=True)

        def between(others=others) -> None:
            for key, epoch in others.items():
                extra[key].append(epoch())

        _, ours, refs = train_interleaved(cfg, data, reference(), between=between)
        rows.append((name, ours, refs))

    ref_all = [t for _, _, refs in rows for t in refs]
    med_ref = statistics.median([steady_median(refs) for _, _, refs in rows])
    print(f"conv_throughput: {args.n} random 3x32x32 uint8 images, conv VAE hidden (32, 64), latent 32, "
          f"discretized logistic, batch 128, Adam 1e-3, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if gpu else f'{torch.get_num_threads()} threads'}")
    print(f"{'':26s} {'median s/epoch':>15s} {'x ref':>6s} {'images/s':>10s} {'epochs (s)':>30s}")
    # (name, epochs, median, the reference median its ratio is taken against)
    table = [("reference fp32", ref_all, med_ref, med_ref)]
    table += [(k, v, steady_median(v), med_ref) for k, v in extra.items()]
    table += [(name, ours, steady_median(ours), steady_median(refs)) for name, ours, refs in rows]
    for name, ts, med, own_ref in table:
        print(f"{name:26s} {med:15.3f} {own_ref / med:6.2f} {args.n / med:10.0f} "
              f"{' '.join(f'{t:.2f}' for t in ts[:8]):>30s}")
    print("x ref: against the reference fp32 epochs interleaved with that row; targets: vaelab bf16 >= 1.5x the "
          "reference on a CPU, >= 2x on a GPU. Medians leave out each run's first epoch (warm-up; a compiled "
          "variant's compile time).")
    if gpu and "reference bf16 autocast" in extra:
        best = min(steady_median(extra[k]) for k in extra if "bf16" in k)
        for name, ours, _ in rows:
            if "bf16" in name:
                print(f"{name}: {best / steady_median(ours):.2f}x the faster plain bf16 reference "
                      f"({best:.3f} s/epoch)")


if __name__ == "__main__":
    main()
