"""Doersch (2016), Sec. 4.2: completing images from their centre column with a conditional VAE,
against a regressor (the same network without z).

X = the centre column (column 13 of 28), binarized afresh each pass; Y = the other 756 pixels.
Trains both models with the tutorial's networks (encoder 784(+c)-1000-500-250-z30, decoder mirrored,
ReLU, sigmoid/Bernoulli output, Adam lr 1e-3, weight decay 5e-4, batch 100), then measures on
test images:

* the conditional NLL -log P(Y|X) by importance sampling with Q(z|Y,X) as proposal (-L_k, with
  its standard error) and the conditional negative ELBO, for the CVAE;
* the regressor's -log P(Y|X) under the same Bernoulli likelihood (exact: it has no z);
* the diversity of completions of the same X over the completed pixels, and their distance to the
  truth (mean, best of S) against the regressor's;

and writes ``completion.png`` (rows: observed column | CVAE completions | regressor | truth) and
``results.json``. The tutorial trains for 60k iterations; the defaults here take a few minutes on
two CPU cores, so expect softer pictures than the paper's.

    python experiments/cvae_completion.py --data fashion-mnist            # ~7 min on 2 busy cores
    python experiments/cvae_completion.py --data mnist --limit-train 0 --epochs 20   # closer to the paper
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from vaelab import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    VaelabError,
    evaluate_model,
    load_data,
    train,
)
from vaelab.data import to_float
from vaelab.evaluation import describe_likelihood
from vaelab.pipeline import condition_of
from vaelab.viz import save_grid
from vaelab.viz.complete import complete_images, completion_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="an MNIST-family data set (mnist, fashion-mnist, kmnist)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/cvae-completion", help="folder for the two runs, the figure, the JSON")
    p.add_argument("--condition", default="centre-column", help="what is observed (the tutorial: centre-column)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit-train", type=int, default=15000,
                   help="train on the first N examples only (0: all; the default keeps the run to minutes)")
    p.add_argument("--hidden", default="1000,500,250", help="encoder widths (the decoder mirrors them)")
    p.add_argument("--latent-dim", type=int, default=30)
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("-k", type=int, default=500, help="importance samples for -log P(Y|X)")
    p.add_argument("--eval-n", type=int, default=500, help="test images evaluated")
    p.add_argument("--samples", type=int, default=8, help="completions per image (figure and diversity)")
    p.add_argument("--rows", type=int, default=10, help="test images in the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def configs(a: argparse.Namespace) -> tuple[RunConfig, RunConfig]:
    hidden = tuple(int(v) for v in a.hidden.split(",") if v)
    data = DataConfig(name=a.data, data_dir=a.data_dir, limit_train=a.limit_train or None,
                      val_size=a.val_size, seed=a.seed)
    tr = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, seed=a.seed,
                     threads=a.threads, progress=not a.no_progress)
    model = ModelConfig(model="cvae", condition=a.condition, latent_dim=a.latent_dim, hidden=hidden,
                        activation="relu", likelihood="bernoulli")
    # The regressor: the same decoder fed c alone; its z (size 1) is ignored.
    reg = ModelConfig(model="regressor", condition=a.condition, latent_dim=1, hidden=hidden,
                      activation="relu", likelihood="bernoulli")
    return RunConfig(data, model, tr), RunConfig(data, reg, tr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    out = Path(a.out)
    cfg_cvae, cfg_reg = configs(a)
    timings: dict[str, float] = {}
    runs = {}
    splits = load_data(cfg_cvae.data)
    for name, cfg in (("cvae", cfg_cvae), ("regressor", cfg_reg)):
        print(f"== training the {name} ({cfg.model.condition}) into {out / name}")
        t0 = time.perf_counter()
        res = train(cfg, out / name, data=splits)  # re-running resumes / reuses a finished run
        timings[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)
        runs[name] = res

    cvae, reg = runs["cvae"].model.eval(), runs["regressor"].model.eval()
    test = splits.test.subset(slice(0, a.eval_n))
    exact, meaning = describe_likelihood(runs["cvae"].config)
    cond = condition_of(cvae)

    print(f"== evaluating on {len(test)} test images: CVAE with k={a.k}, regressor exactly (k=1)")
    t0 = time.perf_counter()
    ev_c = evaluate_model(cvae, test, k=a.k, seed=a.seed, exact=exact, meaning=meaning, progress=not a.no_progress)
    # The regressor's L_1 is already log P(Y|X) exactly (KL = 0, one deterministic prediction).
    ev_r = evaluate_model(reg, test, k=1, seed=a.seed, exact=exact, meaning=meaning, progress=not a.no_progress)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    div = completion_metrics(cvae, test.images, samples=a.samples, seed=a.seed, regressor=reg)

    rows = to_float(test.images[: a.rows])
    comp = complete_images(cvae, rows, samples=a.samples, seed=a.seed, regressor=reg)
    prov = {"picture": "observed | CVAE completions | regressor | ground truth", "run": str(out / "cvae"),
            "checkpoint": "latest (in memory, end of training)", "epoch": str(runs["cvae"].state.epoch),
            "step": str(runs["cvae"].state.step), "seed": str(a.seed), "temperature": "1.0",
            "command": shlex.join([sys.executable, *sys.argv])}
    fig = save_grid(comp.grid_images(), out / "completion.png", nrow=comp.columns(), provenance=prov)

    def pick(e) -> dict[str, Any]:
        return {"neg_elbo": e.neg_elbo, "neg_elbo_stderr": e.neg_elbo_stderr, "reconstruction": e.reconstruction,
                "kl": e.kl, "nll": e.nll, "nll_stderr": e.nll_stderr, "k": e.k, "active_units": e.active_units,
                "latent_dim": e.latent_dim}

    results = {
        "experiment": "Doersch 2016 Sec. 4.2: CVAE vs regressor completion",
        "data": a.data,
        "condition": cond.describe(),
        "scored_pixels": int(div["unobserved_pixels"]),
        "likelihood_note": meaning,
        "train_examples": len(splits.train),
        "epochs": a.epochs,
        "networks": {"hidden": list(cfg_cvae.model.hidden), "latent_dim": a.latent_dim},
        "test_images": len(test),
        "cvae": pick(ev_c),
        "regressor": pick(ev_r),
        "completions": div,
        "final_val_elbo": {k: r.history[-1]["val_elbo"] if r.history else None for k, r in runs.items()},
        "timings": timings,
        "figure": str(fig),
        "figure_columns": ["observed"] + [f"cvae {i + 1}" for i in range(a.samples)] + ["regressor", "truth"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"== {cond.describe()}; nats per image over the {results['scored_pixels']} scored pixels")
    print(f"  CVAE      -ELBO {ev_c.neg_elbo:.2f} ± {ev_c.neg_elbo_stderr:.2f}   "
          f"-log P(Y|X) ≈ -L_{a.k} {ev_c.nll:.2f} ± {ev_c.nll_stderr:.2f}   KL {ev_c.kl:.2f}")
    print(f"  regressor -log P(Y|X) {ev_r.nll:.2f} ± {ev_r.nll_stderr:.2f}")
    print(f"  completions: per-pixel std {div['pixel_std']:.4f}, pairwise L2 {div['pairwise_l2']:.3f}; "
          f"L2 to truth: CVAE {div['sample_l2']:.3f} (best of {a.samples}: {div['best_of_s_l2']:.3f}), "
          f"regressor {div['regressor_l2']:.3f}")
    print(f"  figure {fig}\n  numbers {out / 'results.json'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except VaelabError as e:  # bad data or options: a message, not a traceback
        raise SystemExit(f"cvae_completion: error: {e}") from None
