"""The step decided on the device (issue 24): the guard skips an update inside the optimizer's kernel
(``found_inf``), the host reads the steps' numbers every ``train.sync_every`` steps, and a run trains
bit for bit as with the host deciding each step: the same skips and counts, the same messages, the
same halt (with the weights of the step that reached ``train.max_nonfinite``), the same checkpoints.
On a GPU this is the default; here it is forced (``Accelerator.device_guard``)."""

from __future__ import annotations

import pytest
import torch
from test_reliability import Poisoned, assert_same_run, tiny_cfg, write_tiny_mnist

import vaelab.training.loop as loopmod
from vaelab.accel import Accelerator
from vaelab.errors import NonFiniteError
from vaelab.models import build_model
from vaelab.runs import RunDir, load_checkpoint
from vaelab.training import train
from vaelab.training.ema import EMA
from vaelab.training.step import PendingStep, StepGuard, read_steps


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_mnist(tmp_path / "data")


@pytest.fixture
def on_device(monkeypatch):
    """Decide the steps on the device, on this CPU."""
    monkeypatch.setattr(Accelerator, "device_guard", True)


def _reads(monkeypatch) -> list[int]:
    """The number of steps each host read took in."""
    real, sizes = loopmod.read_steps, []

    def spy(steps):
        sizes.append(len(steps))
        return real(steps)

    monkeypatch.setattr(loopmod, "read_steps", spy)
    return sizes


# ---------------------------------------------------------------- the units
def _pending(report, flags, skip) -> PendingStep:
    return PendingStep(torch.tensor(report), torch.tensor(flags), torch.tensor(skip), 4)


def test_the_device_counts_the_run_of_nonfinite_steps_and_freezes_at_the_limit():
    g = StepGuard(True, 16, 3, 1, torch.device("cpu"))  # one non-finite step already before this read
    seen = []
    for flags, skip in [((1.0, 0.0), 1.0), ((0.0, 1.0), 1.0), ((0.0, 0.0), 0.0), ((1.0, 0.0), 1.0),
                        ((1.0, 0.0), 1.0), ((1.0, 0.0), 1.0), ((0.0, 0.0), 1.0)]:
        g.follow(_pending((0.0, 0.0, 0.0, 0.0), flags, skip))
        seen.append((float(g.run), float(g.frozen)))
    # +1, unchanged by a norm skip, 0 when applied, then 1, 2, 3 (the limit: frozen from here on)
    assert seen == [(2, 0), (2, 0), (0, 0), (1, 0), (2, 0), (3, 1), (3, 1)]  # frozen: skipped, unchanged
    host = StepGuard(False, 16, 3, 0, torch.device("cpu"))
    assert host.every == 1 and host.frozen is None  # the host decides, and reads, every step


def test_one_read_brings_back_every_pending_step():
    steps = [_pending((1.5, 2.0, -3.0, 4.0), (0.0, 0.0), 0.0),
             _pending((float("nan"), float("nan"), 0.0, 0.0), (1.0, 0.0), 1.0),
             _pending((1.0, 500.0, -1.0, 1.0), (0.0, 1.0), 1.0)]
    a, b, c = read_steps(steps)
    assert (a.loss, a.grad_norm, a.rec, a.kl, a.n, a.applied, a.skipped) == (1.5, 2.0, -3.0, 4.0, 4, True, False)
    assert not b.applied and not b.skipped  # non-finite
    assert not c.applied and c.skipped  # finite, skipped for its norm
    assert read_steps([]) == []


