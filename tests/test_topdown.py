"""The top-down residual VAE (NVAE / VDVAE style, ``model = "topdown"``): shapes of the latent contract
for one and k draws, each group's KL against torch.distributions and against its Monte Carlo estimate,
L_k against the exact log P(X) of a tiny model (Gauss-Hermite quadrature over its two latent groups),
per-group temperatures, bit-identical checkpoints and training, the shipped configs, and every command
on a briefly trained 8-bit model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab.config import DataSpec, ModelConfig, RunConfig, TrainConfig, load_config_file
from vaelab.distributions import StandardNormal
from vaelab.errors import ConfigError
from vaelab.models import TopDownVAE
from vaelab.objectives import elbo, iwae_bound
from vaelab.objectives.elbo import elbo_terms
from vaelab.runs import RunDir

CONFIGS = Path(__file__).parent.parent / "configs" / "topdown"


def _model(shape=(3, 12, 12), seed=0, **kw) -> TopDownVAE:
    base = dict(model="topdown", hidden=(6, 8, 8), groups_per_scale=(1, 1, 2), latent_dim=2, cells_per_group=1,
                likelihood="discretized-logistic-mixture", n_mixtures=2, activation="silu")
    torch.manual_seed(seed)
    return vaelab.build_model(ModelConfig(**{**base, **kw}), DataSpec(shape))


def _perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 7) -> None:
    """Weights away from the initialisation (whose zero heads put every posterior on its prior)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _images(n: int, shape=(3, 12, 12), seed=1) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float() / 255


# ---------------------------------------------------------------- the contract's shapes
def test_groups_resolutions_and_shapes_for_one_and_k_draws():
    model = _model()
    # 12x12 -> 6x6 -> 3x3: one group at 12x12, one at 6x6, two at 3x3 (the top), 2 channels each, bottom-up
    assert model.latent_dims == (2 * 144, 2 * 36, 2 * 9, 2 * 9)
    assert isinstance(model.prior(), StandardNormal) and model.prior().dim == 18
    x = _images(5)
    for k in (1, 3):
        out = model(x, generator=torch.Generator().manual_seed(0), k=k)
        lead = (5,) if k == 1 else (k, 5)
        assert out.k == k and [ly.name for ly in out.layers] == ["z1", "z2", "z3", "z4"]
        assert [ly.z.shape for ly in out.layers] == [(*lead, d) for d in model.latent_dims]
        for ly in out.layers:
            assert not ly.prior_depends_on_z and ly.q.mu.shape == ly.z.shape
        assert [ly.p.mu.shape for ly in out.layers[:-1]] == [(*lead, d) for d in model.latent_dims[:-1]]
        assert out.likelihood.log_prob(x.repeat(k, 1, 1, 1)).shape == (k * 5,)
        # the top group's posterior does not depend on the draw: its k rows are equal
        if k > 1:
            assert torch.equal(out.layers[-1].q.mu[0], out.layers[-1].q.mu[2])
    qs = model.encode(x)
    assert [q.mean.shape for q in qs] == [(5, d) for d in model.latent_dims]
    torch.testing.assert_close(model.top_posterior(x).mean, qs[-1].mean)
    assert model.decode(torch.zeros(4, 18)).mean.shape == (4, 3, 12, 12)
    assert model.decode_layers([torch.zeros(4, 18), torch.zeros(4, 18)]).mean.shape == (4, 3, 12, 12)
    assert model.sample(3, generator=torch.Generator().manual_seed(1)).shape == (3, 3, 12, 12)


def test_odd_sizes_one_scale_and_the_default_groups():
    # 7x5 -> 4x3 -> 2x2; groups_per_scale left empty: `layers` groups at the lowest resolution
    model = _model(shape=(1, 7, 5), hidden=(4, 4, 6), groups_per_scale=(), layers=2, likelihood="bernoulli")
    assert model.latent_dims == (8, 8)
    out = model(_images(2, (1, 7, 5)).round(), k=2)
    assert out.likelihood.mean.shape == (4, 1, 7, 5) and [ly.name for ly in out.layers] == ["z1", "z2"]
    one = _model(shape=(1, 4, 4), hidden=(4,), groups_per_scale=(1,), likelihood="bernoulli")
    assert one.latent_dims == (32,) and [ly.name for ly in one(_images(2, (1, 4, 4))).layers] == ["z"]
    # VDVAE's bottleneck cells: 1x1 -> 3x3 -> 3x3 -> 1x1 through a quarter of the channels
    thin = _model(hidden=(8, 8, 8), bottleneck=0.25)
    convs = [m for m in thin.groups[0].cells.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(8, 2, 1), (2, 2, 3), (2, 2, 3), (2, 8, 1)]
    assert thin(_images(2), k=2).likelihood.mean.shape == (4, 3, 12, 12)


