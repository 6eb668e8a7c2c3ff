"""Safe loading: weights only through safetensors, configs only through JSON. A pickle is refused and
never executed (a malicious payload would create a marker file), wherever it is handed to vaelab;
a checkpoint that disagrees with its config, or is truncated or corrupted, is a CheckpointError
saying what is wrong; bad configuration on the command line is a ConfigError, exit code 2."""

from __future__ import annotations

import importlib
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vaelab import cli
from vaelab.config import DataConfig
from vaelab.data import load_data, write_idx
from vaelab.errors import CheckpointError, DataError, VaelabError
from vaelab.models import build_model
from vaelab.runs import RunDir, load_checkpoint, load_run
from vaelab.runs.checkpoint import load_model_state, read_config, read_metadata
from vaelab.training import train

MARKER_NAME = "PWNED"


class Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_tiny_mnist(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 80), ("t10k", 20)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def tiny_args(data_dir: Path, epochs: int = 1) -> list[str]:
    return ["--data", "mnist", "--data-dir", str(data_dir), "--no-download", "--val-size", "16",
            "--latent-dim", "4", "--hidden", "16", "--epochs", str(epochs), "--batch-size", "16",
            "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (module-wide, never modified: tests copy what they change)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_tiny_mnist(root / "data")
    assert cli.main(["train", "--run", str(root / "run"), *tiny_args(data)]) == 0
    return root / "run", data


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / MARKER_NAME
    yield m
    assert not m.exists(), "a pickle payload was executed"


def _payloads(marker: Path) -> dict[str, bytes]:
    evil = {"model": Evil(marker)}
    buf = io.BytesIO()
    torch.save(evil, buf)  # what a PyTorch .pt checkpoint looks like (a zip holding a pickle)
    return {f"protocol{p}": pickle.dumps(evil, protocol=p) for p in (0, 2, 4, 5)} | {"torch-zip": buf.getvalue()}


# ---------------------------------------------------------------- pickles are never executed
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".ckpt", ".bin", ".safetensors", ""])
@pytest.mark.parametrize("kind", ["protocol0", "protocol2", "protocol4", "protocol5", "torch-zip"])
def test_load_checkpoint_refuses_pickles_without_running_them(tmp_path, marker, suffix, kind):
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(_payloads(marker)[kind])
    with pytest.raises(CheckpointError, match=str(path)) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "pickle" in msg or "safetensors" in msg
    with pytest.raises(CheckpointError):
        load_run(path)


def test_a_pickle_in_a_run_directory_is_refused_by_load_run_and_the_cli(tmp_path, marker, trained, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    payload = _payloads(marker)
    (run / "checkpoints" / "best.safetensors").write_bytes(payload["protocol2"])
    (run / "checkpoints" / "latest.safetensors").write_bytes(payload["torch-zip"])
    (run / "model.pt").write_bytes(payload["protocol4"])
    with pytest.raises(CheckpointError, match="pickle"):
        load_run(run)
    with pytest.raises(CheckpointError, match="pickle"):
        load_run(run, "latest")
    _, data = trained
    for argv in (["evaluate", str(run), "-k", "2", "--no-progress", "--data-dir", str(data)],
                 ["evaluate", str(run), "--checkpoint", str(run / "model.pt"), "-k", "2", "--no-progress"],
                 ["evaluate", str(run / "model.pt"), "-k", "2", "--no-progress"],
                 ["sample", str(run), "--out", str(tmp_path / "s.png")],
                 ["train", "--resume", str(run), "--no-progress"],
                 ["train", "--run", str(run), *tiny_args(data)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vaelab: error:") and "pickle" in err and "Traceback" not in err, (argv, err)


@pytest.mark.skipif(importlib.util.find_spec("vaelab.data.cifar") is None, reason="no CIFAR loader")
def test_a_malicious_cifar_python_batch_is_not_executed(tmp_path, marker):
    from vaelab.data.cifar import CIFAR10

    folder = tmp_path / CIFAR10.py_dir
    folder.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    for names in CIFAR10.py_members.values():
        for n in names:
            (folder / n).write_bytes(good)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*refusing to unpickle"):
        load_data(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False, val_size=1))
    # also inside the .tar.gz
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"{CIFAR10.py_dir}/{f.name}")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_data(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False, val_size=1))


@pytest.mark.skipif(importlib.util.find_spec("vaelab.data.arrays") is None, reason="no npz loader")
def test_pickled_object_arrays_in_npz_are_not_executed(tmp_path, marker):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([Evil(marker), None], dtype=object))
    with pytest.raises(DataError, match="evil.npz"):
        load_data(DataConfig(name=f"npz:{path}", download=False, val_size=0))
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([Evil(marker)], dtype=object))
    with pytest.raises(DataError, match="evil.npy"):
        load_data(DataConfig(name=f"npy:{npy}", download=False, val_size=0))


