"""Reliability promises of training (docs/reliability.md): complete checkpoints, atomic writes that
survive a full disk, bit-identical resume (also after SIGKILL of a real training process), the
non-finite guard, gradient clipping, and one writer per run directory."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaelab.runs.checkpoint as ckmod
from vaelab import cli
from vaelab.config import DataSpec, RunConfig
from vaelab.data import write_idx
from vaelab.errors import CheckpointError, NonFiniteError, RunLockedError
from vaelab.objectives import ELBOObjective
from vaelab.runs import RunDir, RunLock, load_checkpoint, save_checkpoint
from vaelab.training import make_optimizer, train

TIMING = {"elapsed_s"}  # metrics fields that measure time and so differ between runs


# ---------------------------------------------------------------- tiny data and configs
def write_tiny_mnist(folder: Path, n_train: int = 200, n_test: int = 40, size: int = 8) -> Path:
    """IDX files of a tiny MNIST-like data set (random pixels, labels 0..9) in ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    return folder


def train_args(data_dir: Path, epochs: int = 3, every: int = 0, *extra: str) -> list[str]:
    """CLI options of a tiny run: 160 training images of 8x8, batches of 16 -> 10 steps per epoch."""
    return ["--data", "mnist", "--data-dir", str(data_dir), "--no-download", "--val-size", "40",
            "--latent-dim", "4", "--hidden", "32", "--epochs", str(epochs), "--batch-size", "16",
            "--threads", "1", "--device", "cpu", "--no-progress", "--set", f"train.checkpoint_every={every}", *extra]


def tiny_cfg(data_dir: Path, epochs: int = 3, every: int = 0, *extra: str) -> RunConfig:
    """Exactly the config that ``vaelab train`` builds from :func:`train_args`."""
    args = cli.build_parser().parse_args(["train", *train_args(data_dir, epochs, every, *extra)])
    return cli.config_from_args(args)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_mnist(tmp_path / "data")


def assert_same_run(a: Path, b: Path, which: str = "latest") -> None:
    """Bit-identical final checkpoints (every tensor: model, optimizer, RNG) and equal metrics."""
    fa, fb = (RunDir.of(r).checkpoint(which) for r in (a, b))
    ta, tb = load_file(fa), load_file(fb)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("model/") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{which}: tensors differ after resume: {different}"
    sa, sb = load_checkpoint(fa).state, load_checkpoint(fb).state
    for s in (sa, sb):
        s.pop("elapsed")
    assert sa == sb
    ma = [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir.of(a).read_metrics()]
    mb = [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir.of(b).read_metrics()]
    assert ma == mb and ma


