"""The latent-variable contract: models written here, in the tests alone and in the style of
``vaelab/models``, train, evaluate, sample, resume bit-identically and complete images through
vaelab's own objective, loop, evaluation and pictures, which know nothing of them:

* ``test-learned-prior``: the VAE with a Gaussian prior whose mean and scale are learned (the KL
  stays in closed form, against a prior with parameters);
* ``test-mixture-prior``: the VAE with a learned mixture-of-Gaussians prior (no closed form: the
  objective uses the Monte Carlo KL log q(z) - log p(z));
* ``test-two-layer``: two stochastic layers (Burda et al. 2016, Sec. 5): q(z1|x) q(z2|z1),
  p(z2) p(z1|z2) p(x|z1).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vaelab
from vaelab.config import DataSpec, ModelConfig
from vaelab.distributions import DiagonalGaussian, Distribution, StandardNormal, kl_divergence, monte_carlo_kl
from vaelab.distributions.likelihoods import LIKELIHOODS, build_likelihood
from vaelab.models import MODELS, VAE, LatentModel, LatentModelBase, ModelOutput, StochasticLayer
from vaelab.models.base import flat_draws, repeat_rows
from vaelab.nets import build_decoder, build_encoder
from vaelab.nets.mlp import mlp
from vaelab.objectives import elbo
from vaelab.runs import RunDir, load_checkpoint


# ---------------------------------------------------------------- three models, in models/ style
class LearnedGaussianPriorVAE(VAE):
    """The VAE with P(z) = N(m, diag exp(v)), m and v learned: only the prior changes."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__(cfg, spec)
        self.prior_mu = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(cfg.latent_dim))

    def prior(self) -> DiagonalGaussian:
        return DiagonalGaussian(self.prior_mu, self.prior_logvar)  # batch (), broadcasts over data