# ---------------------------------------------------------------- config and tensors must agree
def _resave(src: Path, dst: Path, edit_config=None, edit_meta=None) -> Path:
    """Copy a checkpoint, editing its JSON metadata; tensors unchanged."""
    raw = src.read_bytes()
    tensors, meta = st_load(raw), dict(read_metadata(src, raw))
    if edit_config is not None:
        cfg = json.loads(meta["config"])
        edit_config(cfg)
        meta["config"] = json.dumps(cfg)
    if edit_meta is not None:
        edit_meta(meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(st_save(tensors, metadata=meta))
    return dst


def _set(section: str, key: str, value):
    return {"edit_config": lambda cfg: cfg[section].__setitem__(key, value)}


def _set_data(key: str, value):
    """Edit the data description (image shape, ...) saved beside the config."""
    def edit(meta):
        d = json.loads(meta["data"])
        d[key] = value
        meta["data"] = json.dumps(d)

    return {"edit_meta": edit}


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (_set("model", "latent_dim", 5), r"checkpoint has shape \(8, 16\), config implies \(10, 16\)"),
        (_set("model", "hidden", [24]), r"checkpoint has shape \(16, 64\), config implies \(24, 64\)"),
        (_set_data("shape", [1, 7, 7]), r"config implies \(16, 49\)"),
        (_set("model", "likelihood", "gaussian-learned"), r"missing tensors: likelihood.log_sigma"),
        (_set("model", "encoder", "conv"), r"(?s)missing tensors: encoder\..*unexpected tensors: encoder\."),
    ],
    ids=["latent_dim", "hidden", "input_shape", "another-likelihood", "another-encoder"],
)
def test_a_checkpoint_whose_config_disagrees_with_its_tensors_is_refused(trained, tmp_path, edit, expect):
    run, _ = trained
    bad = _resave(RunDir.of(run).latest, tmp_path / "run" / "checkpoints" / "latest.safetensors", **edit)
    with pytest.raises(CheckpointError, match="does not match its model config") as e:
        load_run(bad)
    assert str(bad) in str(e.value)
    assert re.search(expect, str(e.value), re.S), str(e.value)
    with pytest.raises(VaelabError) as e:  # resuming it too (input_shape: the data disagree first)
        train(load_checkpoint(bad).config, tmp_path / "run")
    assert re.search(expect, str(e.value), re.S) or re.search(
        r"trained on data with images of shape \(1, 7, 7\).*now give images of shape \(1, 8, 8\)", str(e.value))


def test_weights_for_another_model_are_refused_naming_every_difference(trained):
    run, _ = trained
    ck = load_checkpoint(RunDir.of(run).latest)
    other = build_model(ck.config.model.__class__(**{**ck.config.model.__dict__, "latent_dim": 3}), ck.spec)
    with pytest.raises(CheckpointError) as e:
        load_model_state(other, ck.model, "mine.safetensors")
    msg = str(e.value)
    assert msg.startswith("mine.safetensors: checkpoint does not match")
    assert "encoder" in msg and "decoder" in msg  # both networks' differing tensors are listed


@pytest.mark.parametrize(
    ("edit_meta", "expect"),
    [
        (lambda m: m.__setitem__("config", "{not json"), "corrupted 'config' metadata"),
        (lambda m: m.__setitem__("config", "[1, 2]"), "expected a JSON dict"),
        (lambda m: m.__setitem__("config", json.dumps({"model": {"bogus": 1}})), r"unknown key\(s\) \['bogus'\]"),
        (lambda m: m.__setitem__("state", "nope"), "corrupted 'state' metadata"),
        (lambda m: m.__setitem__("optimizer", '{"state": 3}'), "optimizer state is incomplete or corrupted"),
        (lambda m: m.pop("format"), "not a vaelab checkpoint"),
        (lambda m: m.pop("config"), "no 'config' entry"),
    ],
    ids=["config-not-json", "config-not-object", "config-unknown-key", "state", "optimizer", "format", "no-config"],
)
def test_corrupted_metadata_is_a_checkpoint_error(trained, tmp_path, edit_meta, expect):
    run, _ = trained
    bad = _resave(RunDir.of(run).latest, tmp_path / "c.safetensors", edit_meta=edit_meta)
    with pytest.raises(CheckpointError, match=expect):
        load_checkpoint(bad)


