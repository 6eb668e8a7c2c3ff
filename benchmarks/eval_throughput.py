"""Throughput of the IWAE estimate -L_k (Burda et al. 2016): vaelab's `evaluate` path vs a plain-PyTorch
reference implementation, at an equal estimate, with the decoder's GEMM floor, in one run.

The model is the PyTorch examples' VAE (MLP 784-400-20, Bernoulli on [0,1] intensities), trained for
one epoch by vaelab on Fashion-MNIST (the estimate needs a sensible model, the speed does not). The
reference is written the straightforward way: for each image, repeat it k times, encode, draw k z,
decode all k at once, and take the logsumexp of the log-weights. vaelab runs `evaluate_batches` (what
`vaelab evaluate` runs) in fp32 and with bf16 decoder passes, eagerly and with --compile (compiled once
on one batch before the timing starts; the compile time is printed). bf16 rows run only where this CPU
has native bf16 (else emulated, ~10x slower than fp32) unless --bf16 asks for them. The images are split in parts and the
implementations alternate part by part, so all see the same machine state. The floor is the time of
the decoder's matrix products alone (2 (20*400 + 400*784) flops per draw) with the fastest fp32
kernel and with bf16.

    python benchmarks/eval_throughput.py [-k 5000] [--n 10000] [--threads N] [--quick] [--bf16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from _floors import KERNELS, floor_seconds, native_bf16

import vaelab
from vaelab.accel import Accelerator
from vaelab.data import to_float
from vaelab.devices import resolve_device
from vaelab.evaluation import evaluate_batches

LOG2PI = math.log(2 * math.pi)


@torch.no_grad()
def reference_lk(net, x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """L_k per image, the plain way: x (N, 784) in [0,1]; net holds fc1, fc2 (encoder), fc3, fc4 (decoder)."""
    out = torch.empty(x.shape[0], device=x.device)
    for i in range(x.shape[0]):
        xi = x[i : i + 1]  # (1, 784)
        mu, logvar = net["fc2"](F.relu(net["fc1"](xi))).chunk(2, dim=1)  # (1, 20) each
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(k, mu.shape[1], generator=g, device=x.device)
        z = mu + eps * std  # (k, 20)
        logits = net["fc4"](F.relu(net["fc3"](z)))  # (k, 784)
        log_px = -F.binary_cross_entropy_with_logits(logits, xi.expand(k, -1), reduction="none").sum(1)
        log_pz = -0.5 * (z.pow(2) + LOG2PI).sum(1)
        log_qz = -0.5 * (eps.pow(2) + LOG2PI + logvar).sum(1)
        out[i] = torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k)
    return out.cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", type=int, default=5000)
    ap.add_argument("--n", type=int, default=10000, help="test images")
    ap.add_argument("--parts", type=int, default=5, help="alternate the implementations over this many parts")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="k=500 on 32 images, the model trained on 2000 (< 1 min)")
    ap.add_argument("--bf16", action="store_true", help="the bf16 rows even where bf16 is emulated")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where vaelab and the reference run")
    args = ap.parse_args()
    if args.quick:
        args.k, args.n, args.parts = min(args.k, 500), min(args.n, 32), min(args.parts, 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(data_dir=args.data_dir, limit_train=2000 if args.quick else 20000, val_size=0,
                               limit_test=args.n),
        model=vaelab.ModelConfig(latent_dim=20, hidden=(400,), likelihood="bernoulli"),
        train=vaelab.TrainConfig(epochs=1, progress=False, threads=args.threads, device=args.device),
    )
    data = vaelab.load_data(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        model = vaelab.train(cfg, f"{tmp}/run", data=data).model.eval()
    device = resolve_device(args.device)
    model.to(device)
    enc, dec = model.encoder.net, model.decoder.net  # Sequential(Linear, ReLU, Linear)
    net = {}
    for name, lin in (("fc1", enc[0]), ("fc2", enc[2]), ("fc3", dec[0]), ("fc4", dec[2])):
        ref = torch.nn.Linear(lin.in_features, lin.out_features)  # plain nn.Linear (MKL in fp32)
        ref.load_state_dict(lin.state_dict())
        net[name] = ref.to(device)
    images = data.test.images[: args.n]
    x = to_float(images).flatten(1).to(device)
    pipe = vaelab.BatchPipeline(vaelab.build_condition("none", model.spec))
    impls = {"reference (plain PyTorch)": lambda s, e, p: reference_lk(net, x[s:e], args.k,
                                                                      torch.Generator(device).manual_seed(1000 + p))}
    precisions = ["fp32"] + (["bf16"] if args.bf16 or device.type == "cuda" or native_bf16() else [])
    compile_s = {}
    for prec in precisions:
        for comp in (False, True):
            name = f"vaelab evaluate {prec}" + (" --compile" if comp else "")
            run = lambda s, e, p, prec=prec, comp=comp: evaluate_batches(  # noqa: E731
                model, images[s:e], None, pipe, k=args.k, seed=p, precision=prec,
                passes=Accelerator(compile=comp).passes()).lk.float()
            if comp:  # compiled on one batch's pass shapes (its groups and the last one); later calls re-use them
                t0 = time.perf_counter()
                run(0, min(100, len(x)), 99)
                compile_s[name] = time.perf_counter() - t0
            impls[name] = run
    times = {name: 0.0 for name in impls}
    lks: dict[str, list[torch.Tensor]] = {name: [] for name in impls}
    bounds = [round(i * len(x) / args.parts) for i in range(args.parts + 1)]
    for p in range(args.parts):
        for name, f in impls.items():
            t0 = time.perf_counter()
            lks[name].append(f(bounds[p], bounds[p + 1], p))
            times[name] += time.perf_counter() - t0
    # decoder products per draw: z (20) -> 400 -> 784; the floor at ~2500-row calls
    rows = 2500
    calls = len(x) * args.k / rows
    floors = {kname: floor_seconds([(rows, 20, 400, "fwd"), (rows, 400, 784, "fwd")], max(1, round(calls)), kname,
                                   reps=1) for kname in KERNELS} if device.type == "cpu" else {}
    fastest32 = min(floors.get("fp32 MKL", math.nan), floors.get("fp32 oneDNN", math.nan))

    print(f"eval_throughput: -L_{args.k} on {len(x)} Fashion-MNIST test images, MLP 784-400-20 Bernoulli "
          f"(1 epoch of training), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}")
    print("decoder GEMM floors (s): " + ", ".join(f"{kn} {v:.2f}" for kn, v in floors.items()))
    ref_lk = torch.cat(lks["reference (plain PyTorch)"])
    se = float(ref_lk.std() / math.sqrt(len(ref_lk))) if len(ref_lk) > 1 else math.nan
    print(f"{'':28s} {'seconds':>8s} {'x ref':>6s} {'x floor':>8s} {'-L_k':>9s} {'s.e.':>6s} {'- ref':>7s}")
    for name in impls:
        lk = torch.cat(lks[name])
        floor = floors.get("bf16 oneDNN", math.nan) if "bf16" in name else fastest32
        print(f"{name:28s} {times[name]:8.2f} {times['reference (plain PyTorch)'] / times[name]:6.2f} "
              f"{times[name] / floor:8.2f} {float(-lk.mean()):9.3f} "
              f"{float(lk.std() / math.sqrt(len(lk))) if len(lk) > 1 else math.nan:6.3f} "
              f"{float(-lk.mean() + ref_lk.mean()):+7.3f}")
    print(f"equal estimate: the differences from the reference should be within one standard error ({se:.3f}); "
          f"target: vaelab >= 3x the reference at k=5000.")
    if compile_s:
        print("compile (s, a first call on one batch, not in the times above): "
              + ", ".join(f"{name} {t:.1f}" for name, t in compile_s.items()))
    if "vaelab evaluate bf16" in lks:
        diff = torch.cat(lks["vaelab evaluate bf16"]) - torch.cat(lks["vaelab evaluate fp32"])
        print(f"per-image paired s.d. bf16 vs fp32: {statistics.pstdev(diff.tolist()):.4f} nats")


if __name__ == "__main__":
    main()
