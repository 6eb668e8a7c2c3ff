"""The run report (vaelab/app/report.py) on every kind of model, its health check in words, and
pictures that explain themselves: PNG provenance chunks, variant file names, the manifold's padding,
and evaluation output that names its checkpoint and epoch."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace

import pytest
from PIL import Image

import vaelab
from vaelab.app import report as rp
from vaelab.cli import main
from vaelab.evaluation import EvalResult
from vaelab.provenance import KEYS, read_provenance


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of each kind: a 2-D VAE, a binarized 6-D VAE, a label CVAE, a left-half CVAE, a
    regressor, and a model with two stochastic layers and a VampPrior."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("report")
    data = write_mnist(root / "data" / "mnist").parent
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False),
        model=vaelab.ModelConfig(latent_dim=2, hidden=(32,)),
        train=vaelab.TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu", lr=3e-3),
    )
    kinds = {"vae2": ({}, {}), "bin": ({"latent_dim": 6}, {"binarize": "dynamic"}),
             "label": ({"model": "cvae", "condition": "label", "latent_dim": 3}, {}),
             "half": ({"model": "cvae", "condition": "left-half", "latent_dim": 3}, {}),
             "reg": ({"model": "regressor", "condition": "left-half"}, {}),
             "two": ({"latent_dim": 4, "layers": 2, "prior": "vamp", "prior_components": 5}, {})}
    out = {}
    for name, (m, d) in kinds.items():
        cfg = base.replace(model=replace(base.model, **m), data=replace(base.data, **d))
        out[name] = vaelab.train(cfg, root / name).run_dir
    return out


def _images(html: str) -> list[Image.Image]:
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in srcs]


@pytest.mark.parametrize("name", ["vae2", "bin", "label", "half", "reg", "two"])
def test_report_for_every_kind_of_model(runs, name):
    path = vaelab.app.write_report(runs[name], k=10)
    assert path == runs[name] / "report.html"
    html = path.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    imgs = _images(html)
    for im in imgs:
        im.load()
        assert im.format == "PNG" and im.size[0] > 0 and {"picture", "run", "checkpoint", "epoch"} <= set(im.text)
    ids = re.findall(r'<section id="([a-z]+)"', html)
    assert ids[:4] == ["health", "config", "curves", "evaluation"]
    assert "posterior collapse" in html and "non-finite steps" in html and "over-fitting" in html
    latent = name != "reg"
    assert ("reconstructions" in ids) == latent and ("kl" in ids) == latent
    assert ("manifold" in ids) == (name in ("vae2", "two"))  # a 2-D unconditional top layer (two: z2 has 4 // 2)
    assert ("interpolation" in ids) == latent  # with its picture, or a line saying why there is none
    assert ('alt="interpolation"' in html) == (name in ("vae2", "bin", "two"))
    assert ("completions" in ids) == (name in ("half", "reg")) and ("samples" in ids) == (name in ("vae2", "bin", "label", "two"))
    if latent:
        assert "ELBO gap" in html and html.count('<th class="rowlabel">original</th>') == 2
        assert html.count('<th class="rowlabel">reconstruction</th>') == 2
    else:
        assert "no latent variables, so nothing can collapse" in html
    # the evaluation sentence names the case that applies, and only that one
    if name == "bin":
        assert "true NLL of the binary data" in html and "not binarized" not in html
    else:
        assert "pixels not binarized" in html and "true NLL" not in html
    if name == "two":  # every layer: active units and KL bars per layer
        assert "<td>z1</td>" in html and "<td>z2</td>" in html and "layer z1:" in html and "layer z2:" in html


def test_report_reuses_a_stored_evaluation_of_the_same_checkpoint(runs, capsys):
    run = runs["vae2"]
    ev = vaelab.evaluate_run(run, k=37, progress=False)
    html = vaelab.app.write_report(run, evaluate=False).read_text()
    assert "test-k37.json" in html and "-L_37" in html and f"{ev.nll:.3f}" in html
    # the best checkpoint's numbers are not taken for another checkpoint file's
    rep = rp.build_report(run, which="latest", evaluate=False)
    assert rep.evaluation is None and rp._stored_evaluation(rep.run, "test") is None


def test_report_cli_and_a_moved_data_set(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(runs["vae2"]), "--out", str(out), "-k", "5", "--no-evaluate"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.exists()
    # the data set gone: the sections that need it say so, the rest is written
    html = vaelab.app.write_report(runs["label"], tmp_path / "m.html", data_dir=str(tmp_path / "nowhere"), k=5).read_text()
    assert 'class="missing"' in html and "Training curves" in html and "Samples" in html
    assert main(["report", str(tmp_path / "no-run")]) == 2
    assert "no such run" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vae2", "two", "label"])
def test_report_shows_the_latent_traversal(runs, name):
    html = vaelab.app.write_report(runs[name], k=5).read_text()
    section = html.split('<section id="traversal">', 1)[1].split("</section>", 1)[0]
    (img,) = _images(section)
    rows = min(8, vaelab.load_run(runs[name], device="cpu").model.latent_dims[-1])
    assert "most active units" in section and img.size[0] > img.size[1] * 9 / rows * 0.8  # 9 columns, a row per dim


def test_layer_kl_series_reads_per_layer_columns():
    rows = [{"epoch": 1, "val_kl": 3.0, "val_kl_z1": 2.0, "val_kl_z2": 1.0, "train_kl_layers": {"z1": 2.5, "z2": 0.5}},
            {"epoch": 2, "val_kl": 3.0, "val_kl_z1": 2.2, "train_layers": [{"name": "z1", "kl": 2.1}]}]
    s = rp.layer_kl_series(rows)
    assert s["val z1"] == [2.0, 2.2] and s["train z1"] == [2.5, 2.1]
    assert s["val z2"][0] == 1.0 and s["val z2"][1] != s["val z2"][1]  # NaN where a row lacks it
    assert s["train z2"][0] == 0.5 and rp.layer_kl_series([{"val_kl": 1.0}]) == {}


def _ev(**kw) -> EvalResult:
    base = dict(split="test", n=10, k=100, neg_elbo=100.0, neg_elbo_stderr=1.0, reconstruction=90.0, kl=10.0,
                nll=99.5, nll_stderr=1.0, active_units=4, latent_dim=4, kl_per_dim=[1.0] * 4, exact=False, meaning="",
                layers=[{"name": "z", "dim": 4, "kl": 10.0, "closed_form": True, "active_units": 4,
                         "kl_per_dim": [2.5] * 4}])
    base.update(kw)
    return EvalResult(**base)


def test_health_check_in_words():
    rows = [{"epoch": e, "val_elbo": -v, "train_rec": -90.0, "train_kl": 5.0, "nonfinite_total": 0}
            for e, v in ((1, 110.0), (2, 100.0), (3, 100.2))]
    checks = {c.title: c for c in rp.health_checks(_ev(), rows, {"nonfinite_total": 0})}
    assert checks["posterior collapse"].status == "ok" and "0 of 4 units inactive" in checks["posterior collapse"].text
    assert checks["ELBO gap"].status == "ok" and "0.50 nats" in checks["ELBO gap"].text
    assert checks["non-finite steps"].status == "ok" and checks["over-fitting"].status == "ok"

    collapsed = _ev(neg_elbo=110.0, layers=[{"name": "z", "dim": 4, "kl": 0.0, "closed_form": True,
                                              "active_units": 0, "kl_per_dim": [0.0] * 4}])
    risen = [*rows, {"epoch": 4, "val_elbo": -104.0, "train_rec": -80.0, "train_kl": 5.0, "nonfinite_total": 3}]
    checks = {c.title: c for c in rp.health_checks(collapsed, risen, {"nonfinite_total": 3})}
    assert checks["posterior collapse"].status == "warn" and "all 4 units are inactive" in checks["posterior collapse"].text
    assert checks["ELBO gap"].status == "warn"
    assert checks["non-finite steps"].status == "warn" and "3 optimizer steps" in checks["non-finite steps"].text
    assert checks["over-fitting"].status == "warn" and "best at epoch 2" in checks["over-fitting"].text
    assert rp.health_checks(None, [], {})[-1].text.startswith("no validation data")


# ---------------------------------------------------------------- pictures that explain themselves
def test_every_png_carries_its_provenance(runs, tmp_path):
    run = runs["vae2"]
    p = vaelab.sample_run(run, n=4, seed=3, temperature=0.5)
    assert p.name == "samples-t0.5-seed3.png"
    info = read_provenance(p)
    assert set(KEYS) <= set(info)
    ckpt = vaelab.load_run(run)
    assert info["run"] == str(run.resolve()) and info["checkpoint"].endswith("best.safetensors")
    assert (info["epoch"], info["step"]) == (str(ckpt.state["epoch"]), str(ckpt.state["step"]))
    assert info["seed"] == "3" and info["temperature"] == "0.5"
    assert info["command"].startswith("vaelab.sample_run(") and "seed=3" in info["command"]
    for f in (vaelab.reconstruct_run(run, n=4), vaelab.interpolate_run(run, steps=3),
              vaelab.manifold_run(run, n=3), vaelab.complete_run(runs["half"], n=2, samples=2).path):
        assert set(KEYS) <= set(read_provenance(f)), f
    # from the command line: the command itself
    assert main(["sample", str(run), "-n", "4", "--seed", "1"]) == 0
    cmd = read_provenance(run / "samples-seed1.png")["command"]
    assert cmd == f"vaelab sample {run} -n 4 --seed 1"


def test_variants_do_not_overwrite_each_other(runs, capsys):
    lab = runs["label"]
    assert main(["sample", str(lab), "--label", "7", "-n", "4"]) == 0
    assert main(["sample", str(lab), "--label", "7", "-n", "4", "--temperature", "0.8"]) == 0
    assert main(["sample", str(lab), "--label", "3", "-n", "4"]) == 0
    out = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in out] == ["samples-label7.png", "samples-label7-t0.8.png",
                                                  "samples-label3.png"]
    assert read_provenance(lab / "samples-label7.png")["label"] == "7"
    run = runs["vae2"]
    assert vaelab.sample_run(run).name == "samples.png"  # the defaults keep the plain name
    assert vaelab.sample_run(run, which="latest").name in ("samples-ckpt-latest.png",)
    assert vaelab.manifold_run(run, n=4, dims=(1, 0)).name == "manifold-dims1_0.png"
    assert vaelab.interpolate_run(run, a=2, b=5).name == "interpolation-a2-b5.png"
    assert vaelab.complete_run(runs["half"], n=2, condition="top-half").path.name == "completions-top-half.png"


def test_manifold_has_the_padding_and_scale_of_the_other_grids(runs, tmp_path):
    run = runs["vae2"]
    m = Image.open(vaelab.manifold_run(run, tmp_path / "m.png", n=4))
    s = Image.open(vaelab.sample_run(run, tmp_path / "s.png", n=16))
    assert m.size == s.size == ((4 * 30 + 2) * 2,) * 2


def test_evaluation_says_which_checkpoint_and_epoch(runs, capsys):
    run = runs["vae2"]
    assert main(["evaluate", str(run), "-k", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    state = vaelab.load_run(run).state
    assert f"checkpoint {run / 'checkpoints' / 'best.safetensors'} (epoch {state['epoch']}, step {state['step']})" in out
    assert main(["evaluate", str(run), "-k", "3", "--no-progress", "--json", "--checkpoint", "latest"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["extra"]["checkpoint"].endswith("latest.safetensors") and d["extra"]["epoch"] == 2


@pytest.mark.parametrize("name", ["vae2", "half"])
def test_the_evaluation_note_wraps_instead_of_scrolling(runs, name):
    """The sentence saying what the number means (and a CVAE's condition) are paragraphs, which wrap;
    the table's box wraps its lines too, so nothing in it is hidden behind a sideways scroll."""
    html = rp.render_html(rp.build_report(runs[name], k=5))
    ev = re.search(r'<section id="evaluation">(.*?)</section>', html, re.S).group(1)
    meaning = re.search(r'<p class="meaning"><b>What the number means here:</b> (.*?)\.</p>', ev).group(1)
    assert len(meaning) > 80  # the long sentence that was cut off
    (table,) = re.findall(r"<pre>(.*?)</pre>", ev, re.S)
    assert "note:" not in table and meaning not in table and "-ELBO" in table
    if name == "half":
        cond = vaelab.load_run(runs[name]).condition.describe()
        assert cond not in table and re.search(rf'<p class="note">{re.escape(rp._esc(cond))}; \d+ scored', ev)
    pre_css = re.search(r"(?m)^pre\{([^}]*)\}", rp._CSS).group(1)
    assert "white-space:pre-wrap" in pre_css and "overflow" not in pre_css.replace("overflow-wrap", "")


@pytest.mark.parametrize("per_layer", [False, True])
def test_curve_legends_cover_no_line(per_layer):
    """Every legend of the training curves lies outside every plotted line (the KL lines on the twin
    axis included) and inside the figure: checked on the drawn figure, in display coordinates."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"epoch": e, "train_loss": 540 - 40 * e, "val_elbo": -(500 - 30 * e), "train_rec": -(520 - 45 * e),
             "val_rec": -(510 - 40 * e), "train_kl": 2 + 3 * e, "val_kl": 1 + 3.5 * e,
             **({"val_kl_z1": 1 + 2 * e, "val_kl_z2": 0.5 * e} if per_layer else {})} for e in range(1, 6)]
    fig = rp.curves_figure(rows)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert len(legends) == (3 if per_layer else 2)
    lines = [ln for a in fig.axes for ln in a.get_lines()]
    assert any(ln.get_label() == "validation KL" for ln in lines)
    for leg in legends:
        box = leg.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # not cut off
        for ln in lines:
            assert not box.overlaps(ln.get_window_extent(renderer)), (leg.get_texts()[0].get_text(), ln.get_label())
        for a in fig.axes:
            assert not box.overlaps(a.patch.get_window_extent(renderer))  # outside every plotting area
            assert not box.overlaps(a.xaxis.label.get_window_extent(renderer))


def test_a_mask_files_extension_is_not_repeated_in_the_default_name(runs, tmp_path, capsys):
    """`vaelab complete RUN --mask holes.png` wrote completions-mask_holes.png.png."""
    import numpy as np

    from vaelab.viz.complete import condition_part

    arr = np.zeros((28, 28), np.uint8)
    arr[:, :14] = 255
    (tmp_path / "masks").mkdir()
    mask = tmp_path / "masks" / "holes.png"
    Image.fromarray(arr).save(mask)
    run = runs["half"]
    assert main(["complete", str(run), "--mask", str(mask), "-n", "2", "--samples", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(run / "completions-mask-holes.png")
    assert vaelab.complete_run(run, n=2, samples=2, condition=f"mask:{mask}").path.name == "completions-mask-holes.png"
    assert vaelab.complete_run(run, n=2, samples=2, mask=mask, seed=3).path.name == "completions-mask-holes-seed3.png"
    assert condition_part("mask:a/b/my mask.v2.jpeg") == "mask-my_mask.v2" and condition_part("top-half") == "top-half"
    assert not list(run.glob("*.png.png"))