def test_corrupted_training_state_is_refused_on_resume(trained, tmp_path):
    run, _ = trained
    dst = tmp_path / "run" / "checkpoints" / "latest.safetensors"
    _resave(RunDir.of(run).latest, dst, edit_meta=lambda m: m.__setitem__("state", '{"epoch": 1, "bogus": 2}'))
    with pytest.raises(CheckpointError, match=re.escape(f"{dst}: corrupted training state: unknown entries ['bogus']")):
        train(load_checkpoint(dst).config, tmp_path / "run")


@pytest.mark.parametrize("name, content", [
    ("README.md", b"# vaelab\n\nVariational autoencoders on images. See docs/quickstart.md.\n"),
    ("notes.txt", b"no full stop at the end"),
    ("picture.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
    ("model.safetensors", b"hello, this is not a checkpoint."),
])
def test_a_file_that_is_no_checkpoint_at_all_is_named_plainly(tmp_path, capsys, name, content):
    """A text file or picture given as RUN is "not a vaelab run or checkpoint", not a corrupted header
    or a pickle (README.md ends with a full stop, which once read as a pickle's STOP)."""
    path = tmp_path / name
    path.write_bytes(content)
    for load in (load_checkpoint, read_config):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert str(e.value).startswith(f"{path}: not a vaelab run or checkpoint") and "pickle" not in str(e.value)
    for argv in (["evaluate", str(path), "-k", "2", "--no-progress"], ["sample", str(path)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == f"vaelab: error: {path}: not a vaelab run or checkpoint (not a safetensors file)\n", err


def test_a_protocol_0_pickle_is_still_refused_as_a_pickle(tmp_path, marker):
    path = tmp_path / "weights"
    path.write_bytes(_payloads(marker)["protocol0"])
    for load in (load_checkpoint, read_config):
        with pytest.raises(CheckpointError, match="refusing to load a pickle"):
            load(path)


def test_every_truncation_of_a_checkpoint_is_a_checkpoint_error(trained, tmp_path):
    raw = RunDir.of(trained[0]).latest.read_bytes()
    path = tmp_path / "t.safetensors"
    cuts = sorted({0, 1, 7, 8, 9, 100, len(raw) // 2, len(raw) - 1} | set(range(0, len(raw), max(1, len(raw) // 97))))
    for cut in cuts:
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_checkpoints_load_or_raise_vaelab_errors(trained, tmp_path, flips, cut):
    """Random byte flips (mostly in the header, where they matter) and truncations: load_checkpoint
    either loads or raises CheckpointError; loading the weights into the model that the (possibly
    altered) config describes either works or raises a VaelabError."""
    raw = bytearray(RunDir.of(trained[0]).latest.read_bytes())
    head = 8 + int.from_bytes(raw[:8], "little")
    for pos, x in flips:
        raw[int(pos * head)] ^= x
    if cut is not None:
        del raw[int(cut * len(raw)):]
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        ck = load_checkpoint(path)
    except CheckpointError:
        return
    try:
        load_model_state(build_model(ck.config.model, ck.spec), ck.model, str(path))
    except VaelabError:
        pass


# ---------------------------------------------------------------- bad configuration on the CLI
@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--set", "train.bogus=1"], r"unknown key\(s\) \['bogus'\]"),
        (["--set", "nosuchsection.lr=1"], r"unknown key\(s\) \['nosuchsection'\]"),
        (["--set", "train.lr=fast"], "train.lr: expected a number"),
        (["--set", "train.lr=-1"], "train.lr must be > 0"),
        (["--set", "model.latent_dim=0"], "latent_dim must be >= 1"),
        (["--set", "train.lr"], "must look like section.key=value"),
        (["--set", "a.b.c=1"], "key must be section.key"),
        (["--epochs", "many"], "--epochs: invalid value 'many'"),
        (["--likelihood", "poisson"], "unknown likelihood 'poisson'; known: bernoulli"),
        (["--binarize", "sometimes"], "data.binarize must be none, dynamic or fixed"),
        (["--config", "/nonexistent/cfg.toml"], "cannot read config"),
    ],
)
def test_bad_configuration_is_a_config_error_with_exit_code_2(trained, tmp_path, capsys, extra, expect):
    _, data = trained
    rc = cli.main(["train", "--run", str(tmp_path / "run"), *tiny_args(data), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vaelab: error:") and "Traceback" not in err
    assert re.search(expect, err), err


def test_a_malformed_config_file_is_a_config_error(trained, tmp_path, capsys):
    _, data = trained
    for name, text in (("c.toml", "[train\nlr = 1"), ("c.json", "{\"train\": "), ("d.toml", "train = 3")):
        (tmp_path / name).write_text(text)
        rc = cli.main(["train", "--run", str(tmp_path / "run"), *tiny_args(data), "--config", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("vaelab: error:") and "Traceback" not in err, err
        assert name in err or "train" in err
