"""Check a trained run's reported ELBO against E_q[log w] on its own test images (issue 26).

    python experiments/elbo_check.py RUN [--images 200] [--draws 200] [--seed 0]

For each of the first N test images it draws D samples z ~ q and computes, per draw, log w (the
importance weight's log: log p(x|z) + sum_l log p(z_l) - log q(z_l)), vaelab's ELBO terms (each layer's
KL in closed form where the contract allows it, else the Monte Carlo term), and the ELBO every layer in
closed form would give (the formula vaelab used before issue 26, which is wrong for a layer whose prior
depends on its own draw). E_q[log w] is the ELBO by definition; the script prints the mean of each
estimate over the images and the paired differences with their standard errors (over images, each image
averaged over its D draws), so that a bias shows as a difference many standard errors from 0.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from vaelab.errors import VaelabError
from vaelab.models import fixed_weights, generator_for
from vaelab.objectives import elbo_terms
from vaelab.runs import Run
from vaelab.viz.generate import first_test_images


def estimates(run: Run, images: int, draws: int, seed: int) -> dict[str, torch.Tensor]:
    """Per image (N,): the mean over ``draws`` of log w, of vaelab's ELBO, and of the all-closed-form ELBO."""
    model = run.model.eval()
    b, n = first_test_images(run, images)
    g = generator_for(model, seed)
    with torch.no_grad(), fixed_weights(model):
        out = model(b.x, b.c, generator=g, k=draws)
        terms = elbo_terms(out, b.x, b.mask, weights=True)
        flags = [layer.prior_depends_on_z for layer in out.layers]
        for layer in out.layers:
            layer.prior_depends_on_z = False
        old = elbo_terms(out, b.x, b.mask, weights=False)
        for layer, f in zip(out.layers, flags, strict=True):
            layer.prior_depends_on_z = f
    assert terms.log_w is not None
    return {"E_q[log w]": terms.log_w.mean(0).double(), "vaelab ELBO": terms.elbo.double(),
            "all closed form": old.elbo.double(), "monte_carlo_layers": torch.tensor(sum(flags))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        run = Run(args.run, "best", device=args.device)
        est = estimates(run, args.images, args.draws, args.seed)
    except VaelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = est["E_q[log w]"].shape[0]
    print(f"{args.run}: {n} test images x {args.draws} draws; layers {run.model.latent_dims}, "
          f"{int(est['monte_carlo_layers'])} with a prior that depends on their own draw")
    ref = est["E_q[log w]"]
    for name in ("E_q[log w]", "vaelab ELBO", "all closed form"):
        v = est[name]
        line = f"  {name:16s} {v.mean():10.3f} nats"
        if name != "E_q[log w]":
            d = v - ref
            se = d.std() / math.sqrt(n)
            line += f"   minus E_q[log w]: {d.mean():+.3f} ± {se:.3f} (paired s.e.; {abs(d.mean()) / se:.1f} s.e.)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
