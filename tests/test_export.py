"""``vaelab export``: the weights-only folder, ``from_pretrained``, every command on an exported
folder, the refusals and one-line errors, and the ONNX encoder/decoder against PyTorch for every
registered model and likelihood (run by onnxruntime with another batch size than the export's)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_contract  # noqa: F401  registers the test models (two layers, learned and mixture priors)
import torch
from safetensors.torch import load_file

import vaelab
from vaelab.cli import main
from vaelab.config import DataSpec, ModelConfig
from vaelab.errors import CheckpointError, ConfigError
from vaelab.export.onnx import EXPORT_BATCH, export_onnx, reference_outputs
from vaelab.runs.pretrained import EXPORT_FORMAT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("export")
    data = write_mnist(root / "data" / "mnist").parent
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False),
        model=ModelConfig(latent_dim=3, hidden=(32,)),
        train=vaelab.TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu"),
    )
    vaelab.train(cfg, root / "run")
    vaelab.evaluate_run(root / "run", k=5, progress=False)
    return root / "run"


def test_export_round_trip_gives_identical_outputs(trained, tmp_path):
    res = vaelab.export_run(trained, tmp_path / "exp")
    assert res.files == ["README.md", "config.json", "model.safetensors", "samples.png"]
    info = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert info["format"] == EXPORT_FORMAT and info["dtype"] == "fp32"
    assert info["config"] == vaelab.load_run(trained).config.to_dict() and info["data"]["shape"] == [1, 28, 28]
    assert info["trained"]["epoch"] == 2 and info["trained"]["step"] == 14
    # weights only: no optimizer state, no RNG, names as in model.state_dict()
    assert sorted(load_file(tmp_path / "exp" / "model.safetensors")) == sorted(vaelab.load_run(trained).model.state_dict())
    model = vaelab.from_pretrained(tmp_path / "exp")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    x = vaelab.load_run(trained).data("test", limit=7).images.float() / 255
    ref = vaelab.load_run(trained).model
    q, qr = model.encode(x)[-1], ref.encode(x)[-1]
    assert torch.equal(q.mean, qr.mean) and torch.equal(q.logvar, qr.logvar)
    assert torch.equal(model.decode(q.mean).mean, ref.decode(qr.mean).mean)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(5, generator=g()), ref.sample(5, generator=g()))
    assert torch.equal(vaelab.iwae_bound(model, x, k=4, generator=g()), vaelab.iwae_bound(ref, x, k=4, generator=g()))
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "| test | 60 | 5 |" in card and "![samples from the prior](samples.png)" in card
    assert "after 2 of 2 epochs, 14 optimizer steps" in card


def test_bf16_export_is_stored_in_bf16_and_loads_as_float32(trained, tmp_path):
    vaelab.export_run(trained, tmp_path / "exp", dtype="bf16")
    stored = load_file(tmp_path / "exp" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    ref = vaelab.load_run(trained).model.state_dict()
    model = vaelab.from_pretrained(tmp_path / "exp")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k].to(torch.bfloat16).float())
    assert (tmp_path / "exp" / "model.safetensors").stat().st_size < 0.6 * sum(
        v.numel() * 4 for v in ref.values())
    half = vaelab.from_pretrained(tmp_path / "exp", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_every_command_takes_an_exported_folder(trained, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["export", str(trained), str(exp)]) == 0
    assert "exported to" in capsys.readouterr().out
    assert main(["evaluate", str(exp), "-k", "5", "--no-progress", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    ref = vaelab.evaluate_run(trained, k=5, progress=False, write=False)
    assert ev["nll"] == ref.nll and ev["neg_elbo"] == ref.neg_elbo  # same weights, same seed: same numbers
    assert (exp / "eval" / "test-k5.json").exists()
    for cmd in (["sample", "-n", "4"], ["reconstruct", "-n", "4"], ["interpolate", "--steps", "3"],
                ["manifold", "-n", "3"], ["encode"]):
        assert main([cmd[0], str(exp), *cmd[1:]]) == 0, cmd
    assert np.load(exp / "encoded-test.npy").shape == (60, 3)
    run = vaelab.load_run(exp)
    assert run.state["epoch"] == 2 and run.checkpoint.name == "model.safetensors"
    assert main(["sample", str(exp), "--checkpoint", "latest", "-n", "2", "--out", str(tmp_path / "s.png")]) == 0
    # a re-export over a previous export: its files replaced, the user's eval/ kept
    assert main(["export", str(trained), str(exp), "--dtype", "fp16"]) == 0
    assert json.loads((exp / "config.json").read_text())["dtype"] == "fp16" and (exp / "eval" / "test-k5.json").exists()
    # ... and an export of an export
    assert main(["export", str(exp), str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["trained"]["epoch"] == 2


def test_export_never_clobbers_a_folder_of_other_things(trained, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    (user / "README.md").write_text("my readme")
    assert main(["export", str(trained), str(user)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and holds no previous export" in err and "--force" in err
    assert sorted(p.name for p in user.iterdir()) == ["README.md", "notes.txt"]
    assert (user / "README.md").read_text() == "my readme"
    assert main(["export", str(trained), str(user), "--force"]) == 0
    assert (user / "notes.txt").read_text() == "precious" and (user / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["export", str(trained), str(trained), "--force"]) == 2  # the run itself
    assert "is the run itself" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(trained), str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.parametrize("damage, message", [
    ("no-config", "config.json: missing"),
    ("bad-json", "config.json: not valid JSON"),
    ("bad-format", "not a vaelab export (format"),
    ("shape", "config.json implies"),
    ("dtype", "config.json says bf16"),
    ("pickle", "refusing to load a pickle"),
    ("truncated", "truncated or corrupted"),
])
def test_a_damaged_folder_is_one_line_naming_the_problem(trained, tmp_path, capsys, damage, message):
    exp = tmp_path / "exp"
    vaelab.export_run(trained, exp)
    cfg, weights = exp / "config.json", exp / "model.safetensors"
    info = json.loads(cfg.read_text())
    if damage == "no-config":
        cfg.unlink()
    elif damage == "bad-json":
        cfg.write_text("{not json")
    elif damage == "bad-format":
        cfg.write_text(json.dumps({**info, "format": "something-else"}))
    elif damage == "shape":
        info["config"]["model"]["latent_dim"] = 5
        cfg.write_text(json.dumps(info))
    elif damage == "dtype":
        cfg.write_text(json.dumps({**info, "dtype": "bf16"}))
    elif damage == "pickle":
        weights.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        vaelab.from_pretrained(exp)
    assert main(["sample", str(exp), "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_export_options_are_checked(trained, tmp_path):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        vaelab.export_run(trained, tmp_path / "e", dtype="int8")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        vaelab.from_pretrained(vaelab.export_run(trained, tmp_path / "e").path, dtype="float64")


def test_onnx_without_the_onnx_extra_is_one_line_before_anything_is_written(trained, tmp_path, capsys, monkeypatch):
    """Asked-for ONNX files that cannot be written are an error, not a warning after a success line."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    out = tmp_path / "exp"
    assert main(["export", str(trained), str(out), "--onnx"]) == 2
    res = capsys.readouterr()
    assert res.out == "" and res.err.count("\n") == 1, res
    assert "(--onnx) needs the onnx package" in res.err and "pip install 'vaelab[onnx]'" in res.err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary folder
    with pytest.raises(ConfigError, match=r"pip install 'vaelab\[onnx\]'"):
        vaelab.export_run(trained, out, onnx=True)
    assert not out.exists()


