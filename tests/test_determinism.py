"""The determinism contract, end to end (docs/reliability.md): the same command, seed, machine and torch
give the same bits, fresh or resumed, in every mode. Every run here is the real CLI in a fresh process
(``python -m vaelab train``), so nothing is shared between runs but what a machine shares: the files of
the run directory, the persisted kernel decisions (``$XDG_CACHE_HOME/vaelab/kernels/<machine>.json``) and
inductor's cache of compiled kernels (one per test session here, so that compiles after the first are
warm, as they are on a user's machine).

The runs are tiny (160 images of 8x8, batches of 16: 10 steps an epoch) but with a hidden layer of 1024,
so that two of the model's linear shapes (64x1024, 1024x64) are large enough for the kernel plan to
decide something (kernels.MIN_FLOPS): on a machine where oneDNN wins they run on it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import TIMING, assert_same_run, train_args, write_tiny_mnist

from vaelab.accel import KernelPlan, compiler, kernels
from vaelab.runs import RunDir
from vaelab.runs.checkpoint import read_metadata

HIDDEN = 1024
SHAPES = {(4, HIDDEN), (64, HIDDEN), (HIDDEN, 8), (HIDDEN, 64)}  # (in, out) of the model's linear layers
MODES = {
    "default": (),
    "bf16": ("--precision", "bf16"),
    "vamp-2layers": ("--prior", "vamp", "--layers", "2", "--prior-components", "5"),
    "onednn": ("--set", "train.kernels=onednn"),
    "compile": ("--compile",),
}
TIMEOUT = 300  # seconds a single run may take (they take ~3 s; a cold compile ~15 s)
needs_onednn = pytest.mark.skipif(not compiler.has("onednn_linear"), reason="this torch has no oneDNN linear")


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory) -> Path:
    """Inductor's cache, shared by every process of this test session."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_mnist(tmp_path / "data")


@pytest.fixture
def machine(tmp_path: Path, inductor_cache: Path) -> Machine:
    return Machine(tmp_path / "xdg", inductor_cache)


