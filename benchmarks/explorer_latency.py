"""The explorer's decode round trip: an HTTP request with a latent code to the decoded PNG back.

The model is the tutorial's MLP VAE (784-400-20, Bernoulli), trained for one epoch on random
28x28 images (its weights do not change the cost of a decode). The explorer is started as a user
starts it (`vaelab explore RUN --port 0 --device cpu`, its own process); the client is one keep-alive HTTP
connection posting a fresh random z each time, as the pad does while you drag. Printed: the median
and 95th percentile in milliseconds, and the decode alone (Explorer.decode in-process) for the split.

    python benchmarks/explorer_latency.py [--requests 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vaelab
from vaelab.app.explore import Explorer
from vaelab.data import write_idx


def tiny_run(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "data" / "mnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", 600), ("t10k", 100)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    cfg = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(root / "data"), val_size=100, download=False),
        model=vaelab.ModelConfig(latent_dim=20, hidden=(400,), likelihood="bernoulli"),
        train=vaelab.TrainConfig(epochs=1, batch_size=128, progress=False, device="cpu"),
    )
    return vaelab.train(cfg, root / "run").run_dir


def percentile(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads in the server (default 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = tiny_run(Path(tmp))
        # the server in its own process, started as a user starts it (its own interpreter and GIL)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        proc = subprocess.Popen([sys.executable, "-m", "vaelab", "explore", str(run), "--port", "0", "--device", "cpu"],
                                stdout=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        rng = np.random.default_rng(1)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as browsers do
        headers = {"Content-Type": "application/json"}
        times = []
        for i in range(a.requests + 20):  # the first 20 warm up
            body = json.dumps({"z": rng.normal(size=20).round(4).tolist()}).encode()  # bytes: one send() with the headers
            t0 = time.perf_counter()
            conn.request("POST", "/api/decode", body, headers)
            resp = conn.getresponse()
            png = resp.read()
            dt = (time.perf_counter() - t0) * 1e3
            assert resp.status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", (resp.status, png[:80])
            if i >= 20:
                times.append(dt)
        conn.close()
        proc.terminate()
        proc.wait(timeout=10)
        ex = Explorer.open(run, device="cpu")

        alone = []
        for _ in range(200):
            z = {"z": rng.normal(size=20).round(4).tolist()}
            t0 = time.perf_counter()
            ex.decode(z)
            alone.append((time.perf_counter() - t0) * 1e3)

    print(f"explorer decode round trip, MLP 784-400-20 on the CPU ({a.threads} torch thread(s)), "
          f"{a.requests} requests over one keep-alive connection:")
    print(f"  HTTP request -> decoded PNG back: median {statistics.median(times):.2f} ms, "
          f"p95 {percentile(times, 95):.2f} ms, max {max(times):.2f} ms")
    print(f"  of which the decode + PNG alone:  median {statistics.median(alone):.2f} ms, "
          f"p95 {percentile(alone, 95):.2f} ms")


if __name__ == "__main__":
    main()
