"""The training aids of deep hierarchies (issue 26): free bits per group, KL balancing, EMA weights,
skipping updates by their gradient norm; each against a hand computation, and fresh == resumed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import assert_same_run, train_args, write_tiny_mnist

from vaelab import cli
from vaelab.config import RunConfig, TrainConfig
from vaelab.errors import ConfigError
from vaelab.objectives import ELBOObjective, ELBOTerms, LayerKL, kl_balance_coefficients
from vaelab.runs import RunDir, load_checkpoint
from vaelab.runs.run import load_run
from vaelab.training import train
from vaelab.training.ema import EMA
from vaelab.training.session import open_session
from vaelab.training.step import StepResult, TrainState, guard_nonfinite, train_step


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_mnist(tmp_path / "data")


def cfg_of(data_dir: Path, epochs: int, *extra: str) -> RunConfig:
    args = cli.build_parser().parse_args(["train", *train_args(data_dir, epochs, 0, *extra)])
    return cli.config_from_args(args)


def _layer(name: str, kl_per_dim: torch.Tensor) -> LayerKL:
    return LayerKL(name, kl_per_dim.shape[-1], kl_per_dim.sum(-1), kl_per_dim, True)


def _terms(*per_dim: torch.Tensor) -> ELBOTerms:
    return ELBOTerms(torch.zeros(per_dim[0].shape[0]), [_layer(f"z{i + 1}", d) for i, d in enumerate(per_dim)])


# ---------------------------------------------------------------- free bits per group
def test_free_bits_per_group_clamps_each_layers_kl_not_each_dimension():
    """IAF eq. 15 with a group = a layer: max(lambda, E_batch KL_layer); per dim: sum_j max(lambda, E KL_j)."""
    a = torch.tensor([[0.1, 2.0], [0.3, 2.0]], requires_grad=True)  # layer z1: dims with mean KL 0.2, 2.0
    b = torch.tensor([[0.05, 0.05], [0.15, 0.05]], requires_grad=True)  # layer z2: total mean 0.15
    terms = _terms(a, b)
    lam = 0.5
    # per dim: z1 max(.5,.2)+max(.5,2) = 2.5; z2 max(.5,.1)+max(.5,.05) = 1.0
    assert terms.loss(1.0, lam, "dim").item() == pytest.approx(3.5)
    # per group: z1 max(.5, 2.2) = 2.2; z2 max(.5, .15) = .5
    loss = terms.loss(1.0, lam, "group")
    assert loss.item() == pytest.approx(2.7)
    loss.backward()
    # the gradient: z1 penalised as a whole (each element 1/B), z2 below its allowance (none)
    assert torch.equal(a.grad, torch.full_like(a, 0.5)) and torch.equal(b.grad, torch.zeros_like(b))
    with pytest.raises(ConfigError, match="free_bits_per"):
        TrainConfig(free_bits_per="layer")


def test_free_bits_per_group_trains_differently_from_per_dim(data_dir, tmp_path):
    per = {}
    for mode in ("dim", "group"):
        # this tiny model's KL is ~0.05 nats over 4 dimensions: 0.01 per dimension holds some of them,
        # 0.01 for the layer none
        res = train(cfg_of(data_dir, 1, "--free-bits", "0.01", "--free-bits-per", mode), tmp_path / mode, max_steps=3)
        per[mode] = res.model.state_dict()
        assert res.config.train.free_bits_per == mode
    assert any(not torch.equal(per["dim"][k], per["group"][k]) for k in per["dim"])


# ---------------------------------------------------------------- KL warm-up
def test_warm_up_weighs_every_layers_kl_by_the_same_beta():
    from vaelab.training.loop import beta_at

    t = TrainConfig(warmup_epochs=4.0, beta=1.0)
    assert [beta_at(t, e) for e in (0.0, 1.0, 4.0, 9.0)] == [0.0, 0.25, 1.0, 1.0]
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], requires_grad=True)  # z1: batch-mean KL 3.0
    b = torch.tensor([[0.5, 0.0], [0.5, 0.0]], requires_grad=True)  # z2: 0.5
    terms = _terms(a, b)
    terms.loss(0.25).backward()  # = 0.25 * (3.0 + 0.5)
    assert torch.allclose(a.grad, torch.full_like(a, 0.125)) and torch.allclose(b.grad, torch.full_like(b, 0.125))


# ---------------------------------------------------------------- KL balancing
def test_kl_balance_coefficients_against_a_hand_computation():
    # batch-mean |KL| per layer: 3.0 (size 2), 0.5 (size 4), 0.0 (size 1)
    layers = [_layer("z1", torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
              _layer("z2", torch.tensor([[0.25, 0.25, 0.0, 0.0], [0.25, 0.25, 0.0, 0.0]])),
              _layer("z3", torch.zeros(2, 1))]
    raw = [(3.0 + 0.01) / 2, (0.5 + 0.01) / 4, (0.0 + 0.01) / 1]
    mean = sum(raw) / 3
    want = torch.tensor([r / mean for r in raw])
    got = kl_balance_coefficients(layers)
    assert torch.allclose(got, want, rtol=1e-6) and got.sum().item() == pytest.approx(3.0)
    assert not got.requires_grad


def test_kl_balance_weighs_the_layers_during_the_warm_up_only():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.25, 0.25, 0.0, 0.0], [0.25, 0.25, 0.0, 0.0]], requires_grad=True)
    terms = _terms(a, b)
    gamma = kl_balance_coefficients(terms.layers)
    obj = ELBOObjective(kl_balance=True, full_beta=1.0)
    balance = obj.kl_balance and 0.3 < obj.full_beta
    loss = terms.loss(0.3, 0.0, "dim", balance)
    assert loss.item() == pytest.approx(0.3 * (gamma[0] * 3.0 + gamma[1] * 0.5).item())
    loss.backward()
    # d loss / d KL_l(x) = beta * gamma_l / B: the coefficients carry no gradient of their own
    assert torch.allclose(a.grad, torch.full_like(a, 0.3 * gamma[0].item() / 2))
    assert torch.allclose(b.grad, torch.full_like(b, 0.3 * gamma[1].item() / 2))
    # after the warm-up (beta at its final value) and in a compiled graph's tensor form
    assert terms.loss(1.0, 0.0, "dim", obj.kl_balance and 1.0 < obj.full_beta).item() == pytest.approx(3.5)
    for beta, want in ((0.3, loss.item()), (1.0, 3.5)):
        t = torch.tensor(beta)
        assert terms.loss(t, 0.0, "dim", obj.kl_balance and t < obj.full_beta).item() == pytest.approx(want)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(kl_balance=True)


def test_kl_balance_changes_training_of_a_hierarchy_during_warm_up(data_dir, tmp_path):
    out = {}
    for name, extra in (("plain", ()), ("balanced", ("--kl-balance", "true"))):
        res = train(cfg_of(data_dir, 1, "--layers", "2", "--warmup-epochs", "5", *extra), tmp_path / name, max_steps=3)
        out[name] = res.model.state_dict()
    assert any(not torch.equal(out["plain"][k], out["balanced"][k]) for k in out["plain"])


# ---------------------------------------------------------------- EMA
def test_ema_is_the_exponential_average_of_the_applied_steps_and_what_a_run_is_used_with(data_dir, tmp_path):
    """The EMA after N steps equals d^N theta_0 + sum_i (1 - d) d^(N-i) theta_i, the weights after each
    step, computed by hand from a run stopped after each step; the run's checkpoint holds it; the
    evaluation's and pictures' model (Run) is loaded with it, while resume continues the raw weights."""
    d, n = 0.9, 4
    cfg = cfg_of(data_dir, 1, "--ema", str(d))
    # theta_0: the initial weights (a session opened and not trained), then the weights after each step
    thetas = [dict(open_session(cfg, RunDir.of(tmp_path / "init"), None, None, 0, 1).model.state_dict())]
    for i in range(1, n + 1):
        res = train(cfg, tmp_path / "run", max_steps=i)
        thetas.append({k: v.clone() for k, v in res.model.state_dict().items()})
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert ck.ema is not None and set(ck.ema) == set(ck.model)
    for k, e in ck.ema.items():
        want = thetas[0][k].double() * d**n
        for i in range(1, n + 1):
            want = want + (1 - d) * d ** (n - i) * thetas[i][k].double()
        assert torch.allclose(e.double(), want, rtol=1e-5, atol=1e-6), k
        assert torch.equal(ck.model[k], thetas[n][k])  # the raw weights are kept, and trained on
    assert any(not torch.equal(ck.ema[k], ck.model[k]) for k in ck.ema)
    run = load_run(tmp_path / "run", "latest")
    assert run.weights == "ema"
    assert all(torch.equal(v, ck.ema[k]) for k, v in run.model.state_dict().items())


def test_ema_update_skips_frozen_tensors_and_applied_to_restores_bits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(model)
    w0 = before["0.weight"] - 1.0
    assert torch.allclose(ema.tensors["0.weight"], 0.5 * w0 + 0.5 * before["0.weight"])
    assert torch.equal(ema.tensors["0.bias"], before["0.bias"])  # not trained: copied
    assert torch.equal(ema.tensors["1.running_mean"], before["1.running_mean"])  # a buffer: copied
    with ema.applied_to(model) as m:
        assert torch.equal(m[0].weight, ema.tensors["0.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="train.ema"):
        TrainConfig(ema=1.0)


def test_validation_and_best_follow_the_ema_weights(data_dir, tmp_path):
    from vaelab.evaluation.loop import evaluate_batches

    cfg = cfg_of(data_dir, 1, "--ema", "0.5")
    res = train(cfg, tmp_path / "run")
    row = RunDir.of(tmp_path / "run").read_metrics()[-1]
    run = load_run(tmp_path / "run", "best")
    data = run.splits.val
    t = cfg.train
    ev = evaluate_batches(run.model, data.images, data.labels, run.pipeline, k=1, batch_size=t.eval_batch_size,
                          seed=t.seed)
    assert ev.means()["elbo"] == pytest.approx(row["val_elbo"], rel=1e-6)
    raw = load_checkpoint(RunDir.of(tmp_path / "run").best)
    run.model.load_state_dict(raw.model)
    ev_raw = evaluate_batches(run.model, data.images, data.labels, run.pipeline, k=1,
                              batch_size=t.eval_batch_size, seed=t.seed)
    assert ev_raw.means()["elbo"] != pytest.approx(row["val_elbo"], rel=1e-9)
    assert res.state.best_val == row["val_elbo"]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compile"])
def test_resume_with_every_aid_is_bit_identical(data_dir, tmp_path, compile, capsys):
    """Fresh == resumed with every aid on (two layers in their KL warm-up, balanced, free bits per group,
    EMA, skipped updates), eager and compiled (the fused gradient pass computes the balanced loss in its
    graph and reports the norm that train_step's guard reads). This run's gradient norms are 1.6-3.1:
    2.5 skips about half the steps."""
    extra = ("--layers", "2", "--warmup-epochs", "4", "--kl-balance", "true", "--free-bits", "0.01",
             "--free-bits-per", "group", "--ema", "0.9", "--skip-threshold", "2.5",
             *(("--compile",) if compile else ()))
    cfg = cfg_of(data_dir, 2, *extra)
    straight = train(cfg, tmp_path / "straight")
    assert 0 < straight.state.skipped_total < 20
    if compile:  # the fused gradient pass ran (not the eager fallback)
        assert "torch.compile (the whole step)" in capsys.readouterr().out
    # mid-epoch, an epoch's end, mid-epoch again (one stop when compiling: each process compiles anew)
    for stop in (7,) if compile else (7, 10, 13):
        train(cfg, tmp_path / "resumed", max_steps=stop)
    train(cfg, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", "latest")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", "best")
    tensors = load_file(RunDir.of(tmp_path / "straight").latest)
    assert any(k.startswith("ema/") for k in tensors)
    rows = RunDir.of(tmp_path / "straight").read_metrics()
    assert "skipped_total" in rows[-1]


# ---------------------------------------------------------------- skipping updates by gradient norm
class _Quadratic(torch.nn.Module):
    """loss = 0.5 * scale^2 * |w|^2 * x: the gradient norm is set by the batch (scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))


