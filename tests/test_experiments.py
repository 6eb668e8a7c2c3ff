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
