"""Distributed training with PyTorch's own engine: torchrun + DistributedDataParallel (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import vaelab


def test_torchrun_two_processes(mnist_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vaelab", "train", "--data", "mnist", "--data-dir", str(mnist_dir), "--no-download",
        "--val-size", "41", "--hidden", "32", "--latent-dim", "2", "--batch-size", "16", "--epochs", "2",
        "--threads", "1", "--device", "cpu", "--run-dir", str(run), "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # rank 0 alone writes: one row per epoch, not one per process
    assert [r["epoch"] for r in rows] == [1, 2]
    # 199 training images (odd on purpose): each rank takes 99 a epoch, 2 x 16 per step: 7 steps per epoch
    assert rows[-1]["step"] == 14
    # the train loss is averaged over both ranks' examples
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    loaded = vaelab.load_run(run, "latest")
    assert loaded.state["world_size"] == 2 and loaded.state["epoch"] == 2