def test_the_masked_moving_average_is_the_applied_one_or_none():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ema, twin = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    twin.update(model, torch.tensor(0.0))  # taken
    assert all(torch.equal(ema.tensors[k], twin.tensors[k]) for k in ema.tensors)
    before = {k: v.clone() for k, v in twin.tensors.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    twin.update(model, torch.tensor(1.0))  # skipped: nothing moves
    assert all(torch.equal(before[k], twin.tensors[k]) for k in before)


# ---------------------------------------------------------------- whole runs, device vs host
@pytest.mark.parametrize("extra", [(), ("--set", "train.ema=0.9", "--set", "train.skip_threshold=60"),
                                   ("--set", "train.grad_clip=5")], ids=["plain", "ema-and-skips", "clip"])
def test_a_run_decided_on_the_device_is_the_run_decided_by_the_host(data_dir, tmp_path, monkeypatch, capsys, extra):
    cfg = tiny_cfg(data_dir, 2, 0, "--set", "train.sync_every=4", *extra)
    train(cfg, tmp_path / "host", objective=Poisoned({3, 4, 14}))
    host_out = capsys.readouterr().out
    monkeypatch.setattr(Accelerator, "device_guard", True)
    sizes = _reads(monkeypatch)
    train(cfg, tmp_path / "device", objective=Poisoned({3, 4, 14}))
    device_out = capsys.readouterr().out
    assert_same_run(tmp_path / "host", tmp_path / "device")
    assert_same_run(tmp_path / "host", tmp_path / "device", "best")
    # the same lines, the skipped steps named by their own numbers
    strip = lambda out: [ln for ln in out.splitlines() if not ln.startswith("run ")]  # noqa: E731
    assert strip(host_out) == strip(device_out)
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in device_out
    # 10 steps an epoch: read at steps 4 and 8 and at the epoch's end (10), then 12, 16, 20
    assert sizes == [4, 4, 2, 2, 4, 4]
    rows = RunDir.of(tmp_path / "device").read_metrics()
    assert [r["nonfinite_total"] for r in rows] == [2, 3]


def test_resuming_a_run_decided_on_the_device_is_bit_identical(data_dir, tmp_path, on_device):
    cfg = tiny_cfg(data_dir, 3, 4, "--set", "train.sync_every=3")
    train(cfg, tmp_path / "straight", objective=Poisoned({5, 17}))
    for stop in (7, 13):
        train(cfg, tmp_path / "resumed", max_steps=stop, objective=Poisoned(set()))
    train(cfg, tmp_path / "resumed")
    straight_clean = tmp_path / "clean"
    train(cfg, straight_clean)
    assert_same_run(straight_clean, tmp_path / "resumed")


def test_the_halt_on_the_device_keeps_the_weights_of_the_step_that_reached_the_limit(data_dir, tmp_path,
                                                                                     monkeypatch):
    """Steps 2-6 are non-finite (the limit is 5, reached at step 6); 7 on are finite. The host reads
    only every 16 steps, but the device froze the updates at step 6: the error names step 6 and the
    model holds the weights of step 2, as when the host decides each step."""
    cfg = tiny_cfg(data_dir, 3, 0, "--set", "train.max_nonfinite=5", "--set", "train.sync_every=16")
    spec = train(cfg, tmp_path / "probe", max_steps=1).spec
    weights = {}
    for device in (False, True):
        monkeypatch.setattr(Accelerator, "device_guard", device)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, spec)
        with pytest.raises(NonFiniteError) as e:
            train(cfg, tmp_path / f"run-{device}", objective=Poisoned(set(range(2, 7))), model=model)
        assert "5 consecutive non-finite losses/gradients at step 6" in str(e.value)
        weights[device] = {k: v.clone() for k, v in model.state_dict().items()}
        # nothing was checkpointed (no epoch ended)
        assert not (tmp_path / f"run-{device}" / "checkpoints" / "latest.safetensors").exists()
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])
    # and those are the weights after two applied steps
    torch.manual_seed(cfg.train.seed)
    ref = build_model(cfg.model, spec)
    train(cfg, tmp_path / "two", model=ref, max_steps=2)
    assert all(torch.equal(weights[True][k], v) for k, v in ref.state_dict().items())


