"""Image data of any size (issue 23): decode once, stream from disk. Generates its own folder of
synthetic 64x64 JPEGs (smooth random colour fields in 10 class sub-folders) and measures, in one run:

1. build: ``vaelab data prepare`` (worker processes) against a plain PIL decode loop on the same
   cores (one process, and a multiprocessing.Pool of as many processes as the build's workers);
2. start-up: from launching ``vaelab train ... --max-steps 1`` to the start of its first training step
   (a stamp the child writes) and to its exit, with a warm cache, and in memory (``data.cache=false``,
   which decodes the folder again); ``vaelab sample`` and ``vaelab evaluate -k 4 --limit 100`` on that
   run with the warm cache;
3. s/epoch of a conv VAE (vaelab's conv nets, hidden 32,64, latent 32, discretized logistic, batch 128)
   read from the cache vs held in memory: blocks of --block-steps steps alternate (map, memory, memory, map,
   ...; each path resumes its own run, bit-exactly) so both see the same machine state, every step is timed,
   and the ratio is that of the median steps; whether the two runs end with the same weights;
4. peak RSS of a whole ``vaelab train`` command (one epoch over every image, a small MLP VAE) from the
   cache and from memory (the child's own ru_maxrss, from wait4). Run at two sizes (--images 10000 and
   100000) to see that the cache's does not grow with the image count.

    python benchmarks/data_throughput.py [--images 100000] [--dir DIR] [--image-size 32] [--epochs 2]
                                         [--block-steps 20] [--epoch-images N] [--workers N] [--threads N]
                                         [--skip-memory-start] [--memory-rss-steps N]

``--dir`` keeps the generated folder (re-used when it already holds --images JPEGs); without it a
temporary folder is used and removed. The prepared caches are written under a temporary cache folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE_SIZE = 64
CLASSES = 10


# ---------------------------------------------------------------- the synthetic folder
def _write_chunk(args: tuple[str, int, int]) -> int:
    from PIL import Image

    root, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        # a smooth colour field: 4x4 random colours upsampled bicubically to 64x64, plus mild noise,
        # so the JPEGs are photo-like in size (~2-3 KB) rather than incompressible noise
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        img = np.asarray(small.resize((SOURCE_SIZE, SOURCE_SIZE), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(Path(root) / f"c{i % CLASSES}" / f"{i:07d}.jpg", quality=90)
    return stop - start


def make_folder(root: Path, n: int, workers: int) -> float:
    existing = sum(1 for _ in root.rglob("*.jpg")) if root.is_dir() else 0
    if existing == n:
        return 0.0
    if root.exists():
        shutil.rmtree(root)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True)
    t0 = time.perf_counter()
    step = 1000
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sum(pool.imap_unordered(_write_chunk, [(str(root), s, min(n, s + step)) for s in range(0, n, step)]))
    return time.perf_counter() - t0


# ---------------------------------------------------------------- a plain PIL loop (the reference)
def _plain_decode(paths: list[str], size: int) -> int:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)  # one chunk's images in memory
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            out[k] = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    return len(paths)


def plain_loop(files: list[str], size: int, workers: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1:
        for s in range(0, len(files), 1000):
            _plain_decode(files[s : s + 1000], size)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = [files[s : s + 256] for s in range(0, len(files), 256)]
            sum(pool.starmap(_plain_decode, [(c, size) for c in chunks]))
    return time.perf_counter() - t0


# ---------------------------------------------------------------- commands, timed
# A small launcher runs the command and reports its peak RSS: a process's ru_maxrss keeps the high-water
# mark of the image it was forked from (until and across exec), so the command must be forked from a
# small process, not from this one (which holds torch and data sets).
LAUNCH = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def vaelab_cmd(*args: str, env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, the command's own process) and stderr of ``vaelab ARGS``."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as out:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", LAUNCH, out.name, sys.executable, "-m", "vaelab", *args], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"vaelab {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        return wall, int(Path(out.name).read_text()), p.stderr


FIRST_STEP = """
import sys, time
import vaelab.training.loop as loop
real = loop.take_step
def first(*a, **k):
    if not getattr(first, "done", False):
        first.done = True
        with open(sys.argv[1], "w") as f:
            f.write(repr(time.time()))
    return real(*a, **k)