# ---------------------------------------------------------------- ONNX
ort = pytest.importorskip("onnxruntime")


def _onnx_cases():
    cases = []
    for model in vaelab.MODELS.names():
        for lik in vaelab.LIKELIHOODS.names():
            cases.append((model, lik, "mlp"))
    cases += [("vae", "discretized-logistic-mixture", "conv"), ("vae", "bernoulli", "resnet")]
    # the model family of ModelConfig: deeper models and learned priors (the encoder takes x alone)
    cases += [("vae", "bernoulli", "mlp", {"layers": 2}), ("vae", "gaussian", "mlp", {"layers": 3, "prior": "mog"}),
              ("vae", "discretized-logistic", "conv", {"prior": "vamp", "prior_components": 3, "layers": 2}),
              ("ladder", "bernoulli", "mlp", {"layers": 3}), ("ladder", "gaussian", "mlp", {"layers": 3, "ladder_skip": True}),
              # batch normalisation (model.norm), exported with its running statistics (made non-trivial)
              ("ladder", "bernoulli", "mlp", {"layers": 3, "norm": "batch"}),
              ("vae", "bernoulli", "mlp", {"layers": 2, "norm": "batch"})]
    return [c if len(c) == 4 else (*c, {}) for c in cases]


def _build(name: str, likelihood: str, net: str, condition: str = "none", **extra) -> torch.nn.Module:
    from vaelab.conditioning import describe_data

    shape = (3, 8, 8)
    cfg = ModelConfig(model=name, latent_dim=4, hidden=(8,), likelihood=likelihood, encoder=net, decoder=net,
                      n_mixtures=2, condition=condition, sigma=0.5, **extra)
    try:
        model = vaelab.build_model(cfg, describe_data(shape, 4, condition)).eval()
    except ConfigError as e:
        if condition != "none" or "condition" not in str(e):
            raise
        return _build(name, likelihood, net, "left-half", **extra)  # a model that needs a condition (cvae, regressor)
    g = torch.Generator().manual_seed(2)
    for m in model.modules():  # running statistics away from (0, 1), so that exporting them is tested
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _compare(model: torch.nn.Module, folder: Path, batch: int = 5) -> dict[str, float]:
    """Run encoder.onnx / decoder.onnx with onnxruntime on a batch of ``batch`` (not the export's) and
    compare every output with PyTorch; the max abs differences, by graph."""
    g = torch.Generator().manual_seed(1)
    spec = model.spec
    x = torch.rand((batch, *spec.shape), generator=g)
    c = {"c": torch.rand((batch, spec.cond_dim), generator=g)} if spec.cond_dim else {}
    diffs = {}
    for role, inputs in (("encoder", {"x": x, **c}),
                         ("decoder", {"z": torch.randn((batch, model.latent_dims[-1]), generator=g), **c}
                          if model.latent_dims else c)):
        path = folder / f"{role}.onnx"
        if not path.exists():
            continue
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        assert sorted(names) == sorted(inputs), (role, names)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        want = reference_outputs(model, role, inputs)
        assert len(got) == len(want)
        for o, w in zip(got, want, strict=True):
            assert o.shape == tuple(w.shape) and o.shape[0] == batch
        diffs[role] = max(float(np.abs(o - w.numpy()).max()) for o, w in zip(got, want, strict=True))
    return diffs


