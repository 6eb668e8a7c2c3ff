"""The conditional VAE (Doersch 2016, Sec. 3 and 4.2): conditions, the regressor baseline, the
conditional likelihood estimate, completion, save/load and the CLI.

The trained-model tests use a tiny separable data set made here: 8x8 images of three patterns
(left block, right block, top block), written as IDX files so that runs load it like MNIST."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab import load_run, train
from vaelab.cli import main
from vaelab.conditioning import (
    CONDITIONS,
    Condition,
    MaskCondition,
    build_condition,
    describe_data,
    override_condition,
)
from vaelab.config import DataConfig, DataSpec, ModelConfig, RunConfig, TrainConfig
from vaelab.data.idx import write_idx
from vaelab.errors import ConfigError, DataError
from vaelab.models import CVAE, VAE, Regressor, build_model
from vaelab.objectives import elbo, iwae_bound
from vaelab.runs import RunDir
from vaelab.viz.complete import complete_images, complete_run

H = W = 8


def _built(condition: str, shape=(1, 28, 28), num_classes: int | None = 10, **kw) -> tuple[ModelConfig, DataSpec]:
    return ModelConfig(condition=condition, **kw), describe_data(shape, num_classes, condition)


def _cond(condition: str, shape=(1, 28, 28), num_classes: int | None = 10) -> Condition:
    return build_condition(condition, DataSpec(shape, num_classes))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- masks and noisy binarization
def test_centre_column_is_column_13_of_28_binarized_with_rate_equal_to_intensity():
    cond = _cond("centre-column")
    # intensity varies down the column: row r has intensity r / 27
    x = (torch.arange(28.0) / 27.0)[None, None, :, None].expand(4000, 1, 28, 28).contiguous()
    b = cond(x, None, _gen())
    observed = 1 - b.mask
    assert torch.equal(observed[0, 0].nonzero()[:, 1].unique(), torch.tensor([13]))
    assert int(observed[0].sum()) == 28
    c = b.c.view(-1, 1, 28, 28)
    assert set(c.unique().tolist()) <= {0.0, 1.0}  # binarized
    assert c[..., :13].abs().sum() == 0 and c[..., 14:].abs().sum() == 0  # only observed pixels in c
    rate = c[:, 0, :, 13].mean(0)  # (28,): empirical on-rate per row
    assert torch.allclose(rate, x[0, 0, :, 13], atol=0.03)
    assert torch.equal(b.x, x)  # the encoder sees the full image


@pytest.mark.parametrize(
    "name, region",
    [
        ("left-half", (slice(None), slice(0, 4))),
        ("right-half", (slice(None), slice(4, 8))),
        ("top-half", (slice(0, 4), slice(None))),
        ("bottom-half", (slice(4, 8), slice(None))),
    ],
)
def test_half_masks_observe_their_half_and_score_the_rest(name, region):
    cond = _cond(name, shape=(2, H, W))
    x = torch.rand(3, 2, H, W)
    b = cond(x, None, _gen())
    want = torch.zeros(H, W)
    want[region] = 1
    assert torch.equal(1 - b.mask, want.expand(3, 2, H, W))
    assert torch.equal(b.c, (x * want).flatten(1))  # intensities, not binarized
    assert cond.dim == 2 * H * W


def test_random_patches_are_deterministic_given_the_generator_and_carry_the_mask():
    cond = _cond("random-patches")
    x = torch.rand(64, 1, 28, 28)
    b1, b2 = cond(x, None, _gen(5)), cond(x, None, _gen(5))
    assert torch.equal(b1.c, b2.c) and torch.equal(b1.mask, b2.mask)
    b3 = cond(x, None, _gen(6))
    assert not torch.equal(b1.mask, b3.mask)  # resampled
    d = 28 * 28
    m = b1.c[:, d:].view(-1, 1, 28, 28)
    assert torch.equal(m, 1 - b1.mask)  # c's second half is the observed mask
    assert torch.equal(b1.c[:, :d].view(-1, 1, 28, 28), x * m)
    area = m.flatten(1).sum(1)
    assert area.min() >= 49 and area.max() <= 4 * 49  # 4 patches of 7x7, overlaps allowed
    assert len(set(area.tolist())) > 1 or not torch.equal(m[0], m[1])  # masks differ between examples


def test_noisy_condition_is_deterministic_given_the_generator():
    cond = _cond("centre-column")
    x = torch.rand(16, 1, 28, 28)
    g = _gen(3)
    first = [cond(x, None, g).c for _ in range(2)]
    g = _gen(3)
    again = [cond(x, None, g).c for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # afresh each pass


def test_mask_file_condition(tmp_path):
    arr = np.zeros((H, W), np.uint8)
    arr[2:5, 1:3] = 255
    p = tmp_path / "holes.png"
    Image.fromarray(arr).save(p)
    cond = _cond(f"mask:{p}", shape=(1, H, W))
    b = cond(torch.rand(2, 1, H, W), None, _gen())
    assert torch.equal((1 - b.mask)[0, 0], torch.from_numpy(arr > 0).float())
    assert str(p) in cond.describe()


# ---------------------------------------------------------------- bad conditions
def test_bad_conditions_give_clear_errors(tmp_path):
    p = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(p)
    with pytest.raises(DataError, match=r"wrong\.png.*10x12.*8x8"):
        _cond(f"mask:{p}", shape=(1, H, W))
    with pytest.raises(DataError, match="missing.png: mask image not found"):
        _cond(f"mask:{tmp_path / 'missing.png'}", shape=(1, H, W))
    with pytest.raises(ConfigError, match="needs an argument"):
        _cond("mask")
    with pytest.raises(ConfigError, match="takes no argument"):
        _cond("left-half:3")
    with pytest.raises(ConfigError, match="unknown condition 'middle'"):
        _cond("middle")
    with pytest.raises(ConfigError, match="class labels"):
        _cond("label", num_classes=None)
    lab = _cond("label", num_classes=3)
    assert torch.equal(lab.encode_labels(torch.tensor([2, 0])), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ConfigError, match=r"label 7 is out of range.*0\.\.2"):
        lab.encode_labels(torch.tensor([1, 7]))
    with pytest.raises(ConfigError, match="out of range"):
        lab(torch.rand(2, 1, 28, 28), torch.tensor([-1, 0]))
    with pytest.raises(ConfigError, match="needs labels"):
        lab(torch.rand(2, 1, 28, 28), None)
    with pytest.raises(ConfigError, match="model 'cvae' needs a condition"):
        build_model(ModelConfig(model="cvae"), DataSpec())
    with pytest.raises(ConfigError, match="not a partial observation"):
        override_condition(_cond("label"), "left-half")


# ---------------------------------------------------------------- models
def test_empty_observation_is_the_unconditional_vae(tmp_path):
    """A mask that observes nothing gives c = 0 and scores every pixel: with the unconditional model's
    weights (the extra input columns multiply zeros) the CVAE's loss equals the VAE's on the same seed."""
    p = tmp_path / "empty.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(p)
    base = ModelConfig(latent_dim=3, hidden=(16,))
    torch.manual_seed(0)
    vae = build_model(base, DataSpec((1, H, W)))
    ccfg, cspec = _built(f"mask:{p}", shape=(1, H, W), latent_dim=3, hidden=(16,), model="cvae")
    cvae = build_model(ccfg, cspec)
    assert isinstance(cvae, CVAE)
    with torch.no_grad():
        sd = cvae.state_dict()
        for k, v in vae.state_dict().items():
            sd[k][tuple(slice(0, s) for s in v.shape)] = v  # first layers: the non-c columns
        cvae.load_state_dict(sd)
    x = torch.rand(32, 1, H, W)
    b = _cond(f"mask:{p}", shape=(1, H, W))(x, None, _gen())
    assert torch.count_nonzero(b.c) == 0 and torch.equal(b.mask, torch.ones_like(x))
    t_c = elbo(cvae, b.x, b.c, mask=b.mask, generator=_gen(1))
    t_u = elbo(vae, x, generator=_gen(1))
    assert torch.allclose(t_c.loss(), t_u.loss(), rtol=1e-6, atol=1e-5)
    lk_c = iwae_bound(cvae, b.x, 20, b.c, mask=b.mask, generator=_gen(2))
    lk_u = iwae_bound(vae, x, 20, generator=_gen(2))
    assert torch.allclose(lk_c, lk_u, rtol=1e-6, atol=1e-4)


def test_regressor_is_the_decoder_alone_and_its_bound_is_exact():
    cfg, spec = _built("centre-column", latent_dim=1, hidden=(32,), model="regressor")
    reg = build_model(cfg, spec)
    cvae = build_model(dataclasses.replace(cfg, model="cvae"), spec)
    assert isinstance(reg, Regressor) and not hasattr(reg, "encoder") and reg.latent_dims == ()
    # the same decoder network as the CVAE's, without z's input columns
    shapes = {k: v.shape for k, v in reg.decoder.state_dict().items()}
    want = {k: v.shape for k, v in cvae.decoder.state_dict().items()}
    want["net.0.weight"] = (want["net.0.weight"][0], want["net.0.weight"][1] - 1)
    assert shapes == want
    x = torch.rand(8, 1, 28, 28)
    b = _cond("centre-column")(x, None, _gen())
    t = elbo(reg, b.x, b.c, mask=b.mask, generator=_gen(1))
    assert torch.equal(t.kl, torch.zeros(8))
    lk = iwae_bound(reg, b.x, 50, b.c, mask=b.mask, generator=_gen(2))
    direct = reg.likelihood(reg.decoder(torch.zeros(8, 0), b.c)).log_prob(x, b.mask)  # log P(Y|X)
    assert torch.allclose(t.elbo, direct) and torch.allclose(lk, direct, atol=1e-4)
    # the prediction does not depend on z
    assert torch.equal(reg.decode(torch.randn(8, 1), b.c).mean, reg.decode(torch.randn(8, 1), b.c).mean)


# ---------------------------------------------------------------- trained models on a separable toy set
PROTOS = torch.zeros(3, 1, H, W)
PROTOS[0, :, :, :3] = 1  # left block
PROTOS[1, :, :, 5:] = 1  # right block
PROTOS[2, :, :3, :] = 1  # top block


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 0.05 + 0.85 * PROTOS[labels] + 0.05 * torch.randn(n, 1, H, W, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy(), labels.numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    for prefix, n, seed in (("train", 900, 0), ("t10k", 90, 1)):
        imgs, labels = _toy(n, seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


def _train(toy_dir, run, model: str, condition: str, epochs: int, latent: int = 2, seed: int = 0):
    cfg = RunConfig(
        data=DataConfig(name="mnist", data_dir=str(toy_dir), download=False, val_size=90),
        model=ModelConfig(model=model, condition=condition, latent_dim=latent, hidden=(64,)),
        train=TrainConfig(epochs=epochs, batch_size=30, lr=3e-3, seed=seed, progress=False, device="cpu"),
    )
    return train(cfg, run)


@pytest.fixture(scope="module")
def label_run(toy_dir, tmp_path_factory):
    return _train(toy_dir, tmp_path_factory.mktemp("runs") / "label", "cvae", "label", epochs=15)


@pytest.fixture(scope="module")
def column_runs(toy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cv = _train(toy_dir, root / "cvae", "cvae", "centre-column", epochs=15)
    rg = _train(toy_dir, root / "reg", "regressor", "centre-column", epochs=15, latent=1)
    return cv, rg


def test_label_conditioning_generates_the_requested_class(label_run):
    model = label_run.model.eval()
    assert model.spec.cond_dim == 10  # the IDX loader's 10 classes
    cond = load_run(label_run.run_dir).condition
    for k in range(3):
        s = model.sample(60, cond.encode_labels(torch.full((60,), k)), generator=_gen(k))
        d = ((s[:, None] - PROTOS[None]) ** 2).flatten(2).sum(-1)  # (60, 3) distance to each prototype
        assert (d.argmin(1) == k).float().mean() > 0.9, f"class {k}"


def test_conditional_nll_is_below_the_conditional_negative_elbo(column_runs, toy_dir):
    cv = column_runs[0].model.eval()
    x = torch.from_numpy(_toy(300, 7)[0]).float()[:, None] / 255
    b = _cond("centre-column", shape=(1, H, W))(x, None, _gen())
    with torch.no_grad():
        # the ELBO's expectation over z, estimated with 50 draws per datapoint, vs L_200
        e = torch.stack([elbo(cv, b.x, b.c, mask=b.mask, generator=_gen(10 + i)).elbo for i in range(50)]).mean(0)
    lk = iwae_bound(cv, b.x, 200, b.c, mask=b.mask, generator=_gen(99))
    gap = (lk - e).double()  # L_k - ELBO >= 0 in expectation
    se = float(gap.std() / math.sqrt(len(gap)))
    assert gap.mean() > 0.05 and gap.mean() > 4 * se, (float(gap.mean()), se)  # measured ~0.15-0.2, se ~0.02


def test_evaluate_model_on_conditional_and_regressor_runs(column_runs):
    from vaelab import evaluate_model
    from vaelab.data import ImageSet

    imgs, labels = _toy(90, 3)
    data = ImageSet(torch.from_numpy(imgs)[:, None], torch.from_numpy(labels.astype(np.int64)), num_classes=10)
    cv, rg = (r.model for r in column_runs)
    res = evaluate_model(cv, data, k=100, progress=False)
    assert res.nll <= res.neg_elbo + 1e-6
    reg = evaluate_model(rg, data, k=10, progress=False)
    assert reg.kl == 0 and abs(reg.nll - reg.neg_elbo) < 1e-3  # L_k = log P(Y|X) exactly
    # only Y is scored: 56 of 64 pixels, so the score is far below an unconditional 64-pixel one
    assert 0 < res.nll < 56 * math.log(2) * 1.5
    assert res.conditional and res.scored_dims == 56 and "P(x|c)" in res.table()


def test_regressor_blurs_where_the_cvae_chooses(column_runs):
    """The centre column of the left- and right-block patterns is the same dark column: X cannot tell
    them apart. The regressor predicts their average (both blocks grey); each CVAE completion picks one."""
    cv, rg = (r.model for r in column_runs)
    x = torch.from_numpy(_toy(60, 11)[0]).float()[:, None] / 255
    amb = x[torch.arange(60) % 3 < 2]  # classes 0 and 1
    comp = complete_images(cv, amb, samples=8, seed=0, regressor=rg)
    left, right = PROTOS[0, 0].bool(), PROTOS[1, 0].bool()
    r = comp.regressor[:, 0]
    assert 0.25 < float(r[:, left].mean()) < 0.75 and 0.25 < float(r[:, right].mean()) < 0.75
    s = comp.samples[:, :, 0]  # (N, S, H, W)
    contrast = (s[..., left].mean(-1) - s[..., right].mean(-1)).abs()  # one block much brighter: a choice
    assert float(contrast.mean()) > 0.3  # measured ~0.55 (the patterns' own contrast is 0.85)
    assert float((r[:, left].mean(-1) - r[:, right].mean(-1)).abs().mean()) < 0.1
    met = comp.metrics()
    assert met["pixel_std"] > 0.1 and met["best_of_s_l2"] < met["regressor_l2"]


def test_save_load_round_trip(column_runs, label_run):
    for res in (*column_runs, label_run):
        loaded = load_run(res.run_dir, "latest")
        assert type(loaded.model) is type(res.model) and loaded.config == res.config
        x = torch.rand(5, 1, H, W)
        cond = loaded.condition
        b = cond(x, torch.tensor([0, 1, 2, 0, 1]), _gen())
        res.model.eval()
        a = elbo(res.model, b.x, b.c, mask=b.mask, generator=_gen(4)).elbo
        c = elbo(loaded.model, b.x, b.c, mask=b.mask, generator=_gen(4)).elbo
        assert torch.equal(a, c)
    assert isinstance(load_run(column_runs[1].run_dir).model, Regressor)
    assert isinstance(load_run(label_run.run_dir).model, VAE)


def test_complete_run_and_cli(column_runs, label_run, tmp_path, capsys):
    cv, rg = column_runs
    res = complete_run(cv.run_dir, tmp_path / "c.png", n=4, samples=3, regressor=rg.run_dir)
    with Image.open(res.path) as im:
        # 4 rows x (observed + 3 completions + regressor + truth), 8 px cells, 2 px padding, scale 2
        assert im.size == (2 * (6 * 10 + 2), 2 * (4 * 10 + 2))
    assert isinstance(override_condition(load_run(cv.run_dir).condition, "left-half"), MaskCondition)
    assert main(["complete", str(cv.run_dir), "-n", "3", "--condition", "left-half", "--out",
                 str(tmp_path / "lh.png")]) == 0
    assert (tmp_path / "lh.png").exists()
    assert main(["sample", str(label_run.run_dir), "--label", "2", "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()
    assert main(["sample", str(label_run.run_dir), "--label", "12"]) == 2
    assert "label 12 is out of range" in capsys.readouterr().err
    assert main(["complete", str(label_run.run_dir)]) == 2
    assert "vaelab sample --label" in capsys.readouterr().err
    assert main(["complete", str(cv.run_dir), "--regressor", str(label_run.run_dir)]) == 2
    assert "same X" in capsys.readouterr().err


def test_the_complete_examples_in_docs_cvae_write_the_files_they_name(column_runs, tmp_path, capsys):
    """docs/cvae.md's `vaelab complete runs/cc ... # -> runs/cc/NAME.png` lines, run as written (on
    copies of the tiny runs at runs/cc and runs/cc-reg), write NAME.png."""
    import shlex

    doc = (Path(__file__).parent.parent / "docs" / "cvae.md").read_text()
    examples = [line for line in doc.splitlines() if line.startswith("vaelab complete ") and "# -> " in line]
    assert examples
    runs = tmp_path / "runs"
    shutil.copytree(column_runs[0].run_dir, runs / "cc")
    shutil.copytree(column_runs[1].run_dir, runs / "cc-reg")
    for line in examples:
        command, said = line.split("#", 1)
        written = said.split("->", 1)[1].split()[0].rstrip(",")
        argv = [a.replace("runs/", f"{runs}/", 1) if a.startswith("runs/") else a for a in shlex.split(command)[1:]]
        assert main(argv) == 0, line
        assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / written), line


@pytest.mark.parametrize("condition", ["centre-column", "random-patches"])
def test_resume_mid_epoch_is_exact_with_random_conditions(toy_dir, tmp_path, condition):
    """Noisy binarization and random masks come from the training loop's saved generator."""
    full = _train(toy_dir, tmp_path / "full", "cvae", condition, epochs=2)
    cfg = full.config
    train(cfg, tmp_path / "cut", max_steps=7)
    resumed = train(cfg, tmp_path / "cut", resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_lists_every_condition():
    assert {"none", "label", "centre-column", "left-half", "right-half", "top-half", "bottom-half",
            "random-patches", "mask"} <= set(CONDITIONS.names())


def _as_format_1(src: Path, dst: Path) -> Path:
    """Rewrite a checkpoint as vaelab 0.1 wrote it: the data description inside the model config and,
    for the regressor, a decoder fed ``latent_dim`` zeros in z's place (weights and Adam moments get
    those input columns back, with arbitrary values: they multiplied zeros)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from vaelab.runs.checkpoint import read_metadata

    raw = src.read_bytes()
    tensors, meta = dict(st_load(raw)), dict(read_metadata(src, raw))
    cfg, spec = json.loads(meta["config"]), json.loads(meta.pop("data"))
    cfg["model"].update(input_shape=spec["shape"], num_classes=spec["num_classes"], cond_dim=spec["cond_dim"])
    meta.update(format="vaelab-checkpoint-1", config=json.dumps(cfg))
    if cfg["model"]["model"] == "regressor":
        pad = lambda t: torch.cat([torch.randn(t.shape[0], cfg["model"]["latent_dim"]), t], 1)  # noqa: E731
        names = [n for n, _ in load_run(src).model.named_parameters()]
        pid = names.index("decoder.net.0.weight")
        for key in ("model/decoder.net.0.weight", f"optim/{pid}/exp_avg", f"optim/{pid}/exp_avg_sq"):
            tensors[key] = pad(tensors[key])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(st_save(tensors, metadata=meta))
    return dst


def test_format_1_checkpoints_load_evaluate_and_resume(column_runs, toy_dir, tmp_path):
    for res in column_runs:  # the CVAE (tensors unchanged) and the regressor (z's columns dropped)
        run = tmp_path / res.run_dir.name
        for which in ("latest", "best"):
            _as_format_1(RunDir.of(res.run_dir).checkpoint(which), run / "checkpoints" / f"{which}.safetensors")
        old, new = load_run(run), load_run(res.run_dir)
        assert old.config == new.config and old.spec == new.spec
        x = torch.rand(5, 1, H, W)
        b = old.condition(x, None, _gen())
        a = elbo(old.model, b.x, b.c, mask=b.mask, generator=_gen(3)).elbo
        c = elbo(new.model, b.x, b.c, mask=b.mask, generator=_gen(3)).elbo
        assert torch.equal(a, c)
        # resuming a format-1 run continues exactly as the run it came from
        more = res.config.replace(train=dataclasses.replace(res.config.train, epochs=res.config.train.epochs + 1))
        copy = tmp_path / "copy" / res.run_dir.name
        shutil.copytree(res.run_dir, copy)
        t_old, t_new = train(more, run, resume=True), train(more, copy, resume=True)
        assert t_old.state.epoch == t_new.state.epoch == res.config.train.epochs + 1
        sd_old, sd_new = t_old.model.state_dict(), t_new.model.state_dict()
        assert all(torch.equal(sd_old[k], sd_new[k]) for k in sd_new)