def test_configuration_errors_are_one_clear_line():
    for kw, text in (({"hidden": (6, 8), "groups_per_scale": (1, 0)}, "last resolution"),
                     ({"upper_latent": (3,), "layers": 2, "groups_per_scale": ()}, "groups_per_scale"),
                     ({"hidden": (), "groups_per_scale": ()}, "model.hidden"),
                     ({"encoder": "conv", "decoder": "conv"}, "leave model.encoder")):
        with pytest.raises(ConfigError, match=text) as e:
            _model(**kw)
        assert "\n" not in str(e.value)
    for bad in ({"groups_per_scale": (1, 1)}, {"groups_per_scale": (1, -1, 1)}, {"cells_per_group": -1},
                {"groups_per_scale": (1, 1, 1), "layers": 2}):
        with pytest.raises(ConfigError):
            ModelConfig(model="topdown", hidden=(4, 4, 4), **bad)


# ---------------------------------------------------------------- KL per group
def test_each_group_kl_is_the_closed_form_and_matches_its_monte_carlo_estimate():
    model = _model(shape=(1, 8, 8), hidden=(4, 4, 4), groups_per_scale=(1, 1, 1)).double()
    _perturb(model, 0.2)
    x = _images(3, (1, 8, 8)).double()
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(0), k=1000)
        terms = elbo_terms(out, x)
    for ly, t in zip(out.layers, terms.layers, strict=True):
        assert t.closed_form
        # the closed form against torch.distributions, draw by draw
        q = torch.distributions.Normal(ly.q.mu, ly.q.std)
        p = torch.distributions.Normal(ly.p.mu, ly.p.std)
        ref = torch.distributions.kl_divergence(q, p).sum(-1)  # (k, B) (the top: against N(0, I))
        torch.testing.assert_close(t.kl, ref.mean(0))
        # ... and against log q(z) - log p(z) at the draws: the same expectation over z_>l and z_l
        mc = ly.q.log_prob(ly.z) - ly.p.log_prob(ly.z)  # (k, B)
        se = mc.std(0) / math.sqrt(mc.shape[0])
        assert ((mc.mean(0) - t.kl).abs() < 4 * se + 1e-6).all(), (ly.name, mc.mean(0), t.kl, se)
        assert (t.kl > 0.1).all()  # the perturbed posteriors are off their priors


# ---------------------------------------------------------------- L_k against the exact log P(X)
def _exact_log_px(model: TopDownVAE, x: torch.Tensor, nodes: int = 60) -> torch.Tensor:
    """log P(x) of a model with two 1-number groups: P(x) = E_{z2 ~ N(0,1)} E_{z1 ~ p(z1|z2)} P(x|z1, z2),
    both expectations by Gauss-Hermite quadrature (probabilists'), z1 = mu(z2) + sigma(z2) u. Float64."""
    u, w = np.polynomial.hermite_e.hermegauss(nodes)  # int f(u) e^{-u^2/2} du = sum w_i f(u_i)
    u, logw = torch.tensor(u), torch.tensor(np.log(w / math.sqrt(2 * math.pi)))
    z2 = u.repeat_interleave(nodes)[:, None]  # (n^2, 1): row i*n + j is (z2 = u_i, z1 node j)
    uu = u.repeat(nodes)[:, None]

    def choose(g, q, p):
        return z2 if g == 0 else p.mu + p.std * uu

    with torch.no_grad():
        h, _ = model._top_down(nodes * nodes, None, None, choose)
        px = model._likelihood(h)
        lw = logw.repeat_interleave(nodes) + logw.repeat(nodes)  # (n^2,)
        return torch.stack([torch.logsumexp(lw + px.log_prob(xi.expand(nodes * nodes, *xi.shape)), 0) for xi in x])