def test_an_optimizer_without_found_inf_is_decided_by_the_host(data_dir, tmp_path, on_device, monkeypatch):
    def plain_adam(model, cfg):  # the for-loop Adam: its step() takes no found_inf
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=False)

    sizes = _reads(monkeypatch)
    cfg = tiny_cfg(data_dir, 1, 0, "--set", "train.sync_every=4")
    res = train(cfg, tmp_path / "run", optimizer=plain_adam, objective=Poisoned({2}))
    assert sizes == [1] * 10  # read at every step
    assert res.state.nonfinite_total == 1
    assert int(load_checkpoint(RunDir.of(tmp_path / "run").latest).optimizer["state"][0]["step"]) == 9


def test_callbacks_that_watch_steps_get_every_step_as_it_is_taken(data_dir, tmp_path, on_device):
    from vaelab.training import Callback

    class Watch(Callback):
        def __init__(self):
            self.seen = []

        def on_step(self, step):
            self.seen.append((step.step, step.batch, step.result.applied))

    w = Watch()
    train(tiny_cfg(data_dir, 1, 0, "--set", "train.sync_every=8"), tmp_path / "run", callbacks=[w],
          objective=Poisoned({4}))
    assert w.seen == [(i, i, i != 5) for i in range(1, 11)]


def test_sync_every_is_checked_in_one_line(data_dir, tmp_path, capsys):
    from vaelab import cli

    assert cli.main(["train", "--run", str(tmp_path / "r"), "--data", "mnist", "--data-dir", str(data_dir),
                     "--set", "train.sync_every=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sync_every" in err[0] and "1..10000" in err[0]


# ---------------------------------------------------------------- CUDA graphs: the fallback, here
def test_a_step_that_cannot_be_captured_runs_compiled_without_graphs_and_computes_the_same(monkeypatch):
    """Where capturing the step in CUDA graphs fails, one line says so and the step runs compiled
    without them, from the same random state (so the same bits as a step never captured)."""
    import copy

    import vaelab.accel.step as speed
    from vaelab import DataSpec, ModelConfig
    from vaelab.accel import compiler
    from vaelab.conditioning import Batch
    from vaelab.objectives import ELBOObjective
    from vaelab.training.step import train_step

    if not compiler.has("trace_autograd"):
        pytest.skip("this torch's dynamo cannot trace torch.autograd.grad")
    monkeypatch.setattr(compiler, "BACKEND", "eager")
    real = compiler.compiled

    def no_capture(fn, backend=None, graphs=False):
        if not graphs:
            return real(fn, backend)

        def fails(*a, **k):
            raise RuntimeError("skipping cudagraphs due to mutated inputs")

        return fails

    monkeypatch.setattr(compiler, "compiled", no_capture)
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (model, twin))
    said: list[str] = []
    plain = speed.FusedGradients(model, ELBOObjective(), 8, "fp32", None, say=lambda s: None)
    graphed = speed.FusedGradients(twin, ELBOObjective(), 8, "fp32", None, say=said.append, graphs=True)
    g, g_twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i in range(3):
        batch = Batch(torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i)), None, None)
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=g, gradient_pass=plain)
        f = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=g_twin, gradient_pass=graphed)
        assert (r.loss, r.grad_norm) == (f.loss, f.grad_norm)
    lines = [s for s in said if "CUDA graphs" in s]
    assert lines == ["CUDA graphs are not possible for this step (RuntimeError: skipping cudagraphs due to "
                     "mutated inputs); it runs compiled without them"]
    assert not graphed.graphs and graphed.compiled is not None
    assert torch.equal(g.get_state(), g_twin.get_state())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


# ---------------------------------------------------------------- on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_a_training_step_on_the_gpu_never_waits_for_it(data_dir, tmp_path, monkeypatch, compile_):
    """torch's sync debug mode raises at any host synchronisation: none in a step (the batch, the
    pipeline, the schedule, the step, the guard, the moving average), past the first steps (lazy
    state, compiling)."""
    real, calls = loopmod._Stepper.__call__, [0]

    def strict(self, x, y, position):
        calls[0] += 1
        if calls[0] <= 3:
            return real(self, x, y, position)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, x, y, position)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loopmod._Stepper, "__call__", strict)
    extra = ["--set", "train.ema=0.9", "--set", "train.warmup_epochs=1", *(["--compile"] if compile_ else [])]
    cfg = tiny_cfg(data_dir, 2, 0, "--device", "cuda", "--set", "train.sync_every=8", *extra)
    res = train(cfg, tmp_path / "run", objective=None)
    assert calls[0] == 20 and res.state.nonfinite_total == 0


