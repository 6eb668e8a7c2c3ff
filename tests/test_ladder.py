"""The Ladder VAE (issue 26): its posterior is the precision-weighted product of Sønderby et al. (2016),
its ELBO (closed-form KL per layer) is E_q[log w], every command runs on it, a lower layer can be
traversed, and sampling takes one temperature per layer."""

from __future__ import annotations

import math

import pytest
import torch

import vaelab
from vaelab.config import DataSpec, ModelConfig, TrainConfig
from vaelab.distributions.normal import DiagonalGaussian
from vaelab.errors import ConfigError
from vaelab.models.ladder import precision_weighted


def _ladder(layers: int = 3, latent: int = 8, shape=(1, 8, 8), **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(model="ladder", layers=layers, latent_dim=latent, hidden=(32,), **kw)
    return vaelab.build_model(cfg, DataSpec(shape))


def test_precision_weighted_posterior_is_the_normalised_product_of_the_two_gaussians():
    g = torch.Generator().manual_seed(0)
    a = DiagonalGaussian(torch.randn(5, 3, generator=g, dtype=torch.float64),
                         3 * torch.randn(5, 3, generator=g, dtype=torch.float64))
    b = DiagonalGaussian(torch.randn(5, 3, generator=g, dtype=torch.float64),
                         3 * torch.randn(5, 3, generator=g, dtype=torch.float64))
    q = precision_weighted(a, b)
    va, vb = a.logvar.exp(), b.logvar.exp()
    var = 1 / (1 / va + 1 / vb)
    assert torch.allclose(q.logvar.exp(), var) and torch.allclose(q.mu, (a.mu / va + b.mu / vb) * var)
    # N(z; a) N(z; b) / N(z; q) is the same constant for every z: q is their normalised product
    z = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    ratio = a.log_prob_elements(z) + b.log_prob_elements(z) - q.log_prob_elements(z)
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))


def test_layers_are_listed_bottom_up_with_closed_form_kls_conditioned_on_the_draw_above():
    model = _ladder(layers=4, latent=16)
    assert model.latent_dims == (16, 8, 4, 2)
    x = torch.rand(6, 1, 8, 8)
    out = model(x, generator=torch.Generator().manual_seed(1), k=3)
    assert [ly.name for ly in out.layers] == ["z1", "z2", "z3", "z4"]
    assert [ly.z.shape for ly in out.layers] == [(3, 6, d) for d in (16, 8, 4, 2)]
    assert not any(ly.prior_depends_on_z for ly in out.layers)
    terms = vaelab.elbo(model, x, generator=torch.Generator().manual_seed(1))
    assert all(ly.closed_form and ly.kl_per_dim.shape == (6, ly.dim) for ly in terms.layers)
    # each lower layer's prior is the top-down network at the draw above
    for level, ly in enumerate(out.layers[:-1]):
        p = model.down[level](out.layers[level + 1].z)
        assert torch.equal(ly.p.mu, p.chunk(2, -1)[0])


@pytest.mark.parametrize(("skip", "posterior"), [(False, "precision"), (True, "precision"), (True, "residual"),
                                                  (False, "residual")], ids=["markov", "skip", "skip-residual",
                                                                             "markov-residual"])
def test_the_elbo_with_closed_form_kls_is_e_q_log_w(skip, posterior):
    """Each layer's q and p are conditioned on the draw above, not on its own draw, so the closed-form
    KLs sum to the same expectation as log q - log p at the draws: the ELBO agrees with the mean of
    log w over many draws, within Monte Carlo error (and the closed form has far less noise)."""
    model = _ladder(layers=3, latent=6, shape=(1, 4, 4), ladder_skip=skip, ladder_posterior=posterior).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64).bernoulli()
    n = 20000
    with torch.no_grad():
        terms = vaelab.elbo(model, x, generator=torch.Generator().manual_seed(4), k=n, weights=True)
    log_w = terms.log_w  # (n, B)
    se = log_w.std(0) / math.sqrt(n)
    z = ((terms.elbo - log_w.mean(0)) / se).abs()
    assert (z < 4).all(), (terms.elbo, log_w.mean(0), se)


@pytest.mark.parametrize("skip", [False, True], ids=["markov", "skip-residual"])
def test_bounds_and_sampling_with_a_temperature_per_layer(skip):
    model = _ladder(layers=3, latent=8, ladder_skip=skip, ladder_posterior="residual" if skip else "precision").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g).bernoulli()
    with torch.no_grad():
        for p in model.parameters():  # a posterior off the true one: the bounds' gaps are wide
            p.add_((0.1 if skip else 0.3) * torch.randn(p.shape, generator=g))  # (the residual state grows fast)
        lk = {k: vaelab.iwae_bound(model, x, k, generator=torch.Generator().manual_seed(1)).mean().item()
              for k in (1, 10, 100)}
    assert lk[1] < lk[10] < lk[100]
    a = model.sample(4, generator=torch.Generator().manual_seed(2), temperature=[1.0, 0.5, 0.0])
    b = model.sample(4, generator=torch.Generator().manual_seed(2), temperature=(1.0, 0.5, 0.0))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    # temperature 0 at every layer is the deterministic chain of prior means: decode(prior mean)
    zero = model.sample(3, generator=torch.Generator().manual_seed(5), temperature=0.0)
    assert torch.allclose(zero, model.decode(torch.zeros(3, 2)).mean)
    with pytest.raises(ConfigError, match="3 stochastic layer"):
        model.sample(2, temperature=[1.0, 1.0])
    with pytest.raises(ConfigError, match="finite"):
        model.sample(2, temperature=[1.0, float("nan"), 1.0])