def test_lk_is_a_bound_on_the_exact_log_likelihood_that_tightens_with_k():
    # 2x2 binary images, both 1-number groups at 1x1: all 16 images, P(x) exact by quadrature
    model = _model(shape=(1, 2, 2), hidden=(4, 4), groups_per_scale=(0, 2), latent_dim=1,
                   likelihood="bernoulli", activation="tanh").double().eval()
    _perturb(model, 0.3)
    x = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=torch.float64).view(16, 1, 2, 2)
    log_px = _exact_log_px(model, x, nodes=120)
    torch.testing.assert_close(log_px, _exact_log_px(model, x, nodes=80), atol=1e-5, rtol=0)  # converged
    with torch.no_grad():
        e = torch.stack([elbo(model, x, generator=torch.Generator().manual_seed(s)).elbo for s in range(20)])
        lk = {k: torch.stack([iwae_bound(model, x, k, generator=torch.Generator().manual_seed(s))
                              for s in range(n)]) for k, n in ((1, 20), (10, 20), (100, 20), (2000, 2))}
    gap = {k: (log_px - v).mean().item() for k, v in lk.items()}  # mean over images and seeds
    se = {k: (v.std() / math.sqrt(v.numel())).item() for k, v in lk.items()}  # (images differ: generous)
    assert (log_px - e).mean().item() > 0.1  # a real gap to close
    assert gap[1] > gap[10] > gap[100] > gap[2000] > -3 * se[2000], (gap, se)
    assert gap[2000] < 0.05 * gap[1], gap
    # ELBO (closed-form KLs) = L_1 = E_q[log w] in expectation
    assert abs(e.mean().item() - lk[1].mean().item()) < 4 * se[1], (e.mean(), lk[1].mean(), se[1])


# ---------------------------------------------------------------- temperatures
def test_temperature_per_group_bottom_up():
    model = _model().eval()
    _perturb(model, 0.1)
    L_top = model.latent_dims[-1]

    def draw(t, mean=True):
        return model.sample(4, generator=torch.Generator().manual_seed(3), temperature=t, mean=mean)

    cold = draw(0.0)
    # every group at its prior's mean: the decoder at z_top = 0
    torch.testing.assert_close(cold, model.decode(torch.zeros(4, L_top)).mean)
    # only the top warm: z_top = T * eps with the generator's first draw, the others at their means
    eps = torch.randn((4, L_top), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw([0, 0, 0, 0.7]), model.decode(0.7 * eps).mean)
    # a lower group's temperature changes the picture, and one number means it for every group
    assert not torch.allclose(draw([0.8, 0, 0, 0]), cold) and not torch.allclose(draw([0, 0.8, 0, 0]), cold)
    assert torch.equal(draw(0.6), draw([0.6] * 4)) and torch.equal(draw(1.0), draw([1, 1, 1, 1]))
    for bad in ([1.0, 1.0], [1, 1, 1, -1], [1, 1, 1, math.nan]):
        with pytest.raises(ConfigError):
            draw(bad)


# ---------------------------------------------------------------- a briefly trained 8-bit model
def _run_cfg(root: Path, condition: str = "none", **train) -> RunConfig:
    model = ModelConfig(model="topdown", hidden=(8, 8, 12), groups_per_scale=(0, 1, 1), latent_dim=2,
                        cells_per_group=1, likelihood="discretized-logistic-mixture", n_mixtures=2,
                        activation="silu", condition=condition)
    return RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(root), val_size=40, download=False, limit_train=104),
        model=model,
        train=TrainConfig(epochs=1, batch_size=32, progress=False, threads=1, device="cpu", lr=2e-3, **train),
    )


@pytest.fixture(scope="module")
def td_runs(tmp_path_factory):
    """A top-down model trained by the IWAE bound (k = 2) on tiny 8-bit 28x28 digits, trained twice from
    the same config, and a conditional one (centre column observed)."""
    from conftest import write_mnist

    root = write_mnist(tmp_path_factory.mktemp("td") / "data" / "mnist").parent
    out = tmp_path_factory.mktemp("td-runs")
    runs = {"root": root, "cfg": _run_cfg(root, iwae_k=2)}
    runs["a"] = vaelab.train(runs["cfg"], out / "a")
    runs["b"] = vaelab.train(runs["cfg"], out / "b")
    runs["cvae"] = vaelab.train(_run_cfg(root, "centre-column"), out / "cvae").run_dir
    return runs


