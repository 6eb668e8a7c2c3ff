"""Hostile input: every kind of file or argument an attacker or a new user might hand vaelab either
works or is refused with one line, never a traceback, a hang or unbounded memory.

* Bombs and special files (decompression bombs in gzip IDX, npz, compressed .mat and CIFAR archives,
  pickle memo amplification, FIFOs, devices, sparse files, huge headers, a checkpoint whose config
  asks for a huge model) are read in a child process whose address space is capped a few hundred MB
  above what its imports take (``RLIMIT_AS``), under a timeout; each must end in a vaelab error and
  raise the child's peak memory by little. Bombs are made small by lowering the limits
  (``VAELAB_MAX_BYTES``, ``safeio.RATIO_FREE``) or by declaring sizes that are not there.
* Crafted optimizer, RNG and counter state in a checkpoint is a CheckpointError naming the entry
  before it reaches torch (a wrong-sized Adam buffer crashed the fused kernel).
* Deeply nested JSON/TOML, a full disk at the run lock, and every bad command-line argument of
  issue 9 give exit code 2 and exactly one line on stderr.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import vaelab
from vaelab import cli
from vaelab.config import DataConfig, DataSpec, ModelConfig, RunConfig, TrainConfig
from vaelab.data import write_idx
from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.models import build_model
from vaelab.runs import RunDir, load_checkpoint
from vaelab.runs.checkpoint import Checkpoint, read_config, read_metadata, save_checkpoint
from vaelab.training import train

SRC = str(Path(vaelab.__file__).resolve().parents[1])
MB = 1 << 20

# ---------------------------------------------------------------- the child process
_CHILD = r"""
import json, os, re, resource, sys, traceback
import numpy as np, torch
import vaelab, vaelab.data, vaelab.runs, scipy.io  # imported before the cap: it covers the work only
from vaelab import safeio
from vaelab.data import arrays, cifar, svhn
from vaelab.data.idx import read_idx
from vaelab.runs import load_checkpoint, load_run
from vaelab.runs.checkpoint import read_config
from pathlib import Path
torch.set_num_threads(1)
safeio.RATIO_FREE = 1 << 20  # so that small bombs count as bombs
cases = json.loads(sys.argv[1])
vm = int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
cap = vm + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = {}
for name, code in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        exec(code)
        res = {"ok": True}
    except vaelab.VaelabError as e:
        res = {"error": type(e).__name__, "message": str(e)}
    except BaseException as e:
        res = {"crash": type(e).__name__, "message": str(e)[:300], "tb": traceback.format_exc()[-1500:]}
    res["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out[name] = res
print(json.dumps(out))
"""


def run_child(cases: dict[str, str], env: dict[str, str] | None = None, headroom: int = 400 * MB,
              timeout: float = 60) -> dict[str, dict]:
    """Run each snippet in one child process with a capped address space; results by name."""
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases), str(headroom)], capture_output=True,
                       text=True, timeout=timeout, env=e)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- hostile files
def _gz_idx(path: Path, shape: tuple[int, ...], body: int) -> Path:
    """A gzipped IDX file whose header declares ``shape`` (uint8) and whose data is ``body`` zero bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [co.compress(bytes([0, 0, 8, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape))]
    zeros = bytes(MB)
    for _ in range(body // MB):
        parts.append(co.compress(zeros))
    parts.append(co.compress(bytes(body % MB)))
    parts.append(co.flush())
    path.write_bytes(b"".join(parts))
    return path


def _npz(path: Path, array: np.ndarray, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    buf = io.BytesIO()
    np.save(buf, array)
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("images.npy", buf.getvalue())
    return path


def _npy_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose one member is an .npy header declaring ``shape`` with (almost) no data after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("images.npy", buf.getvalue() + bytes(64))
    return path


def _mat_lying(src: Path, dst: Path) -> Path:
    """A compressed .mat whose first variable's inner tag declares 64 bytes but which holds megabytes."""
    raw = src.read_bytes()
    tag_type, nbytes = struct.unpack("<II", raw[128:136])
    assert tag_type == 15
    inner = bytearray(zlib.decompress(raw[136 : 136 + nbytes]))
    inner[4:8] = struct.pack("<I", 64)
    packed = zlib.compress(bytes(inner))
    dst.write_bytes(raw[:128] + struct.pack("<II", 15, len(packed)) + packed + raw[136 + nbytes :])
    return dst


def _cifar_tar_bomb(path: Path) -> Path:
    """A cifar-10-binary.tar.gz holding every member, one of them 8 MB of zeros (compresses 1000:1)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            data = bytes(8 * MB) if name == "data_batch_1.bin" else bytes(3073)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _memo_pickle(path: Path, refs: int) -> Path:
    """A CIFAR python batch whose one image row is referenced ``refs`` times through the pickle memo."""
    row = np.zeros(3072, np.uint8)
    path.write_bytes(pickle.dumps({b"data": [row] * refs, b"labels": [0] * refs}, protocol=2))
    return path


def _reconstruct_pickle(path: Path, n: int) -> Path:
    """A pickle asking numpy's _reconstruct for an array of n bytes (allocated before any data is read)."""
    path.write_bytes(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I%d\ntS'b'\ntR." % n)
    return path


def _tiny_checkpoint(path: Path, hidden=(8,)) -> Path:
    cfg = RunConfig(model=ModelConfig(latent_dim=2, hidden=hidden))
    spec = DataSpec((1, 4, 4))
    model = build_model(cfg.model, spec)
    save_checkpoint(path, Checkpoint(cfg, spec, model.state_dict(), None, {"epoch": 1, "step": 1}))
    return path


def _resave(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    """Copy a checkpoint, editing its metadata (``edit(meta)``) and/or tensors (``tensors(dict)``)."""
    raw = src.read_bytes()
    t, meta = st_load(raw), dict(read_metadata(src, raw))
    if edit is not None:
        edit(meta)
    if tensors is not None:
        tensors(t)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(st_save(t, metadata=meta))
    return dst


def _edit_json(key: str, fn):
    def edit(meta):
        d = json.loads(meta[key])
        fn(d)
        meta[key] = json.dumps(d)

    return edit


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, dict]:
    """Every hostile file, read in one capped child process: the results by case name."""
    from scipy.io import savemat

    d = tmp_path_factory.mktemp("hostile")
    n8 = 8 * MB // 784
    _gz_idx(d / "ratio-idx3-ubyte.gz", (n8, 28, 28), n8 * 784)
    _gz_idx(d / "huge-idx3-ubyte.gz", (2**31, 28, 28), MB)
    _gz_idx(d / "lying-idx3-ubyte.gz", (10, 28, 28), 64 * MB)
    _gz_idx(d / "limit-idx3-ubyte.gz", (40 * MB // 784, 28, 28), 0)
    _npz(d / "ratio.npz", np.zeros((8, MB), np.uint8))
    _npy_header_only(d / "declared.npz", (1 << 20, 1 << 20))
    savemat(d / "ratio.mat", {"X": np.zeros((32, 32, 3, 3000), np.uint8), "y": np.zeros((3000, 1), np.uint8)},
            do_compression=True)
    savemat(d / "small.mat", {"X": np.zeros((32, 32, 3, 700), np.uint8), "y": np.zeros((700, 1), np.uint8)},
            do_compression=True)
    _mat_lying(d / "small.mat", d / "lying.mat")
    _cifar_tar_bomb(d / "cifar-10-binary.tar.gz")
    _memo_pickle(d / "memo_batch", 1_000_000)
    _reconstruct_pickle(d / "reconstruct_batch", 10**11)
    os.mkfifo(d / "fifo.safetensors")
    with open(d / "sparse.safetensors", "wb") as fh:
        fh.truncate(20 << 30)  # 20 GB that take no disk
    with open(d / "bigheader.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", 17 * MB) + b"{")
        fh.truncate(20 * MB)
    good = _tiny_checkpoint(d / "good.safetensors")
    _resave(good, d / "huge-model.safetensors",
            edit=_edit_json("config", lambda c: c["model"].__setitem__("hidden", [4000] * 200)))
    run = d / "fiforun" / "checkpoints"
    run.mkdir(parents=True)
    os.mkfifo(run / "latest.safetensors")

    def rd(f: str) -> str:
        return f"read_idx({str(d / f)!r})"

    cases = {
        "idx-gzip-ratio": rd("ratio-idx3-ubyte.gz"),
        "idx-gzip-declared-huge": rd("huge-idx3-ubyte.gz"),
        "idx-gzip-more-than-declared": rd("lying-idx3-ubyte.gz"),
        "idx-gzip-over-the-byte-limit": "os.environ['VAELAB_MAX_BYTES'] = '16M'\ntry:\n    "
                                        + rd("limit-idx3-ubyte.gz") + "\nfinally:\n    del os.environ['VAELAB_MAX_BYTES']",
        "npz-ratio": f"arrays.read_npz({str(d / 'ratio.npz')!r}, vaelab.DataConfig())",
        "npz-declared-huge": f"arrays.read_npz({str(d / 'declared.npz')!r}, vaelab.DataConfig())",
        "mat-ratio": f"svhn.read_svhn_mat(Path({str(d / 'ratio.mat')!r}))",
        "mat-more-than-declared": f"svhn.read_svhn_mat(Path({str(d / 'lying.mat')!r}))",
        "cifar-tar-member-ratio": f"cifar.read_cifar(Path({str(d / 'cifar-10-binary.tar.gz')!r}), cifar.CIFAR10)",
        "cifar-pickle-memo": f"p = {str(d / 'memo_batch')!r}\ncifar.parse_python(open(p, 'rb').read(), p, cifar.CIFAR10)",
        "cifar-pickle-reconstruct": f"p = {str(d / 'reconstruct_batch')!r}\n"
                                    "cifar.parse_python(open(p, 'rb').read(), p, cifar.CIFAR10)",
        "checkpoint-fifo": f"load_checkpoint({str(d / 'fifo.safetensors')!r})",
        "checkpoint-fifo-read-config": f"read_config({str(d / 'fifo.safetensors')!r})",
        "run-with-fifo-latest": f"load_run({str(d / 'fiforun')!r}, 'latest')",
        "checkpoint-dev-zero": "load_checkpoint('/dev/zero')",
        "checkpoint-directory": f"load_checkpoint({str(d)!r})",
        "checkpoint-sparse-20GB": f"load_checkpoint({str(d / 'sparse.safetensors')!r})",
        "checkpoint-huge-header": f"load_checkpoint({str(d / 'bigheader.safetensors')!r})",
        "checkpoint-config-asks-for-a-huge-model": f"load_run({str(d / 'huge-model.safetensors')!r})",
    }
    out = run_child(cases, timeout=120)
    out["_dir"] = {"path": str(d)}
    return out


HOSTILE = {
    "idx-gzip-ratio": ("DataError", "decompression bomb"),
    "idx-gzip-declared-huge": ("DataError", "more than the 4.0 GiB vaelab reads"),
    "idx-gzip-more-than-declared": ("DataError", "unexpected trailing bytes"),
    "idx-gzip-over-the-byte-limit": ("DataError", "VAELAB_MAX_BYTES"),
    "npz-ratio": ("DataError", "decompression bomb"),
    "npz-declared-huge": ("DataError", "truncated: declares an array of shape (1048576, 1048576)"),
    "mat-ratio": ("DataError", "decompression bomb"),
    "mat-more-than-declared": ("DataError", "decompresses to more than"),
    "cifar-tar-member-ratio": ("DataError", "data_batch_1.bin: declares a member of 8.0 MiB"),
    "cifar-pickle-memo": ("DataError", "referenced many times"),
    "cifar-pickle-reconstruct": ("DataError", "declares an array of"),
    "checkpoint-fifo": ("CheckpointError", "is a FIFO (named pipe), not a regular file"),
    "checkpoint-fifo-read-config": ("CheckpointError", "is a FIFO (named pipe), not a regular file"),
    "run-with-fifo-latest": ("CheckpointError", "is a FIFO (named pipe), not a regular file"),
    "checkpoint-dev-zero": ("CheckpointError", "/dev/zero: is a character device"),
    "checkpoint-directory": ("CheckpointError", "is a directory"),
    "checkpoint-sparse-20GB": ("CheckpointError", "holds 20.0 GiB, more than the 4.0 GiB"),
    "checkpoint-huge-header": ("CheckpointError", "header declares 17825792 bytes"),
    "checkpoint-config-asks-for-a-huge-model": ("CheckpointError", "config implies (4000, 16)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_quickly_with_bounded_memory(hostile, case):
    res = hostile[case]
    kind, text = HOSTILE[case]
    assert "crash" not in res, f"{case}: {res}"
    assert res.get("error") == kind and text in res["message"], f"{case}: {res}"
    assert "\n" not in res["message"] or case.startswith("checkpoint-config"), res["message"]
    assert res["peak_mb"] < 64, f"{case}: peak memory rose by {res['peak_mb']:.0f} MB"


def test_hostile_files_name_the_file(hostile):
    d = hostile["_dir"]["path"]
    for case in HOSTILE:
        if case != "checkpoint-dev-zero":
            assert d in hostile[case]["message"], (case, hostile[case]["message"])


def test_genuine_files_above_the_ratio_threshold_load_when_the_limit_is_raised(tmp_path, monkeypatch):
    from vaelab import safeio

    monkeypatch.setattr(safeio, "RATIO_FREE", 1 << 16)
    x = np.zeros((300, 28, 28), np.uint8)
    write_idx(tmp_path / "z-idx3-ubyte.gz", x)
    with pytest.raises(DataError, match="VAELAB_MAX_RATIO"):
        vaelab.data.read_idx(tmp_path / "z-idx3-ubyte.gz")
    monkeypatch.setenv("VAELAB_MAX_RATIO", "100000")
    assert np.array_equal(vaelab.data.read_idx(tmp_path / "z-idx3-ubyte.gz"), x)
    monkeypatch.setenv("VAELAB_MAX_BYTES", "lots")
    with pytest.raises(ConfigError, match="VAELAB_MAX_BYTES='lots'"):
        vaelab.data.read_idx(tmp_path / "z-idx3-ubyte.gz")


def test_concatenated_gzip_members_still_load(tmp_path):
    x = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    raw = io.BytesIO()
    write_idx(tmp_path / "a-idx3-ubyte", x)
    data = (tmp_path / "a-idx3-ubyte").read_bytes()
    raw.write(gzip.compress(data[:30]) + gzip.compress(data[30:]))
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(raw.getvalue())
    assert np.array_equal(vaelab.data.read_idx(tmp_path / "b-idx3-ubyte.gz"), x)


def test_npz_and_npy_mixed_up_get_a_hint(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 3), np.uint8))
    _npz(tmp_path / "b.npz", np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match="is a single .npy array, not an .npz archive; use npy:"):
        vaelab.data.load_splits(DataConfig(name=f"npz:{tmp_path / 'a.npy'}"))
    with pytest.raises(DataError, match="is an .npz \\(zip\\) archive.*use npz:"):
        vaelab.data.load_splits(DataConfig(name=f"npy:{tmp_path / 'b.npz'}"))
    with pytest.raises(DataError, match="not an .npz file") as e:
        vaelab.data.load_splits(DataConfig(name=f"npz:{tmp_path / 'data.csv'}"))
    assert "pickle" not in str(e.value)


# ---------------------------------------------------------------- deep nesting
def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path):
    good = _tiny_checkpoint(tmp_path / "good.safetensors")
    deep = "[" * 200_000 + "]" * 200_000
    _resave(good, tmp_path / "meta.safetensors", edit=lambda m: m.__setitem__("config", deep))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(tmp_path / "meta.safetensors")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_config(tmp_path / "meta.safetensors")
    # the safetensors header itself
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header)[:-1] + ', "x": ' + deep + "}"
    (tmp_path / "header.safetensors").write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n :])
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(tmp_path / "header.safetensors")
    # config files and --set
    (tmp_path / "c.json").write_text('{"train": {"lr": ' + deep + "}}")
    (tmp_path / "c.toml").write_text("[train]\nlr = " + "[" * 100_000 + "]" * 100_000 + "\n")
    for f in ("c.json", "c.toml"):
        with pytest.raises(ConfigError, match=f"{f}: not valid .*nested too deeply"):
            vaelab.config.load_config_file(tmp_path / f)
    with pytest.raises(ConfigError, match="nested too deeply"):
        vaelab.config.apply_overrides({}, ["train.lr=" + deep])


# ---------------------------------------------------------------- crafted training state
def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--run", str(run), "--data", "mnist", "--data-dir", str(data), "--no-download",
            "--val-size", "16", "--latent-dim", "4", "--hidden", "16", "--epochs", "1", "--batch-size", "16",
            "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run stopped mid-epoch (module-wide, never modified: tests copy what they change)."""
    root = tmp_path_factory.mktemp("resumable")
    rng = np.random.default_rng(0)
    data = root / "data" / "mnist"
    data.mkdir(parents=True)
    for split, n in (("train", 80), ("t10k", 20)):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    assert cli.main([*_args(root / "data", root / "run"), "--max-steps", "2"]) == 0
    return root / "run", root / "data"


def _crafted(resumable, tmp_path: Path, **kw) -> Path:
    run, _ = resumable
    dst = tmp_path / "run"
    _resave(RunDir.of(run).latest, dst / "checkpoints" / "latest.safetensors", **kw)
    (dst / "config.json").write_bytes((run / "config.json").read_bytes())
    return dst


def _optim_tensor(name: str, fn):
    return {"tensors": lambda t: t.__setitem__(name, fn(t[name]))}


_STATE = {
    "adam-buffer-too-small": (_optim_tensor("optim/0/exp_avg", lambda v: v.flatten()[:3].contiguous()),
                              "parameter 0 'exp_avg': shape (3,) does not match the parameter's (16, 64)"),
    "adam-buffer-wrong-dtype": (_optim_tensor("optim/0/exp_avg_sq", lambda v: v.double()),
                                "'exp_avg_sq': dtype torch.float64 does not match"),
    "adam-buffer-nan": (_optim_tensor("optim/1/exp_avg", lambda v: torch.full_like(v, math.nan)),
                        "parameter 1 'exp_avg': holds NaN"),
    "adam-step-negative": (_optim_tensor("optim/0/step", lambda v: torch.full_like(v, -3.0)),
                           "'step': step must be a non-negative whole number"),
    "adam-step-not-a-scalar": (_optim_tensor("optim/0/step", lambda v: torch.zeros(5)),
                               "step must be one number"),
    "optimizer-lr-nan": ({"edit": _edit_json("optimizer", lambda o: o["param_groups"][0].__setitem__("lr", math.nan))},
                         "parameter group 0: lr must be a finite number"),
    "optimizer-betas-out-of-range": ({"edit": _edit_json("optimizer", lambda o: o["param_groups"][0].__setitem__(
        "betas", [0.9, 1.5]))}, "betas must lie in [0, 1)"),
    "optimizer-param-ids": ({"edit": _edit_json("optimizer", lambda o: o["param_groups"][0].__setitem__(
        "params", [0, 1, 2]))}, "parameter ids [0, 1, 2] do not match"),
    "optimizer-unknown-parameter": ({"edit": _edit_json("optimizer", lambda o: o["state"].__setitem__(
        "99", o["state"]["0"]))}, "entry for parameter 99"),
    "torch-rng-wrong-size": ({"tensors": lambda t: t.__setitem__("rng/torch", t["rng/torch"][:100].clone())},
                             "rng/torch (expected 5056 bytes of uint8"),
    "noise-rng-wrong-size": ({"tensors": lambda t: t.__setitem__("rng/noise/0", torch.zeros(7, dtype=torch.uint8))},
                             "rng/noise/0"),
    "numpy-rng-wrong-size": ({"tensors": lambda t: t.__setitem__("rng/numpy", t["rng/numpy"][:12].clone())},
                             "random number generator state (numpy)"),
    "python-rng-wrong": ({"edit": _edit_json("state", lambda s: s["rng_meta"]["python"].__setitem__(1, [1, 2]))},
                         "random number generator state (python)"),
    "epoch-negative": ({"edit": _edit_json("state", lambda s: s.__setitem__("epoch", -1))},
                       "epoch must be a whole number >= 0, got -1"),
    "step-not-a-number": ({"edit": _edit_json("state", lambda s: s.__setitem__("step", "many"))},
                          "step must be a whole number >= 0, got 'many'"),
    "step-in-epoch-past-step": ({"edit": _edit_json("state", lambda s: s.__setitem__("step_in_epoch", 10**6))},
                                "step_in_epoch 1000000 exceeds step"),
    "best-val-nan": ({"edit": _edit_json("state", lambda s: s.__setitem__("best_val", math.nan))},
                     "best_val must be a number or -inf"),
    "sums-infinite": ({"edit": _edit_json("state", lambda s: s["sums"].__setitem__("loss", math.inf))},
                      "sums must map names to finite numbers"),
}


@pytest.mark.parametrize("case", sorted(_STATE))
def test_crafted_training_state_is_refused_naming_the_entry(resumable, tmp_path, case):
    edit, text = _STATE[case]
    run = _crafted(resumable, tmp_path, **edit)
    cfg = load_checkpoint(run / "checkpoints" / "latest.safetensors").config
    torch_state = torch.get_rng_state()
    with pytest.raises(CheckpointError) as e:
        train(cfg, run, data=None)
    assert str(run / "checkpoints" / "latest.safetensors") in str(e.value) and text in str(e.value), str(e.value)
    assert torch.equal(torch.get_rng_state(), torch_state) or "rng" not in case  # nothing half-restored


def test_a_wrong_sized_adam_buffer_is_an_error_not_a_crash_of_the_fused_kernel(resumable, tmp_path):
    """In a child process: before the check, `train --resume` died of a segmentation fault here."""
    run = _crafted(resumable, tmp_path, **_STATE["adam-buffer-too-small"][0])
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "vaelab", "train", "--resume", str(run), "--no-progress",
                        "--data-dir", str(resumable[1])], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vaelab: error:") and "exp_avg" in r.stderr


def test_resuming_an_untouched_checkpoint_still_works(resumable, tmp_path):
    run = _crafted(resumable, tmp_path)
    assert cli.main(["train", "--resume", str(run), "--no-progress", "--data-dir", str(resumable[1])]) == 0


# ---------------------------------------------------------------- the run lock
def test_a_full_disk_when_taking_the_run_lock_is_one_line(resumable, tmp_path, monkeypatch, capsys):
    import vaelab.runs.lock as lockmod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lockmod.os, "write", full)
    assert cli.main(_args(resumable[1], tmp_path / "new")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the run lock: No space left on device" in err, err
    assert not (tmp_path / "new").exists()  # nothing left behind


# ---------------------------------------------------------------- the command line
def _cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse
        return int(e.code or 0)


@pytest.fixture(scope="module")
def finished(resumable, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    assert cli.main(_args(resumable[1], root / "run")) == 0
    (root / "afile").write_text("not a folder")
    return root / "run", resumable[1]


def _bad_args(run: Path, data: Path, root: Path) -> dict[str, tuple[list[str], str]]:
    t = ["--data", "mnist", "--data-dir", str(data), "--no-download", "--no-progress"]
    new = str(root / "new")
    return {
        "negative --hidden": (["train", "--run", new, *t, "--hidden", "-5"], "--hidden: model.hidden must be sizes >= 1"),
        "negative --image-size": (["train", "--run", new, *t, "--image-size", "-1"], "--image-size: data.image_size"),
        "negative --threads": (["train", "--run", new, *t, "--threads", "-1"], "--threads: train.threads must be in 1..1024"),
        "huge --seed": (["train", "--run", new, *t, "--seed", str(10**30)], "train.seed must be an integer in 0..4294967295"),
        "NaN --sigma": (["train", "--run", new, *t, "--likelihood", "gaussian", "--sigma", "nan"],
                        "--sigma: model.sigma must be > 0 (a finite number), got nan"),
        "NaN --beta": (["train", "--run", new, *t, "--beta", "nan"], "--beta: train.beta must be >= 0"),
        "NaN --lr": (["train", "--run", new, *t, "--lr", "nan"], "--lr: train.lr must be > 0"),
        "--weight-decay -1": (["train", "--run", new, *t, "--weight-decay", "-1"], "train.weight_decay must be >= 0"),
        "Adam betas out of range": (["train", "--run", new, *t, "--set", "train.adam_betas=[0.9,1.0]"],
                                    "train.adam_betas must be two numbers in [0, 1)"),
        "--run is a file": (["train", "--run", str(root / "afile"), *t], "cannot be a run directory: it is a file"),
        "--run under a file": (["train", "--run", str(root / "afile" / "run"), *t], "which is a file, not a folder"),
        "abbreviated --ep": (["train", "--run", new, *t, "--ep", "3"], "unrecognized arguments: --ep 3"),
        "--max-steps 0": (["train", "--run", new, *t, "--max-steps", "0"], "--max-steps must be >= 1"),
        "data path without a prefix": (["train", "--run", new, "--data", str(root / "afile")], "e.g. --data npz:"),
        "data set typo": (["train", "--run", new, "--data", "fashion-mnst"], "did you mean 'fashion-mnist'?"),
        "evaluate -k 0": (["evaluate", str(run), "-k", "0", "--no-progress"], "k (importance samples per datapoint) must"),
        "evaluate -k -1": (["evaluate", str(run), "-k", "-1", "--no-progress"], "must be an integer >= 1, got -1"),
        "evaluate --limit 0": (["evaluate", str(run), "--limit", "0", "-k", "2", "--no-progress"], "limit"),
        "evaluate --limit -3": (["evaluate", str(run), "--limit", "-3", "-k", "2", "--no-progress"], "got -3"),
        "evaluate --batch-size 0": (["evaluate", str(run), "--batch-size", "0", "-k", "2", "--no-progress"], "batch_size"),
        "evaluate -k x": (["evaluate", str(run), "-k", "x"], "argument -k: invalid int value: 'x'"),
        "evaluate a FIFO checkpoint": (["evaluate", str(run), "--checkpoint", str(root / "fifo"), "-k", "2"], "FIFO"),
        "sample -n -1": (["sample", str(run), "-n", "-1"], "n (images to sample) must be an integer in 1..10000"),
        "sample --seed -1": (["sample", str(run), "--seed", "-1"], "seed must be an integer in 0..4294967295"),
        "sample --temperature nan": (["sample", str(run), "--temperature", "nan"], "temperature must be a finite"),
        "sample --out a directory": (["sample", str(run), "--out", str(root)], "is a directory; give a file name"),
        "sample --out under a file": (["sample", str(run), "--out", str(root / "afile" / "s.png")], "is a file"),
        "interpolate past the split": (["interpolate", str(run), "--a", "500"], "image 500 requested, the test split has 20"),
        "interpolate negative index": (["interpolate", str(run), "--b", "-1"], "b (index of the second image)"),
        "manifold --dims x": (["manifold", str(run), "--dims", "x"], "--dims takes two latent dimensions"),
        "manifold --dims 0,9": (["manifold", str(run), "--dims", "0,9"], "give two different latent dimensions in 0..3"),
        "reconstruct -n 0": (["reconstruct", str(run), "-n", "0"], "n (images to reconstruct) must be"),
        "encode --out a directory": (["encode", str(run), "--out", str(root)], "is a directory"),
        "demo --epochs 0": (["demo", "--epochs", "0"], "--epochs must be an integer >= 1"),
    }


def test_every_bad_argument_is_exit_code_2_and_one_line(finished, capsys):
    run, data = finished
    root = run.parent
    if not (root / "fifo").exists():
        os.mkfifo(root / "fifo")
    failures = []
    for name, (argv, text) in _bad_args(run, data, root).items():
        rc = _cli(argv)
        err = capsys.readouterr().err
        lines = err.splitlines()
        if rc != 2 or len(lines) != 1 or not lines[0].startswith("vaelab: error:") or text not in err:
            failures.append(f"{name}: rc={rc} stderr={err!r}")
    assert not failures, "\n".join(failures)
    assert not (root / "new").exists()


def test_fewer_images_than_asked_is_one_warning_line(finished, capsys, tmp_path):
    run, _ = finished
    assert _cli(["reconstruct", str(run), "-n", "50", "--out", str(tmp_path / "r.png")]) == 0
    err = capsys.readouterr().err
    assert err == f"vaelab: warning: {run}: the test split has 20 images; reconstructing all 20, not 50\n"


# ---------------------------------------------------------------- configs built in Python
@pytest.mark.parametrize(("section", "kw", "text"), [
    (TrainConfig, {"lr": math.nan}, "train.lr must be > 0"),
    (TrainConfig, {"lr": "fast"}, "train.lr: expected a number"),
    (TrainConfig, {"beta": math.inf}, "train.beta must be >= 0"),
    (TrainConfig, {"adam_betas": (0.9, -0.1)}, "train.adam_betas"),
    (TrainConfig, {"adam_eps": -1.0}, "train.adam_eps"),
    (TrainConfig, {"grad_clip": math.nan}, "train.grad_clip"),
    (TrainConfig, {"batch_size": 0}, "train.batch_size must be >= 1"),
    (TrainConfig, {"epochs": True}, "train.epochs: expected an integer"),
    (TrainConfig, {"seed": -1}, "train.seed"),
    (TrainConfig, {"threads": 0}, "train.threads"),
    (ModelConfig, {"hidden": (16, 0)}, "model.hidden"),
    (ModelConfig, {"sigma": math.nan}, "model.sigma"),
    (ModelConfig, {"latent_dim": 0}, "model.latent_dim"),
    (DataConfig, {"limit_train": 0}, "data.limit_train"),
    (DataConfig, {"image_size": -1}, "data.image_size"),
    (DataConfig, {"seed": 2**40}, "data.seed"),
])
def test_configs_built_in_python_are_checked_too(section, kw, text):
    with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
        section(**kw)


def test_configs_built_in_python_are_normalised():
    assert ModelConfig(hidden=[16, 8]).hidden == (16, 8)
    assert isinstance(TrainConfig(lr=1).lr, float) and TrainConfig(epochs=np.int64(3)).epochs == 3


# ---------------------------------------------------------------- strict JSON outputs
def test_json_outputs_hold_no_nan_or_infinity(finished, tmp_path, capsys):
    run, data = finished

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    capsys.readouterr()
    assert _cli(["evaluate", str(run), "-k", "2", "--limit", "1", "--json", "--no-progress"]) == 0
    res = strict(capsys.readouterr().out)
    assert res["n"] == 1 and res["nll_stderr"] is None  # undefined for one datapoint: null, not NaN
    strict((run / "eval" / "test-k2.json").read_text())
    assert cli.main(_args(data, tmp_path / "noval", "--val-size", "0")) == 0
    rows = [strict(line) for line in (tmp_path / "noval" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_elbo"] is None