# ---------------------------------------------------------------- 1. what a checkpoint holds
def test_checkpoint_holds_model_optimizer_counters_every_rng_and_config(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, every=4)
    res = train(cfg, tmp_path / "run", max_steps=13)  # stops mid-epoch 2
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert ck.config == res.config
    assert set(ck.model) == set(res.model.state_dict())
    assert all(torch.equal(ck.model[k], v) for k, v in res.model.state_dict().items())
    assert ck.optimizer is not None and len(ck.optimizer["state"]) == len(list(res.model.parameters()))
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(ck.optimizer["state"][0])
    assert (ck.state["epoch"], ck.state["step"], ck.state["step_in_epoch"]) == (1, 13, 3)
    assert ck.state["sums"]["n"] == 3 * 16  # the running sums of the unfinished epoch
    assert {"torch", "numpy", "noise/0"} <= set(ck.rng)  # noise: z draws, binarization, conditions
    assert {"numpy", "python"} <= set(ck.state["rng_meta"])
    # The global RNGs are restored exactly from what was saved.
    saved_torch = ck.rng["torch"].clone()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    ckmod.restore_global_rng(ck.rng, ck.state["rng_meta"])
    assert torch.equal(torch.get_rng_state(), saved_torch)
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckmod.restore_global_rng(ck.rng, ck.state["rng_meta"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == a


# ---------------------------------------------------------------- 2. exact resume, in process
@pytest.mark.parametrize(
    ("every", "stops"),
    [(0, (7,)), (0, (10,)), (4, (3, 17, 26)), (3, (9, 12))],
    ids=["mid-epoch", "epoch-boundary", "three-stops-every4", "on-checkpoint-step"],
)
def test_resume_after_max_steps_is_bit_identical(data_dir, tmp_path, every, stops):
    cfg = tiny_cfg(data_dir, epochs=3, every=every)
    train(cfg, tmp_path / "straight")
    for s in stops:
        res = train(cfg, tmp_path / "resumed", max_steps=s)
        assert res.state.step == s
    train(cfg, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", "latest")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", "best")


def test_more_epochs_continue_a_finished_run(data_dir, tmp_path):
    train(tiny_cfg(data_dir, epochs=3), tmp_path / "straight")
    train(tiny_cfg(data_dir, epochs=2), tmp_path / "extended")
    train(tiny_cfg(data_dir, epochs=3), tmp_path / "extended")
    assert_same_run(tmp_path / "straight", tmp_path / "extended")


def test_without_validation_data_best_is_the_latest(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, 2, 0, "--set", "data.val_size=0")
    train(cfg, tmp_path / "run")
    run = RunDir.of(tmp_path / "run")
    assert not run.best.exists()
    assert run.checkpoint("best") == run.latest
    assert load_checkpoint(run.checkpoint("best")).state["epoch"] == 2


# ---------------------------------------------------------------- 2b. SIGKILL of a real process
def _checkpoint_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def test_sigkill_at_random_moments_then_resume_is_bit_identical(data_dir, tmp_path):
    """A real ``vaelab train`` is SIGKILLed three times at random moments after it starts writing
    checkpoints (often mid-write: it checkpoints every 2 steps), resumed each time by re-running the
    command or by ``--resume``, and ends bit-identical to an uninterrupted run."""
    seed = int.from_bytes(os.urandom(4), "little")
    rnd = random.Random(seed)
    args = train_args(data_dir, 6, 2)
    train(tiny_cfg(data_dir, 6, 2), tmp_path / "straight")

    run = tmp_path / "killed"
    latest = run / "checkpoints" / "latest.safetensors"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    commands = [["train", "--run", str(run), *args], ["train", "--run", str(run), *args],
                ["train", "--resume", str(run), "--threads", "1", "--no-progress"]]
    delays, kills = [], 0
    for command in commands:
        before = _checkpoint_id(latest)
        proc = subprocess.Popen([sys.executable, "-m", "vaelab", *command], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _checkpoint_id(latest) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        delay = rnd.uniform(0.0, 0.3)
        delays.append(round(delay, 3))
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), f"seed {seed}: {err.decode()}"
        if proc.returncode == 0:
            break
    assert kills >= 1, f"seed {seed}: the run finished before any kill (delays {delays})"
    # The last resume runs in this process (same CLI code path; saves a fourth interpreter start).
    assert cli.main(["train", "--resume", str(run), "--threads", "1", "--no-progress"]) == 0
    assert not list((run / "checkpoints").glob(".*.tmp")), "temporary files of killed writes were not cleaned"
    try:
        assert_same_run(tmp_path / "straight", run, "latest")
        assert_same_run(tmp_path / "straight", run, "best")
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, kill delays {delays}: {e}") from None


# ---------------------------------------------------------------- 1b. a full disk mid-write
class _FullDisk(Exception):
    pass


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_for(target: str, real):
    """``real`` (os.fsync, os.replace or os.fdopen), failing with ENOSPC on files named ``target``."""

    def name_of(arg) -> str:
        return os.readlink(f"/proc/self/fd/{arg}") if isinstance(arg, int) else str(arg)

    def wrapped(*a, **k):
        names = [name_of(x) for x in a if isinstance(x, (int, str, os.PathLike))]
        if any(target in n for n in names):
            if real is os.fdopen:
                return _HalfWriter(real(*a, **k))
            _enospc()
        return real(*a, **k)

    return wrapped


class _HalfWriter:
    """A file object whose write stores half the data, then fails as a full disk does."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        _enospc()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_disk_full_mid_write_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, failing):
    cfg = tiny_cfg(data_dir, 1, 3)
    train(cfg, tmp_path / "run")  # epoch 1 done: latest at step 10
    latest = tmp_path / "run" / "checkpoints" / "latest.safetensors"
    good = latest.read_bytes()
    real = {"write": os.fdopen, "fsync": os.fsync, "replace": os.replace}[failing]
    monkeypatch.setattr(ckmod.os, "fdopen" if failing == "write" else failing, _full_for("latest.safetensors", real))
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(data_dir, 2, 3), tmp_path / "run")  # first write: the step-12 checkpoint
    monkeypatch.undo()
    msg = str(e.value)
    assert str(latest) in msg and "No space left on device" in msg and "intact" in msg
    assert "training stopped at step 12" in msg
    assert latest.read_bytes() == good
    assert not list(latest.parent.glob(".*.tmp"))
    # With space again, re-running resumes from the intact checkpoint as if nothing had happened.
    train(tiny_cfg(data_dir, 2, 3), tmp_path / "run")
    train(tiny_cfg(data_dir, 2, 3), tmp_path / "straight")
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_disk_full_on_metrics_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ckmod.os, "fsync", _full_for("metrics.jsonl", os.fsync))
    with pytest.raises(CheckpointError, match="could not append to .*metrics.jsonl: No space left on device"):
        train(tiny_cfg(data_dir, 1), tmp_path / "run")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "checkpoints" / "latest.safetensors").exists()
    train(tiny_cfg(data_dir, 1), tmp_path / "run")  # the torn metrics line does not get in the way
    assert len(RunDir.of(tmp_path / "run").read_metrics()) == 1


def test_disk_full_through_the_cli_is_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--run", str(run), *train_args(data_dir, 1)]) == 0
    monkeypatch.setattr(ckmod.os, "replace", _enospc)
    assert cli.main(["train", "--run", str(run), *train_args(data_dir, 2)]) == 2
    err = capsys.readouterr().err
    assert "vaelab: error: training stopped at step 20: could not write" in err
    assert "best.safetensors: No space left on device" in err  # best is written first, then latest
    assert "Traceback" not in err


# ---------------------------------------------------------------- 3. non-finite guard
class Poisoned(ELBOObjective):
    """The ELBO objective with a non-finite loss (kind="loss") or only a non-finite gradient
    (kind="grad") at the given 0-based training steps."""

    def __init__(self, bad_steps: set[int], kind: str = "loss") -> None:
        super().__init__()
        object.__setattr__(self, "bad", (bad_steps, kind, [0]))

    def __call__(self, model, batch, *, generator, beta=1.0):
        bad_steps, kind, calls = self.bad
        terms = super().__call__(model, batch, generator=generator, beta=beta)[1]
        step = calls[0]
        calls[0] += 1
        if step in bad_steps:
            lp = terms.log_px_z
            if kind == "loss":
                terms.log_px_z = lp * float("nan")
            else:  # finite value, infinite gradient: d/dx sqrt(x) at 0
                terms.log_px_z = lp + torch.sqrt(lp - lp.detach())
        return terms.loss(beta), terms


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_counted_and_logged(data_dir, tmp_path, capsys, kind):
    res = train(tiny_cfg(data_dir, 2, 0, "--set", "train.max_nonfinite=4"), tmp_path / "run",
                objective=Poisoned({3, 4, 5, 14}, kind))
    rows = RunDir.of(tmp_path / "run").read_metrics()
    assert [r["nonfinite_total"] for r in rows] == [3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    out = capsys.readouterr()
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in out.out + out.err
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert ck.state["nonfinite_total"] == 4 and ck.state["step"] == 20
    assert int(ck.optimizer["state"][0]["step"]) == 16  # skipped steps never reached Adam
    assert all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values())


def test_too_many_consecutive_nonfinite_steps_stop_with_the_last_good_checkpoint(data_dir, tmp_path):
    train(tiny_cfg(data_dir, 1), tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "latest.safetensors"
    good = latest.read_bytes()
    with pytest.raises(NonFiniteError) as e:
        train(tiny_cfg(data_dir, 3, 0, "--set", "train.max_nonfinite=5"), tmp_path / "run",
              objective=Poisoned(set(range(2, 100))))
    assert "5 consecutive non-finite" in str(e.value) and str(latest) in str(e.value)
    assert latest.read_bytes() == good


def test_nonfinite_weights_are_never_saved_over_a_good_checkpoint(data_dir, tmp_path):
    def make(model, cfg):  # an optimizer whose 5th step corrupts the weights
        opt = make_optimizer(model, cfg)
        step, count = opt.step, {"n": 0}

        def corrupting_step(*a, **k):
            out = step(*a, **k)
            count["n"] += 1
            if count["n"] == 5:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("inf")
            return out

        opt.step = corrupting_step
        return opt

    with pytest.raises(NonFiniteError) as e:
        train(tiny_cfg(data_dir, 2, 3), tmp_path / "run", optimizer=make)
    latest = tmp_path / "run" / "checkpoints" / "latest.safetensors"
    # From step 5 on every step is skipped: nothing is checkpointed while that goes on (not at step 6,
    # not at the end of epoch 1), and epoch 2, in which no step succeeds, stops the run.
    assert f"Last good checkpoint: {latest}" in str(e.value)
    assert "epoch 2: every step was skipped" in str(e.value)
    assert load_checkpoint(latest).state["step"] == 3  # the last good one, untouched


def test_save_checkpoint_refuses_nonfinite_state(tmp_path):
    good = ckmod.Checkpoint(RunConfig(), DataSpec(), {"w": torch.ones(3)}, None, {"step": 1})
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, good)
    before = path.read_bytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="refusing to write .*w"):
            save_checkpoint(path, ckmod.Checkpoint(RunConfig(), DataSpec(), {"w": torch.tensor([1.0, bad])}, None, {}))
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.tensor([float("nan")])}},
           "param_groups": [{"params": [0]}]}
    with pytest.raises(NonFiniteError, match="exp_avg"):
        save_checkpoint(path, ckmod.Checkpoint(RunConfig(), DataSpec(), {"w": torch.ones(3)}, opt, {}))
    assert path.read_bytes() == before


def test_huge_learning_rate_stops_cleanly_with_finite_checkpoint(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, 3, 2, "--lr", "1e30", "--set", "train.max_nonfinite=3")
    with pytest.raises(NonFiniteError):
        train(cfg, tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "latest.safetensors"
    if latest.exists():
        ck = load_checkpoint(latest)
        assert all(bool(torch.isfinite(v).all()) for v in ck.model.values())


def test_grad_clip_bounds_the_global_gradient_norm(data_dir, tmp_path):
    norms: list[float] = []

    def make(model, cfg):  # record the gradient norm Adam is given
        opt = make_optimizer(model, cfg)
        step = opt.step

        def spy(*a, **k):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return step(*a, **k)

        opt.step = spy
        return opt

    train(tiny_cfg(data_dir, 1), tmp_path / "free", optimizer=make)
    free = list(norms)
    assert max(free) > 1.0  # so that clipping at 1 changes something
    norms.clear()
    res = train(tiny_cfg(data_dir, 1, 0, "--grad-clip", "1.0"), tmp_path / "clipped", optimizer=make)
    assert res.config.train.grad_clip == 1.0 and len(norms) == len(free)
    assert max(norms) <= 1.0 + 1e-5


# ---------------------------------------------------------------- 6. one writer per run
def _hold_lock_in_child(run: Path) -> int:
    """Fork a child that takes the run lock and sleeps; returns its pid once it holds the lock."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no torch work, just the lock
        try:
            os.close(r)
            RunLock(run).acquire()
            os.write(w, b"locked")
            time.sleep(300)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 16) == b"locked"
    os.close(r)
    return pid


def test_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(data_dir, tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock_in_child(run)
    try:
        second = subprocess.run([sys.executable, "-m", "vaelab", "train", "--run", str(run),
                                 *train_args(data_dir, 1)], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert "another vaelab process is training into this run" in second.stderr
        assert f"pid {holder}" in second.stderr and "Traceback" not in second.stderr
        assert not (run / "checkpoints").exists()
        with pytest.raises(RunLockedError, match=f"pid {holder}"):  # and from Python, in this process
            train(tiny_cfg(data_dir, 1), run)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    # The killed holder's lock file is still there, naming a dead pid: it is stale and taken over.
    assert f"pid {holder}" in (run / ".lock").read_text()
    res = train(tiny_cfg(data_dir, 1), run)
    assert res.state.epoch == 1
    assert f"pid {os.getpid()}" in (run / ".lock").read_text()


def test_lock_is_released_after_training_and_on_errors(data_dir, tmp_path):
    train(tiny_cfg(data_dir, 1), tmp_path / "run")
    RunLock(tmp_path / "run").acquire().release()
    with pytest.raises(NonFiniteError):
        train(tiny_cfg(data_dir, 2, 0, "--set", "train.max_nonfinite=2"), tmp_path / "run",
              objective=Poisoned(set(range(100))))
    with RunLock(tmp_path / "run"):
        pass


def test_run_directory_metrics_tolerate_a_torn_last_line(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, 2)
    train(cfg, tmp_path / "straight")
    train(tiny_cfg(data_dir, 1), tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "step": 20, "train_lo')  # killed mid-append
    assert len(RunDir.of(tmp_path / "run").read_metrics()) == 1
    train(cfg, tmp_path / "run")
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


# ---------------------------------------------------------------- what an epoch's line and row report
def _epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ") and " train " in line]


def test_iwae_run_is_validated_by_the_bound_it_trains_and_says_so(data_dir, tmp_path, capsys):
    args = train_args(data_dir, 2, 0, "--iwae-k", "5")
    assert cli.main(["train", *args, "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    lines = _epoch_lines(out)
    assert len(lines) == 2, out
    for line in lines:  # both numbers are -L_5: they compare
        assert "train -L_5 " in line and "val -L_5 " in line and "-ELBO" in line and "train loss" not in line, line
    rows = RunDir.of(tmp_path / "run").read_metrics()
    assert all(math.isfinite(r["val_lk"]) and math.isfinite(r["val_elbo"]) for r in rows)
    assert sum(r["val_lk"] for r in rows) >= sum(r["val_elbo"] for r in rows)  # L_k >= ELBO
    assert f"val -L_5 {-rows[-1]['val_lk']:.2f}, -ELBO {-rows[-1]['val_elbo']:.2f}" in lines[-1]
    assert "validation -L_5 " in out  # the command's closing line too
    # deterministic: a run stopped mid-way and resumed gives the same rows (val_lk included), bit for bit
    cfg = tiny_cfg(data_dir, 2, 0, "--iwae-k", "5")
    train(cfg, tmp_path / "resumed", max_steps=13)
    train(cfg, tmp_path / "resumed")
    train(cfg, tmp_path / "straight")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert [r["val_lk"] for r in RunDir.of(tmp_path / "straight").read_metrics()] == [r["val_lk"] for r in rows]


def test_elbo_run_labels_both_numbers_minus_elbo(data_dir, tmp_path, capsys):
    assert cli.main(["train", *train_args(data_dir, 1), "--run", str(tmp_path / "run")]) == 0
    (line,) = _epoch_lines(capsys.readouterr().out)
    assert "train -ELBO " in line and "val -ELBO " in line and "L_" not in line, line
    assert "val_lk" not in RunDir.of(tmp_path / "run").read_metrics()[0]
    assert cli.main(["train", *train_args(data_dir, 1, 0, "--beta", "0.5"), "--run", str(tmp_path / "beta")]) == 0
    (line,) = _epoch_lines(capsys.readouterr().out)
    assert "train loss (β applied) " in line and "val -ELBO " in line, line  # what was minimised is not the ELBO