def test_training_twice_gives_the_same_bits_and_checkpoints_round_trip(td_runs):
    a, b = td_runs["a"], td_runs["b"]
    ta, tb = load_file(RunDir.of(a.run_dir).latest), load_file(RunDir.of(b.run_dir).latest)
    assert sorted(ta) == sorted(tb) and not [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    run = vaelab.load_run(a.run_dir, "latest", device="cpu")
    assert run.config.model == td_runs["cfg"].model and isinstance(run.model, TopDownVAE)
    mine, loaded = a.model.state_dict(), run.model.state_dict()
    assert sorted(mine) == sorted(loaded) and all(torch.equal(mine[k], loaded[k]) for k in mine)
    x = run.pipeline(run.data("test", limit=6).images, None, torch.Generator().manual_seed(0)).x
    a.model.eval()
    from vaelab.accel import Accelerator

    Accelerator().prepare(a.model)  # every product ATen's again, as a loaded run's model computes
    with torch.no_grad():
        la = iwae_bound(a.model, x, 5, generator=torch.Generator().manual_seed(1))
        lb = iwae_bound(run.model, x, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(la, lb)


def test_training_improves_the_bound(td_runs):
    assert math.isfinite(td_runs["a"].history[-1]["val_lk"])  # an IWAE run validates by -L_k too
    run = vaelab.load_run(td_runs["a"].run_dir, device="cpu")
    fresh = vaelab.build_model(run.config.model, run.spec)
    x = run.pipeline(run.data("test", limit=20).images, None, torch.Generator().manual_seed(0)).x
    with torch.no_grad():
        before = -elbo(fresh, x, generator=torch.Generator().manual_seed(0)).elbo.mean()
        after = -elbo(run.model, x, generator=torch.Generator().manual_seed(0)).elbo.mean()
    assert after < before, (before, after)


def test_every_command_works_on_a_topdown_model(td_runs, tmp_path, capsys):
    from vaelab.cli import main

    run = td_runs["a"].run_dir
    dims = vaelab.load_run(run, device="cpu").model.latent_dims
    assert dims == (2 * 14 * 14, 2 * 7 * 7)
    ev = vaelab.evaluate_run(run, k=8, progress=False, write=False, device="cpu")
    assert [ly["name"] for ly in ev.layers] == ["z1", "z2"] and all(ly["closed_form"] for ly in ev.layers)
    assert all(0 <= ly["active_units"] <= ly["dim"] for ly in ev.layers) and len(ev.kl_per_dim) == sum(dims)
    assert ev.exact and ev.bits_per_dim is not None and ev.nll <= ev.neg_elbo + 1.0
    assert "KL layer z2" in ev.table()
    for f, kw in ((vaelab.sample_run, {"n": 4}), (vaelab.reconstruct_run, {"n": 4}),
                  (vaelab.interpolate_run, {"steps": 3}), (vaelab.manifold_run, {"n": 3, "dims": (0, 5)}),
                  (vaelab.traverse_run, {"top": 2, "steps": 3}), (vaelab.traverse_run, {"top": 2, "layer": "z1"})):
        assert f(run, tmp_path / f"{f.__name__}.png", device="cpu", **kw).exists()
    assert np.load(vaelab.encode_run(run, tmp_path / "z.npy", device="cpu")).shape == (60, dims[-1])
    # completion: an unconditional model says what it needs; the conditional one completes
    with pytest.raises(ConfigError, match="completion needs a model conditioned"):
        vaelab.complete_run(run, tmp_path / "c.png", n=2, samples=2, device="cpu")
    out = vaelab.complete_run(td_runs["cvae"], tmp_path / "c.png", n=2, samples=2, device="cpu")
    assert out.path.exists() and math.isfinite(out.metrics["sample_l2"])
    assert vaelab.app.report.write_report(run, tmp_path / "r.html", k=4, limit=20).exists()
    # the command line, on the same run
    for argv in (["evaluate", str(run), "-k", "3", "--limit", "10", "--device", "cpu"],
                 ["sample", str(run), "-n", "4", "--temperature", "0.7", "--device", "cpu"],
                 ["traverse", str(run), "--dims", "0,1", "--steps", "3", "--device", "cpu"]):
        assert main(argv) == 0, argv
    capsys.readouterr()


def test_the_command_line_trains_it_by_the_iwae_bound(td_runs, tmp_path, capsys):
    from vaelab.cli import main

    argv = ["train", "--model", "topdown", "--data", "mnist", "--data-dir", str(td_runs["root"]), "--limit-train", "48",
            "--val-size", "16", "--hidden", "4,4,8", "--latent-dim", "2", "--set", "model.groups_per_scale=0,1,1",
            "--set", "model.cells_per_group=1", "--likelihood", "discretized-logistic", "--iwae-k", "2",
            "--epochs", "1", "--batch-size", "16", "--threads", "1", "--device", "cpu", "--run", str(tmp_path / "cli")]
    assert main(argv) == 0
    assert "-L_2" in capsys.readouterr().out  # an IWAE run validates by -L_k
    run = vaelab.load_run(tmp_path / "cli", device="cpu")
    assert run.config.train.iwae_k == 2 and run.model.latent_dims == (2 * 14 * 14, 2 * 7 * 7)


def test_the_explorer_api_works_through_encode_and_decode(td_runs):
    from starlette.testclient import TestClient

    from vaelab.app.explore import Explorer, make_app

    client = TestClient(make_app(Explorer.open(td_runs["a"].run_dir)), raise_server_exceptions=False)
    info = client.get("/api/info").json()
    top = info["top"]
    assert top == 98 and info["latent_dims"] == [392, 98]
    r = client.post("/api/decode", json={"z": [0.1] * top})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert client.post("/api/decode", json={"z": [0.1] * 3}).status_code == 400
    enc = client.post("/api/encode", json={"test": 0, "samples": 2}).json()
    assert len(enc["mean"]) == top
    for path, body in (("/api/samples", {"n": 4}), ("/api/prior", {"seed": 1}),
                       ("/api/interpolate", {"a": 0, "b": 1, "steps": 3})):
        assert client.post(path, json=body).status_code == 200, path


def test_export_from_pretrained_and_onnx(td_runs, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from vaelab.export.onnx import reference_outputs

    res = vaelab.export_run(td_runs["a"].run_dir, tmp_path / "exp", onnx=True)
    assert not res.messages
    model = vaelab.from_pretrained(tmp_path / "exp")
    run = vaelab.load_run(td_runs["a"].run_dir, device="cpu")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = iwae_bound(model, x, 4, generator=torch.Generator().manual_seed(1))
        b = iwae_bound(run.model, x, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # the ONNX graphs: top group's mean/logvar first, then mean_0/logvar_0 (the group below), any batch size
    g = torch.Generator().manual_seed(2)
    for role, inputs in (("encoder", {"x": x}), ("decoder", {"z": torch.randn(3, model.latent_dims[-1], generator=g)})):
        sess = ort.InferenceSession(str(tmp_path / "exp" / f"{role}.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        if role == "encoder":
            assert names == ["mean", "logvar", "mean_0", "logvar_0"]
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        for o, w in zip(got, reference_outputs(model, role, inputs), strict=True):
            assert o.shape == tuple(w.shape) and (not o.size or float(np.abs(o - w.numpy()).max()) < 1e-4)


# ---------------------------------------------------------------- the shipped configs
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_topdown_configs_build(path):
    cfg = RunConfig.from_dict(load_config_file(path))
    assert cfg.model.model == ("vae" if path.stem.endswith("-vae") else "topdown")  # and a baseline
    shape = {"cifar10": (3, 32, 32)}.get(cfg.data.name, (1, 28, 28))
    with torch.device("meta"):  # the shapes and the parameter count, without initialising 30M weights
        model = vaelab.build_model(cfg.model, DataSpec(shape))
    assert len(model.latent_dims) == (sum(cfg.model.groups_per_scale) if cfg.model.model == "topdown" else 1)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_options_reach_the_command_line():
    from vaelab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--model", "topdown", "--hidden", "8,16", "--latent-dim", "4",
                                      "--set", "model.groups_per_scale=1,2", "--set", "model.cells_per_group=1"])
    cfg = config_from_args(args)
    assert (cfg.model.model, cfg.model.groups_per_scale, cfg.model.cells_per_group) == ("topdown", (1, 2), 1)
