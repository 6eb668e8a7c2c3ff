"""Tracking: the callback interface (on_start/on_step/on_epoch/on_checkpoint/on_end) and the
TensorBoard logger (``train.log = "tensorboard"``), read back with tensorboard's own event reader."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab.cli import main
from vaelab.errors import ConfigError
from vaelab.runs import RunDir
from vaelab.training import Callback


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


class Recorder(Callback):
    def __init__(self):
        self.calls: list[tuple] = []

    def on_start(self, run):
        self.calls.append(("start", run.step, run.epoch, run.config.train.epochs))

    def on_step(self, step):
        self.calls.append(("step", step.step, step.epoch, step.batch, round(step.lr, 6), step.result.n))

    def on_epoch(self, row):
        self.calls.append(("epoch", row["epoch"], row["step"]))

    def on_checkpoint(self, ckpt):
        self.calls.append(("checkpoint", ckpt.step, tuple(p.name for p in ckpt.paths), ckpt.best))

    def on_end(self):
        self.calls.append(("end",))


def test_callbacks_see_every_step_epoch_and_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(train=replace(tiny_cfg.train, checkpoint_every=4))
    rec, rows = Recorder(), []
    vaelab.train(cfg, tmp_path / "run", callbacks=[rec, rows.append])  # an object and a plain function
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 14 and kinds.count("epoch") == 2
    assert rec.calls[0] == ("start", 0, 0, 2)
    steps = [c for c in rec.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, 15)) and steps[7][2:4] == (1, 1) and steps[0][4] == 0.001
    assert [c[2] for c in steps][:7] == [0] * 7 and sum(c[5] for c in steps[:7]) == 200
    ckpts = [c for c in rec.calls if c[0] == "checkpoint"]
    # mid-epoch every 4 steps (not at an epoch's last step), and at each epoch's end (best, then latest)
    assert [c[1] for c in ckpts] == [4, 7, 8, 12, 14]
    assert ckpts[1][2][-1] == "latest.safetensors" and ckpts[0][2] == ("latest.safetensors",) and not ckpts[0][3]
    assert [r["epoch"] for r in rows] == [1, 2]
    # resumed: on_start says where it starts
    rec2 = Recorder()
    vaelab.train(cfg.replace(train=replace(cfg.train, epochs=3)), tmp_path / "run", callbacks=[rec2])
    assert rec2.calls[0] == ("start", 14, 2, 3) and [c[1] for c in rec2.calls if c[0] == "step"] == list(range(15, 22))


def test_callbacks_end_even_when_training_fails(tiny_cfg, tmp_path):
    class Boom(Recorder):
        def on_step(self, step):
            super().on_step(step)
            if step.step == 3:
                raise RuntimeError("tracker down")

    rec = Boom()
    with pytest.raises(RuntimeError, match="tracker down"):
        vaelab.train(tiny_cfg, tmp_path / "run", callbacks=[rec])
    assert rec.calls[-1] == ("end",)


def test_tensorboard_logs_scalars_samples_and_config_without_changing_training(tiny_cfg, tmp_path):
    logged = tiny_cfg.replace(train=replace(tiny_cfg.train, log="tensorboard", log_every=3))
    vaelab.train(logged, tmp_path / "tb-run")
    vaelab.train(tiny_cfg, tmp_path / "plain")
    a, b = (load_file(RunDir.of(tmp_path / r).latest) for r in ("tb-run", "plain"))
    assert [k for k in a if k.startswith("model/") and not torch.equal(a[k], b[k])] == []  # the same weights
    acc = _events(tmp_path / "tb-run" / "tb")
    tags = acc.Tags()
    want = {"epoch/train_loss", "epoch/train_rec", "epoch/train_kl", "epoch/val_elbo", "epoch/val_rec", "epoch/val_kl",
            "epoch/beta", "step/loss", "step/grad_norm", "step/rec", "step/kl", "step/beta", "step/lr"}
    assert want <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in acc.Scalars("step/loss")] == [3, 6, 9, 12]
    assert [e.step for e in acc.Scalars("epoch/val_elbo")] == [7, 14]
    rows = RunDir.of(tmp_path / "tb-run").read_metrics()
    assert [e.value for e in acc.Scalars("epoch/val_elbo")] == pytest.approx([r["val_elbo"] for r in rows])
    assert "samples" in tags["images"] and [e.step for e in acc.Images("samples")] == [3, 6, 7, 9, 12, 14]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"latent_dim": 2' in text


def test_tensorboard_on_the_command_line_and_on_resume_of_a_run_without_it(mnist_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--no-download", "--val-size", "40", "--hidden",
            "16", "--latent-dim", "2", "--batch-size", "32", "--threads", "1", "--run", str(run), "--no-progress"]
    assert main([*args, "--epochs", "1"]) == 0  # a run trained without a tracker (as older runs were)
    assert not (run / "tb").exists()
    assert main([*args, "--epochs", "2", "--log", "tensorboard", "--log-every", "5"]) == 0  # resumed, now tracked
    acc = _events(run / "tb")
    assert [e.step for e in acc.Scalars("step/loss")] == [10] and [e.step for e in acc.Scalars("epoch/val_elbo")] == [14]


def test_older_checkpoint_configs_without_the_tracking_fields_load():
    d = vaelab.RunConfig().to_dict()
    del d["train"]["log"], d["train"]["log_every"]
    cfg = vaelab.RunConfig.from_dict(d)
    assert cfg.train.log == "none" and cfg.train.log_every == 100
    assert cfg.resume_with(cfg.replace(train=replace(cfg.train, log="tensorboard"))).train.log == "tensorboard"


def test_asking_for_tensorboard_without_the_package_is_one_line(tiny_cfg, tmp_path, monkeypatch, capsys, mnist_dir):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = tiny_cfg.replace(train=replace(tiny_cfg.train, log="tensorboard"))
    with pytest.raises(ConfigError, match=r"pip install 'vaelab\[tensorboard\]'"):
        vaelab.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert main(["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--log", "tensorboard",
                 "--run", str(tmp_path / "r2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the tensorboard package" in err
    with pytest.raises(ConfigError, match="train.log must be none or tensorboard"):
        vaelab.TrainConfig(log="wandb")