@pytest.mark.parametrize("skip", [False, True], ids=["markov", "skip-residual"])
def test_decode_layers_is_decode_from_a_lower_layer(skip):
    model = _ladder(layers=3, latent=8, ladder_skip=skip, ladder_posterior="residual" if skip else "precision").eval()
    if skip:  # the deltas start at zero (q = p): move them so that q differs from p
        with torch.no_grad():
            for post in model.posts:
                post[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(9))
    z3 = torch.randn(4, 2)
    with torch.no_grad():
        qs = model.encode(torch.rand(4, 1, 8, 8))
        assert [q.mean.shape for q in qs] == [(4, 8), (4, 4), (4, 2)]
        # layers below a given code take their prior's mean: giving those means changes nothing
        s, priors = model._top_down(z3, lambda level, p, s: p.mean)
        z2 = priors[1].mean
        assert torch.equal(model.decode(z3).mean, model.decode_layers([z3]).mean)
        assert torch.allclose(model.decode_layers([z2, z3]).mean, model.decode(z3).mean)
        # and a code given for a lower layer is used: the posterior means decode what encode implies
        codes = [q.mean for q in qs]
        assert not torch.allclose(model.decode_layers(codes).mean, model.decode(codes[-1]).mean)


def test_with_skip_every_layer_reaches_the_decoder():
    """Markov: the image depends on z_1 alone; with the skip state, changing z_2 with z_1 fixed changes it."""
    for skip, changes in ((False, False), (True, True)):
        model = _ladder(layers=3, latent=8, ladder_skip=skip).eval()
        with torch.no_grad():
            z1, z2, z3 = torch.randn(1, 8), torch.randn(1, 4), torch.randn(1, 2)
            a = model.decode_layers([z1, z2, z3]).mean
            b = model.decode_layers([z1, z2 + 1.0, z3]).mean
        assert (not torch.equal(a, b)) == changes


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("ladder")
    data = write_mnist(root / "data" / "mnist").parent
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False, limit_train=136),
        model=ModelConfig(model="ladder", layers=3, latent_dim=8, hidden=(24,)),
        train=TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu", lr=3e-3,
                          warmup_epochs=1.0),
    )
    return vaelab.train(cfg, root / "run").run_dir


def test_every_command_works_on_a_ladder_run(ladder_run, tmp_path, capsys):
    import numpy as np

    from vaelab.cli import main

    ev = vaelab.evaluate_run(ladder_run, k=20, progress=False, write=False, device="cpu")
    assert [ly["name"] for ly in ev.layers] == ["z1", "z2", "z3"]
    assert all(ly["closed_form"] and len(ly["kl_per_dim"]) == ly["dim"] for ly in ev.layers)
    assert all(0 <= ly["active_units"] <= ly["dim"] for ly in ev.layers) and ev.nll <= ev.neg_elbo + 1.0
    for f, kw in ((vaelab.sample_run, {"n": 4}), (vaelab.reconstruct_run, {"n": 4}),
                  (vaelab.interpolate_run, {"steps": 3}), (vaelab.manifold_run, {"n": 3}),
                  (vaelab.traverse_run, {"top": 2, "steps": 4}),
                  (vaelab.traverse_run, {"top": 3, "steps": 4, "layer": "z1"})):
        assert f(ladder_run, tmp_path / f"{f.__name__}-{len(kw)}.png", device="cpu", **kw).exists()
    assert np.load(vaelab.encode_run(ladder_run, tmp_path / "z.npy", device="cpu")).shape[1] == 2
    row = (ladder_run / "metrics.jsonl").read_text().splitlines()[-1]
    assert all(f'"val_kl_z{i}"' in row for i in (1, 2, 3))
    # the command line: per-layer temperatures and a lower layer's traversal, and their one-line errors
    assert main(["sample", str(ladder_run), "-n", "4", "--temperature", "1,0.8,0.5", "--device", "cpu"]) == 0
    assert "samples-t1_0.8_0.5.png" in capsys.readouterr().out
    assert main(["traverse", str(ladder_run), "--layer", "z2", "--top", "2", "--steps", "3", "--device", "cpu"]) == 0
    assert "traversal-z2.png" in capsys.readouterr().out
    assert main(["sample", str(ladder_run), "--temperature", "1,1", "--device", "cpu"]) == 2
    assert "2 values for a model with 3 stochastic layer(s)" in capsys.readouterr().err
    assert main(["traverse", str(ladder_run), "--layer", "z9", "--device", "cpu"]) == 2
    assert "this model's stochastic layers are z1, z2, z3" in capsys.readouterr().err
    assert main(["sample", str(ladder_run), "--temperature", "hot", "--device", "cpu"]) == 2
    assert "--temperature takes a number" in capsys.readouterr().err


def test_a_lower_layer_traversal_varies_one_unit_per_row(ladder_run):
    from vaelab.viz.generate import aggregate_spread, first_test_images, traverse_images

    run = vaelab.load_run(ladder_run, device="cpu")
    b, _ = first_test_images(run, 20)
    spread = aggregate_spread(run.model, b.x, b.c, 0)
    assert spread[0].shape == (8,) and (spread[1] > 0).all()
    imgs = traverse_images(run.model, b.x[0], dims=(0, 3), steps=5, layer=0, spread=spread)
    assert imgs.shape == (10, 1, 28, 28) and torch.isfinite(imgs).all()
    # the ends of a row differ (the unit moves the image); the rows are distinct units
    assert not torch.equal(imgs[0], imgs[4]) and not torch.equal(imgs[:5], imgs[5:])
    with pytest.raises(ConfigError, match="needs its spread"):
        traverse_images(run.model, b.x[0], dims=(0,), layer=0)