@pytest.mark.parametrize("name, likelihood, net, extra", _onnx_cases())
def test_onnx_matches_pytorch_for_every_model_and_likelihood(name, likelihood, net, extra, tmp_path):
    assert EXPORT_BATCH != 5
    model = _build(name, likelihood, net, **extra)
    messages: list[str] = []
    graphs = export_onnx(model, tmp_path, messages=messages)
    if model.latent_dims:
        assert set(graphs) == {"encoder", "decoder"} and not messages
        assert graphs["encoder"].outputs[:2] == ("mean", "logvar")
        assert len(graphs["encoder"].outputs) == 2 * len(model.latent_dims)
    else:  # the regressor: no latent variable, no encoder; its decoder takes c alone
        assert set(graphs) == {"decoder"} and graphs["decoder"].inputs == ("c",)
        assert len(messages) == 1 and "no encoder.onnx: the model has no latent variables" in messages[0]
    diffs = _compare(model, tmp_path)
    print(f"{name}/{likelihood}/{net}/{extra}: max abs difference ONNX vs PyTorch {diffs}")
    assert set(diffs) == set(graphs) and all(d < 1e-4 for d in diffs.values()), diffs


def test_onnx_graphs_are_plain_when_the_linear_layers_run_on_onednn(tmp_path):
    """With every Linear on oneDNN (vaelab.accel's plan "onednn"), the exported graphs still hold
    plain ONNX operators (no custom op), and agree with PyTorch on a batch large enough for oneDNN."""
    import onnx

    from vaelab.accel import Accelerator

    model = vaelab.build_model(ModelConfig(latent_dim=3, hidden=(256,)), vaelab.DataSpec((1, 28, 28))).eval()
    Accelerator.for_model("onednn", model, rows=300).prepare(model)
    assert any(getattr(m, "bits", 0) for m in model.modules()) or not kernels_available()
    export_onnx(model, tmp_path)
    for role in ("encoder", "decoder"):
        domains = {n.domain for n in onnx.load(str(tmp_path / f"{role}.onnx")).graph.node}
        assert domains <= {"", "ai.onnx"}, domains
    diffs = _compare(model, tmp_path, batch=300)
    assert all(d < 1e-4 for d in diffs.values()), diffs