@needs_cuda
def test_on_the_gpu_the_device_and_host_decisions_give_the_same_bits(data_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(data_dir, 2, 0, "--device", "cuda", "--set", "train.skip_threshold=60")
    monkeypatch.setattr(Accelerator, "device_guard", False)
    train(cfg, tmp_path / "host", objective=Poisoned({3, 4, 14}))
    monkeypatch.setattr(Accelerator, "device_guard", None)  # the default on a GPU: on the device
    train(cfg, tmp_path / "device", objective=Poisoned({3, 4, 14}))
    assert_same_run(tmp_path / "host", tmp_path / "device")


@needs_cuda
def test_the_step_captured_in_cuda_graphs_computes_the_compiled_step():
    import copy

    import vaelab.accel.step as speed
    from vaelab import DataSpec, ModelConfig
    from vaelab.conditioning import Batch
    from vaelab.objectives import ELBOObjective
    from vaelab.training.step import train_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6))).cuda()
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (model, twin))
    said: list[str] = []
    plain = speed.FusedGradients(model, ELBOObjective(), 8, "fp32", 1.0, say=lambda s: None)
    graphed = speed.FusedGradients(twin, ELBOObjective(), 8, "fp32", 1.0, say=said.append, graphs=True)
    g, g_twin = torch.Generator("cuda").manual_seed(3), torch.Generator("cuda").manual_seed(3)
    for i in range(6):
        batch = Batch(torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(i)).cuda(), None, None)
        r = train_step(model, opt, ELBOObjective(), batch, 1.0, generator=g, gradient_pass=plain)
        f = train_step(twin, twin_opt, ELBOObjective(), batch, 1.0, generator=g_twin, gradient_pass=graphed)
        assert abs(r.loss - f.loss) <= 1e-4 * abs(r.loss), (i, r.loss, f.loss)
    assert graphed.graphs, said  # captured, no fallback
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


# ---------------------------------------------------------------- conv nets: channels_last (forced here)
def test_a_conv_run_in_channels_last_is_reproducible_resumable_and_computes_the_same_model(data_dir, tmp_path,
                                                                                          monkeypatch):
    """On a GPU conv models train channels_last (NHWC); forced on this CPU: the weights and batches are
    NHWC, a run is bit-identical to itself and to its resumed twin (the optimizer's moments are put back
    in the weights' layout after a checkpoint's plain tensors), and it trains the same model as NCHW up
    to the convolutions' summation order."""
    conv = ("--encoder", "conv", "--decoder", "conv", "--hidden", "4,8")
    cfg = tiny_cfg(data_dir, 2, 4, *conv)
    train(cfg, tmp_path / "nchw")
    monkeypatch.setattr(Accelerator, "channels_last_on", True)
    res = train(cfg, tmp_path / "nhwc")
    convs = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert any(not m.weight.is_contiguous() for m in convs)  # (a 1-channel weight is both)
    train(cfg, tmp_path / "again")
    assert_same_run(tmp_path / "nhwc", tmp_path / "again")
    for stop in (7, 13):
        train(cfg, tmp_path / "resumed", max_steps=stop)
    train(cfg, tmp_path / "resumed")
    assert_same_run(tmp_path / "nhwc", tmp_path / "resumed")
    a, b = (RunDir.of(tmp_path / r).read_metrics() for r in ("nchw", "nhwc"))
    assert abs(a[-1]["val_elbo"] - b[-1]["val_elbo"]) < 1e-3 * abs(a[-1]["val_elbo"])
