"""The runnable reproductions and benchmarks keep working (tiny settings; numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vaelab.data import DATASETS
from vaelab.data.sources import candidate_dirs, locate
from vaelab.errors import DatasetNotFoundError

ROOT = Path(__file__).parent.parent


def missing_dataset(name: str) -> str | None:
    """Why data set ``name`` cannot be used here (None when vaelab finds it without downloading), by
    vaelab's own search: $VAELAB_DATA, /usr/share/datasets/NAME (Debian's packages), the cache."""
    try:
        locate(name, DATASETS.get(name).files, None, download=False)
    except DatasetNotFoundError:
        return (f"data set {name!r} is not installed (searched {', '.join(map(str, candidate_dirs(name, None)))}; "
                f"Debian: apt-get install dataset-{name})")
    return None


def test_missing_dataset_names_the_data_set_only_when_vaelab_cannot_find_it(tmp_path, monkeypatch):
    from conftest import write_mnist

    import vaelab.data.sources as sources

    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "no-system-datasets")  # a machine without the package
    reason = missing_dataset("fashion-mnist")
    assert reason is not None and "'fashion-mnist' is not installed" in reason and "\n" not in reason
    assert str(tmp_path / "no-system-datasets" / "fashion-mnist") in reason
    write_mnist(tmp_path / "mine" / "fashion-mnist")
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "mine"))
    assert missing_dataset("fashion-mnist") is None


def test_cvae_completion_experiment_runs(mnist_dir, tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, str(ROOT / "experiments" / "cvae_completion.py"), "--data", "mnist",
           "--data-dir", str(mnist_dir), "--out", str(out), "--epochs", "1", "--limit-train", "100", "--val-size", "40",
           "--hidden", "32", "--latent-dim", "2", "-k", "5", "--eval-n", "10", "--samples", "2", "--rows", "2",
           "--threads", "1", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pngs = list(out.rglob("*.png"))
    jsons = [p for p in out.rglob("*.json") if "eval" not in p.parts]
    assert pngs and jsons
    assert any(isinstance(json.loads(p.read_text()), dict) for p in jsons)


def test_benchmarks_run(mnist_dir):
    """Each benchmark runs end to end on tiny settings and prints its ratios and floors (bf16 variants are
    left out here: without native bf16 they are emulated; the training benchmark runs a compiled variant
    before another, which once broke the floors of every later variant)."""
    if reason := missing_dataset("fashion-mnist"):  # eval_throughput.py reads the real data set
        pytest.skip(reason)
    bench = ROOT / "benchmarks"
    res = subprocess.run([sys.executable, str(bench / "train_throughput.py"), "--epochs", "1", "--data", "mnist",
                          "--data-dir", str(mnist_dir), "--val-size", "40", "--threads", "1", "--variants", "vaelab fp32 --compile,vaelab fp32"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GEMM floors" in res.stdout and "fp32 oneDNN" in res.stdout and "x floor" in res.stdout
    assert "reference (pytorch/examples)" in res.stdout and "vaelab fp32 " in res.stdout
    assert "compiled: vaelab fp32 --compile: the " in res.stdout  # the whole step, or the forward pass and the loss
    res = subprocess.run([sys.executable, str(bench / "conv_throughput.py"), "--n", "64", "--epochs", "1",
                          "--threads", "1", "--variants", "vaelab fp32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference fp32" in res.stdout and "vaelab fp32" in res.stdout and "x ref" in res.stdout
    res = subprocess.run([sys.executable, str(bench / "eval_throughput.py"), "--quick", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "decoder GEMM floors" in res.stdout and "reference (plain PyTorch)" in res.stdout
    assert "vaelab evaluate fp32" in res.stdout and "equal estimate" in res.stdout


def test_reproduce_writes_a_table_with_the_papers_numbers_and_the_orderings(mnist_dir, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "iwae-table1", "--budget", "small",
           "--data", "mnist", "--data-dir", str(mnist_dir), "--out", str(out), "--eval-k", "5", "--eval-limit", "10",
           "--no-progress", "--set", "train.epochs=1", "--set", "data.limit_train=60", "--set", "data.val_size=20",
           "--set", "train.threads=1", "--set", "model.hidden=[16]", "--set", "train.iwae_k=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "iwae-table1-small.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["vae-1l", "iwae-1l", "iwae-2l"]
    assert [r["paper"] for r in result["rows"]] == [86.76, 84.78, 82.90]
    two = result["rows"][2]
    assert two["config"]["model"]["layers"] == 2 and len(two["active_units"]) == 2
    assert result["orderings"][0]["ordering"] == "vae-1l > iwae-1l > iwae-2l"
    assert isinstance(result["orderings"][0]["holds"], bool)
    md = (out / "iwae-table1-small.md").read_text()
    assert "| IWAE, 2 stochastic layers, k = 50 | 82.90 |" in md and "- vae-1l > iwae-1l > iwae-2l: " in md
    # the budget's settings reached the runs: Burda's schedule and the data subset
    assert two["config"]["train"]["schedule"] == "burda" and two["config"]["data"]["limit_train"] == 60
    listing = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--list"],
                             capture_output=True, text=True, timeout=60)
    assert "iwae-table1" in listing.stdout and "vampprior" in listing.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce.py"), "iwae-tabel1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown table 'iwae-tabel1'" in bad.stderr and "Traceback" not in bad.stderr


def test_models_benchmark_runs(mnist_dir):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "models.py"), "--epochs", "1", "--data", "mnist",
                          "--data-dir", str(mnist_dir), "--limit-train", "60", "--val-size", "20", "--components", "4",
                          "--threads", "1", "--hidden", "16"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if "x VAE 1L" in ln or ln.startswith(("VAE", "IWAE"))]
    assert lines[1].split()[-1] == "1.00" and len(lines) == 8  # header + 7 models, the baseline at 1.00


def _reproduce_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_under_test", ROOT / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_table_args(mnist_dir, out):
    return ["iwae-table1", "--budget", "small", "--data", "mnist", "--data-dir", str(mnist_dir), "--out", str(out),
            "--eval-k", "5", "--eval-limit", "10", "--no-progress", "--set", "train.epochs=1",
            "--set", "data.limit_train=60", "--set", "data.val_size=20", "--set", "train.threads=1",
            "--set", "model.hidden=[16]", "--set", "train.iwae_k=2", "--set", "train.device=cpu"]


@pytest.fixture
def keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_reproduce_stopped_after_a_row_writes_the_partial_table_and_the_command_that_continues_it(
        mnist_dir, tmp_path, monkeypatch, capsys, keep_torch_threads):
    import shlex

    mod = _reproduce_module()
    out = tmp_path / "results"
    argv = _tiny_table_args(mnist_dir, out)
    real_train, real_eval = mod.train, mod.evaluate_run
    calls = []

    def train_stopped_at_the_second_row(cfg, run_dir, **kw):
        calls.append(run_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second row trains
        return real_train(cfg, run_dir, **kw)

    monkeypatch.setattr(mod, "train", train_stopped_at_the_second_row)
    try:
        rc = mod.main(argv)
    except KeyboardInterrupt:  # not to stop the whole test session
        pytest.fail("the Ctrl-C went through reproduce.py without an exit code")
    assert rc == 130
    err = capsys.readouterr().err
    result = json.loads((out / "iwae-table1-small.json").read_text())
    assert result["complete"] is False and "Ctrl-C" in result["stopped"] and "'iwae-1l'" in result["stopped"]
    first, *rest = result["rows"]
    assert first["name"] == "vae-1l" and first["done"] and isinstance(first["nll"], float)
    assert [(r["name"], r["done"]) for r in rest] == [("iwae-1l", False), ("iwae-2l", False)]
    assert result["orderings"][0]["holds"] is None
    md = (out / "iwae-table1-small.md").read_text()
    assert "**Partial table**" in md and "| IWAE, 2 stochastic layers, k = 50 | 82.90 | not done |" in md
    assert f"| {first['label']} | 86.76 | {first['nll']:.2f} ± " in md
    command = "python experiments/reproduce.py " + shlex.join(argv)
    assert command in err and "vaelab train --resume" not in err and result["command"] == command
    assert not list(out.glob(".*.tmp"))  # written atomically

    # re-running the same command finishes the table and reuses the finished row (not evaluated again)
    monkeypatch.setattr(mod, "train", real_train)
    evaluated = []
    monkeypatch.setattr(mod, "evaluate_run", lambda run, **kw: evaluated.append(Path(run).name) or real_eval(run, **kw))
    assert mod.main(argv) == 0
    result = json.loads((out / "iwae-table1-small.json").read_text())
    assert result["complete"] is True and evaluated == ["iwae-1l", "iwae-2l"]
    assert [r["done"] for r in result["rows"]] == [True, True, True] and result["rows"][0] == first
    assert isinstance(result["orderings"][0]["holds"], bool)
    assert "Partial table" not in (out / "iwae-table1-small.md").read_text()


def test_reproduce_table_records_the_environment(mnist_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    import vaelab

    mod = _reproduce_module()
    out = tmp_path / "results"
    # stand-ins for training and evaluation: the table is what is checked here
    monkeypatch.setattr(mod, "train", lambda cfg, run_dir, **kw: SimpleNamespace(
        state=SimpleNamespace(epoch=1, step=2, elapsed=0.5)))
    monkeypatch.setattr(mod, "evaluate_run", lambda run, **kw: SimpleNamespace(
        nll=90.0, nll_stderr=1.0, neg_elbo=95.0, n=10, bits_per_dim=None, layers=[{"active_units": 3, "dim": 5}]))
    assert mod.main(_tiny_table_args(mnist_dir, out)) == 0
    result = json.loads((out / "iwae-table1-small.json").read_text())
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["vaelab"] == vaelab.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    if head.returncode == 0:
        assert env["git_commit"].startswith(head.stdout.strip())
    else:
        assert "git_commit" not in env
    assert env["cpu"] and env["torch_threads"] >= 1 and env["date"][:4].isdigit() and "gpu" in env
    md = (out / "iwae-table1-small.md").read_text()
    assert f"- torch: {torch.__version__}" in md and f"- cpu: {env['cpu']}" in md
    assert f"- vaelab: {vaelab.__version__}" in md and ("git_commit" not in env or f"- git_commit: {env['git_commit']}" in md)


def test_orderings_with_seeds_need_a_gap_beyond_the_margin_and_the_seed_spread():
    mod = _reproduce_module()

    def row(entry, seed, nll, units=((3, 4),)):
        return {"name": f"{entry}@s{seed}", "entry": entry, "seed": seed, "nll": nll, "train_seconds": 60.0,
                "active_units": list(units), "done": True}

    rows = [row("one", 0, 100.0), row("one", 1, 100.8), row("ladder", 0, 97.0, ((5, 8), (2, 4))),
            row("ladder", 1, 97.4, ((5, 8), (1, 4))), row("two", 0, 99.5), row("two", 1, 99.2)]
    stats = mod.entry_stats(rows, ["one", "ladder", "two"])
    assert stats["one"]["mean"] == pytest.approx(100.4) and stats["one"]["spread"] == pytest.approx(0.8)
    checks = mod.check_orderings([["one", "ladder"], ["two", "ladder"], ["one", "two"]], stats, margin=1.5)
    # 100.4 - 97.2 = 3.2 > max(1.5, 0.8, 0.4); 99.35 - 97.2 = 2.15 > 1.5; 100.4 - 99.35 = 1.05 < 1.5
    assert [c["holds"] for c in checks] == [True, True, False]
    assert checks[2]["needed"] == [pytest.approx(1.5)]
    # a spread wider than the margin is what the gap must beat
    wide = mod.entry_stats([*rows[:4], row("two", 0, 99.0), row("two", 1, 101.5)], ["one", "ladder", "two"])
    assert mod.check_orderings([["two", "ladder"]], wide, margin=1.5)[0]["needed"] == [pytest.approx(2.5)]
    # a seed not done: not checked
    partial = mod.entry_stats([*rows[:5], {**row("two", 1, 0.0), "done": False}], ["one", "ladder", "two"])
    assert mod.check_orderings([["two", "ladder"]], partial, 1.5)[0]["holds"] is None
    # every group active: more than one active unit in every layer of every seed
    entries = [{"name": "ladder", "all_groups_active": True}, {"name": "one"}]
    groups = mod.check_groups_active(entries, rows)
    assert len(groups) == 1 and groups[0]["holds"] is False  # seed 1's top layer has one active unit
    # without seeds or a margin, the old rule: strictly lower
    single = mod.entry_stats([{"name": "a", "nll": 2.0, "train_seconds": 1.0}, {"name": "b", "nll": 1.9,
                                                                                 "train_seconds": 1.0}], ["a", "b"])
    assert mod.check_orderings([["a", "b"]], single)[0]["holds"] is True


def test_elbo_check_compares_the_reported_elbo_with_e_q_log_w(mnist_dir, tmp_path, capsys):
    import importlib.util

    import vaelab
    from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(data=DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=20, download=False,
                                    limit_train=60, binarize="dynamic"),
                    model=ModelConfig(latent_dim=6, layers=2, hidden=(16,)),
                    train=TrainConfig(epochs=1, batch_size=20, progress=False, threads=1, device="cpu"))
    vaelab.train(cfg, tmp_path / "run")
    spec = importlib.util.spec_from_file_location("elbo_check", ROOT / "experiments" / "elbo_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "run"), "--images", "20", "--draws", "400"]) == 0
    out = capsys.readouterr().out
    assert "1 with a prior that depends on their own draw" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    ours = float(lines["vaelab"].split("(paired s.e.; ")[1].split(" s.e.")[0])
    assert ours < 4  # vaelab's ELBO is E_q[log w] within its Monte Carlo error
    assert mod.main([str(tmp_path / "nothing")]) == 2 and "no such run" in capsys.readouterr().err