class MixtureOfGaussians(Distribution):
    """sum_j pi_j N(mu_j, diag exp(logvar_j)) over a 1-D event; no closed-form KL is registered."""

    event_dims = 1

    def __init__(self, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.logits, self.mu, self.logvar = logits, mu, logvar  # (K,), (K, L), (K, L)

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not factorised
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        comp = DiagonalGaussian(self.mu, self.logvar).log_prob(x[..., None, :])  # (..., K)
        return torch.logsumexp(comp + torch.log_softmax(self.logits, -1), dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return (torch.softmax(self.logits, -1)[:, None] * self.mu).sum(0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_n(1, generator)[0]

    def sample_n(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        j = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.mu.shape[-1]), generator=generator, device=self.mu.device)
        return self.mu[j] + temperature * torch.exp(0.5 * self.logvar[j]) * eps


class MixturePriorVAE(VAE):
    """The VAE with a learned mixture of 3 Gaussians as its prior (a Monte Carlo KL)."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__(cfg, spec)
        g = torch.Generator().manual_seed(0)
        self.prior_logits = nn.Parameter(torch.zeros(3))
        self.prior_mu = nn.Parameter(torch.randn(3, cfg.latent_dim, generator=g))
        self.prior_logvar = nn.Parameter(torch.zeros(3, cfg.latent_dim))

    def prior(self) -> MixtureOfGaussians:
        return MixtureOfGaussians(self.prior_logits, self.prior_mu, self.prior_logvar)


def _gaussian(h: torch.Tensor) -> DiagonalGaussian:
    mu, logvar = h.chunk(2, dim=-1)
    return DiagonalGaussian(mu, logvar)


class TwoLayerVAE(LatentModelBase):
    """Burda et al. (2016, Sec. 5): q(z1|x) q(z2|z1), p(z2) = N(0, I), p(z1|z2), p(x|z1).
    z1 has ``latent_dim`` units, z2 half as many; the deterministic layers are ``hidden`` wide."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        l1, l2, width = cfg.latent_dim, max(1, cfg.latent_dim // 2), cfg.hidden[-1]
        c = spec.shape[0]
        self.likelihood = build_likelihood(cfg, c)
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        self.q1 = build_encoder(cfg, spec.shape, spec.cond_dim, 2 * l1)
        self.q2 = mlp([l1, width, 2 * l2], cfg.activation)
        self.p1 = mlp([l2, width, 2 * l1], cfg.activation)
        self.px = build_decoder(cfg, l1, spec.cond_dim, (k, *spec.shape[1:]))
        self._dims = (l1, l2)

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return self._dims

    def prior(self) -> StandardNormal:
        return StandardNormal(self._dims[1], device=self.device)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        q1 = _gaussian(self.q1(x, c))
        return [q1, _gaussian(self.q2(q1.mean))]

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.likelihood(self.px(_gaussian(self.p1(z)).mean, c))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator=None, k: int = 1) -> ModelOutput:
        q1 = _gaussian(self.q1(x, c))  # batch (B,)
        z1 = q1.rsample(generator, sample_shape=() if k == 1 else (k,))  # (B, L1) or (k, B, L1)
        q2 = _gaussian(self.q2(z1))  # batch like z1
        z2 = q2.rsample(generator)
        p1 = _gaussian(self.p1(z2))  # p(z1|z2)
        px = self.likelihood(self.px(flat_draws(z1, k), repeat_rows(c, k)))
        return ModelOutput(px, [StochasticLayer("z1", q1, p1, z1, prior_depends_on_z=True),  # p1 at a z2 drawn from z1
                                StochasticLayer("z2", q2, self.prior(), z2)], k)

    @torch.no_grad()
    def sample(self, n, c=None, *, generator=None, temperature=1.0, mean=True) -> torch.Tensor:
        z2 = self.prior().sample_n(n, generator, temperature)
        z1 = _gaussian(self.p1(z2)).sample_n(1, generator, temperature)[0]  # ancestral: z1 ~ p(z1|z2)
        px = self.likelihood(self.px(z1, c))
        return px.mean if mean else px.sample(generator)


TEST_MODELS = {"test-learned-prior": LearnedGaussianPriorVAE, "test-mixture-prior": MixturePriorVAE,
               "test-two-layer": TwoLayerVAE}
for _name, _cls in TEST_MODELS.items():
    if _name not in MODELS:
        MODELS.add(_name, _cls)


# ---------------------------------------------------------------- helpers
def _cfg(tiny_cfg, model: str, epochs: int = 2, **model_kw):
    return tiny_cfg.replace(model=replace(tiny_cfg.model, model=model, latent_dim=4, **model_kw),
                            train=replace(tiny_cfg.train, epochs=epochs, checkpoint_every=3))


def _same_checkpoints(a: Path, b: Path) -> None:
    ta, tb = (load_file(RunDir.of(r).latest) for r in (a, b))
    assert sorted(ta) == sorted(tb)
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each test model trained for 2 epochs on the tiny MNIST of conftest."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("contract")
    data = write_mnist(root / "data" / "mnist").parent
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False),
        model=ModelConfig(latent_dim=4, hidden=(32,)),
        train=vaelab.TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, lr=3e-3, device="cpu"),
    )
    return base, {name: vaelab.train(_cfg(base, name), root / name) for name in TEST_MODELS}


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_test_models_follow_the_protocol(trained, name):
    model = trained[1][name].model
    assert isinstance(model, LatentModel)
    assert isinstance(vaelab.build_model(ModelConfig(), DataSpec()), LatentModel)
    want = 2 if name == "test-two-layer" else 1
    assert len(model.latent_dims) == want


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_evaluation_bounds_rise_with_k_and_are_reported_per_layer(trained, name):
    run = trained[1][name].run_dir
    res = {k: vaelab.evaluate_run(run, k=k, progress=False, write=False) for k in (1, 10, 200)}
    # L_1 <= L_10 <= L_200: -L_k falls as k grows; the ELBO (its k=200-draw estimate) stays below L_200.
    assert res[1].nll > res[10].nll > res[200].nll, [r.nll for r in res.values()]
    assert res[200].neg_elbo >= res[200].nll
    assert abs(res[1].nll - res[1].neg_elbo) < 3 * res[1].neg_elbo_stderr + 5.0  # L_1 is an ELBO estimate
    layers = res[200].layers
    assert [ly["name"] for ly in layers] == (["z1", "z2"] if name == "test-two-layer" else ["z"])
    assert all(0 <= ly["active_units"] <= ly["dim"] for ly in layers)
    mc = name == "test-mixture-prior"
    # the two-layer model's z1: its prior p(z1|z2) is evaluated at a z2 drawn from z1 (Monte Carlo, issue 26)
    closed = [not mc] * len(layers) if name != "test-two-layer" else [False, True]
    assert [ly["closed_form"] for ly in layers] == closed
    assert (layers[0]["kl_per_dim"] is None) == (not closed[0])
    assert math.isclose(res[200].kl, sum(ly["kl"] for ly in layers), rel_tol=1e-9, abs_tol=1e-9)
    table = res[200].table()
    assert ("KL layer z2" in table) == (name == "test-two-layer") and "active units" in table