def kernels_available() -> bool:
    from vaelab.accel import compiler

    return compiler.has("onednn_linear")


def test_onnx_of_a_label_conditioned_model_takes_the_condition(tmp_path):
    from vaelab.conditioning import describe_data

    cfg = ModelConfig(model="cvae", latent_dim=3, hidden=(8,), condition="label")
    model = vaelab.build_model(cfg, describe_data((1, 6, 6), 5, "label")).eval()
    graphs = export_onnx(model, tmp_path)
    assert graphs["encoder"].inputs == ("x", "c") and graphs["decoder"].inputs == ("z", "c")
    assert max(_compare(model, tmp_path, batch=7).values()) < 1e-4


def test_the_dynamo_exporter_works_too(tmp_path):
    model = _build("test-two-layer", "gaussian-learned", "mlp")
    export_onnx(model, tmp_path, exporter="dynamo")
    diffs = _compare(model, tmp_path, batch=3)
    print(f"dynamo exporter: max abs difference ONNX vs PyTorch {diffs}")
    assert set(diffs) == {"encoder", "decoder"} and max(diffs.values()) < 1e-4


def test_an_unknown_distribution_is_named(tmp_path):
    from vaelab.distributions.base import Distribution
    from vaelab.export import OnnxUnsupported

    class Odd(Distribution):
        event_dims = 3

        def __init__(self, h):
            self.h = h

        def log_prob_elements(self, x):
            return x

        def sample(self, generator=None):
            return self.h

        @property
        def mean(self):
            return self.h

    model = _build("vae", "bernoulli", "mlp")
    model.likelihood.forward = lambda h: Odd(h)
    messages: list[str] = []
    graphs = export_onnx(model, tmp_path, messages=messages)
    assert set(graphs) == {"encoder"} and len(messages) == 1
    assert "no decoder.onnx" in messages[0] and "is a Odd, which has no ONNX form (known: " in messages[0]
    with pytest.raises(OnnxUnsupported, match="Odd"):
        export_onnx(model, tmp_path / "b")


def test_export_with_onnx_lists_the_graphs_in_config_and_card(trained, tmp_path, capsys):
    assert main(["export", str(trained), str(tmp_path / "exp"), "--onnx"]) == 0
    info = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert info["onnx"]["encoder"] == {"file": "encoder.onnx", "inputs": ["x"], "outputs": ["mean", "logvar"]}
    assert info["onnx"]["decoder"]["outputs"] == ["logits"]
    assert "`decoder.onnx`: inputs `z`" in (tmp_path / "exp" / "README.md").read_text()
    diffs = _compare(vaelab.from_pretrained(tmp_path / "exp"), tmp_path / "exp")
    assert max(diffs.values()) < 1e-4
    # re-exported without --onnx: the stale graphs go
    assert main(["export", str(trained), str(tmp_path / "exp")]) == 0
    assert not (tmp_path / "exp" / "encoder.onnx").exists()
    shutil.rmtree(tmp_path / "exp")