def _objective(model, batch, *, generator, beta):
    scale = batch.x.flatten()[0]
    loss = 0.5 * (scale * model.w).square().sum()
    return loss, ELBOTerms(torch.zeros(1), [])


class _B:
    def __init__(self, scale: float) -> None:
        self.x, self.c, self.mask = torch.full((1, 1), scale), None, None


def test_skip_threshold_skips_exactly_the_steps_at_or_above_it_and_leaves_the_weights():
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = TrainState()
    scales = [1.0, 30.0, 2.0, 50.0, 3.0]  # gradient norm = scale^2 * |w| = 2 scale^2 at w = 1
    for scale in scales:
        before = model.w.detach().clone()
        r = train_step(model, opt, _objective, _B(scale), 1.0, generator=None, skip_threshold=400.0)
        guard_nonfinite(state, r, 3, lambda: "none", lambda m: None)
        state.step += 1
        assert r.skipped == (r.grad_norm >= 400.0) and r.applied == (not r.skipped)
        if r.skipped:
            assert torch.equal(model.w, before) and model.w.grad is None
        else:
            assert not torch.equal(model.w, before)
    assert state.skipped_total == 2 and state.nonfinite_total == 0 and state.nonfinite_run == 0
    # without the threshold every finite step is applied
    r = train_step(model, opt, _objective, _B(50.0), 1.0, generator=None)
    assert r.applied and not r.skipped