def test_the_learned_prior_is_learned_and_sampled_from(trained):
    model = trained[1]["test-learned-prior"].model.eval()
    assert model.prior_mu.abs().sum() > 0 or model.prior_logvar.abs().sum() > 0  # the KL reached it
    # temperature 0: every sample is the decoded prior mean, so sample() uses the model's own prior
    s = vaelab.viz.sample_images(model, 3, temperature=0.0)
    torch.testing.assert_close(s, model.decode(model.prior_mu.detach()[None].expand(3, -1)).mean.clamp(0, 1))


def test_mixture_prior_uses_the_monte_carlo_kl(trained):
    model = trained[1]["test-mixture-prior"].model.eval()
    x = torch.rand(16, 1, 28, 28)
    t = elbo(model, x, generator=torch.Generator().manual_seed(0))
    assert not t.layers[0].closed_form and t.layers[0].kl_per_dim is None
    out = model(x, generator=torch.Generator().manual_seed(0))
    layer = out.layers[0]
    torch.testing.assert_close(t.kl, layer.q.log_prob(layer.z) - layer.p.log_prob(layer.z))
    model.zero_grad(set_to_none=True)
    t.loss().backward()  # the prior's parameters get gradients through the objective
    assert model.prior_mu.grad is not None and model.prior_mu.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_pictures_work_on_every_model(trained, name, tmp_path):
    run = trained[1][name].run_dir
    assert vaelab.sample_run(run, tmp_path / "s.png", n=4).exists()
    assert vaelab.reconstruct_run(run, tmp_path / "r.png", n=4).exists()
    assert vaelab.interpolate_run(run, tmp_path / "i.png", steps=4).exists()
    assert vaelab.manifold_run(run, tmp_path / "m.png", n=3).exists()
    top = vaelab.load_run(run).model.latent_dims[-1]
    import numpy as np

    assert np.load(vaelab.encode_run(run, tmp_path / "z.npy")).shape == (60, top)


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_resume_is_bit_identical(trained, name, tmp_path):
    cfg = trained[1][name].config
    for stop in (5, 11):  # mid-epoch (7 steps per epoch) and into the second epoch
        vaelab.train(cfg, tmp_path / "cut", max_steps=stop)
    vaelab.train(cfg, tmp_path / "cut")
    _same_checkpoints(trained[1][name].run_dir, tmp_path / "cut")
    assert load_checkpoint(RunDir.of(tmp_path / "cut").latest).state["step"] == 14


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_conditional_versions_complete_images(trained, name, tmp_path):
    base = trained[0]
    cfg = _cfg(base, name, epochs=1, condition="centre-column")
    res = vaelab.train(cfg, tmp_path / "run")
    assert res.model.spec.cond_dim == 28 * 28
    out = vaelab.complete_run(tmp_path / "run", tmp_path / "c.png", n=3, samples=2)
    assert out.path.exists() and math.isfinite(out.metrics["sample_l2"])
    ev = vaelab.evaluate_run(tmp_path / "run", k=5, progress=False, write=False)
    assert ev.conditional and ev.nll <= ev.neg_elbo + 1.0


# ---------------------------------------------------------------- KL: Monte Carlo vs closed form
def test_monte_carlo_kl_agrees_with_the_closed_form_for_gaussian_pairs():
    g = torch.Generator().manual_seed(0)
    q = DiagonalGaussian(torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 0.5)
    priors = [StandardNormal(3), DiagonalGaussian(torch.randn(3, generator=g), torch.randn(3, generator=g) * 0.5)]
    for p in priors:
        closed = kl_divergence(q, p, q.rsample(g))
        assert closed.closed_form and closed.per_dim is not None
        z = q.rsample(g, sample_shape=(200_000,))  # (S, 5, 3)
        mc = monte_carlo_kl(q, p, z).double()  # (S, 5)
        se = mc.std(0) / math.sqrt(mc.shape[0])
        assert ((mc.mean(0) - closed.total.double()).abs() < 4 * se + 1e-3).all(), (mc.mean(0), closed.total)


