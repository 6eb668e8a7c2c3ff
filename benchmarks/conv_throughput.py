"""Training throughput of a 32x32 colour convolutional VAE: vaelab's loop vs a plain-PyTorch loop.

Both train the same network (vaelab's "conv" encoder/decoder, hidden (32, 64), latent 32, a
discretized logistic likelihood, batch 128, Adam 1e-3) on the same random uint8 images (CIFAR-10 is
not available offline; throughput does not depend on the pixels). The reference is written the
plain way: a DataLoader over a TensorDataset, the loss spelled out, default Adam. Epochs alternate
(vaelab, reference, vaelab, ...) so both see the same machine state; we print the median seconds per
epoch of each and the throughput ratio.

    python benchmarks/conv_throughput.py [--n 10000] [--epochs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _interleave import train_interleaved
from torch.utils.data import DataLoader, TensorDataset

import vaelab
from vaelab.data import DataSplits, ImageSet, to_float
from vaelab.distributions.logistic import discretized_logistic_log_prob


def reference_epoch(enc, dec, opt, loader) -> float:
    """One epoch the plain way: reparameterise, discretized-logistic NLL + closed-form KL."""
    enc.train()
    dec.train()
    t0 = time.perf_counter()
    for (x,) in loader:
        opt.zero_grad()
        mu, logvar = enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        loc, log_scale = dec(z).chunk(2, dim=1)
        nll = -discretized_logistic_log_prob(x, loc, log_scale.clamp(min=-7.0)).flatten(1).sum(1)
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(1)
        (nll + kl).mean().backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="training images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n + 200, 3, 32, 32), generator=g, dtype=torch.uint8)
    train_set = ImageSet(images[: args.n], source="random")
    data = DataSplits(train_set, ImageSet(images[args.n : args.n + 100]), ImageSet(images[args.n + 100 :]), "random")
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name="random", val_size=100),
        model=vaelab.ModelConfig(encoder="conv", decoder="conv", hidden=(32, 64),
                                 latent_dim=32, likelihood="discretized-logistic"),
        train=vaelab.TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, progress=False, threads=args.threads),
    )

    torch.manual_seed(1)
    net = vaelab.build_model(cfg.model, vaelab.DataSpec((3, 32, 32)))
    enc, dec = copy.deepcopy(net.encoder), copy.deepcopy(net.decoder)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    loader = DataLoader(TensorDataset(to_float(train_set.images)), batch_size=128, shuffle=True)
    _, ours_times, ref_times = train_interleaved(cfg, data, lambda: reference_epoch(enc, dec, opt, loader))

    med_ref, med_ours = statistics.median(ref_times), statistics.median(ours_times)
    print(f"conv_throughput: {args.n} random 3x32x32 uint8 images, conv VAE hidden (32, 64), latent 32, "
          f"discretized logistic, batch 128, Adam 1e-3, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':12s} {'median s/epoch':>15s} {'images/s':>10s} {'epochs (s)':>30s}")
    for name, med, ts in (("reference", med_ref, ref_times), ("vaelab", med_ours, ours_times)):
        print(f"{name:12s} {med:15.3f} {args.n / med:10.0f} {' '.join(f'{t:.2f}' for t in ts):>30s}")
    print(f"throughput ratio vaelab/reference: {med_ref / med_ours:.2f}x")


if __name__ == "__main__":
    main()
