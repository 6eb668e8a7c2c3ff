"""The command line end to end on tiny IDX files, and the Python API it is a layer over."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vaelab
from vaelab.cli import main


def _train_args(mnist_dir, run, *extra, net=True):
    sizes = ["--hidden", "32", "--latent-dim", "2"] if net else []
    return ["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--no-download", "--val-size", "40",
            *sizes, "--batch-size", "32", "--epochs", "2", "--threads", "1",
            "--run", str(run), "--no-progress", *extra]


def test_train_evaluate_generate_end_to_end(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(mnist_dir, run)) == 0
    assert (run / "config.json").exists() and (run / "checkpoints" / "latest.safetensors").exists()
    assert (run / "checkpoints" / "best.safetensors").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["val_elbo"]) for r in rows)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 2 and vaelab.load_run(run).spec.shape == (1, 28, 28)

    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "20", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 60 and res["k"] == 20 and res["latent_dim"] == 2
    assert res["nll"] <= res["neg_elbo"] + 1.0  # -L_k below -ELBO (up to Monte Carlo noise)
    assert "cross-entropy" in res["meaning"] and res["bits_per_dim"] is None
    assert len(res["kl_per_dim"]) == 2 and 0 <= res["active_units"] <= 2
    assert (run / "eval" / "test-k20.json").exists()
    assert main(["evaluate", str(run), "-k", "20", "--no-progress", "--json", "--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)  # the same draws, compiled: the same estimate up to rounding
    assert compiled["extra"]["compile"] and abs(compiled["nll"] - res["nll"]) < 1e-3

    assert main(["sample", str(run), "-n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == ((4 * 30 + 2) * 2,) * 2
    assert main(["reconstruct", str(run), "-n", "8"]) == 0
    assert (run / "reconstructions.png").exists()
    assert main(["interpolate", str(run), "--steps", "5"]) == 0
    assert Image.open(run / "interpolation.png").size[0] == (7 * 30 + 2) * 2
    assert main(["manifold", str(run), "-n", "5"]) == 0
    assert Image.open(run / "manifold.png").size == ((5 * 30 + 2) * 2,) * 2  # the padding and scale of every grid
    assert main(["encode", str(run), "--out", str(tmp_path / "z.npy")]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (60, 2) and np.load(tmp_path / "z_labels.npy").shape == (60,)


def test_rerunning_resumes_and_more_epochs_continue(mnist_dir, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(mnist_dir, run)) == 0
    assert main(_train_args(mnist_dir, run, "--epochs", "3")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # a changed model is refused instead of silently mixing runs
    assert main(_train_args(mnist_dir, run, "--latent-dim", "3", "--epochs", "4")) == 2


def test_rerunning_an_existing_run_keeps_its_config_and_takes_only_the_flags_given(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(mnist_dir, run, "--latent-dim", "3", "--lr", "0.002", net=False)) == 0
    capsys.readouterr()
    # only --epochs given: the run's own latent size and learning rate stay (not the defaults)
    assert main(["train", "--run", str(run), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert f"resuming {run} from epoch 2, step 14" in out.out + out.err
    cfg = vaelab.load_run(run, "latest").config
    assert (cfg.model.latent_dim, cfg.train.lr, cfg.train.epochs) == (3, 0.002, 3)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    # where the data lives may change ...
    moved = tmp_path / "moved"
    shutil.copytree(mnist_dir, moved)
    assert main(["train", "--run", str(run), "--epochs", "4", "--data-dir", str(moved), "--no-progress"]) == 0
    assert vaelab.load_run(run, "latest").config.data.data_dir == str(moved)
    # ... anything else is refused, naming the setting, and the run is left as it was
    before = (run / "checkpoints" / "latest.safetensors").read_bytes()
    assert main(["train", "--run", str(run), "--epochs", "5", "--latent-dim", "4", "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "model.latent_dim: run has 3, now 4" in err and "train.beta: run has 1.0, now 0.5" in err
    assert (run / "checkpoints" / "latest.safetensors").read_bytes() == before


def test_config_file_and_overrides(mnist_dir, tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[model]\nlatent_dim = 3\nhidden = [16]\n[train]\nlr = 0.002\n')
    run = tmp_path / "run"
    args = _train_args(mnist_dir, run, "--config", str(cfgf), "--set", "train.beta=0.5", "--epochs", "1", net=False)
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 3 and cfg["model"]["hidden"] == [16]
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["beta"] == 0.5


def test_bad_input_is_a_clear_error(tmp_path, capsys, mnist_dir):
    assert main(["train", "--data", "nope", "--run", str(tmp_path / "r")]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert main(["train", "--set", "train.nope=1", "--run", str(tmp_path / "r")]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(_train_args(mnist_dir, tmp_path / "r2", "--likelihood", "poisson")) == 2
    assert "unknown likelihood 'poisson'" in capsys.readouterr().err


def test_python_api_round_trip(tiny_cfg, tmp_path):
    res = vaelab.train(tiny_cfg, tmp_path / "run")
    loaded = vaelab.load_run(tmp_path / "run", "latest")
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    assert loaded.config == res.config
    x = torch.rand(4, 1, 28, 28)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    res.model.eval()
    torch.testing.assert_close(vaelab.elbo(res.model, x, generator=g1).elbo,
                               vaelab.elbo(loaded.model, x, generator=g2).elbo)


def test_module_entry_point_and_console_script():
    out = subprocess.run([sys.executable, "-m", "vaelab", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("vaelab ")
    out = subprocess.run([sys.executable, "-m", "vaelab", "datasets"], capture_output=True, text=True, check=True)
    assert "fashion-mnist" in out.stdout and "mnist" in out.stdout


@pytest.mark.parametrize("lik", ["gaussian", "gaussian-learned"])
def test_gaussian_likelihoods_train(tiny_cfg, tmp_path, lik):
    from dataclasses import replace

    cfg = tiny_cfg.replace(model=replace(tiny_cfg.model, likelihood=lik, sigma=0.2),
                           train=replace(tiny_cfg.train, epochs=1))
    res = vaelab.train(cfg, tmp_path / lik)
    assert np.isfinite(res.history[-1]["val_elbo"])
    if lik == "gaussian-learned":
        assert "likelihood.log_sigma" in res.model.state_dict()


def test_grid_shows_any_channel_count(tmp_path):
    from vaelab.viz import save_grid

    for c, mode in ((1, "L"), (2, "L"), (3, "RGB"), (4, "RGB")):
        p = save_grid(torch.rand(5, c, 6, 6), tmp_path / f"g{c}.png", scale=1)
        img = Image.open(p)
        assert img.mode == mode and img.size == (3 * 8 + 2, 2 * 8 + 2)


def test_train_refuses_a_folder_of_other_things_and_resumes_a_run_or_an_unstarted_one(mnist_dir, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main(_train_args(mnist_dir, user, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert err == f"vaelab: error: {user}: is not empty and holds no vaelab run (no config.json or checkpoints/); " \
                  "choose a new or empty folder for the run (--run)\n", err
    assert [p.name for p in user.iterdir()] == ["notes.txt"]  # nothing written into it
    with pytest.raises(vaelab.ConfigError, match="holds no vaelab run"):
        vaelab.train(vaelab.RunConfig(), user)
    # what an earlier start that failed may leave (a lock, an empty checkpoints/) is a run to start
    for leftover in ("lock", "checkpoints"):
        run = tmp_path / leftover
        run.mkdir()
        (run / ".lock").touch()
        if leftover == "checkpoints":
            (run / "checkpoints").mkdir()
        assert main(_train_args(mnist_dir, run, "--epochs", "1")) == 0, capsys.readouterr().err
        assert (run / "checkpoints" / "latest.safetensors").exists()
    # a run with the user's own files beside it resumes
    (run / "notes.txt").write_text("mine")
    assert main(_train_args(mnist_dir, run, "--epochs", "2")) == 0
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("given", ["missing", "empty", "other-data"])
def test_an_explicit_data_dir_without_the_data_set_is_an_error_naming_it(mnist_dir, tmp_path, monkeypatch, capsys,
                                                                         given):
    """--data-dir is where the data set is: not found there is an error, never a silent fall-back to
    another copy (here a system copy in /usr/share/datasets/mnist, simulated)."""
    import vaelab.data.sources as sources

    monkeypatch.setattr(sources, "SYSTEM_ROOT", mnist_dir)  # it holds mnist/
    folder = tmp_path / "nonexistent"
    if given != "missing":
        folder.mkdir()
        if given == "other-data":
            (folder / "train-images-idx3-ubyte.gz").write_bytes(b"")  # some but not all of the files
    args = _train_args(mnist_dir, tmp_path / "run", "--epochs", "1")
    args[args.index("--data-dir") + 1] = str(folder)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vaelab: error: --data-dir {folder}: "), err
    assert ("no such folder" if given == "missing" else "holds no 'mnist' data set") in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(vaelab.DatasetNotFoundError, match=re.escape(str(folder))):
        vaelab.load_data(vaelab.DataConfig(name="mnist", data_dir=str(folder), download=True))
    # without --data-dir the usual places are searched, the system copy among them
    args = _train_args(mnist_dir, tmp_path / "run", "--epochs", "1")
    i = args.index("--data-dir")
    assert main(args[:i] + args[i + 2:]) == 0, capsys.readouterr().err


def test_a_run_that_fails_before_starting_leaves_no_folder(tmp_path):
    run = tmp_path / "never"
    assert main(["train", "--data", "kmnist", "--no-download", "--run", str(run), "--no-progress"]) == 2
    assert not run.exists()


# ---------------------------------------------------------------- what the user sees
def test_outside_a_terminal_progress_is_a_line_every_few_seconds(mnist_dir, tmp_path):
    env = {**os.environ, "VAELAB_PROGRESS_EVERY": "0.001"}
    args = _train_args(mnist_dir, tmp_path / "run", "--epochs", "1")
    args.remove("--no-progress")
    res = subprocess.run([sys.executable, "-m", "vaelab", *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("epoch 1/1: ")]
    assert lines and re.match(r"epoch 1/1: \d+/7 \(\d+%\), \d+ s elapsed, about .* left", lines[0]), res.stderr
    assert "\r" not in res.stderr  # no bar redrawn into a log
    assert "data mnist: 200 train / 40 validation / 60 test images, 1x28x28 grey, 10 classes" in res.stdout
    res = subprocess.run([sys.executable, "-m", "vaelab", "evaluate", str(tmp_path / "run"), "-k", "3",
                          "--batch-size", "10"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "on 60 test images; data mnist" in res.stderr
    assert re.search(r"evaluate \(k=3, 60 images\): \d/6 ", res.stderr), res.stderr


def test_a_long_evaluation_says_how_long_it_will_take(tiny_cfg, tmp_path, capsys, monkeypatch):
    import vaelab.evaluation.loop as loop

    vaelab.train(tiny_cfg, tmp_path / "run")
    monkeypatch.setattr(loop, "ESTIMATE_AFTER", 0.0)
    vaelab.evaluate_run(tmp_path / "run", k=5, batch_size=20, write=False)
    err = capsys.readouterr().err
    assert re.search(r"evaluate: k=5 draws for each of 60 images will take about \d+ s \(measured on the first batch\)",
                     err), err
    vaelab.evaluate_run(tmp_path / "run", k=5, batch_size=20, write=False, progress=False)
    assert capsys.readouterr().err == ""


def test_rerunning_a_finished_run_or_the_demo_says_nothing_is_trained(tiny_cfg, tmp_path, capsys):
    from vaelab.demo import _train

    _train(tiny_cfg, tmp_path / "run", "a tiny VAE")
    out = capsys.readouterr().out
    assert "== training: a tiny VAE, 2 epochs" in out and "epoch 2:" in out
    _train(tiny_cfg, tmp_path / "run", "a tiny VAE")
    out = capsys.readouterr().out
    assert f"== {tmp_path / 'run'} already holds a tiny VAE, trained for 2 epochs: reusing it" in out
    assert "epoch" not in out.split("reusing it", 1)[1]
    vaelab.train(tiny_cfg, tmp_path / "run")
    assert "is already trained for 2 epochs (train.epochs = 2): nothing to train" in capsys.readouterr().out


def test_the_command_line_starts_without_importing_torch():
    code = "import sys, vaelab, vaelab.cli; assert 'torch' not in sys.modules; print(vaelab.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == vaelab.__version__, out.stderr
    assert vaelab.train is vaelab.training.train and "train" in dir(vaelab)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vaelab.nope  # noqa: B018


def _help_blocks(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, whitespace collapsed, from an argparse help listing."""
    blocks: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        m = re.match(r"  (--[a-z-]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line
        else:
            flag = None
    return {f: " ".join(b.split()) for f, b in blocks.items()}


def test_train_help_shows_each_flags_choices_default_and_meaning(capsys, tmp_path):
    from vaelab.config import RunConfig
    from vaelab.distributions.likelihoods import LIKELIHOODS
    from vaelab.models.priors import PRIORS
    from vaelab.training.schedules import SCHEDULES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    blocks = _help_blocks(capsys.readouterr().out)
    lik = blocks["--likelihood"]
    listed = re.search(r"one of: (.*?) \(default: (.*?)\)", lik)
    assert listed and listed.group(1).split(" | ") == LIKELIHOODS.names() and listed.group(2) == "bernoulli"
    assert "p(x|z)" in lik and "[model.likelihood]" in lik
    assert set(PRIORS.names()) <= set(re.search(r"one of: (.*?) \(", blocks["--prior"]).group(1).split(" | "))
    assert "(default: constant)" in blocks["--schedule"] and all(n in blocks["--schedule"] for n in SCHEDULES)
    from vaelab.cli import _TRAIN_FLAGS, _train_choices

    defaults = RunConfig()
    choices = _train_choices()
    for flag, (sec, key, _) in _TRAIN_FLAGS.items():
        text = blocks["--" + flag.replace("_", "-")]
        assert f"[{sec}.{key}]" in text and "(default: " in text, text
        assert len(text.split("  ", 1)[-1].split("(default:")[0].strip()) > 5, text  # a meaning, not just a key
        if flag in choices:
            names = re.search(r"one of: (.*?) \(default", text).group(1).split(" | ")
            assert names == choices[flag]
            default = getattr(getattr(defaults, sec), key)
            assert f"(default: {default})" in text and (default in names or flag == "data"), text
    assert "(default: 400)" in blocks["--hidden"] and "(default: 128)" in blocks["--batch-size"]
    # names are shown, not enforced by argparse: an unknown one is still the registry's one-line error
    assert main(["train", "--likelihood", "bernouli", "--run", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "did you mean 'bernoulli'" in capsys.readouterr().err
