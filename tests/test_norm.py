"""Batch normalisation of the MLPs' hidden layers (``model.norm = batch``; Sønderby et al. 2016 found it
necessary for the Ladder VAE): where it sits, that evaluation never lets a datapoint's score depend on
its batch, that a skipped step leaves the running statistics as they were, that resumes are bit for
bit, and the one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab.conditioning import Batch
from vaelab.config import DataSpec, ModelConfig, TrainConfig
from vaelab.errors import ConfigError
from vaelab.nets.base import NORMS, FeatureBatchNorm
from vaelab.objectives import ELBOObjective
from vaelab.runs import RunDir
from vaelab.training.step import read_steps, running_statistics, take_step


def _model(name: str = "ladder", norm: str = "batch", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(model=name, latent_dim=4, hidden=(16,), norm=norm, **kw)
    return vaelab.build_model(cfg, DataSpec((1, 6, 6)))


def _norms(model: torch.nn.Module) -> list[FeatureBatchNorm]:
    return [m for m in model.modules() if isinstance(m, FeatureBatchNorm)]


def test_every_hidden_layer_is_normalised_before_its_activation_and_none_adds_no_module():
    assert NORMS.names() == ["batch", "none"]
    vae = _model("vae", layers=2)
    # encoder 36-16-8, decoder 4-16-36, up 4-4-4-4 and down 2-4-4-8 (two hidden layers each): 6 hidden layers
    assert len(_norms(vae)) == 6
    for seq in (vae.encoder.net, vae.decoder.net):
        kinds = [type(m).__name__ for m in seq]
        assert kinds == ["Linear", "FeatureBatchNorm", "ReLU", "Linear"]
    ladder = _model("ladder", layers=3)
    # f_1's output (d_1) and each block's are normalised too, then every hidden layer of the top-down MLPs
    assert [type(m).__name__ for m in ladder.encoder_act] == ["FeatureBatchNorm", "ReLU"]
    assert all(type(b[1][0]).__name__ == "FeatureBatchNorm" for b in ladder.blocks)
    # without a normalisation the parameter names are those models always had (old checkpoints load)
    plain = _model("ladder", norm="none", layers=3)
    assert not _norms(plain) and not running_statistics(plain)
    names = set(plain.state_dict())
    assert {"encoder.net.0.weight", "blocks.0.0.0.weight", "down.0.0.weight", "down.0.2.weight"} <= names


def test_the_draws_of_an_importance_weighted_pass_are_one_population():
    bn = FeatureBatchNorm(3)
    x = torch.randn(5, 7, 3)  # (k, B, L)
    ref = torch.nn.BatchNorm1d(3)
    torch.testing.assert_close(bn(x), ref(x.reshape(35, 3)).reshape(5, 7, 3), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)


def test_a_training_batch_of_one_is_normalised_by_the_running_statistics_and_leaves_them():
    bn = FeatureBatchNorm(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    before = copy.deepcopy(bn.state_dict())
    x = torch.tensor([[3.0, -1.0, 0.5]])
    out = bn(x)  # training mode, one row: no spread to normalise by (BatchNorm1d raises here)
    want = (x - before["running_mean"]) / torch.sqrt(before["running_var"] + bn.eps)
    torch.testing.assert_close(out, want)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


@pytest.mark.parametrize("name", ["vae", "ladder"])
def test_a_bound_never_depends_on_the_other_images_of_its_batch(name):
    model = _model(name, layers=2)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # training moves the running statistics away from (0, 1)
        batch = Batch((torch.rand(16, 1, 6, 6, generator=g) > 0.5).float(), None, None)
        take_step(model, opt, ELBOObjective(), batch, 1.0, generator=g)
    assert any(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in _norms(model))
    x = (torch.rand(6, 1, 6, 6, generator=g) > 0.5).float()
    z = torch.randn(6, 2, generator=g)

    def each_alone_and_in_the_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            qs_all, px_all = model.encode(x), model.decode(z).logits
            out = [(px_all, torch.cat([model.decode(z[i : i + 1]).logits for i in range(6)]))]
            for j, q in enumerate(qs_all):
                alone = [model.encode(x[i : i + 1])[j] for i in range(6)]
                out += [(q.mu, torch.cat([a.mu for a in alone])), (q.logvar, torch.cat([a.logvar for a in alone]))]
        return out

    # training mode normalises by the batch: the same image scores differently in another batch
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in each_alone_and_in_the_batch()[1:])
    model.eval()  # every bound, sample and export: the running statistics
    for a, b in each_alone_and_in_the_batch():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["host-decided", "device-decided"])
def test_a_skipped_step_leaves_the_running_statistics_as_they_were(masked):
    model = _model("ladder", layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=masked)  # fused: takes found_inf (masked skip)
    stats = running_statistics(model)
    assert len(stats) == 3 * len(_norms(model))  # running mean, variance and the batch count of each
    g = torch.Generator().manual_seed(0)
    good = Batch((torch.rand(8, 1, 6, 6, generator=g) > 0.5).float(), None, None)
    take_step(model, opt, ELBOObjective(), good, 1.0, generator=g, masked=masked, statistics=stats)
    before = [s.clone() for s in stats]
    bad = Batch(torch.full((8, 1, 6, 6), float("nan")), None, None)
    (r,) = read_steps([take_step(model, opt, ELBOObjective(), bad, 1.0, generator=g, masked=masked,
                                 statistics=stats)])
    assert not r.applied
    assert all(torch.equal(a, b) for a, b in zip(stats, before, strict=True))
    # an applied step does move them
    (r,) = read_steps([take_step(model, opt, ELBOObjective(), good, 1.0, generator=g, masked=masked,
                                 statistics=stats)])
    assert r.applied and not all(torch.equal(a, b) for a, b in zip(stats, before, strict=True))


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    from conftest import write_mnist

    return write_mnist(tmp_path_factory.mktemp("norm") / "data" / "mnist").parent


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_resumed_equals_fresh_bit_for_bit_with_batch_normalisation(mnist_root, tmp_path, compile_):
    # 129 training images in batches of 32: the last batch of every epoch is a single image
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(mnist_root), val_size=40, download=False, limit_train=129),
        model=ModelConfig(model="ladder", layers=3, latent_dim=4, hidden=(24,), norm="batch"),
        train=TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu", lr=3e-3,
                          warmup_epochs=1.0, compile=compile_),
    )
    whole = vaelab.train(cfg, tmp_path / "whole")
    assert whole.state.step == 10
    vaelab.train(cfg, tmp_path / "cut", max_steps=3)
    vaelab.train(cfg, tmp_path / "cut")
    ta, tb = (load_file(RunDir.of(tmp_path / r).latest) for r in ("whole", "cut"))
    assert any("running_mean" in k for k in ta)  # saved with the weights
    assert sorted(ta) == sorted(tb) and not [k for k in ta if not torch.equal(ta[k], tb[k])]
    ev = vaelab.evaluate_run(tmp_path / "whole", k=10, progress=False, write=False, device="cpu")
    assert ev.nll <= ev.neg_elbo + 1.0 and [ly["name"] for ly in ev.layers] == ["z1", "z2", "z3"]


def test_a_step_the_loop_skips_leaves_the_model_as_it_was(tmp_path):
    from test_reliability import Poisoned, tiny_cfg, write_tiny_mnist

    data = write_tiny_mnist(tmp_path / "data")
    cfg = tiny_cfg(data, 1, 0, "--model", "ladder", "--layers", "2", "--norm", "batch")
    before = vaelab.train(cfg, tmp_path / "three", max_steps=3).model.state_dict()
    after = vaelab.train(cfg, tmp_path / "skipped", max_steps=4, objective=Poisoned({3})).model.state_dict()
    assert any("running_var" in k for k in before)
    # step 3 (NaN loss, after a finite forward pass that moved the statistics) was skipped: the weights and
    # the running statistics are those after step 2
    assert sorted(before) == sorted(after) and not [k for k in before if not torch.equal(before[k], after[k])]


def test_the_refusals_are_one_line(capsys):
    with pytest.raises(ConfigError, match="VampPrior"):
        ModelConfig(norm="batch", prior="vamp")
    with pytest.raises(ConfigError, match="applies to MLP networks"):
        ModelConfig(model="topdown", norm="batch")
    with pytest.raises(ConfigError, match="applies to MLP networks"):
        ModelConfig(norm="batch", encoder="conv", decoder="conv", hidden=(8, 16))
    with pytest.raises(ConfigError, match="train.ema cannot be used with model.norm=batch"):
        vaelab.RunConfig(model=ModelConfig(norm="batch"), train=TrainConfig(ema=0.999))
    from vaelab.cli import main

    for args, says in ((["--norm", "layer"], "unknown normalisation 'layer'"),
                       (["--norm", "batch", "--set", "train.ema=0.99"], "train.ema cannot be used"),
                       (["--norm", "batch", "--encoder", "conv"], "applies to MLP networks")):
        assert main(["train", *args, "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_exporting_onnx_leaves_the_callers_model_as_it_was(tmp_path):
    pytest.importorskip("onnx")
    from vaelab.export.onnx import export_onnx

    model = _model("ladder", layers=2).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path)
    assert model.training and all(m.training for m in model.modules())  # still training: batch statistics
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