def test_norm_skips_do_not_count_towards_the_nonfinite_halt():
    state = TrainState()
    skipped = StepResult(1.0, 1e6, 0.0, 0.0, 1, False, False, True)
    nonfinite = StepResult(math.nan, math.nan, 0.0, 0.0, 1, False)
    for r in (nonfinite, skipped, skipped, nonfinite):
        guard_nonfinite(state, r, 3, lambda: "x", lambda m: None)
    assert state.nonfinite_run == 2 and state.nonfinite_total == 2 and state.skipped_total == 2


def test_skip_threshold_in_a_run_counts_and_reports(data_dir, tmp_path):
    res = train(cfg_of(data_dir, 1, "--skip-threshold", "1e-6"), tmp_path / "all", max_steps=4)
    assert res.state.skipped_total == 4 and res.state.nonfinite_total == 0
    init = train(cfg_of(data_dir, 1, "--skip-threshold", "1e-6"), tmp_path / "all2", max_steps=1).model.state_dict()
    assert all(torch.equal(v, init[k]) for k, v in res.model.state_dict().items())  # nothing was applied
    res = train(cfg_of(data_dir, 1, "--skip-threshold", "1e9"), tmp_path / "none")
    assert res.state.skipped_total == 0
    assert RunDir.of(tmp_path / "none").read_metrics()[-1]["skipped_total"] == 0
