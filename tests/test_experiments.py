"""The runnable reproductions and benchmarks keep working (tiny settings; numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


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
    bench = ROOT / "benchmarks"
    res = subprocess.run([sys.executable, str(bench / "train_throughput.py"), "--epochs", "1", "--data", "mnist",
                          "--data-dir", str(mnist_dir), "--val-size", "40", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "throughput ratio vaelab/reference" in res.stdout and "matmul floor" in res.stdout
    res = subprocess.run([sys.executable, str(bench / "conv_throughput.py"), "--n", "64", "--epochs", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "throughput ratio vaelab/reference" in res.stdout
