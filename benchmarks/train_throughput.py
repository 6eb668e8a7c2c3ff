"""Training throughput: vaelab's loop vs a plain-PyTorch reference loop, side by side.

The model is the PyTorch examples' VAE (vae/main.py): MLP 784-400-20, ReLU, Bernoulli likelihood
on [0,1] intensities, Adam lr 1e-3, batch 128, on Fashion-MNIST. The reference is written the way
that example is: a DataLoader over a TensorDataset, a sigmoid output with binary cross-entropy,
default Adam. Epochs alternate (reference, vaelab, reference, ...) so both see the same machine
state; we report the median seconds per epoch, the throughput ratio, and the test negative ELBO
(nats, one z per image, closed-form KL) of both after the same number of epochs.

    python benchmarks/train_throughput.py [--epochs 5] [--data-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _interleave import train_interleaved
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vaelab
from vaelab.data import to_float
from vaelab.devices import resolve_device
from vaelab.evaluation import evaluate_batches


class ReferenceVAE(nn.Module):
    """pytorch/examples vae/main.py, sizes as arguments."""

    def __init__(self, d: int = 784, h: int = 400, z: int = 20) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, z), nn.Linear(h, z)
        self.fc3, self.fc4 = nn.Linear(z, h), nn.Linear(h, d)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(x.shape[0], -1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def reference_loss(recon, x, mu, logvar):
    bce = F.binary_cross_entropy(recon, x.view(x.shape[0], -1), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(model, opt, loader, device: torch.device = CPU) -> float:
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    for (x,) in loader:
        x = x.to(device, non_blocking=True)  # as the official example does on a GPU
        opt.zero_grad()
        recon, mu, logvar = model(x)
        loss = reference_loss(recon, x, mu, logvar)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def reference_test_neg_elbo(model, x_test: torch.Tensor) -> float:
    model.eval()
    torch.manual_seed(0)
    tot = 0.0
    for i in range(0, len(x_test), 1000):
        x = x_test[i : i + 1000]
        recon, mu, logvar = model(x)
        tot += reference_loss(recon, x, mu, logvar).item()
    return tot / len(x_test)


def matmul_floor(n_train: int, d: int = 784, h: int = 400, z: int = 20, batch: int = 128, reps: int = 3,
                 device: torch.device = CPU) -> float:
    """Seconds per epoch spent in the step's matrix products alone (4 forward addmm, 7 backward mm,
    the same shapes any implementation of this model must compute): a floor no loop can beat."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, d, generator=g).to(device)
    w1, w2, w3, w4 = (torch.randn(o, i, generator=g).to(device) * 0.05 for o, i in ((h, d), (2 * z, h), (h, z), (d, h)))
    b1, b2, b3, b4 = (torch.zeros(o, device=device) for o in (h, 2 * z, h, d))
    h1, e, zz, h3, out = (torch.empty(batch, h, device=device), torch.empty(batch, 2 * z, device=device),
                          torch.rand(batch, z, device=device), torch.empty(batch, h, device=device),
                          torch.empty(batch, d, device=device))

    def step() -> None:
        torch.addmm(b1, x, w1.t(), out=h1)
        torch.addmm(b2, h1, w2.t(), out=e)
        torch.addmm(b3, zz, w3.t(), out=h3)
        torch.addmm(b4, h3, w4.t(), out=out)
        out.t().mm(h3), out.mm(w4), h3.t().mm(zz), h3.mm(w3), e.t().mm(h1), e.mm(w2), h1.t().mm(x)

    steps = -(-n_train // batch)
    for _ in range(20):
        step()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--run", default=None, help="run directory for vaelab (default: a temporary one)")
    ap.add_argument("--limit-train", type=int, default=None, help="use only N training images (smoke tests)")
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | ...: both loops run there")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name=args.data, data_dir=args.data_dir, limit_train=args.limit_train,
                               val_size=args.val_size),
        model=vaelab.ModelConfig(latent_dim=20, hidden=(400,), likelihood="bernoulli"),
        train=vaelab.TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, progress=False, threads=args.threads,
                                 device=args.device),
    )
    data = vaelab.load_data(cfg.data)
    x_train = to_float(data.train.images)
    x_test = to_float(data.test.images).to(device)

    torch.manual_seed(1)
    ref = ReferenceVAE().to(device)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x_train), batch_size=128, shuffle=True, pin_memory=device.type == "cuda")
    res, ours_times, ref_times = train_interleaved(cfg, data, lambda: reference_epoch(ref, ref_opt, loader, device),
                                                   args.run)
    ours_nelbo = -evaluate_batches(res.model, data.test.images, None, vaelab.BatchPipeline(vaelab.build_condition(
        "none", res.spec)), batch_size=1000).means()["elbo"]
    ref_nelbo = reference_test_neg_elbo(ref, x_test)
    floor = matmul_floor(len(x_train), device=device)

    med_ref, med_ours = statistics.median(ref_times), statistics.median(ours_times)
    print(f"train_throughput: {args.data}, {len(x_train)} training images, MLP 784-400-20, Bernoulli, batch 128, "
          f"Adam 1e-3, fp32, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print(f"{'':12s} {'median s/epoch':>15s} {'epochs (s)':>40s} {'test -ELBO':>11s}")
    print(f"{'reference':12s} {med_ref:15.3f} {' '.join(f'{t:.2f}' for t in ref_times):>40s} {ref_nelbo:11.2f}")
    print(f"{'vaelab':12s} {med_ours:15.3f} {' '.join(f'{t:.2f}' for t in ours_times):>40s} {ours_nelbo:11.2f}")
    print(f"{'matmul floor':12s} {floor:15.3f}   (the 11 matrix products of each step alone, fp32)")
    print(f"throughput ratio vaelab/reference: {med_ref / med_ours:.2f}x (target >= 2.5x); "
          f"the most any fp32 loop could reach here is reference/floor = {med_ref / floor:.2f}x")
    print(f"test -ELBO difference after {args.epochs} epochs: {ours_nelbo - ref_nelbo:+.2f} nats (target within 0.5)")


if __name__ == "__main__":
    main()
