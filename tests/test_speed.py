"""Speed without other maths (docs/speed.md): the oneDNN float32 linear against nn.Linear (values and
gradients), its per-shape decisions (overridable, saved with a run, re-used on resume), flushed
denormals, bit-identical resume in the oneDNN, bf16 and compile modes, compile's fallback to eager,
bf16 autocast with float32 reductions, and bf16 evaluation within the estimate's standard error."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from test_reliability import assert_same_run, tiny_cfg, write_tiny_mnist
from torch import nn

import vaelab.training.speed as speed
from vaelab import BatchPipeline, DataSpec, ModelConfig, build_model, compiling
from vaelab.conditioning import Batch, build_condition
from vaelab.distributions.noise import NoiseRecorder, PreDrawn
from vaelab.errors import CheckpointError, ConfigError
from vaelab.evaluation import evaluate_batches
from vaelab.evaluation.loop import _summaries, eval_mode
from vaelab.nets import linear
from vaelab.objectives import ELBOObjective
from vaelab.runs import load_checkpoint
from vaelab.training import train
from vaelab.training.step import train_step


@pytest.fixture(autouse=True)
def fresh_decisions():
    linear.reset()
    yield
    linear.reset()


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_mnist(tmp_path / "data")


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


# ---------------------------------------------------------------- the oneDNN linear
needs_onednn = pytest.mark.skipif(not linear.AVAILABLE, reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("mode", range(8))
@pytest.mark.parametrize("compiled_op", [False, True], ids=["eager-function", "custom-op"])
def test_fast_linear_matches_nn_linear_in_value_and_gradient(mode, compiled_op):
    torch.manual_seed(0)
    ref = nn.Linear(37, 23)
    x = torch.randn(19, 37, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w, b = ref.weight.detach().clone().requires_grad_(), ref.bias.detach().clone().requires_grad_()
    y = (linear.fast_linear if compiled_op else linear._FastLinear.apply)(x2, w, b, mode)
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
    torch.library.opcheck(linear.fast_linear, (x, w, b, 7))
    # oneDNN computes in float32: compare its analytic gradient with float64 finite differences of the maths
    y = linear.fast_linear(x, w, b, 7)
    y.square().sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(x64, w64, b64).square().sum().backward()
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_module_keeps_nn_linear_state_and_takes_any_leading_dims(monkeypatch):
    monkeypatch.setenv(linear.ENV, "onednn")
    torch.manual_seed(0)
    fast, ref = linear.Linear(6, 5), nn.Linear(6, 5)
    ref.load_state_dict(fast.state_dict())  # same parameters, same names: old checkpoints load
    assert sorted(fast.state_dict()) == ["bias", "weight"]
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-6, atol=1e-6)
    assert linear.decisions() == {"12x6x5": 7}
    with torch.autocast("cpu", torch.bfloat16):  # autocast: plain F.linear, in bf16
        assert fast(x).dtype == torch.bfloat16
    assert fast.double()(x.double()).dtype == torch.float64


def test_mlp_nets_are_built_from_the_fast_linear():
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert lins and all(isinstance(m, linear.Linear) for m in lins)


def test_decisions_follow_the_setting_and_small_products_stay_with_aten(monkeypatch):
    monkeypatch.setenv(linear.ENV, "aten")
    assert linear.decide(512, 784, 400) == 0
    linear.reset()
    monkeypatch.setenv(linear.ENV, "onednn")
    assert linear.decide(512, 784, 400) == (7 if linear.AVAILABLE else 0)
    linear.reset()
    monkeypatch.setenv(linear.ENV, "auto")
    assert linear.decide(4, 8, 8) == 0  # 512 flops: not worth timing
    if linear.AVAILABLE:
        got = linear.decide(128, 256, 256)  # timed: whichever is faster here, kept for the process
        assert 0 <= got <= 7 and linear.decide(128, 256, 256) == got


def test_saved_decisions_are_checked_before_use():
    linear.preset({"16x64x32": 5}, "ck")
    assert linear.decide(16, 64, 32) == 5
    for bad in ({"a": 9}, {"a": True}, ["x"], {"a": "7"}):
        with pytest.raises(CheckpointError, match="ck: corrupted training state: gemm"):
            linear.preset(bad, "ck")


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
def test_resume_is_bit_identical_with_onednn_linears_and_saves_its_decisions(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(linear.ENV, "onednn")
    _resume_matches(tiny_cfg(data_dir, 2), tmp_path)
    gemm = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.safetensors").state["gemm"]
    assert gemm["16x64x32"] == 7 and gemm["40x64x32"] == 7  # training and validation batches


def test_resume_is_bit_identical_in_bf16(data_dir, tmp_path):
    _resume_matches(tiny_cfg(data_dir, 2, 0, "--precision", "bf16"), tmp_path)


@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_resume_is_bit_identical_compiled_with_an_eager_short_last_batch(data_dir, tmp_path, capsys, monkeypatch,
                                                                          fp32_linear):
    # 160 images in batches of 24: six compiled batches and an eager one of 16 per epoch; onednn: every
    # product on oneDNN, in the graph (where dynamo traces autograd.grad) and in the eager steps
    monkeypatch.setenv(linear.ENV, fp32_linear)
    cfg = tiny_cfg(data_dir, 2, 0, "--compile", "--set", "train.batch_size=24")
    assert cfg.train.compile
    _resume_matches(cfg, tmp_path, stops=(5,))
    out = capsys.readouterr()
    whole = fp32_linear == "aten" or compiling.traces_autograd()
    assert f"torch.compile (the {'whole step' if whole else 'forward pass and the loss'}): the first step took" \
        in out.out + out.err
    assert "not available" not in out.out + out.err


def test_compile_falls_back_to_eager_in_one_line_when_no_compiler_works(data_dir, tmp_path, monkeypatch, capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found\nmore detail")

    train(tiny_cfg(data_dir, 1), tmp_path / "eager")
    monkeypatch.setattr(compiling, "BACKEND", broken)
    train(tiny_cfg(data_dir, 1, 0, "--compile"), tmp_path / "fallback")
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "torch.compile" in ln]
    assert len(lines) == 1 and "no working C++ compiler found" in lines[0] and "training eagerly" in lines[0]
    assert_same_run(tmp_path / "eager", tmp_path / "fallback")  # the failed attempt drew nothing


def test_compile_may_be_switched_on_when_resuming(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo only: quick
    train(tiny_cfg(data_dir, 1), tmp_path / "run")
    res = train(tiny_cfg(data_dir, 2, 0, "--compile"), tmp_path / "run")
    assert res.config.train.compile and res.state.epoch == 2


# ---------------------------------------------------------------- compiled steps take their noise as tensors
def test_the_compiled_bernoulli_likelihood_is_the_eager_one_in_value_and_gradient(monkeypatch):
    # inside a compiled graph the log-likelihood takes the softplus form (one exp, one log1p a pixel)
    from vaelab.distributions.bernoulli import Bernoulli

    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo traces it (is_compiling() is true there)
    logits = torch.cat([torch.randn(3, 1, 4, 4) * 5, torch.tensor([-100.0, -30, -20.5, 0, 19.9, 20.1, 30, 100]
                                                                  ).repeat(6).reshape(3, 1, 4, 4)])
    x = torch.rand(6, 1, 4, 4).round()
    mask = (torch.rand(6, 1, 4, 4) > 0.3).float()

    def value_and_grad(lg, m):
        lg = lg.clone().requires_grad_()
        v = Bernoulli(lg).log_prob(x, m)
        return v.detach(), torch.autograd.grad(v.sum(), lg)[0]

    step = compiling.compiled(value_and_grad)
    for m in (None, mask):
        (v, g), (cv, cg) = value_and_grad(logits, m), step(logits, m)
        torch.testing.assert_close(cv, v, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(cg, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pixels", [(1, 28, 28), (1, 1, 67)])  # 784: 14 blocks of 56; 67: none, per element
def test_the_compiled_bernoulli_likelihood_without_gradients_is_the_exact_one(monkeypatch, pixels):
    # no gradient (evaluation's passes): softplus summed as Σ max(l, 0) + Σ_blocks log Π (1 + e^-|l|)
    from vaelab.distributions.bernoulli import Bernoulli, _block

    assert (_block(784), _block(67), _block(16)) == (56, None, 16)
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    g = torch.Generator().manual_seed(0)
    for sign, x in ((1, torch.rand(1, *pixels, generator=g)), (-1, torch.zeros(1, *pixels))):
        # one datapoint against 40 draws' logits; then all negative and x = 0 (a dark background), where
        # log p is the products' logs alone, -Σ log(1 + e^l), and an error in them cannot hide
        logits = torch.randn(40, *pixels, generator=g) * 8
        logits = logits if sign > 0 else -logits.abs()
        logits.view(40, -1)[:, :6] = torch.tensor([-100.0, -30, -17, -16, 0, 16.5 if sign > 0 else -1])
        exact = Bernoulli(logits.double()).log_prob(x.double())
        with torch.no_grad():
            compiled = compiling.compiled(lambda lg, x=x: Bernoulli(lg).log_prob(x))(logits)
            eager = Bernoulli(logits).log_prob(x)
        tol = 5e-5 if sign < 0 else 1e-6 * exact.abs().max().item()  # float32 rounding of sums of 784 terms
        assert (compiled.double() - exact).abs().max() < tol and (eager.double() - exact).abs().max() < tol


def test_the_blocked_bernoulli_sum_is_left_out_where_a_gradient_is_taken(monkeypatch):
    import vaelab.distributions.bernoulli as bernoulli

    blocks = []
    monkeypatch.setattr(bernoulli, "_block", lambda d: blocks.append(d) or 16)
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    (model, opt), _ = _fused_pair()
    fused = speed.FusedStep(model, opt, ELBOObjective(), 8, "fp32", None, say=lambda s: None)
    assert fused(Batch(torch.rand(8, 1, 6, 6), None, None), 1.0, generator=torch.Generator().manual_seed(0))
    assert not blocks  # training: the per-element softplus, whose gradient is the sigmoid
    with torch.no_grad():
        compiling.compiled(lambda lg: bernoulli.Bernoulli(lg).log_prob(torch.rand(1, 1, 4, 4)))(torch.randn(3, 1, 4, 4))
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
    with torch.no_grad(), eval_mode(model):  # one graph (the VampPrior's cache of its mixture stays outside it)
        _summaries(model, x, None, None, 4, NoiseRecorder(None))  # an eager pass first fills that cache
        explained = torch._dynamo.explain(_summaries)(model, x, None, None, 4, PreDrawn(
            [torch.randn(4, 3, 4, device=device), torch.randn(4, 3, 2, device=device)]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    runs = {comp: evaluate_batches(model, images, None, pipe, k=40, batch_size=5, seed=2, budget=64 * 20,
                                   compile=comp) for comp in (False, True)}
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
    monkeypatch.setattr(compiling, "BACKEND", broken)
    fallback = evaluate_batches(model, images, None, pipe, k=8, seed=1, compile=True)
    assert torch.equal(fallback.lk, eager.lk)  # the failed attempt drew nothing
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "torch.compile" in ln]
    assert len(lines) == 1 and "no working C++ compiler found" in lines[0] and "evaluating eagerly" in lines[0]


def test_a_models_later_evaluations_reuse_its_compiled_passes_and_do_not_keep_it_alive(monkeypatch):
    # a compiled function of its own per evaluation was traced by dynamo again at every call
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo's tracing only: quick
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    images = torch.randint(0, 256, (6, 1, 6, 6), dtype=torch.uint8)
    pipe = BatchPipeline(build_condition("none", model.spec))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = evaluate_batches(model, images, None, pipe, k=8, seed=1, compile=True)
    again = evaluate_batches(model, images, None, pipe, k=8, seed=1, compile=True)
    assert torch.equal(first.lk, again.lk)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    evaluate_batches(model, images, None, pipe, k=4, seed=1, compile=True)  # another kind of pass: its own
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
    monkeypatch.setenv(linear.ENV, fp32_linear)
    onednn = fp32_linear == "onednn" and device == "cpu"
    if onednn and not compiling.traces_autograd():
        pytest.skip("this torch's dynamo cannot trace torch.autograd.grad")
    (model, opt), (twin, twin_opt) = _fused_pair(device, weight_decay=1e-3)
    linear.prepare(model, 8)
    fused = speed.FusedStep.build(twin, twin_opt, ELBOObjective(), 8, "fp32", clip, 1, None, say=lambda s: None)
    assert fused is not None and fused.onednn == onednn
    g, g_twin = torch.Generator(device).manual_seed(3), torch.Generator(device).manual_seed(3)
    for i in range(4):
        x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i)).to(device)
        batch = Batch(x, None, None)
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"] = 1e-2 / (i + 1)  # the loop sets the schedule's rate before each step
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=g, grad_clip=clip)
        f = fused(batch, 1.0, generator=g_twin)
        assert f is not None and f.applied and math.isclose(f.loss, r.loss, rel_tol=1e-5)
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
    if fp32_linear == "onednn" and not compiling.traces_autograd():
        pytest.skip("this torch's dynamo cannot trace torch.autograd.grad")
    monkeypatch.setenv(linear.ENV, fp32_linear)
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    (model, opt), (twin, twin_opt) = _fused_pair()
    for m in (model, twin):
        m.encoder.net.insert(2, nn.Dropout(0.5))  # a layer that acts in training mode only
    linear.prepare(model, 8)
    fused = speed.FusedStep.build(twin, twin_opt, ELBOObjective(), 8, "fp32", None, 1, None, say=lambda s: None)
    assert fused is not None and fused.onednn == (fp32_linear == "onednn")
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
        f = fused(batch, 1.0, generator=g_twin)
        assert f is not None and math.isclose(f.loss, r.loss, rel_tol=1e-5), (i, kind, f.loss, r.loss)
    assert len(fused.known) == 2 and fused.compiled is not None  # since the reset: eval without, with a mask
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks


def test_a_compiled_linear_under_autocast_makes_autocasts_own_casts(monkeypatch):
    # inside a graph the linear casts its inputs itself (so that inductor keeps each weight's gradient
    # in the weight's layout): the same bf16 values and the same float32 gradients as eager autocast
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(16, 24, generator=gen), torch.randn(8, 24, generator=gen), torch.randn(8, generator=gen)

    def value_and_grads(x, w, b):
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = linear.linear(x, w, b)
        gw, gb = torch.autograd.grad(y.float().square().sum(), [w, b])
        return y, gw, gb

    eager, traced = value_and_grads(x, w, b), compiling.compiled(value_and_grads)(x, w, b)
    assert eager[0].dtype == traced[0].dtype == torch.bfloat16
    assert traced[1].dtype == traced[2].dtype == torch.float32
    for a, t in zip(eager, traced, strict=True):
        assert torch.equal(a, t)


def test_the_fused_step_runs_the_networks_under_bf16_autocast_like_the_eager_step():
    (model, opt), (twin, twin_opt) = _fused_pair()
    fused = speed.FusedStep(twin, twin_opt, ELBOObjective(), 8, "bf16", None, say=lambda s: None)
    batch = Batch(torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0)), None, None)
    fp32 = float(ELBOObjective()(twin, batch, generator=torch.Generator().manual_seed(3))[0])
    bf16 = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=torch.Generator().manual_seed(3),
                      precision="bf16").loss
    r = fused(batch, 1.0, generator=torch.Generator().manual_seed(3))
    assert r is not None and abs(r.loss - bf16) < abs(r.loss - fp32) / 4, (r.loss, bf16, fp32)  # it ran in bf16


def test_the_fused_step_skips_a_non_finite_step_and_leaves_unused_parameters_alone():
    (model, opt), _ = _fused_pair()
    model.register_parameter("unused", nn.Parameter(torch.ones(2)))  # gets no gradient: Adam leaves it alone
    fused = speed.FusedStep(model, opt, ELBOObjective(), 4, "fp32", None, say=lambda s: None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = torch.rand(4, 1, 6, 6)
    bad[0, 0, 0, 0] = math.nan
    r = fused(Batch(bad, None, None), 1.0, generator=torch.Generator().manual_seed(0))
    assert r is not None and not r.applied and not opt.state
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    r = fused(Batch(torch.rand(4, 1, 6, 6), None, None), 1.0, generator=torch.Generator().manual_seed(0))
    assert r is not None and r.applied and model.unused not in opt.state and torch.equal(model.unused, before["unused"])
    assert "unused" not in fused.names


def test_the_fused_step_is_used_only_where_it_computes_the_same_step(monkeypatch):
    (model, opt), _ = _fused_pair()
    build = lambda o=opt, world=1, scaler=None: speed.FusedStep.build(  # noqa: E731
        model, o, ELBOObjective(), 8, "fp32", None, world, scaler)
    assert build() is not None
    assert build(world=2) is None and build(scaler=object()) is None
    assert build(torch.optim.Adam(model.parameters())) is None  # not fused: another kernel
    assert build(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    # where dynamo cannot trace torch.autograd.grad the graph's products are ATen's: one product on oneDNN
    # (a near tie that timing noise can decide either way) does not pay for losing the fused step; most of
    # the step's product FLOPs on oneDNN do. Layers 36-16, 16-6, 3-16, 16-36.
    monkeypatch.setattr(compiling, "traces_autograd", lambda: False)
    monkeypatch.setitem(linear._decisions, "8x36x16", linear.FWD)
    monkeypatch.setitem(linear._decisions, "4x16x36", linear.FWD | linear.DX | linear.DW)  # another batch size
    assert linear.onednn_share(model, 8) == pytest.approx(576 / (3 * (576 + 96 + 48 + 576)))
    assert build() is not None
    monkeypatch.setitem(linear._decisions, "8x16x36", linear.FWD | linear.DX | linear.DW)
    assert build() is not None  # 0.59 of the FLOPs
    monkeypatch.setitem(linear._decisions, "8x36x16", linear.FWD | linear.DX | linear.DW)
    assert linear.onednn_share(model, 8) > speed.ONEDNN_SHARE and build() is None
    assert linear.onednn_share(copy.deepcopy(model).double(), 8) == 0  # products in float64: ATen's
    # float32 products only: under bf16 autocast every product is ATen's, and the step stays fused
    bf16 = speed.FusedStep.build(model, opt, ELBOObjective(), 8, "bf16", None, 1, None)
    assert bf16 is not None and not bf16.onednn
    # where dynamo traces torch.autograd.grad the graph keeps oneDNN's products, however many
    monkeypatch.setattr(compiling, "traces_autograd", lambda: True)
    assert build().onednn and not speed.FusedStep.build(model, opt, ELBOObjective(), 8, "bf16", None, 1, None).onednn
    linear._decisions.clear()
    assert not build().onednn


@pytest.mark.parametrize("fp32_linear", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_a_kl_warm_up_does_not_recompile_the_step(data_dir, tmp_path, monkeypatch, fp32_linear):
    # the KL weight changes at every step of a warm-up: as a constant of the graph it recompiled each time
    monkeypatch.setenv(linear.ENV, fp32_linear)  # aten: the fused step; onednn: oneDNN products, fused or not
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo's tracing only: quick
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(tiny_cfg(data_dir, 2, 0, "--compile", "--set", "train.warmup_epochs=2"), tmp_path / "run")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_every_run_compiles_its_own_step_past_dynamos_limit(data_dir, tmp_path, monkeypatch):
    # dynamo keeps at most recompile_limit graphs per code object: without a copy per run, the runs
    # after the limit went on eagerly without a word (and a resume mixed compiled and eager steps)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i in range(3):
        train(tiny_cfg(data_dir, 1, 0, "--compile"), tmp_path / f"run{i}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3


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
