"""SIGTERM and SIGINT during training (docs/reliability.md, "Signals"): a checkpoint at the next step
boundary, exit code 143/130 with one line naming the resume command, and a resumed run that is
bit-identical to one never interrupted. Signals are real (``os.kill``), sent at a chosen step from
inside the process (deterministic) or from outside at a random moment (a real ``vaelab train``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_reliability import assert_same_run, tiny_cfg, train_args, write_tiny_mnist

import vaelab.runs.checkpoint as ckmod
import vaelab.training.loop as loopmod
from vaelab import cli
from vaelab.errors import Interrupted
from vaelab.runs import load_checkpoint
from vaelab.training import train


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_mnist(tmp_path / "data")


def _signal_before_step(monkeypatch, sig: int, step: int) -> list[int]:
    """Send ``sig`` to this process as 0-based training step ``step`` starts: training stops after
    that step, the ``step + 1``-th."""
    real, calls = loopmod.take_step, [0]

    def spy(*a, **k):
        if calls[0] == step:
            os.kill(os.getpid(), sig)
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(loopmod, "take_step", spy)
    return calls  # steps started so far


@pytest.mark.parametrize(
    ("sig", "code", "at", "where"),
    [(signal.SIGTERM, 143, 12, "at step 13 (epoch 2, batch 3)"),
     (signal.SIGINT, 130, 12, "at step 13 (epoch 2, batch 3)"),
     (signal.SIGTERM, 143, 19, "at the end of epoch 2 (step 20)")],
    ids=["SIGTERM-mid-epoch", "SIGINT-mid-epoch", "SIGTERM-last-step-of-an-epoch"],
)
def test_a_signal_checkpoints_at_the_next_step_exits_and_resumes_bit_identically(
        data_dir, tmp_path, monkeypatch, capsys, sig, code, at, where):
    train(tiny_cfg(data_dir, 3), tmp_path / "straight")
    run = tmp_path / "signalled"
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _signal_before_step(monkeypatch, sig, at)
    assert cli.main(["train", "--run", str(run), *train_args(data_dir, 3)]) == code
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    err = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(sig).name
    assert err == [f"vaelab: training stopped by {name} {where}; the last checkpoint is "
                   f"{run}/checkpoints/latest.safetensors; resume with: vaelab train --resume {run}"]
    ck = load_checkpoint(run / "checkpoints" / "latest.safetensors")
    assert ck.state["step"] == at + 1
    assert cli.main(["train", "--resume", str(run), "--threads", "1", "--no-progress"]) == 0
    assert_same_run(tmp_path / "straight", run, "latest")
    assert_same_run(tmp_path / "straight", run, "best")


def test_a_second_signal_during_the_checkpoint_write_changes_nothing(data_dir, tmp_path, monkeypatch):
    """torchrun and Slurm each pass a scheduler's SIGTERM on, so a worker often gets two: the second,
    arriving while the checkpoint is written, must neither interrupt nor corrupt it."""
    train(tiny_cfg(data_dir, 2), tmp_path / "straight")
    run = tmp_path / "run"
    steps = _signal_before_step(monkeypatch, signal.SIGTERM, 12)
    real_fsync, sent = os.fsync, []

    def fsync_then_signal(fd):  # once signalled: two more signals in the middle of writing latest
        if steps[0] > 12 and not sent and "latest" in os.readlink(f"/proc/self/fd/{fd}"):
            sent.append(fd)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real_fsync(fd)

    monkeypatch.setattr(ckmod.os, "fsync", fsync_then_signal)
    with pytest.raises(Interrupted) as e:
        train(tiny_cfg(data_dir, 2), run)
    monkeypatch.undo()
    assert sent and e.value.exit_code == 143 and "by SIGTERM at step 13" in str(e.value)
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert load_checkpoint(run / "checkpoints" / "latest.safetensors").state["step"] == 13
    train(tiny_cfg(data_dir, 2), run)
    assert_same_run(tmp_path / "straight", run)


def test_handlers_are_restored_and_not_installed_outside_the_main_thread(data_dir, tmp_path):
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train(tiny_cfg(data_dir, 1), tmp_path / "main")
        assert signal.getsignal(signal.SIGTERM) is mine
        errors: list[BaseException] = []

        def work():
            try:
                train(tiny_cfg(data_dir, 1), tmp_path / "thread")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=work)
        t.start()
        t.join(120)
        assert not errors, errors  # signal.signal outside the main thread would raise ValueError
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_to_a_real_training_process_at_a_random_moment(data_dir, tmp_path):
    """A real ``vaelab train``, sent SIGTERM from outside at a random moment after its first
    checkpoint: exit code 143, one line (after the notice that the signal was received), and the run
    resumed by the command it names ends bit-identical to an uninterrupted one."""
    seed = int.from_bytes(os.urandom(4), "little")
    epochs = 20
    train(tiny_cfg(data_dir, epochs), tmp_path / "straight")
    run = tmp_path / "run"
    latest = run / "checkpoints" / "latest.safetensors"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "train", "--run", str(run), *train_args(data_dir, epochs)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    delay = random.Random(seed).uniform(0.0, 0.2)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"seed {seed}, delay {delay:.3f}: {err}"
    lines = err.strip().splitlines()
    assert lines[0] == "vaelab: SIGTERM received: stopping after this step, once the checkpoint is written"
    assert len(lines) == 2 and lines[1].startswith("vaelab: training stopped by SIGTERM at "), err
    assert lines[1].endswith(f"resume with: vaelab train --resume {run}") and "Traceback" not in err
    assert cli.main(["train", "--resume", str(run)]) == 0
    try:
        assert_same_run(tmp_path / "straight", run)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, delay {delay:.3f}: {e}") from None