def test_objective_sums_layers_and_free_bits_apply_per_layer():
    model = TwoLayerVAE(ModelConfig(latent_dim=4, hidden=(8,)), DataSpec((1, 2, 3)))
    x = torch.rand(7, 1, 2, 3)
    t = elbo(model, x, generator=torch.Generator().manual_seed(0))
    # z1's KL is Monte Carlo (its prior depends on its own draw): no per-dimension KL; z2's is closed form
    assert [ly.kl.shape for ly in t.layers] == [(7,), (7,)] and t.kl_per_dim.shape == (7, 2)
    assert [ly.closed_form for ly in t.layers] == [False, True]
    torch.testing.assert_close(t.elbo, t.log_px_z - t.layers[0].kl - t.layers[1].kl)
    # free bits of 100 nats per dimension: z2's dimensions are clamped, z1 as one group of 4 x 100 nats
    torch.testing.assert_close(t.loss(free_bits=100.0), -(t.log_px_z.mean() - 100.0 * 6))
    torch.testing.assert_close(t.loss(beta=0.0), -t.log_px_z.mean())
    # k draws: log w sums log p - log q over both layers, and L_1 is an unbiased ELBO estimate
    tk = elbo(model, x, generator=torch.Generator().manual_seed(1), k=3)
    assert tk.log_w.shape == (3, 7) and tk.kl.shape == (7,)


def test_evaluation_restores_the_model_mode(trained):
    model = trained[1]["test-two-layer"].model
    data = vaelab.load_data(trained[0].data).test.subset(slice(0, 5))
    model.train()
    vaelab.evaluate_model(model, data, k=3, progress=False)
    assert model.training
    model.eval()
    vaelab.evaluate_model(model, data, k=3, progress=False)
    assert not model.training


# ---------------------------------------------------------------- the pure training step
def test_train_step_takes_one_update_or_none():
    model = TwoLayerVAE(ModelConfig(latent_dim=4, hidden=(8,)), DataSpec((1, 2, 3)))
    opt = vaelab.training.make_optimizer(model, vaelab.RunConfig())
    batch = vaelab.BatchPipeline(vaelab.build_condition("none", model.spec))(torch.rand(5, 1, 2, 3))
    before = [p.detach().clone() for p in model.parameters()]
    r = vaelab.train_step(model, opt, vaelab.ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(0))
    assert r.applied and r.n == 5 and math.isfinite(r.loss) and r.grad_norm > 0
    assert math.isclose(r.loss, -(r.rec - r.kl) / 5, rel_tol=1e-5)  # -ELBO per datapoint at beta = 1
    after = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))

    def nan_objective(model, batch, *, generator, beta):
        loss, terms = vaelab.ELBOObjective()(model, batch, generator=generator, beta=beta)
        return loss * float("nan"), terms

    r = vaelab.train_step(model, opt, nan_objective, batch, 1.0, generator=torch.Generator().manual_seed(0))
    assert not r.applied and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


# ---------------------------------------------------------------- every model, wherever it lives
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["vae", *sorted(TEST_MODELS)])
def test_every_model_evaluates_trains_and_draws_on_every_device(name, device):
    """Every tensor and generator follows the model: evaluation, a training step, the pictures and
    completion run on the model's device (CUDA where present; CPU-only machines run the CPU case)."""
    from vaelab.conditioning import describe_data
    from vaelab.evaluation import evaluate_batches
    from vaelab.models import generator_for
    from vaelab.viz import interpolate_images, manifold_images, reconstruct_images, sample_images

    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    for condition in ("none", "random-patches"):
        spec = describe_data((1, 8, 8), None, condition)
        cfg = ModelConfig(model=name, latent_dim=4, hidden=(16,), condition=condition)
        model = vaelab.build_model(cfg, spec).to(device)
        pipe = vaelab.BatchPipeline(vaelab.build_condition(condition, spec))
        ev = evaluate_batches(model, images, None, pipe, k=20, batch_size=4)
        assert ev.n == 10 and torch.isfinite(ev.lk).all() and torch.isfinite(ev.elbo).all()
        g = generator_for(model, 0)
        batch = pipe(images[:4].to(device), None, g, train=True)
        opt = vaelab.training.make_optimizer(model, vaelab.RunConfig())
        assert vaelab.train_step(model, opt, vaelab.ELBOObjective(k=3), batch, 1.0, generator=g).applied
        if condition == "none":
            x = batch.x
            for imgs, n in ((sample_images(model, 3), 3), (reconstruct_images(model, x), 4),
                            (interpolate_images(model, x[0], x[1], 5), 5), (manifold_images(model, 3), 9)):
                assert imgs.shape == (n, 1, 8, 8) and imgs.device.type == device
        else:
            comp = vaelab.complete_images(model, images[:2].float() / 255, samples=2)
            assert comp.samples.shape == (2, 2, 1, 8, 8) and math.isfinite(comp.metrics()["pixel_std"])
