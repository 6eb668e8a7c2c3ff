"""Speed without other maths (vaelab.accel, docs/speed.md): the oneDNN float32 linear against nn.Linear
(values and gradients), kernel plans (decided once per machine, persisted, recorded in the run's
config), flushed denormals, bit-identical resume in the oneDNN, bf16 and compile modes, the compiled
step derived from the eager one, compile's fallback to eager, each missing torch feature's fallback
in one line, the core free of speed code, bf16 autocast with float32 reductions, and bf16 evaluation
within the estimate's standard error."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from test_reliability import assert_same_run, tiny_cfg, write_tiny_mnist
from torch import nn

import vaelab.accel.step as speed
from vaelab import BatchPipeline, DataSpec, ModelConfig, build_model
from vaelab.accel import Accelerator, KernelPlan, compiler, kernels, machine
from vaelab.accel.evaluation import CompiledPasses
from vaelab.accel.noise import NoiseRecorder, PreDrawn
from vaelab.conditioning import Batch, build_condition
from vaelab.errors import CheckpointError, ConfigError
from vaelab.evaluation import evaluate_batches
from vaelab.evaluation.loop import eval_mode, summaries
from vaelab.models import fixed_weights
from vaelab.objectives import ELBOObjective
from vaelab.runs import load_checkpoint
from vaelab.training import train
from vaelab.training.step import train_step

ALL = kernels.FWD | kernels.DX | kernels.DW


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_mnist(tmp_path / "data")


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


# ---------------------------------------------------------------- the oneDNN linear
needs_onednn = pytest.mark.skipif(not compiler.has("onednn_linear"), reason="this torch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("mode", range(8))
@pytest.mark.parametrize("compiled_op", [False, True], ids=["eager-function", "custom-op"])
def test_fast_linear_matches_nn_linear_in_value_and_gradient(mode, compiled_op):
    torch.manual_seed(0)
    ref = nn.Linear(37, 23)
    x = torch.randn(19, 37, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w, b = ref.weight.detach().clone().requires_grad_(), ref.bias.detach().clone().requires_grad_()
    y = (kernels.fast_linear if compiled_op else kernels._FastLinear.apply)(x2, w, b, mode)
    r = ref(x)
    dy = torch.randn_like(r)
    (r * dy).sum().backward()
    (y * dy).sum().backward()
    for got, want in ((y, r), (x2.grad, x.grad), (w.grad, ref.weight.grad), (b.grad, ref.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@needs_onednn
def test_fast_linear_gradients_match_finite_differences_and_the_op_checks_pass():
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.float32, requires_grad=True) for s in ((5, 4), (3, 4), (3,)))
    torch.library.opcheck(kernels.fast_linear, (x, w, b, 7))
    # oneDNN computes in float32: compare its analytic gradient with float64 finite differences of the maths
    y = kernels.fast_linear(x, w, b, 7)
    y.square().sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(x64, w64, b64).square().sum().backward()
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_prepare_swaps_the_planned_layers_keeping_their_parameters_and_state():
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(64,)), DataSpec((1, 8, 8)))
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    Accelerator(KernelPlan({(64, 64): ALL, (64, 6): kernels.FWD})).prepare(model)
    fast = [m for m in model.modules() if isinstance(m, kernels.FastLinear)]
    assert [(m.in_features, m.out_features, m.bits) for m in fast] == [(64, 64, 7), (64, 6, 1), (3, 64, 0), (64, 64, 7)]
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == ref.state_dict().keys()
    x = torch.rand(300, 1, 8, 8)  # 300 rows: products large enough for oneDNN
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(model(x, generator=g1).likelihood.logits, ref(x, generator=g2).likelihood.logits,
                               rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):  # autocast: plain F.linear, in bf16
        assert fast[0](torch.rand(300, 64)).dtype == torch.bfloat16
    Accelerator().prepare(model)  # the plan "aten": every product F.linear's
    assert all(m.bits == 0 for m in model.modules() if isinstance(m, nn.Linear))


def test_mlp_nets_are_built_from_plain_nn_linear():
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert lins and all(type(m) is nn.Linear for m in lins)


def test_plans_follow_the_setting_and_auto_is_measured_once_per_machine(monkeypatch):
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    assert Accelerator.for_model("aten", model, rows=8).kernels == "aten"
    assert Accelerator.for_model("onednn", model, rows=8).kernels == "onednn"
    assert str(Accelerator.for_model("onednn", model, rows=8).plan) == "3x16=7,16x6=7,16x36=7,36x16=7"
    assert Accelerator.for_model("36x16=5,16x6=0", model, rows=8).plan.of(36, 16) == 5
    measured = []
    monkeypatch.setattr(compiler, "_probed", {"onednn_linear": True})
    monkeypatch.setattr(kernels, "measure", lambda r, i, o: measured.append((r, i, o)) or (ALL if i > 16 else 0))
    first = Accelerator.for_model("auto", model, rows=8)
    assert first.kernels == "3x16=0,16x6=0,16x36=0,36x16=7" and sorted(measured) == [
        (8, 3, 16), (8, 16, 6), (8, 16, 36), (8, 36, 16)]
    again = Accelerator.for_model("auto", model, rows=8)  # another process, the same machine: read, not timed
    assert again.kernels == first.kernels and len(measured) == 4
    assert machine._read(machine.cache_path()) == {"8x3x16": 0, "8x16x6": 0, "8x16x36": 0, "8x36x16": 7}
    assert Accelerator.for_model("auto", model, rows=2000).kernels == first.kernels and len(measured) == 8  # rows <= 1024
    assert {r for r, _, _ in measured[4:]} == {kernels.TIME_ROWS}


def test_small_products_stay_with_aten_whatever_the_plan():
    assert kernels.measure(4, 8, 8) == 0  # 512 flops: not worth timing
    calls = []
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    orig = kernels._FastLinear.apply
    try:
        kernels._FastLinear.apply = lambda *a: calls.append(a) or orig(*a)
        kernels.linear(x, w, None, ALL)
    finally:
        kernels._FastLinear.apply = orig
    assert not calls


def test_a_corrupt_or_unwritable_machine_cache_is_measured_again(monkeypatch, tmp_path):
    path = machine.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert machine.decisions([(8, 40, 40)], lambda *s: 5) == {(8, 40, 40): 5}
    assert machine._read(path) == {"8x40x40": 5}  # rewritten whole
    path.write_text('{"version": 1, "decisions": {"8x40x40": 99, "8x1x1": true, "8x2x2": 3}}')
    assert machine._read(path) == {"8x2x2": 3}  # entries that are not decisions are dropped
    said = []
    monkeypatch.setattr(machine, "cache_path", lambda: tmp_path / "file" / "k.json")
    (tmp_path / "file").write_text("a file where the folder should be")
    assert machine.decisions([(8, 40, 40)], lambda *s: 6, said.append) == {(8, 40, 40): 6}
    assert len(said) == 1 and "measured for this run only" in said[0]


def test_concurrent_first_runs_take_the_same_decisions(tmp_path):
    # two processes with an empty cache: the second waits for the first's measurement and takes it
    import subprocess
    import sys

    code = ("import os, time, vaelab.accel.machine as m\n"
            "print(m.decisions([(8, 64, 64)], lambda *s: time.sleep(0.5) or os.getpid() % 8)[(8, 64, 64)])")
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs[0] == outs[1] and outs[0].isdigit(), outs


def test_plans_and_checkpoint_sections_are_checked_before_use():
    assert KernelPlan.parse("784x400=7,400x20=0").of(784, 400) == 7
    assert str(KernelPlan.parse("400x20=0,784x400=7")) == "400x20=0,784x400=7"
    for bad in ("fast", "784x400=8", "784x400", "784x400=7,", "-1x3=1"):
        with pytest.raises(ConfigError, match="train.kernels: expected auto, aten, onednn or a recorded plan"):
            KernelPlan.parse(bad)
    assert Accelerator.check_state({"kernels": "3x4=1", "step": "fused"}, "ck")
    for bad in ({"kernels": "x"}, {"kernels": 7}, ["x"], {str(i): "" for i in range(20)}):
        with pytest.raises(CheckpointError, match="ck: corrupted training state"):
            Accelerator.check_state(bad, "ck")


# ---------------------------------------------------------------- missing torch features: one line each
def test_without_onednn_a_plan_that_asks_for_it_runs_on_aten_and_says_so(monkeypatch):
    monkeypatch.setattr(compiler, "_probed", {"onednn_linear": False})
    monkeypatch.setattr(compiler, "_said", set())
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    assert Accelerator.for_model("auto", model, rows=8).kernels == "aten"  # nothing measured, nothing said
    said: list[str] = []
    for _ in range(2):
        Accelerator.for_model("onednn", model, rows=8, say=said.append).prepare(model)
    assert all(m.bits == 0 for m in model.modules() if isinstance(m, nn.Linear))
    assert len(said) == 1 and "lacks oneDNN's float32 linear" in said[0] and "ATen's" in said[0]


def test_without_traced_autograd_compile_takes_the_compiled_objective_and_says_so(monkeypatch):
    monkeypatch.setattr(compiler, "_probed", {"trace_autograd": False})
    monkeypatch.setattr(compiler, "_said", set())
    (model, opt), _ = _fused_pair()
    said: list[str] = []
    acc = Accelerator(compile=True, say=said.append)
    objective, gradient_pass = acc.step_parts(model, opt, ELBOObjective(), batch_size=8, precision="fp32",
                                              grad_clip=None, world=1, scaler=None)
    assert isinstance(objective, speed.CompiledObjective) and acc.step_kind == "objective"
    assert len(said) == 1 and "forward pass and the loss, not the whole step" in said[0]


def test_without_guard_skipping_the_fused_step_checks_the_guards(monkeypatch):
    monkeypatch.setattr(compiler, "_probed", {"skip_guards": False})
    said: list[str] = []
    assert compiler.has("skip_guards", said.append) is False and len(said) == 1
    assert isinstance(compiler.guards_skipped(), __import__("contextlib").nullcontext)
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    (model, opt), (twin, twin_opt) = _fused_pair()
    fused = speed.FusedGradients(twin, ELBOObjective(), 8, "fp32", None, say=lambda s: None)
    for i in range(3):
        batch = Batch(torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i)), None, None)
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(i))
        f = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(i),
                       gradient_pass=fused)
        assert math.isclose(f.loss, r.loss, rel_tol=1e-5)


def test_each_feature_is_probed_here():
    # the CI's torch: every feature the speed code uses is there (a release that drops one shows here)
    import importlib.metadata

    assert set(compiler.FEATURES) == {"onednn_linear", "trace_autograd", "skip_guards"}
    if importlib.metadata.version("torch").startswith("2.13.") and compiler.has("onednn_linear"):
        assert all(compiler.has(name) for name in compiler.FEATURES)


# ---------------------------------------------------------------- the core is plain eager PyTorch
def test_the_core_is_free_of_speed_code():
    import re
    from pathlib import Path

    root = Path(__import__("vaelab").__file__).parent
    core = [p for d in ("distributions", "models", "objectives", "evaluation", "runs", "nets")
            for p in sorted((root / d).glob("*.py"))] + [root / "training" / "step.py"]
    speech = re.compile(r"\b(torch\.compile|compil(e|ed|es|ing)|onednn|mkldnn|fused)\b", re.IGNORECASE)
    mentions = sorted(str(p.relative_to(root)) for p in core if speech.search(p.read_text()))
    assert len(mentions) <= 2, mentions  # the Bernoulli's compiled formula, evaluate's --compile
    imports = sorted(str(p.relative_to(root)) for p in core if re.search(r"^\s*(from \.\.accel|from vaelab\.accel|import vaelab\.accel)", p.read_text(), re.M))
    assert imports == ["evaluation/evaluate.py"], imports  # the API's evaluate(compile=...)


# ---------------------------------------------------------------- denormals
def test_denormals_are_flushed_while_training_and_not_after():
    tiny = torch.tensor([1e-40])  # a denormal float32
    with speed.flush_denormal():
        assert float(tiny * 1.0) in (0.0, 1e-40)  # flushed where the CPU supports it
        flushed = float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) != 0.0  # the default again
    assert flushed == torch.set_flush_denormal(False)  # supported <=> flushed


# ---------------------------------------------------------------- bit-identical resume in every mode
def _resume_matches(cfg, tmp_path, stops=(7, 13)):
    train(cfg, tmp_path / "straight")
    for s in stops:
        train(cfg, tmp_path / "resumed", max_steps=s)
    train(cfg, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@needs_onednn
def test_resume_is_bit_identical_with_onednn_linears_and_records_its_plan(data_dir, tmp_path):
    _resume_matches(tiny_cfg(data_dir, 2, 0, "--set", "train.kernels=onednn"), tmp_path)
    ck = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.safetensors")
    assert ck.config.train.kernels == "onednn"  # a rule of its own: the same on every machine
    assert ck.state["accel"] == {"kernels": "4x32=7,32x8=7,32x64=7,64x32=7"}
    auto = train(tiny_cfg(data_dir, 1), tmp_path / "auto").config.train.kernels
    if compiler.has("onednn_linear"):  # auto: the plan taken here, every layer's shape
        assert KernelPlan.parse(auto).bits.keys() == {(4, 32), (32, 8), (32, 64), (64, 32)}


def test_resume_is_bit_identical_in_bf16(data_dir, tmp_path):
    _resume_matches(tiny_cfg(data_dir, 2, 0, "--precision", "bf16"), tmp_path)


@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_resume_is_bit_identical_compiled_with_an_eager_short_last_batch(data_dir, tmp_path, capsys, monkeypatch,
                                                                          fp32_linear):
    # 160 images in batches of 24: six compiled batches and an eager one of 16 per epoch; onednn: every
    # product on oneDNN, in the graph (where dynamo traces autograd.grad) and in the eager steps
    cfg = tiny_cfg(data_dir, 2, 0, "--compile", "--set", "train.batch_size=24", "--set", f"train.kernels={fp32_linear}")
    assert cfg.train.compile
    _resume_matches(cfg, tmp_path, stops=(5,))
    out = capsys.readouterr()
    whole = compiler.has("trace_autograd")
    assert f"torch.compile (the {'whole step' if whole else 'forward pass and the loss'}): the first step took" \
        in out.out + out.err
    assert "not available" not in out.out + out.err


def test_compile_falls_back_to_eager_in_one_line_when_no_compiler_works(data_dir, tmp_path, monkeypatch, capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found\nmore detail")

    train(tiny_cfg(data_dir, 1), tmp_path / "eager")
    monkeypatch.setattr(compiler, "BACKEND", broken)
    train(tiny_cfg(data_dir, 1, 0, "--compile"), tmp_path / "fallback")
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "torch.compile" in ln]
    assert len(lines) == 1 and "no working C++ compiler found" in lines[0] and "training eagerly" in lines[0]
    assert_same_run(tmp_path / "eager", tmp_path / "fallback")  # the failed attempt drew nothing


def test_compile_may_be_switched_on_when_resuming(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "BACKEND", "eager")  # dynamo only: quick
    train(tiny_cfg(data_dir, 1), tmp_path / "run")
    res = train(tiny_cfg(data_dir, 2, 0, "--compile"), tmp_path / "run")
    assert res.config.train.compile and res.state.epoch == 2


# ---------------------------------------------------------------- compiled steps take their noise as tensors
def test_the_compiled_bernoulli_likelihood_is_the_eager_one_in_value_and_gradient(monkeypatch):
    # inside a compiled graph the log-likelihood takes the softplus form (one exp, one log1p a pixel)
    from vaelab.distributions.bernoulli import Bernoulli

    monkeypatch.setattr(compiler, "BACKEND", "eager")  # dynamo traces it (is_compiling() is true there)
    logits = torch.cat([torch.randn(3, 1, 4, 4) * 5, torch.tensor([-100.0, -30, -20.5, 0, 19.9, 20.1, 30, 100]
                                                                  ).repeat(6).reshape(3, 1, 4, 4)])
    x = torch.rand(6, 1, 4, 4).round()
    mask = (torch.rand(6, 1, 4, 4) > 0.3).float()

    def value_and_grad(lg, m):
        lg = lg.clone().requires_grad_()
        v = Bernoulli(lg).log_prob(x, m)
        return v.detach(), torch.autograd.grad(v.sum(), lg)[0]

    step = compiler.compiled(value_and_grad)
    for m in (None, mask):
        (v, g), (cv, cg) = value_and_grad(logits, m), step(logits, m)
        torch.testing.assert_close(cv, v, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(cg, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pixels", [(1, 28, 28), (1, 1, 67)])  # 784: 14 blocks of 56; 67: none, per element
def test_the_compiled_bernoulli_likelihood_without_gradients_is_the_exact_one(monkeypatch, pixels):
    # no gradient (evaluation's passes): softplus summed as Σ max(l, 0) + Σ_blocks log Π (1 + e^-|l|)
    from vaelab.distributions.bernoulli import Bernoulli, _block

    assert (_block(784), _block(67), _block(16)) == (56, None, 16)
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    g = torch.Generator().manual_seed(0)
    for sign, x in ((1, torch.rand(1, *pixels, generator=g)), (-1, torch.zeros(1, *pixels))):
        # one datapoint against 40 draws' logits; then all negative and x = 0 (a dark background), where
        # log p is the products' logs alone, -Σ log(1 + e^l), and an error in them cannot hide
        logits = torch.randn(40, *pixels, generator=g) * 8
        logits = logits if sign > 0 else -logits.abs()
        logits.view(40, -1)[:, :6] = torch.tensor([-100.0, -30, -17, -16, 0, 16.5 if sign > 0 else -1])
        exact = Bernoulli(logits.double()).log_prob(x.double())
        with torch.no_grad():
            compiled = compiler.compiled(lambda lg, x=x: Bernoulli(lg).log_prob(x))(logits)
            eager = Bernoulli(logits).log_prob(x)
        tol = 5e-5 if sign < 0 else 1e-6 * exact.abs().max().item()  # float32 rounding of sums of 784 terms
        assert (compiled.double() - exact).abs().max() < tol and (eager.double() - exact).abs().max() < tol


def test_the_blocked_bernoulli_sum_is_left_out_where_a_gradient_is_taken(monkeypatch):
    import vaelab.distributions.bernoulli as bernoulli

    blocks = []
    monkeypatch.setattr(bernoulli, "_block", lambda d: blocks.append(d) or 16)
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    (model, opt), _ = _fused_pair()
    fused = speed.FusedGradients(model, ELBOObjective(), 8, "fp32", None, say=lambda s: None)
    assert train_step(model, opt, ELBOObjective(), Batch(torch.rand(8, 1, 6, 6), None, None), 1.0,
                      generator=torch.Generator().manual_seed(0), gradient_pass=fused).applied
    assert not blocks  # training: the per-element softplus, whose gradient is the sigmoid
    with torch.no_grad():
        compiler.compiled(lambda lg: bernoulli.Bernoulli(lg).log_prob(torch.rand(1, 1, 4, 4)))(torch.randn(3, 1, 4, 4))
    assert blocks == [16]


def test_recorded_noise_is_drawn_again_as_the_same_numbers():
    rec = NoiseRecorder(torch.Generator().manual_seed(5))
    a, b = rec.randn((3, 2), torch.float32, torch.device("cpu")), rec.randn((4,), torch.float32, torch.device("cpu"))
    again = rec.draw(torch.Generator().manual_seed(5))
    assert torch.equal(again.randn((3, 2), torch.float32, "cpu"), a)
    assert torch.equal(again.randn((4,), torch.float32, "cpu"), b)
    with pytest.raises(RuntimeError, match="does not match draw 0"):
        rec.draw(None).randn((2, 3), torch.float32, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_cfg", [
    ModelConfig(latent_dim=3, hidden=(16,)),
    ModelConfig(latent_dim=3, hidden=(16,), layers=2, upper_latent=(2,), prior="vamp", prior_components=5),
], ids=["one-layer", "two-layer-vamp"])
def test_the_compiled_objective_is_one_graph_and_takes_the_eager_draws(model_cfg, device):
    # a generator inside the graph broke it at every draw, so nothing was fused
    torch.manual_seed(0)
    model = build_model(model_cfg, DataSpec((1, 6, 6))).to(device)
    batch = Batch(torch.rand(8, 1, 6, 6, device=device), None, None)
    compiled = speed.CompiledObjective(ELBOObjective(), 8, say=lambda s: None)
    noise = compiled._record(model, batch, 1.0)
    explained = torch._dynamo.explain(compiled._forward)(model, batch, noise.draw(None), 1.0)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    eager = ELBOObjective()(model, batch, generator=torch.Generator(device).manual_seed(1))[0]
    again = compiled._forward(model, batch, noise.draw(torch.Generator(device).manual_seed(1)), 1.0)[0]
    assert torch.allclose(again, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_compiled_evaluation_takes_the_same_draws_as_eager(device, prior):
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=4, hidden=(32,), layers=2, upper_latent=(2,), prior=prior,
                                    prior_components=5), DataSpec((1, 8, 8))).to(device)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    pipe = BatchPipeline(build_condition("none", model.spec))
    x = torch.rand(3, 1, 8, 8, device=device)
    with torch.no_grad(), eval_mode(model), fixed_weights(model):  # one graph (the VampPrior's cache of its mixture stays outside it)
        summaries(model, x, None, None, 4, NoiseRecorder(None))  # an eager pass first fills that cache
        explained = torch._dynamo.explain(summaries)(model, x, None, None, 4, PreDrawn(
            [torch.randn(4, 3, 4, device=device), torch.randn(4, 3, 2, device=device)]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    runs = {comp: evaluate_batches(model, images, None, pipe, k=40, batch_size=5, seed=2, budget=64 * 20,
                                   passes=CompiledPasses() if comp else None) for comp in (False, True)}
    assert torch.allclose(runs[True].lk, runs[False].lk, atol=1e-4)  # the same draws: equal up to rounding
    assert torch.allclose(runs[True].elbo, runs[False].elbo, atol=1e-4)
    for a, b in zip(runs[True].layers, runs[False].layers, strict=True):
        assert a.name == b.name and torch.allclose(a.kl, b.kl, atol=1e-4) and torch.allclose(a.mean, b.mean, atol=1e-5)


def test_compiled_evaluation_falls_back_to_eager_in_one_line(monkeypatch, capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    images = torch.randint(0, 256, (6, 1, 6, 6), dtype=torch.uint8)
    pipe = BatchPipeline(build_condition("none", model.spec))
    eager = evaluate_batches(model, images, None, pipe, k=8, seed=1)
    monkeypatch.setattr(compiler, "BACKEND", broken)
    said: list[str] = []
    fallback = evaluate_batches(model, images, None, pipe, k=8, seed=1, passes=CompiledPasses(said.append))
    assert torch.equal(fallback.lk, eager.lk)  # the failed attempt drew nothing
    lines = [ln for ln in said if "torch.compile" in ln]
    assert len(lines) == 1 and "no working C++ compiler found" in lines[0] and "evaluating eagerly" in lines[0]


def test_a_models_later_evaluations_reuse_its_compiled_passes_and_do_not_keep_it_alive(monkeypatch):
    # a compiled function of its own per evaluation was traced by dynamo again at every call
    monkeypatch.setattr(compiler, "BACKEND", "eager")  # dynamo's tracing only: quick
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    images = torch.randint(0, 256, (6, 1, 6, 6), dtype=torch.uint8)
    pipe = BatchPipeline(build_condition("none", model.spec))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = evaluate_batches(model, images, None, pipe, k=8, seed=1, passes=CompiledPasses())
    again = evaluate_batches(model, images, None, pipe, k=8, seed=1, passes=CompiledPasses())
    assert torch.equal(first.lk, again.lk)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    evaluate_batches(model, images, None, pipe, k=4, seed=1, passes=CompiledPasses())  # another kind of pass: its own
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_noting_the_draws_changes_no_random_state_and_no_buffer():
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    model.register_buffer("running", torch.zeros(3))

    def like_dropout_and_batch_norm(mod, inp, out):
        model.running.add_(torch.rand(3))

    model.encoder.register_forward_hook(like_dropout_and_batch_norm)
    batch = Batch(torch.rand(8, 1, 6, 6), None, None)
    before = torch.random.get_rng_state()
    noise = speed.CompiledObjective(ELBOObjective(), 8, say=lambda s: None)._record(model, batch, 1.0)
    assert noise.shapes == [((8, 3), torch.float32, torch.device("cpu"))]
    assert torch.equal(torch.random.get_rng_state(), before) and not model.running.any()


# ---------------------------------------------------------------- the fused step (--compile)
def _fused_pair(device="cpu", **adam):
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6))).to(device)
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True, **adam) for m in (model, twin)]
    return (model, opts[0]), (twin, opts[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_the_fused_step_computes_the_eager_step(clip, device, fp32_linear, monkeypatch):
    # onednn: every product of the batch decided for oneDNN, which the graph keeps (gradients by
    # torch.autograd.grad traced into it); the eager step takes the same products
    if not compiler.has("trace_autograd"):
        pytest.skip("this torch's dynamo cannot trace torch.autograd.grad")
    (model, opt), (twin, twin_opt) = _fused_pair(device, weight_decay=1e-3)
    for m in (model, twin):
        Accelerator.for_model(fp32_linear, m, rows=8).prepare(m)
    fused = speed.FusedGradients.build(twin, ELBOObjective(), 8, "fp32", clip, 1, None, say=lambda s: None)
    assert fused is not None
    g, g_twin = torch.Generator(device).manual_seed(3), torch.Generator(device).manual_seed(3)
    for i in range(4):
        x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i)).to(device)
        batch = Batch(x, None, None)
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"] = 1e-2 / (i + 1)  # the loop sets the schedule's rate before each step
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=g, grad_clip=clip)
        f = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=g_twin, grad_clip=clip,
                       gradient_pass=fused)
        assert f.applied and math.isclose(f.loss, r.loss, rel_tol=1e-5)
        assert math.isclose(f.grad_norm, r.grad_norm, rel_tol=1e-4) and math.isclose(f.kl, r.kl, rel_tol=1e-5)
    assert torch.equal(g.get_state(), g_twin.get_state())  # the same draws
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
        sa, sb = opt.state[a], twin_opt.state[b]
        assert torch.equal(sa["step"], sb["step"]) and torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-8)
    assert opt.state_dict()["state"].keys() == twin_opt.state_dict()["state"].keys()


@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_the_fused_step_skips_dynamos_guards_only_for_calls_like_one_it_compiled(monkeypatch, fp32_linear):
    # Past its first call of a kind, the step runs without dynamo's guard checks (~0.2 ms a step on a
    # CPU). A call of another kind (here: a batch with a mask, then the model in eval mode) must not
    # silently run a graph traced for the first kind; after torch._dynamo.reset() the step compiles again,
    # its oneDNN form with its gradients in the graph (no graph break at torch.autograd.grad).
    if not compiler.has("trace_autograd"):
        pytest.skip("this torch's dynamo cannot trace torch.autograd.grad")
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    (model, opt), (twin, twin_opt) = _fused_pair()
    for m in (model, twin):
        m.encoder.net.insert(2, nn.Dropout(0.5))  # a layer that acts in training mode only
        Accelerator.for_model(fp32_linear, m, rows=8).prepare(m)
    fused = speed.FusedGradients.build(twin, ELBOObjective(), 8, "fp32", None, 1, None, say=lambda s: None)
    assert fused is not None
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    mask = (torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(9)) > 0.5).float()
    kinds = [None, mask, None, "eval", "reset", mask]
    g, g_twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, kind in enumerate(kinds):
        if kind == "eval":
            model.eval(), twin.eval()
        if kind == "reset":
            torch._dynamo.reset()
        x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i))
        batch = Batch(x, None, kind if isinstance(kind, torch.Tensor) else None)
        torch.manual_seed(i)  # dropout draws from the global generator
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=g)
        torch.manual_seed(i)
        f = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=g_twin, gradient_pass=fused)
        assert math.isclose(f.loss, r.loss, rel_tol=1e-5), (i, kind, f.loss, r.loss)
    assert len(fused.known) == 2 and fused.compiled is not None  # since the reset: eval without, with a mask
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks


def test_a_compiled_linear_under_autocast_makes_autocasts_own_casts(monkeypatch):
    # inside a graph the linear casts its inputs itself (so that inductor keeps each weight's gradient
    # in the weight's layout): the same bf16 values and the same float32 gradients as eager autocast
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(16, 24, generator=gen), torch.randn(8, 24, generator=gen), torch.randn(8, generator=gen)

    def value_and_grads(x, w, b):
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = kernels.linear(x, w, b, 0)
        gw, gb = torch.autograd.grad(y.float().square().sum(), [w, b])
        return y, gw, gb

    eager, traced = value_and_grads(x, w, b), compiler.compiled(value_and_grads)(x, w, b)
    assert eager[0].dtype == traced[0].dtype == torch.bfloat16
    assert traced[1].dtype == traced[2].dtype == torch.float32
    for a, t in zip(eager, traced, strict=True):
        assert torch.equal(a, t)


def test_the_fused_step_runs_the_networks_under_bf16_autocast_like_the_eager_step():
    (model, opt), (twin, twin_opt) = _fused_pair()
    fused = speed.FusedGradients(twin, ELBOObjective(), 8, "bf16", None, say=lambda s: None)
    batch = Batch(torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0)), None, None)
    fp32 = float(ELBOObjective()(twin, batch, generator=torch.Generator().manual_seed(3))[0])
    bf16 = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(3),
                      precision="bf16").loss
    r = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(3),
                   precision="bf16", gradient_pass=fused)
    assert abs(r.loss - bf16) < abs(r.loss - fp32) / 4, (r.loss, bf16, fp32)  # it ran in bf16


def test_the_fused_step_skips_a_non_finite_step_and_leaves_unused_parameters_alone():
    (model, opt), _ = _fused_pair()
    model.register_parameter("unused", nn.Parameter(torch.ones(2)))  # gets no gradient: Adam leaves it alone
    fused = speed.FusedGradients(model, ELBOObjective(), 4, "fp32", None, say=lambda s: None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = torch.rand(4, 1, 6, 6)
    bad[0, 0, 0, 0] = math.nan
    step = lambda x: train_step(model, opt, ELBOObjective(), Batch(x, None, None), 1.0,  # noqa: E731
                                generator=torch.Generator().manual_seed(0), gradient_pass=fused)
    r = step(bad)
    assert not r.applied and not opt.state and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    r = step(torch.rand(4, 1, 6, 6))
    assert r.applied and model.unused not in opt.state and torch.equal(model.unused, before["unused"])
    assert "model.unused" not in fused.names and fused.compiled is not None


def test_the_fused_step_is_used_only_where_it_computes_the_same_step():
    (model, opt), _ = _fused_pair()
    build = lambda world=1, scaler=None: speed.FusedGradients.build(  # noqa: E731
        model, ELBOObjective(), 8, "fp32", None, world, scaler)
    assert build() is not None or not compiler.has("trace_autograd")
    assert build(world=2) is None and build(scaler=object()) is None  # DDP, fp16 loss scaling: the objective
    for world, kind in ((1, "fused" if compiler.has("trace_autograd") else "objective"), (2, "objective")):
        acc = Accelerator(compile=True)
        acc.step_parts(model, opt, ELBOObjective(), batch_size=8, precision="fp32", grad_clip=None, world=world,
                       scaler=None)
        assert acc.step_kind == kind


@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_a_kl_warm_up_does_not_recompile_the_step(data_dir, tmp_path, monkeypatch, fp32_linear):
    # the KL weight changes at every step of a warm-up: as a constant of the graph it recompiled each time
    monkeypatch.setattr(compiler, "BACKEND", "eager")  # dynamo's tracing only: quick
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(tiny_cfg(data_dir, 2, 0, "--compile", "--set", "train.warmup_epochs=2", "--set",
                   f"train.kernels={fp32_linear}"), tmp_path / "run")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_every_run_compiles_its_own_step_past_dynamos_limit(data_dir, tmp_path, monkeypatch):
    # dynamo keeps at most recompile_limit graphs per code object: without a copy per run, the runs
    # after the limit went on eagerly without a word (and a resume mixed compiled and eager steps)
    # (dynamo's own patch: monkeypatch's undo left torch._dynamo.config without recompile_limit, and
    # every later torch.compile in the process failed with an AttributeError)
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        for i in range(3):
            train(tiny_cfg(data_dir, 1, 0, "--compile"), tmp_path / f"run{i}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3
    assert torch._dynamo.config.recompile_limit == 8  # put back


# ---------------------------------------------------------------- bf16
def test_bf16_is_autocast_with_float32_master_weights_and_reductions():
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    x = torch.rand(8, 1, 6, 6)
    with torch.autocast("cpu", torch.bfloat16):
        loss, terms = ELBOObjective()(model, Batch(x, None, None), generator=torch.Generator().manual_seed(0))
        assert model.decoder(torch.zeros(2, 3)).dtype == torch.bfloat16  # the networks run in bf16
    assert loss.dtype == terms.log_px_z.dtype == terms.kl.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_evaluation_stays_within_the_standard_error_of_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=4, hidden=(32,)), DataSpec((1, 8, 8)))
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    pipe = BatchPipeline(build_condition("none", model.spec))
    runs = {p: evaluate_batches(model, images, None, pipe, k=64, batch_size=10, seed=3, precision=p)
            for p in ("fp32", "bf16")}
    lk32, lk16 = runs["fp32"].lk, runs["bf16"].lk
    se = float(lk32.std() / math.sqrt(len(lk32)))
    assert abs(float(lk16.mean() - lk32.mean())) < se
    assert not torch.equal(lk16, lk32)  # it did run in bf16
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        evaluate_batches(model, images, None, pipe, k=2, precision="fp16")


def test_evaluation_takes_its_draws_in_equal_chunks():
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    images = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    rows: list[int] = []
    model.decoder.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    evaluate_batches(model, images, None, BatchPipeline(build_condition("none", model.spec)), k=50, batch_size=1,
                     budget=36 * 30)
    assert rows[1:] == [25, 25, 25, 25]  # 30 draws fit: two calls of 25 per image, not 30 + 20