loop.take_step = first
from vaelab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def to_first_step(stamp: Path, *args: str, env: dict[str, str]) -> tuple[float, float]:
    """Seconds from launching ``vaelab ARGS`` (a fresh Python) to the start of its first training step,
    and to its exit."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", FIRST_STEP, str(stamp), *args], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    end = time.time()
    if p.returncode != 0:
        sys.exit(f"vaelab {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return float(stamp.read_text()) - t0, end - t0


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def rss_section(a: argparse.Namespace, spec: str, size: str, cache_dir: Path, tmp: Path, env: dict[str, str]) -> None:
    # 4. peak RSS of a whole training command, one epoch over every image. The network is a small MLP
    # (memory here is about the data; the conv VAE's steps would make an epoch of 100k images long)
    small = ["--image-size", size, "--hidden", "64", "--latent-dim", "8", "--batch-size", "128", "--val-size",
             "1000", "--device", "cpu", "--no-progress", "--set", f"data.cache_dir={cache_dir}"]
    if a.threads:
        small += ["--threads", str(a.threads)]
    print("\n4. peak RSS of `vaelab train --epochs 1` over every image (a small MLP VAE; the command's own "
          "process, launched from a small process, from wait4)")
    w_map, rss_map, _ = vaelab_cmd("train", "--data", spec, *small, "--epochs", "1", "--run", str(tmp / "rss-map"),
                                   env=env)
    print(f"   from the cache   {mib(rss_map):>10s}  ({w_map:.1f} s)")
    if not a.skip_memory_start:
        steps = ["--max-steps", str(a.memory_rss_steps)] if a.memory_rss_steps else []
        w_mem, rss_mem, _ = vaelab_cmd("train", "--data", spec, *small, "--set", "data.cache=false", "--epochs", "1",
                                       *steps, "--run", str(tmp / "rss-mem"), env=env)
        print(f"   in memory        {mib(rss_mem):>10s}  ({w_mem:.1f} s"
              + (f", stopped after {a.memory_rss_steps} steps)" if steps else ")"))
    meta = next(Path(cache_dir).glob("folder-*/meta.json"))
    print(f"   (the prepared file: {mib(os.path.getsize(meta.parent / 'images.npy'))}; "
          f"{json.loads(meta.read_text())['shape']})")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where the JPEG folder is generated (kept); default a temp folder")
    ap.add_argument("--image-size", type=int, default=32, help="what the VAE trains on (the JPEGs are 64x64)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per path for the s/epoch ratio")
    ap.add_argument("--block-steps", type=int, default=20, help="steps per alternating block in the s/epoch ratio")
    ap.add_argument("--workers", type=int, default=None, help="build processes (default: every core)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while training (default: torch's)")
    ap.add_argument("--skip-memory-start", action="store_true", help="skip the in-memory start-up and RSS runs")
    ap.add_argument("--only-rss", action="store_true", help="prepare the cache, then measure section 4 alone")
    ap.add_argument("--epoch-images", type=int, default=None,
                    help="train on the first N training images in the s/epoch comparison (default: all)")
    ap.add_argument("--memory-rss-steps", type=int, default=None,
                    help="stop the in-memory RSS run after N steps (its peak is reached when the set is loaded and "
                         "converted, before the first step; default: a whole epoch)")
    a = ap.parse_args()

    import torch

    import vaelab
    from vaelab.data import load_data
    from vaelab.data.cache import default_workers

    workers = a.workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="vaelab-data-bench-"))
    root = Path(a.dir) if a.dir else tmp / "jpegs"
    cache_dir = tmp / "cache"
    env = {**os.environ, "VAELAB_PROGRESS_EVERY": "1000000"}
    spec = f"folder:{root}"
    size = str(a.image_size)
    print(f"vaelab {vaelab.__version__}, torch {torch.__version__}, {os.cpu_count()} cores visible, "
          f"{len(os.sched_getaffinity(0))} usable, load average {os.getloadavg()[0]:.2f} at start")
    try:
        gen = make_folder(root, a.images, workers)
        files = sorted(str(p) for p in root.rglob("*.jpg"))
        disk = sum(os.path.getsize(f) for f in files)
        print(f"folder: {len(files):,} {SOURCE_SIZE}x{SOURCE_SIZE} JPEGs, {mib(disk)}, in {CLASSES} class folders"
              + (f" (generated in {gen:.1f} s)" if gen else " (re-used)"))

        # 1. build vs a plain PIL loop on the same cores
        build, _, _ = vaelab_cmd("data", "prepare", spec, "--image-size", size, "--cache-dir", str(cache_dir),
                                 "--workers", str(workers), "--no-progress", env=env)
        if a.only_rss:
            rss_section(a, spec, size, cache_dir, tmp, env)
            return
        print(f"\n1. decode {len(files):,} images to {size}x{size}")
        plain1 = plain_loop(files, a.image_size, 1)
        plainw = plain_loop(files, a.image_size, workers) if workers > 1 else plain1
        n = len(files)
        meta = json.loads(next(Path(cache_dir).glob("folder-*/meta.json")).read_text())
        inner = float(meta["build_seconds"])
        print(f"   vaelab data prepare ({workers} workers, whole command) {build:8.1f} s  {n / build:8,.0f} images/s")
        print(f"     of which the build itself (listing, headers, decode, write) {inner:8.1f} s  {n / inner:8,.0f} images/s")
        print(f"   plain PIL loop, 1 process                    {plain1:8.1f} s  {n / plain1:8,.0f} images/s")
        print(f"   plain PIL loop, Pool({workers})                        {plainw:8.1f} s  {n / plainw:8,.0f} images/s")
        print(f"   build / plain loop: {inner / plain1:.2f}x the 1-process time, {inner / plainw:.2f}x the "
              f"{workers}-process time (the build also lists and fingerprints the folder, checks each header against "
              "the pixel limit, applies EXIF orientation and writes the cache)")

        # 2. start-up with a warm cache (and in memory, decoding again)
        print("\n2. from launching `vaelab train ... --max-steps 1` to the start of its first training step (and to exit)")
        net = ["--image-size", size, "--encoder", "conv", "--decoder", "conv", "--hidden", "32,64", "--latent-dim",
               "32", "--likelihood", "discretized-logistic", "--batch-size", "128", "--val-size", "1000",
               "--device", "cpu", "--no-progress", "--set", f"data.cache_dir={cache_dir}"]
        if a.threads:
            net += ["--threads", str(a.threads)]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import vaelab.training, vaelab.cli"], check=True, env=env)
        imports = time.perf_counter() - t0
        first, warm = to_first_step(tmp / "stamp", "train", "--data", spec, *net, "--max-steps", "1", "--run",
                                    str(tmp / "first"), env=env)
        print(f"   warm cache            first step after {first:5.1f} s, exit after {warm:5.1f} s   (starting Python "
              f"and importing torch + vaelab alone: {imports:.1f} s)")
        if not a.skip_memory_start:
            first_m, cold = to_first_step(tmp / "stamp", "train", "--data", spec, *net, "--set", "data.cache=false",
                                          "--max-steps", "1", "--run", str(tmp / "first-mem"), env=env)
            print(f"   in memory (decodes)   first step after {first_m:5.1f} s, exit after {cold:5.1f} s   "
                  f"({first_m / first:.1f}x the warm start)")
        run_args = ["--device", "cpu", "--checkpoint", "latest"]
        s_wall, _, _ = vaelab_cmd("sample", str(tmp / "first"), "-n", "16", *run_args, env=env)
        e_wall, _, _ = vaelab_cmd("evaluate", str(tmp / "first"), "-k", "4", "--limit", "100", "--no-progress",
                                  *run_args, env=env)
        print(f"   vaelab sample -n 16 (warm cache)                    {s_wall:5.1f} s")
        print(f"   vaelab evaluate -k 4 --limit 100 (warm cache)       {e_wall:5.1f} s")

        # 3. s/epoch from the map vs from memory: blocks of steps alternate (map, memory, memory, map, ...; each
        # path resumes its own run), so both see the same machine state; every step is timed
        print(f"\n3. s/epoch of a conv VAE on {size}x{size}, map vs memory: {a.epochs} epochs each, alternating "
              f"blocks of {a.block_steps} steps")
        cfg = vaelab.RunConfig(
            data=vaelab.DataConfig(name=spec, image_size=a.image_size, val_size=1000, cache_dir=str(cache_dir),
                                   limit_train=a.epoch_images),
            model=vaelab.ModelConfig(latent_dim=32, hidden=(32, 64), encoder="conv", decoder="conv",
                                     likelihood="discretized-logistic"),
            train=vaelab.TrainConfig(epochs=a.epochs, batch_size=128, progress=False, device="cpu",
                                     threads=a.threads))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            mapped = load_data(cfg.data)
            t_open = time.perf_counter() - t0
            t0 = time.perf_counter()
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its progress bar
                memory = load_data(dataclasses.replace(cfg.data, cache=False))
            t_decode = time.perf_counter() - t0
        print(f"   load_data: {t_open:.2f} s from the cache, {t_decode:.1f} s decoding into memory; "
              f"{len(mapped.train):,} training images")

        class StepTimer(vaelab.Callback):
            """Seconds between consecutive steps of one call (batch fetch + step), epoch ends left out."""

            def __init__(self) -> None:
                self.times: list[float] = []
                self.last: float | None = None

            def on_start(self, run) -> None:  # noqa: ANN001
                self.last = None  # the first step after a resume pays the warm-up: not counted

            def on_step(self, step) -> None:  # noqa: ANN001
                now = time.perf_counter()
                if self.last is not None:
                    self.times.append(now - self.last)
                self.last = now

            def on_epoch(self, row) -> None:  # noqa: ANN001
                self.last = None  # validation ran between these steps

        timers = {"map": StepTimer(), "memory": StepTimer()}
        rows: dict[str, list[dict]] = {"map": [], "memory": []}
        done = {"map": False, "memory": False}
        block = 0
        while not all(done.values()):
            block += 1
            pair = (("map", mapped), ("memory", memory))
            for name, data in pair if block % 2 else pair[::-1]:  # who goes first alternates too
                if done[name]:
                    continue
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # the epoch lines
                    res = vaelab.train(cfg, tmp / f"epochs-{name}", data=data, max_steps=block * a.block_steps,
                                       callbacks=[timers[name], rows[name].append])
                done[name] = res.state.epoch >= a.epochs and not res.state.step_in_epoch
        med = {k: statistics.median(t.times) for k, t in timers.items()}
        steps = res.state.step // a.epochs
        for k in ("map", "memory"):
            per_epoch = [r["elapsed_s"] for r in rows[k]]
            per_epoch = [b - a_ for a_, b in zip([0.0, *per_epoch[:-1]], per_epoch, strict=True)]
            print(f"   {k:7s} median step {1000 * med[k]:6.1f} ms over {len(timers[k].times)} steps -> "
                  f"{med[k] * steps:6.1f} s/epoch ({len(mapped.train) / (med[k] * steps):,.0f} images/s); "
                  f"epochs' training time {', '.join(f'{t:.1f}' for t in per_epoch)} s")
        print(f"   map / memory: {med['map'] / med['memory']:.3f}x per step (target <= 1.1x)")
        same = all(torch.equal(x, y) for x, y in zip(
            vaelab.load_run(tmp / "epochs-map", "latest").model.state_dict().values(),
            vaelab.load_run(tmp / "epochs-memory", "latest").model.state_dict().values(), strict=True))
        print(f"   the two runs' final weights are bit-identical: {same}")

        # 3b. the data path alone (the steps are the same computation on the same tensors): one epoch of
        # batches as training takes them, without training, three times each, alternating; the best
        from vaelab.training.feed import make_feed
        from vaelab.training.loop import epoch_order

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            all_mapped = load_data(dataclasses.replace(cfg.data, limit_train=None))
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                all_memory = load_data(dataclasses.replace(cfg.data, limit_train=None, cache=False))
        feeds = {k: make_feed(d.train, torch.device("cpu"), "discretized-logistic", k)
                 for k, d in (("map", all_mapped), ("memory", all_memory))}
        order = epoch_order(len(all_mapped.train), 0, 0)
        best = {k: float("inf") for k in feeds}
        for _ in range(3):
            for k, f in feeds.items():
                t0 = time.perf_counter()
                for _x, _y in f.epoch(order, 0, 128):
                    pass
                best[k] = min(best[k], time.perf_counter() - t0)
        print(f"   the data path alone, one epoch of {len(order):,} images in batches of 128 (best of 3): "
              f"map {best['map']:.2f} s, memory {best['memory']:.2f} s (index_select from the float copy)")
        del memory, all_memory, feeds

        rss_section(a, spec, size, cache_dir, tmp, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