class Machine:
    """What the processes of one test share, as processes on one machine do: $XDG_CACHE_HOME (its kernel
    decisions) and inductor's cache."""

    def __init__(self, xdg: Path, inductor: Path) -> None:
        self.xdg = xdg
        self.command = [sys.executable, "-m", "vaelab"]
        self.env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "TORCHINDUCTOR_CACHE_DIR": str(inductor),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("VAELAB_DATA", None)

    @property
    def kernels_dir(self) -> Path:
        return self.xdg / "vaelab" / "kernels"

    def cache_file(self) -> Path:
        """The one file of kernel decisions (the test processes all have one key: same CPU, torch, threads)."""
        files = sorted(self.kernels_dir.glob("*.json"))
        assert len(files) == 1, f"expected one file of kernel decisions, found {files}"
        return files[0]

    def start(self, run: Path, args: list[str] | tuple[str, ...]) -> subprocess.Popen:
        return subprocess.Popen([*self.command, "train", "--run", str(run), *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def train(self, run: Path, args: list[str] | tuple[str, ...]) -> str:
        """``vaelab train --run RUN ARGS`` to the end; its output (stdout and stderr)."""
        proc = self.start(run, args)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"vaelab train --run {run} {' '.join(args)} failed ({proc.returncode}):\n{out}\n{err}"
        return out + err


def args_of(data_dir: Path, epochs: int = 2, every: int = 0, *extra: str) -> list[str]:
    return train_args(data_dir, epochs, every, "--hidden", str(HIDDEN), *extra)


def recorded_plan(run: Path) -> str:
    return json.loads((run / "config.json").read_text())["train"]["kernels"]


def header(path: Path) -> dict:
    """A safetensors file's header alone (the checkpoint's metadata), without reading its tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def checkpoint_step(path: Path) -> int | None:
    try:
        return json.loads(header(path)["__metadata__"]["state"])["step"]
    except FileNotFoundError:
        return None


def metadata_without_timing(path: Path) -> dict:
    meta = {k: json.loads(v) if k != "format" else v for k, v in read_metadata(path).items()}
    elapsed = meta["state"].pop("elapsed")
    assert isinstance(elapsed, float)
    return meta


def assert_identical(a: Path, b: Path) -> None:
    """Two runs gave the same bits: every tensor of both checkpoints, their whole metadata but the
    timing, the metrics rows but their timing fields, and the same config.json."""
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    for which in ("latest", "best"):
        assert_same_run(a, b, which)
        fa, fb = RunDir.of(a).checkpoint(which), RunDir.of(b).checkpoint(which)
        ma, mb = metadata_without_timing(fa), metadata_without_timing(fb)
        assert ma == mb, f"{which}: checkpoint metadata differ in {[k for k in ma if ma[k] != mb.get(k)]}"
        ta, tb = load_file(fa), load_file(fb)
        assert {k: (v.dtype, v.shape) for k, v in ta.items()} == {k: (v.dtype, v.shape) for k, v in tb.items()}
    rows = [RunDir.of(r).read_metrics() for r in (a, b)]
    assert [set(r) for r in rows[0]] == [set(r) for r in rows[1]]
    assert all(TIMING <= set(r) for r in rows[0])  # the timing fields left out of the comparison are there


def plan_from_cache(decisions: dict[str, int], shapes=SHAPES, rows: int = 16) -> dict[tuple[int, int], int]:
    """The plan ``auto`` takes from a machine's decisions for linear layers of ``shapes`` (in, out) at
    ``rows`` rows (a batch)."""
    return {(i, o): decisions[f"{rows}x{i}x{o}"] for i, o in shapes}


# ---------------------------------------------------------------- 1. two fresh processes, every mode
@pytest.mark.parametrize("mode", [
    "default", "bf16", "vamp-2layers", pytest.param("onednn", marks=needs_onednn),
    pytest.param("compile", marks=pytest.mark.slow),
])
def test_two_fresh_processes_of_one_command_give_the_same_bits(data_dir, tmp_path, machine, mode):
    a, b = tmp_path / "a", tmp_path / "b"
    args = args_of(data_dir, 2, 0, *MODES[mode])
    out = machine.train(a, args)
    if mode == "onednn":  # a rule of its own, the same on every machine: recorded as such, nothing measured
        assert recorded_plan(a) == "onednn"
        assert not machine.kernels_dir.exists()
        again = machine.train(b, args)
        assert not machine.kernels_dir.exists()
    else:
        cache = machine.cache_file()
        first = (cache.stat().st_ino, cache.stat().st_mtime_ns, cache.read_bytes())
        again = machine.train(b, args)
        # the second process took the machine's decisions: it measured nothing and rewrote nothing
        assert (cache.stat().st_ino, cache.stat().st_mtime_ns, cache.read_bytes()) == first
        # auto is recorded as the plan it resolved to: the machine's persisted decisions
        plan = KernelPlan.parse(recorded_plan(a)).bits
        assert plan == plan_from_cache(json.loads(cache.read_text())["decisions"], plan)
    assert_identical(a, b)

    # the plan the run computed with, layer shape by layer shape, kept in its checkpoint
    computed = KernelPlan.parse(json.loads(read_metadata(RunDir.of(a).latest)["state"])["accel"]["kernels"]).bits
    assert SHAPES <= set(computed)  # the VampPrior's two stochastic layers have more shapes
    assert set(computed) == SHAPES or mode == "vamp-2layers"
    if mode == "onednn":
        assert set(computed.values()) == {kernels.FWD | kernels.DX | kernels.DW}
    else:
        assert computed == plan
    if mode == "compile":  # really compiled (a fallback to eager would make this the default mode again)
        for text in (out, again):
            assert "torch.compile (the " in text and "eagerly" not in text, text
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["train"]["compile"] == (mode == "compile")
    assert cfg["train"]["precision"] == ("bf16" if mode == "bf16" else "fp32")


# ---------------------------------------------------------------- 2. the run records its kernel plan
def test_a_run_records_its_plan_and_its_config_reproduces_it_without_the_cache(data_dir, tmp_path, machine):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    machine.train(a, args_of(data_dir))
    plan = recorded_plan(a)
    assert plan != "auto"
    cache = machine.cache_file()
    body = json.loads(cache.read_text())
    assert KernelPlan.parse(plan).bits == plan_from_cache(body["decisions"])

    # the machine's decisions cleared: the run's own config still gives its plan and its bits
    shutil.rmtree(machine.kernels_dir)
    machine.train(b, ["--config", str(a / "config.json"), "--threads", "1", "--no-progress"])
    assert recorded_plan(b) == plan
    assert_identical(a, b)

    # the machine's decisions now say the opposite of what the run took: its config still wins
    machine.kernels_dir.mkdir(parents=True, exist_ok=True)
    body["decisions"] = {k: 7 - v for k, v in body["decisions"].items()}
    cache.write_text(json.dumps(body))
    machine.train(c, ["--config", str(a / "config.json"), "--threads", "1", "--no-progress"])
    assert recorded_plan(c) == plan
    assert_identical(a, c)


def test_auto_takes_the_machines_persisted_decisions_not_a_timing_of_its_own(data_dir, tmp_path, machine):
    """A process does not time kernels when the machine already decided: a decision written into the
    machine's file (here: the opposite of what was measured) is what the next run records and uses."""
    args = args_of(data_dir, 1)
    machine.train(tmp_path / "a", args)
    cache = machine.cache_file()
    body = json.loads(cache.read_text())
    assert body["version"] == 1 and body["threads"] == 1
    measured = body["decisions"]
    assert KernelPlan.parse(recorded_plan(tmp_path / "a")).bits == plan_from_cache(measured)
    flipped = {k: 7 - v for k, v in measured.items()}
    body["decisions"] = flipped
    cache.write_text(json.dumps(body))
    machine.train(tmp_path / "b", args)
    assert KernelPlan.parse(recorded_plan(tmp_path / "b")).bits == plan_from_cache(flipped)


# ---------------------------------------------------------------- 3. killed, then the same command again
@pytest.fixture(scope="module")
def straight(tmp_path_factory, inductor_cache) -> tuple[Machine, list[str], Path]:
    """A machine, a command (30 steps; checkpoints at every 3rd step and at each epoch's end) and its
    uninterrupted run, which the interrupted runs of the command on that machine are compared with."""
    root = tmp_path_factory.mktemp("straight")
    machine = Machine(root / "xdg", inductor_cache)
    args = args_of(write_tiny_mnist(root / "data"), 3, 3)
    machine.train(root / "run", args)
    return machine, args, root / "run"


def _wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _at_step(latest: Path, target: int) -> Callable[[], bool]:
    return lambda: (checkpoint_step(latest) or 0) >= target


def test_sigkill_at_many_points_then_the_same_command_is_bit_identical(straight, tmp_path):
    """One run SIGKILLed again and again (before its first checkpoint, then once its latest checkpoint
    has reached each of several steps), each time re-run with the same command, which resumes it; it
    ends with the bits of the uninterrupted run."""
    machine, args, reference = straight
    run = tmp_path / "killed"
    latest = run / "checkpoints" / "latest.safetensors"
    points = [("config.json written, no checkpoint yet", lambda: (run / "config.json").exists())]
    points += [(f"latest checkpoint at step >= {s}", _at_step(latest, s)) for s in (3, 13, 24)]
    log, kills = [], 0
    for what, ready in points:
        proc = machine.start(run, args)
        _wait_until(proc, ready, what)
        if proc.poll() is None:
            proc.kill()
            kills += 1
        out, err = proc.communicate(timeout=TIMEOUT)
        log.append(f"killed once {what}: rc {proc.returncode}, latest now at step {checkpoint_step(latest)}")
        assert proc.returncode in (0, -signal.SIGKILL), "\n".join([*log, out, err])
        if proc.returncode == 0:  # finished before the kill: a valid trial, and nothing left to kill
            break
    assert kills >= 3, "\n".join(["the run finished before most kills:", *log])
    machine.train(run, args)  # the same command again: resumes and finishes
    assert not list((run / "checkpoints").glob(".*.tmp")), "temporary files of killed writes were not cleaned"
    try:
        assert_identical(reference, run)
    except AssertionError as e:
        raise AssertionError("\n".join([*log, str(e)])) from None


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_same_command_finishes_bit_identical(straight, tmp_path):
    machine, args, reference = straight
    run = tmp_path / "stopped"
    latest = run / "checkpoints" / "latest.safetensors"
    proc = machine.start(run, args)
    _wait_until(proc, _at_step(latest, 3), "the first checkpoint")
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, f"{proc.returncode}\n{out}\n{err}"
    assert "SIGTERM received" in err and "Traceback" not in err
    stopped = checkpoint_step(latest)
    assert stopped is not None and 3 <= stopped < 30, stopped
    assert [r["step"] for r in RunDir.of(run).read_metrics()] == [s for s in (10, 20) if s <= stopped]
    # The machine's decisions change before the run goes on (as a re-measurement could change them):
    # the resumed run keeps the plan it recorded.
    cache = machine.cache_file()
    measured = cache.read_bytes()
    body = json.loads(measured)
    body["decisions"] = {k: 7 - v for k, v in body["decisions"].items()}
    try:
        cache.write_text(json.dumps(body))
        machine.train(run, args)
    finally:
        cache.write_bytes(measured)
    assert checkpoint_step(latest) == 30
    assert_identical(reference, run)


# ---------------------------------------------------------------- 4. concurrent first runs on one machine
# vaelab's CLI with a kernel measurement that takes 0.5 s a shape and answers at random: two first runs
# that each measured for themselves would all but surely take different plans
NOISY_VAELAB = """
import random, sys, time
from vaelab.accel import kernels
def measure(rows, n_in, n_out):
    time.sleep(0.5)
    return random.SystemRandom().randrange(8)
kernels.measure = measure
from vaelab.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("measurement", ["real", "slow-and-random"])
def test_concurrent_first_runs_agree_on_the_kernels(data_dir, tmp_path, machine, measurement):
    args = args_of(data_dir, 1)
    if measurement == "slow-and-random":
        (tmp_path / "noisy_vaelab.py").write_text(NOISY_VAELAB)
        machine.command = [sys.executable, str(tmp_path / "noisy_vaelab.py")]
    assert not machine.kernels_dir.exists()
    procs = {name: machine.start(tmp_path / name, args) for name in ("a", "b")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{name}: {out}\n{err}"
    assert recorded_plan(tmp_path / "a") == recorded_plan(tmp_path / "b") != "auto"
    cache = machine.cache_file()
    body = json.loads(cache.read_text())
    assert body["version"] == 1 and body["torch"] == torch.__version__
    assert KernelPlan.parse(recorded_plan(tmp_path / "a")).bits == plan_from_cache(body["decisions"])
    assert not [p for p in machine.kernels_dir.iterdir() if p.name.startswith(".tmp-")]
    assert_identical(tmp_path / "a", tmp_path / "b")