def test_from_pretrained_needs_no_training_code(trained, tmp_path):
    """The loader imports nothing from vaelab.training (no optimizer, no loop)."""
    import subprocess
    import sys

    vaelab.export_run(trained, tmp_path / "exp")
    code = ("import sys, vaelab; m = vaelab.from_pretrained(sys.argv[1]); m.sample(2); "
            "print(sorted(k for k in sys.modules if k.startswith('vaelab.training')))")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(vaelab.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp")], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.strip() == "[]"


def test_spec_round_trips_through_replace():
    # DataSpec is written by to_dict and read by from_dict, as in checkpoints
    s = DataSpec((3, 8, 8), 4, 0)
    assert DataSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == replace(s)


def test_the_serving_example_in_the_docs_runs_without_pytorch(trained, tmp_path):
    """docs/export.md's example, run as written (torch blocked from importing) on an exported folder."""
    import re
    import subprocess
    import sys

    from PIL import Image

    doc = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if b.startswith("# serve:"))
    assert 15 <= len(code.strip().splitlines()) <= 25
    vaelab.export_run(trained, tmp_path / "my-model", onnx=True)
    blocked = "import sys; sys.modules['torch'] = None\n"  # an import of torch would fail
    out = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote samples-onnx.png: 16 samples of 1x28x28" in out.stdout
    img = np.asarray(Image.open(tmp_path / "samples-onnx.png"))
    assert img.shape == (4 * 28, 4 * 28)
    # the same pictures as PyTorch's decoder gives for the same z
    rng = np.random.default_rng(0)  # the example's draws: N(0, I) is a one-component mixture
    assert rng.choice(1, size=16, p=[1.0]).tolist() == [0] * 16
    z = rng.standard_normal((16, 3)).astype(np.float32)
    with torch.no_grad():
        want = vaelab.from_pretrained(tmp_path / "my-model").decode(torch.from_numpy(z)).mean.numpy()
    grid = want.reshape(4, 4, 1, 28, 28).transpose(0, 3, 1, 4, 2).reshape(112, 112)
    assert np.abs(img.astype(int) - (grid * 255 + 0.5).astype(np.uint8).astype(int)).max() <= 1


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_prior_npz_is_the_models_prior_as_a_mixture(prior, tmp_path):
    """prior.npz's mixture has the model's own log-density (float64 numpy against PyTorch), whatever
    the prior: N(0, I) as one component, the MoG's components, the VampPrior's posteriors at its
    pseudo-inputs."""
    from vaelab.export.onnx import prior_arrays

    cfg = vaelab.ModelConfig(latent_dim=3, hidden=(8,), prior=prior, prior_components=4, layers=2, upper_latent=(2,))
    torch.manual_seed(0)
    model = vaelab.build_model(cfg, vaelab.DataSpec((1, 6, 6))).eval()
    a = prior_arrays(model)
    k = 1 if prior == "standard" else 4
    assert a["weights"].shape == (k,) and a["mean"].shape == a["logvar"].shape == (k, 2)
    z = np.random.default_rng(1).standard_normal((50, 2)) * 2
    var = np.exp(a["logvar"].astype(np.float64))
    comp = -0.5 * (((z[:, None, :] - a["mean"]) ** 2 / var) + np.log(2 * np.pi * var)).sum(-1)  # (50, K)
    m = comp.max(-1, keepdims=True)
    want = (m[:, 0] + np.log((a["weights"] * np.exp(comp - m)).sum(-1)))
    with torch.no_grad():
        got = model.prior().log_prob(torch.from_numpy(z).float()).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
