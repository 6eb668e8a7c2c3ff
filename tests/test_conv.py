"""Convolutional and residual encoders/decoders: shapes for every image size and channel count,
the condition, and colour data end to end (CLI on a tiny CIFAR archive; API on SVHN, folder, npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_formats import photos, write_cifar, write_svhn

from vaelab import (
    ConfigError,
    DataConfig,
    DataSpec,
    ModelConfig,
    RunConfig,
    TrainConfig,
    evaluate_run,
    load_run,
    train,
)
from vaelab.cli import main
from vaelab.distributions import LIKELIHOODS
from vaelab.models import build_model
from vaelab.nets import DECODERS, ENCODERS
from vaelab.objectives import elbo, iwae_bound

SHAPES = [((1, 28, 28), (8, 16)), ((3, 32, 32), (8, 16)), ((3, 64, 64), (8, 16, 16)), ((2, 7, 9), (4, 8)),
          ((4, 16, 12), (4,))]


@pytest.mark.parametrize("net", ["conv", "resnet"])
@pytest.mark.parametrize("shape,hidden", SHAPES)
def test_shapes_for_every_size_and_channel_count(net, shape, hidden):
    cfg = ModelConfig(encoder=net, decoder=net, hidden=hidden, latent_dim=3)
    enc, dec = ENCODERS.get(net)(cfg, shape, 0, 6), DECODERS.get(net)(cfg, 3, 0, (5, *shape[1:]))
    x = torch.rand(6, *shape)
    assert enc(x).shape == (6, 6)
    assert dec(torch.randn(6, 3)).shape == (6, 5, *shape[1:])
    assert dec(torch.randn(2, 6, 3)).shape == (2, 6, 5, *shape[1:])  # leading sample dims, as IWAE uses


@pytest.mark.parametrize("net", ["conv", "resnet"])
def test_condition_reaches_both_networks(net):
    cfg = ModelConfig(encoder=net, decoder=net, hidden=(8, 16), latent_dim=3)
    enc, dec = ENCODERS.get(net)(cfg, (3, 32, 32), 4, 6), DECODERS.get(net)(cfg, 3, 4, (6, 32, 32))
    x, z = torch.rand(2, 3, 32, 32), torch.randn(2, 3)
    c1, c2 = torch.eye(4)[[0, 1]], torch.eye(4)[[2, 3]]
    assert not torch.allclose(enc(x, c1), enc(x, c2))
    assert not torch.allclose(dec(z, c1), dec(z, c2))


def test_too_many_stages_is_a_config_error():
    with pytest.raises(ConfigError, match="too many for 8x8"):
        build_model(ModelConfig(encoder="conv", decoder="conv", hidden=(4, 4, 4, 4)), DataSpec((1, 8, 8)))
    with pytest.raises(ConfigError, match="model.hidden"):
        build_model(ModelConfig(encoder="conv", decoder="conv", hidden=()), DataSpec((1, 8, 8)))


@pytest.mark.parametrize("likelihood", ["discretized-logistic", "discretized-logistic-mixture", "bernoulli"])
def test_conv_vae_objectives_and_a_few_steps_of_learning(likelihood):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="conv", decoder="conv", hidden=(8, 16), latent_dim=4,
                      likelihood=likelihood, n_mixtures=3)
    model = build_model(cfg, DataSpec((3, 16, 16)))
    x = torch.randint(0, 256, (16, 3, 16, 16)).float() / 255
    x[:8] = x[:8].mean(1, keepdim=True).round()  # some structure to learn
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss = elbo(model, x, generator=g).loss()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lk = iwae_bound(model, x, 8, generator=g)
    assert lk.shape == (16,) and torch.isfinite(lk).all()
    k = LIKELIHOODS.get(likelihood).num_params(3, cfg)
    assert model.decoder(torch.randn(2, 4)).shape == (2, k, 16, 16)


def test_cli_cifar_end_to_end(tmp_path, capsys):
    """train -> evaluate (bits/dim) -> sample (colour PNG) on a tiny CIFAR-10 archive."""
    write_cifar(tmp_path / "data" / "cifar10", n=8)  # 40 train, 8 test
    run = tmp_path / "run"
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-download",
                 "--encoder", "conv", "--decoder", "conv", "--likelihood", "discretized-logistic",
                 "--hidden", "8,16", "--latent-dim", "4", "--val-size", "8", "--batch-size", "16",
                 "--epochs", "1", "--threads", "1", "--no-progress", "--run", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert load_run(run).spec.shape == (3, 32, 32) and cfg["model"]["encoder"] == "conv"
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "4", "--batch-size", "8", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "bits/dim" in table
    assert main(["evaluate", str(run), "-k", "4", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["exact"] and res["n"] == 8 and 0 < res["bits_per_dim"] < 20
    assert abs(res["bits_per_dim"] - res["nll"] / (3072 * np.log(2))) < 1e-9
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    img = Image.open(tmp_path / "s.png")
    assert img.mode == "RGB" and img.size == ((2 * 34 + 2) * 2,) * 2


def _tiny(root, kind: str) -> str:
    """A tiny colour data set of ``kind`` under ``root``; returns its data.name."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if kind == "svhn":
        write_svhn(root / "svhn", 24, 0)
        write_svhn(root / "svhn", 6, 1, "test_32x32.mat")
        return "svhn"
    if kind == "folder":
        china, flower = photos()
        for i in range(12):
            src = china if i % 2 else flower
            Image.fromarray(src[20 * i : 20 * i + 90, 30 * i : 30 * i + 120]).save(root / f"{i}.jpg")
        return f"folder:{root}"
    np.savez(root / "a.npz", x_train=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    return f"npz:{root / 'a.npz'}"


@pytest.mark.parametrize("kind,likelihood", [("svhn", "discretized-logistic-mixture"),
                                             ("folder", "discretized-logistic"), ("npz", "discretized-logistic")])
def test_api_trains_and_evaluates_on_colour_sources(tmp_path, kind, likelihood):
    name = _tiny(tmp_path / "d", kind)
    cfg = RunConfig(
        data=DataConfig(name=name, data_dir=str(tmp_path / "d"), download=False, val_size=4, image_size=16),
        model=ModelConfig(encoder="resnet", decoder="resnet", hidden=(8, 8), latent_dim=3, likelihood=likelihood,
                          n_mixtures=2),
        train=TrainConfig(epochs=1, batch_size=8, progress=False, threads=1),
    )
    res = train(cfg, tmp_path / "run")
    assert res.model.spec.shape[0] == 3 and np.isfinite(res.history[-1]["val_elbo"])
    ev = evaluate_run(tmp_path / "run", k=2, progress=False, write=False)
    assert ev.bits_per_dim is not None and np.isfinite(ev.bits_per_dim)
