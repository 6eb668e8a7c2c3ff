"""Where a run computes: devices (CPU here; CUDA where present, those tests skip elsewhere) and
precision (bf16 autocast on the CPU; fp16 with a gradient scaler on a GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab.cli import main
from vaelab.devices import resolve_device
from vaelab.errors import ConfigError
from vaelab.runs import RunDir, load_checkpoint

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(tiny_cfg, device: str, precision: str = "fp32", epochs: int = 2):
    return tiny_cfg.replace(train=replace(tiny_cfg.train, device=device, precision=precision, epochs=epochs,
                                          checkpoint_every=3))


def _same(a: Path, b: Path) -> None:
    ta, tb = (load_file(RunDir.of(r).latest) for r in (a, b))
    assert sorted(ta) == sorted(tb)
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.mark.parametrize("device", DEVICES)
def test_train_resume_evaluate_and_draw_on_every_device(tiny_cfg, tmp_path, device):
    cfg = _cfg(tiny_cfg, device)
    res = vaelab.train(cfg, tmp_path / "straight")
    assert next(res.model.parameters()).device.type == device
    assert load_checkpoint(RunDir.of(tmp_path / "straight").latest).state["device"] == device
    for stop in (4, 9):  # mid-epoch, and into the second epoch (7 steps per epoch)
        vaelab.train(cfg, tmp_path / "cut", max_steps=stop)
    vaelab.train(cfg, tmp_path / "cut")
    _same(tmp_path / "straight", tmp_path / "cut")  # bit-identical on the same device kind
    ev = vaelab.evaluate_run(tmp_path / "straight", k=20, progress=False, write=False, device=device)
    assert ev.nll <= ev.neg_elbo + 1.0
    assert vaelab.sample_run(tmp_path / "straight", tmp_path / "s.png", n=4, device=device).exists()
    run = vaelab.load_run(tmp_path / "straight", device=device)
    assert run.device.type == device and next(run.model.parameters()).device.type == device


def test_bf16_on_the_cpu_trains_to_within_half_a_nat_of_fp32(tmp_path):
    """bf16 autocast (float32 master weights and reductions) against fp32, the same short run:
    measured 0.01 and 0.07 nats apart for two seeds, where seeds differ among themselves by 0.03."""
    from conftest import write_mnist

    data = write_mnist(tmp_path / "data" / "mnist", n_train=3000, n_test=500).parent
    base = vaelab.RunConfig(
        data=vaelab.DataConfig("mnist", data_dir=str(data), val_size=200, download=False),
        model=vaelab.ModelConfig(latent_dim=8, hidden=(128,)),
        train=vaelab.TrainConfig(epochs=10, batch_size=64, progress=False, threads=1, device="cpu"),
    )
    nelbo = {}
    for precision in ("fp32", "bf16"):
        cfg = base.replace(train=replace(base.train, precision=precision))
        res = vaelab.train(cfg, tmp_path / precision)
        assert all(p.dtype == torch.float32 for p in res.model.parameters())  # float32 master weights
        nelbo[precision] = vaelab.evaluate_run(tmp_path / precision, k=1, progress=False, write=False).neg_elbo
    assert abs(nelbo["bf16"] - nelbo["fp32"]) < 0.5, nelbo


def test_under_autocast_distributions_get_float32_parameters():
    model = vaelab.build_model(vaelab.ModelConfig(latent_dim=3, hidden=(16,)), vaelab.DataSpec((1, 4, 4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert model.encoder(torch.rand(5, 1, 4, 4)).dtype == torch.bfloat16  # the network runs in bf16 ...
    layer = out.layers[0]
    assert out.likelihood.logits.dtype == layer.q.mu.dtype == layer.z.dtype == torch.float32  # ... its outputs not


def test_devices_and_precisions_that_are_not_there_are_one_line(tiny_cfg, tmp_path, capsys):
    with pytest.raises(ConfigError, match="device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda, cuda:N or mps"):
        vaelab.TrainConfig(device="gpu")
    with pytest.raises(ConfigError, match="train.precision must be fp32, bf16 or fp16"):
        vaelab.TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        vaelab.train(_cfg(tiny_cfg, "cpu", "fp16"), tmp_path / "fp16")
    assert not (tmp_path / "fp16" / "checkpoints").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda:0")
        assert resolve_device("auto").type in ("cpu", "mps")
        assert main(["train", "--data", "mnist", "--device", "cuda", "--run", str(tmp_path / "r")]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


@cuda_only
def test_fp16_with_a_gradient_scaler_resumes_bit_identically(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "cuda", "fp16")
    vaelab.train(cfg, tmp_path / "straight")
    scaler = load_checkpoint(RunDir.of(tmp_path / "straight").latest).state["grad_scaler"]
    assert scaler["scale"] > 0
    vaelab.train(cfg, tmp_path / "cut", max_steps=5)
    vaelab.train(cfg, tmp_path / "cut")
    _same(tmp_path / "straight", tmp_path / "cut")


@cuda_only
def test_a_checkpoint_moves_between_device_kinds(tiny_cfg, tmp_path, capsys):
    vaelab.train(_cfg(tiny_cfg, "cpu", epochs=1), tmp_path / "run")
    res = vaelab.train(_cfg(tiny_cfg, "cuda", epochs=2), tmp_path / "run")
    assert "resuming on cuda a run trained on cpu" in capsys.readouterr().out
    assert res.state.epoch == 2 and next(res.model.parameters()).is_cuda
    ev = vaelab.evaluate_run(tmp_path / "run", k=5, progress=False, write=False, device="cpu")
    assert ev.nll <= ev.neg_elbo + 1.0


@cuda_only
def test_data_that_does_not_fit_on_the_gpu_is_moved_batch_by_batch(tiny_cfg, tmp_path, monkeypatch):
    import vaelab.training.feed as feed

    vaelab.train(_cfg(tiny_cfg, "cuda"), tmp_path / "on-gpu")
    monkeypatch.setattr(feed, "fits_on", lambda device, nbytes, share=0.5: False)
    vaelab.train(_cfg(tiny_cfg, "cuda"), tmp_path / "pinned")
    _same(tmp_path / "on-gpu", tmp_path / "pinned")  # the same batches, wherever the data lives
