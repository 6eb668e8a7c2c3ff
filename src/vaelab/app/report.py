"""``vaelab report RUN``: one self-contained HTML page that explains a trained run.

It holds the config; the training curves of ``metrics.jsonl`` (loss, validation ELBO, reconstruction
and KL, per stochastic layer where a run logs them); the evaluation table with the sentence saying what
its number means for this run; samples, labelled reconstructions, an interpolation, the 2-D manifold or
a latent traversal; the KL per latent dimension as bar charts; active units per layer; and a health
check in words (posterior collapse, the ELBO gap, skipped non-finite steps, over-fitting).

Plots are drawn with matplotlib's object API (no pyplot, so no global backend is touched) and every
picture is a PNG inlined as a base64 data URI: the file opens anywhere, offline, and can be mailed.
Each section is built on its own: one that cannot be made (the data set moved, no latent variables)
says why in place of its picture, and the rest of the report is still written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..conditioning import LabelCondition, MaskCondition
from ..data import to_float
from ..errors import ConfigError, VaelabError
from ..evaluation import EvalResult, evaluate_run
from ..evaluation.evaluate import describe_likelihood
from ..provenance import command_or, python_call, run_provenance
from ..runs import Run
from ..runs.checkpoint import atomic_write
from ..viz import generate as gen
from ..viz.complete import complete_images
from ..viz.grid import output_path, png_bytes

RunLike = Run | str | os.PathLike[str]

#: thresholds of the health check (fractions are relative to the validation -ELBO)
COLLAPSE_WARN = 0.5  # warn when more than this fraction of a layer's units is inactive
GAP_WARN = 0.02  # ELBO gap above 2 % of -L_k: the posterior approximation is loose
OVERFIT_RISE = 0.005  # validation -ELBO risen by more than 0.5 % from its best


@dataclass
class Section:
    """One part of the report: a heading and its HTML body (already escaped where needed)."""

    id: str
    title: str
    body: str


@dataclass
class Check:
    """One line of the health check: ``ok`` (fine), ``warn`` (look at this) or ``info``."""

    status: str
    title: str
    text: str


@dataclass
class Report:
    """Everything :func:`write_report` writes, before it becomes HTML."""

    run: Run
    sections: list[Section] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    evaluation: EvalResult | None = None


# ---------------------------------------------------------------- small HTML helpers
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "grid") -> str:
    return f'<img class="{cls}" alt="{_esc(alt)}" src="{_data_uri(png)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{_esc(caption)}</figcaption></figure>"


def _missing(what: str, why: str) -> str:
    return f'<p class="missing">{_esc(what)}: {_esc(why)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _plot_png(fig: Any, provenance: dict[str, str]) -> bytes:
    """A matplotlib Figure as PNG bytes, with the picture's provenance in its text chunks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=provenance)
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# ---------------------------------------------------------------- metrics.jsonl
_LAYER_KEY = re.compile(r"^(train|val)_kl_(.+)$")


def layer_kl_series(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-layer KL curves a run logged, as ``{"val z1": [...], "train z2": [...]}`` (one value per row,
    NaN where a row lacks it). Understands ``<split>_kl_<layer>`` keys and dict values under keys
    ``<split>_kl_layers`` / ``<split>_layers`` ({layer: kl} or {layer: {"kl": ...}})."""
    found: dict[str, dict[int, float]] = {}

    def put(name: str, i: int, v: Any) -> None:
        if isinstance(v, dict):
            v = v.get("kl")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            found.setdefault(name, {})[i] = float(v)

    for i, row in enumerate(rows):
        for key, v in row.items():
            m = _LAYER_KEY.match(key)
            if m and m.group(2) != "layers":
                put(f"{m.group(1)} {m.group(2)}", i, v)
            elif key.endswith("_layers") and isinstance(v, dict):
                split = key.split("_", 1)[0]
                for layer, lv in v.items():
                    put(f"{split} {layer}", i, lv)
            elif key.endswith("_layers") and isinstance(v, list):  # [{"name": .., "kl": ..}, ...]
                split = key.split("_", 1)[0]
                for lv in v:
                    if isinstance(lv, dict) and "name" in lv:
                        put(f"{split} {lv['name']}", i, lv)
    return {k: [d.get(i, math.nan) for i in range(len(rows))] for k, d in sorted(found.items())}


def _series(rows: Sequence[dict[str, Any]], key: str, sign: float = 1.0) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        out.append(sign * float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _legend_below(ax: Any, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    """The legend of ``ax`` under its x label, outside the plotted area, so it covers no curve
    (``loc="best"`` only avoids the lines of its own axes, not those of a twin)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def curves_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """The training curves of ``rows`` (metrics.jsonl) as a matplotlib Figure: loss, reconstruction
    and KL (a twin axis), and KL per stochastic layer when the rows carry it; legends under the axes."""
    ep = [r_.get("epoch", i + 1) for i, r_ in enumerate(rows)]
    layers = layer_kl_series(rows)
    panels = 3 if layers else 2
    fig = _new_figure(4.2 * panels, 3.9)
    axes = fig.subplots(1, panels)
    ax = axes[0]
    ax.plot(ep, _series(rows, "train_loss"), "o-", label="train loss (-ELBO, β-weighted)")
    ax.plot(ep, _series(rows, "val_elbo", -1), "s-", label="validation -ELBO")
    ax.set_title("loss (nats per datapoint)")
    ax = axes[1]
    ax.plot(ep, _series(rows, "train_rec", -1), "o-", label="train reconstruction")
    ax.plot(ep, _series(rows, "val_rec", -1), "s-", label="validation reconstruction")
    ax2 = ax.twinx()
    ax2.plot(ep, _series(rows, "train_kl"), "o--", color="tab:red", label="train KL")
    ax2.plot(ep, _series(rows, "val_kl"), "s--", color="tab:purple", label="validation KL")
    ax.set_title("-E_Q[log P(X|z)] (left), KL (right, dashed)")
    ax2.set_ylabel("KL (nats)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    _legend_below(ax, h1 + h2, l1 + l2)
    if layers:
        ax = axes[2]
        for name, vals in layers.items():
            ax.plot(ep, vals, "o-" if name.startswith("train") else "s--", label=name)
        ax.set_title("KL per stochastic layer (nats)")
        _legend_below(ax)
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    _legend_below(axes[0])
    return fig


def _curves(r: Run, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return _missing("training curves", f"{r.dir.metrics} holds no epochs yet")
    fig = curves_figure(rows)
    layers = layer_kl_series(rows)
    prov = run_provenance(r, "training curves from metrics.jsonl", _call(r))
    note = "" if layers else " This run's metrics.jsonl logs the KL summed over layers (no per-layer columns)."
    return _figure(_plot_png(fig, prov), "training curves",
                   f"Per epoch, from {r.dir.metrics.name}: train loss and validation -ELBO; reconstruction and "
                   f"KL terms.{note}")


# ---------------------------------------------------------------- evaluation
def _stored_evaluation(r: Run, split: str) -> EvalResult | None:
    """The evaluation of this very checkpoint (same file, same epoch) already in RUN/eval, largest k first."""
    best: EvalResult | None = None
    for p in sorted(r.dir.eval.glob(f"{split}-k*.json")) if r.dir.eval.is_dir() else []:
        try:
            d = json.loads(p.read_text())
            res = EvalResult(**d)
        except (OSError, ValueError, TypeError):
            continue  # not one of ours, or from an older version: evaluate afresh
        same = (Path(str(res.extra.get("checkpoint", ""))).resolve() == r.checkpoint.resolve()
                and res.extra.get("epoch") == r.state.get("epoch") and res.extra.get("step") == r.state.get("step"))
        if same and (best is None or res.k > best.k or (res.k == best.k and res.n > best.n)):
            res.extra.setdefault("written", str(p))
            best = res
    return best


def _evaluation(r: Run, k: int, limit: int | None, evaluate: bool) -> tuple[EvalResult | None, str]:
    stored = _stored_evaluation(r, "test")
    if stored is not None:
        return stored, f"from {stored.extra.get('written')}"
    if not evaluate:
        return None, f"no evaluation of this checkpoint in {r.dir.eval}; run `vaelab evaluate {r.root}`"
    available = len(r.data("test"))
    if available == 0:
        raise ConfigError(f"{r.root}: the test split is empty; nothing to evaluate")
    n = available if limit is None else min(limit, available)
    res = evaluate_run(r, k=k, limit=n, progress=False, write=False)
    return res, (f"evaluated now on the first {n} of {available} test images with k={k} "
                 f"(`vaelab evaluate {r.root} -k 5000` gives the full estimate)")


def _evaluation_section(r: Run, ev: EvalResult, where: str) -> str:
    _, meaning = describe_likelihood(r.config)  # this run's case, whatever an older file said
    ev.meaning = meaning
    parts = [f"<p class=\"meaning\"><b>What the number means here:</b> {_esc(meaning)}.</p>",
             f"<pre>{_esc(ev.table(notes=False))}</pre>"]
    if ev.conditional:
        parts.append(f"<p class=\"note\">{_esc(ev.condition)}; {ev.scored_dims:.0f} scored dimensions per datapoint.</p>")
    parts.append(f"<p class=\"note\">{_esc(where)}</p>")
    return "".join(parts)


def _kl_bars(r: Run, ev: EvalResult) -> str:
    layers = [ly for ly in ev.layers if ly.get("kl_per_dim")]
    if not ev.layers:
        return _missing("KL per latent dimension", "this model has no latent variables (KL = 0 by structure)")
    notes = [f"layer {ly['name']}: KL estimated by Monte Carlo, no closed form per dimension"
             for ly in ev.layers if not ly.get("kl_per_dim")]
    if not layers:
        return "".join(_missing("KL per latent dimension", n) for n in notes)
    fig = _new_figure(min(12.0, max(6.5, 2.0 + 0.25 * max(len(ly["kl_per_dim"]) for ly in layers))), 2.6 * len(layers))
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, ly in zip(axes, layers, strict=True):
        vals = ly["kl_per_dim"]
        colours = ["tab:blue" if v > 0.01 else "tab:gray" for v in vals]
        ax.bar(range(len(vals)), vals, color=colours)
        ax.set_title(f"layer {ly['name']}: KL(Q || P) per dimension, nats "
                     f"({ly['active_units']} of {ly['dim']} units active)", fontsize=9)
        ax.set_xlabel("latent dimension")
        ax.set_ylabel("KL (nats)")
        ax.set_xticks(range(len(vals)) if len(vals) <= 40 else range(0, len(vals), max(1, len(vals) // 20)))
        ax.grid(axis="y", alpha=0.3)
    prov = run_provenance(r, "KL per latent dimension", _call(r))
    cap = ("Mean KL per latent dimension on the evaluated data (grey bars: below 0.01 nats, carrying "
           "almost no information).") + "".join(f" {n}." for n in notes)
    return _figure(_plot_png(fig, prov), "KL per latent dimension", cap)


def _active_units(ev: EvalResult) -> str:
    if not ev.layers:
        return "<p>No latent variables: nothing to be active.</p>"
    rows = [(ly["name"], ly["dim"], ly["active_units"], ly["dim"] - ly["active_units"], f"{ly['kl']:.3f}",
             "closed form" if ly["closed_form"] else "Monte Carlo") for ly in ev.layers]
    return ("<p>A unit u is active when Cov_x(E_Q[z_u|x]) > 0.01 (Burda et al. 2016): its posterior mean "
            "moves with the data.</p>" + _table(("layer", "units", "active", "inactive", "KL (nats)", "KL by"), rows))


# ---------------------------------------------------------------- health check
def health_checks(ev: EvalResult | None, rows: Sequence[dict[str, Any]], state: dict[str, Any]) -> list[Check]:
    """The health check in words: posterior collapse, the ELBO gap, non-finite steps, over-fitting."""
    out: list[Check] = []
    if ev is None:
        out.append(Check("info", "posterior collapse, ELBO gap", "not checked: no evaluation of this checkpoint"))
    elif not ev.layers:
        out.append(Check("info", "posterior collapse", "this model has no latent variables, so nothing can collapse"))
    else:
        for ly in ev.layers:
            inactive, dim = ly["dim"] - ly["active_units"], ly["dim"]
            name = f"layer {ly['name']}: " if len(ev.layers) > 1 else ""
            if inactive == dim:
                out.append(Check("warn", "posterior collapse", f"{name}all {dim} units are inactive: Q(z|X) is the "
                                 "same for every input and the decoder ignores z. Try KL warm-up "
                                 "(--warmup-epochs), free bits (--free-bits) or a weaker decoder."))
            elif inactive > COLLAPSE_WARN * dim:
                out.append(Check("warn", "posterior collapse", f"{name}{inactive} of {dim} units are inactive "
                                 f"(only {dim - inactive} carry information). Often harmless (the model uses what it "
                                 "needs), but if reconstructions are poor, try free bits or warm-up."))
            else:
                out.append(Check("ok", "posterior collapse", f"{name}{inactive} of {dim} units inactive; "
                                 f"{dim - inactive} carry information about X."))
        gap = ev.neg_elbo - ev.nll
        rel = gap / abs(ev.nll) if ev.nll else math.nan
        msg = (f"-ELBO {ev.neg_elbo:.2f} vs -L_{ev.k} {ev.nll:.2f}: the ELBO is {gap:.2f} nats "
               f"({100 * rel:.1f} %) below the importance-sampled estimate of log P.")
        if ev.k == 1:
            out.append(Check("info", "ELBO gap", "evaluated with k = 1, where L_k is the ELBO: no gap to measure."))
        elif gap > GAP_WARN * abs(ev.nll):
            out.append(Check("warn", "ELBO gap", msg + " Q(z|X) is far from the true posterior; training with "
                             "the IWAE bound (--iwae-k) or a richer posterior would close part of it."))
        else:
            out.append(Check("ok", "ELBO gap", msg + " Q(z|X) is close to the true posterior for this model."))
    skipped = state.get("nonfinite_total")
    if skipped is None and rows:
        skipped = rows[-1].get("nonfinite_total")
    if skipped:
        out.append(Check("warn", "non-finite steps", f"{skipped} optimizer steps were skipped because the loss or "
                         "a gradient was not finite. A few are harmless; many mean the learning rate is too high "
                         "(try a lower --lr or --grad-clip)."))
    elif skipped == 0:
        out.append(Check("ok", "non-finite steps", "no step was skipped: every loss and gradient was finite."))
    else:
        out.append(Check("info", "non-finite steps", "not recorded for this run"))
    out.append(_overfitting(rows))
    return out


def _overfitting(rows: Sequence[dict[str, Any]]) -> Check:
    val = [(-float(r["val_elbo"]), r) for r in rows if isinstance(r.get("val_elbo"), (int, float))
           and math.isfinite(r["val_elbo"])]
    if not val:
        return Check("info", "over-fitting", "no validation data (data.val_size = 0): over-fitting cannot be seen")
    last_v, last = val[-1]
    best_v, best = min(val, key=lambda t: t[0])
    tr = None
    if isinstance(last.get("train_rec"), (int, float)) and isinstance(last.get("train_kl"), (int, float)):
        tr = -(last["train_rec"] - last["train_kl"])  # the train -ELBO at beta = 1, comparable with validation
    gap = "" if tr is None else (f" At epoch {last.get('epoch')} the train -ELBO is {tr:.2f} and the validation "
                                 f"-ELBO {last_v:.2f} nats (validation {last_v - tr:+.2f}).")
    if last_v - best_v > OVERFIT_RISE * abs(best_v):
        return Check("warn", "over-fitting", f"the validation -ELBO was best at epoch {best.get('epoch')} "
                     f"({best_v:.2f}) and has risen to {last_v:.2f} since: the model is over-fitting.{gap} "
                     "The best checkpoint, which every command uses by default, is from that epoch.")
    if len(val) < 2:
        return Check("info", "over-fitting", f"one epoch with validation only; a trend needs more.{gap}")
    return Check("ok", "over-fitting", f"the validation -ELBO is still at or near its best ({best_v:.2f} at epoch "
                 f"{best.get('epoch')}).{gap}")


def _health_html(checks: Sequence[Check]) -> str:
    mark = {"ok": "✓ fine", "warn": "⚠ look", "info": "· note"}
    items = "".join(f'<li class="{c.status}"><span class="tag">{mark[c.status]}</span> <b>{_esc(c.title)}</b>: '
                    f"{_esc(c.text)}</li>" for c in checks)
    return f'<ul class="health">{items}</ul>'


# ---------------------------------------------------------------- pictures
def _call(r: Run) -> str:
    return python_call("write_report", run=str(r.root))


def _test_batch(r: Run, n: int):
    """The first n test images through the run's pipeline (the pictures' batch)."""
    return gen.first_test_images(r, n)[0]


def _samples(r: Run) -> str:
    model, cond = r.model, r.condition
    if isinstance(cond, MaskCondition) or not model.latent_dims:
        return _completions(r)
    if isinstance(cond, LabelCondition):
        k, per = cond.dim, 8
        c = cond.encode_labels(torch.arange(k).repeat_interleave(per))
        imgs = gen.sample_images(model, k * per, seed=0, c=c)
        prov = run_provenance(r, f"samples from the prior, one row per class 0..{k - 1}", _call(r), seed=0, temperature=1.0)
        return _figure(png_bytes(imgs, nrow=per, provenance=prov), "samples per class",
                       "Samples from P(z) = N(0, I) decoded with each class label: row i is class i "
                       "(the likelihood's mean; seed 0).")
    imgs = gen.sample_images(model, 64, seed=0)
    prov = run_provenance(r, "samples from the prior", _call(r), seed=0, temperature=1.0)
    return _figure(png_bytes(imgs, nrow=8, provenance=prov), "samples",
                   "64 draws z ~ P(z) decoded (the likelihood's mean, seed 0, temperature 1).")


def _completions(r: Run) -> str:
    cond = r.condition
    if not isinstance(cond, MaskCondition):
        return _missing("samples", "this model has neither latent variables nor a partial observation to complete")
    x = to_float(r.data("test", limit=min(6, len(r.data("test")))).images)
    samples = 6 if r.model.latent_dims else 1
    comp = complete_images(r.model, x, samples=samples, seed=0)
    prov = run_provenance(r, "completions: observed | completions | ground truth", _call(r), seed=0, temperature=1.0)
    what = f"{samples} completions" if samples > 1 else "the model's prediction"
    return _figure(png_bytes(comp.grid_images(), nrow=comp.columns(), provenance=prov), "completions",
                   f"Each row: the observation ({cond.region}; unobserved pixels grey) | {what} | the ground truth.")


def _reconstructions(r: Run) -> str | None:
    if not r.model.latent_dims:
        return None  # nothing to reconstruct through: no section
    b = _test_batch(r, 16)
    rec = gen.reconstruct_images(r.model, b.x, b.c)
    rows = []
    for i in range(0, b.x.shape[0], 8):
        for label, imgs in (("original", b.x[i : i + 8]), ("reconstruction", rec[i : i + 8])):
            prov = run_provenance(r, f"test images {i}..{i + imgs.shape[0] - 1}: {label}", _call(r), seed=0)
            rows.append(f'<tr><th class="rowlabel">{label}</th><td>'
                        f'{_img(png_bytes(imgs, nrow=8, provenance=prov), f"{label} {i}")}</td></tr>')
    return (f'<table class="pairs">{"".join(rows)}</table><p class="caption">Test images (original, above) and the '
            "decoded posterior mean of each (reconstruction, below).</p>")


def _interpolation(r: Run) -> str | None:
    if not r.model.latent_dims:
        return None  # no latent space: no section
    if r.spec.cond_dim:
        return _missing("interpolation", "shown for unconditional models (z of a conditional model means "
                        "something different under each condition); try `vaelab explore`")
    b = _test_batch(r, 6)
    if b.x.shape[0] < 2:
        return _missing("interpolation", "the test split has fewer than two images")
    steps, rows = 8, []
    for a, c in ((0, 1), (2, 3), (4, 5)):
        if c >= b.x.shape[0]:
            break
        rows += [b.x[a : a + 1], gen.interpolate_images(r.model, b.x[a], b.x[c], steps), b.x[c : c + 1]]
    prov = run_provenance(r, "interpolations between pairs of test images", _call(r), seed=0)
    return _figure(png_bytes(torch.cat(rows), nrow=steps + 2, provenance=prov), "interpolation",
                   f"Each row: a test image, {steps} decoded points on the straight line between its top-layer "
                   "posterior mean and that of the next test image, that image.")


def _manifold(r: Run) -> str | None:
    dims = r.model.latent_dims
    if not dims or dims[-1] != 2 or r.spec.cond_dim:
        return None
    n = 15
    imgs = gen.manifold_images(r.model, n)
    prov = run_provenance(r, "latent manifold", _call(r), temperature="n/a (a fixed grid of latent points)")
    return _figure(png_bytes(imgs, nrow=n, provenance=prov), "manifold",
                   f"The 2-D latent space (Kingma & Welling Fig. 4): an {n}x{n} grid of Gaussian quantiles, "
                   "z[0] across, z[1] down (top = high), decoded.")


def _traversal(r: Run) -> str | None:
    """The latent traversal of the first test image over the most active top-layer dimensions (the
    ``vaelab traverse`` picture)."""
    if not r.model.latent_dims:
        return None
    b = _test_batch(r, 500)
    dims = gen.most_active_dims(r.model, b.x, b.c, top=8)
    c = None if b.c is None else b.c[0:1]
    imgs = gen.traverse_images(r.model, b.x[0], dims, steps=9, c=c)
    prov = run_provenance(r, "latent traversal", _call(r), seed=0, dims=",".join(map(str, dims)))
    return _figure(png_bytes(imgs, nrow=9, provenance=prov), "traversal",
                   f"Latent traversal of the first test image: row i sets top-layer dimension {list(dims)}[i] "
                   "(the most active units) to 9 values over the prior's mean ± 3 standard deviations, the "
                   "others held at the image's posterior mean.")


def _config_html(r: Run) -> str:
    """The run's config, one key/value table per section side by side, and what the data implied."""
    d = r.config.to_dict()
    d["data (as found)"] = {"shape": list(r.spec.shape), "num_classes": r.spec.num_classes, "cond_dim": r.spec.cond_dim}
    tables = []
    for section, values in d.items():
        rows = [(k, json.dumps(v, default=str) if isinstance(v, (list, dict)) else v) for k, v in values.items()]
        tables.append(f"<div><h3>{_esc(section)}</h3>{_table(('key', 'value'), rows)}</div>")
    return f'<div class="config">{"".join(tables)}</div><p class="note">Saved in every checkpoint and in {_esc(r.dir.config)}.</p>'


# ---------------------------------------------------------------- assembling
def _safe(what: str, build: Callable[[], str | None]) -> str | None:
    """A section's HTML, or one line saying why it could not be made (the rest of the report goes on)."""
    try:
        return build()
    except VaelabError as e:
        return _missing(what, str(e))


def build_report(run: RunLike, *, which: str = "best", k: int = 100, limit: int | None = 2000,
                 evaluate: bool = True, data_dir: str | None = None, device: str = "cpu") -> Report:
    """Every section of the report of ``run`` (see :func:`write_report`)."""
    from ..config import check_count

    check_count(k, "k (importance samples per datapoint)", 1)
    if limit is not None:
        check_count(limit, "limit (test images to evaluate)", 1)
    r = Run.of(run, which, data_dir=data_dir, device=device)
    rep = Report(r)
    rows = r.dir.read_metrics()
    rep.sections.append(Section("config", "Config", _config_html(r)))
    rep.sections.append(Section("curves", "Training curves", _safe("training curves", lambda: _curves(r, rows)) or ""))

    where = ""
    try:
        rep.evaluation, where = _evaluation(r, k, limit, evaluate)
    except VaelabError as e:
        where = str(e)
    ev = rep.evaluation
    rep.sections.append(Section("evaluation", "Evaluation", _evaluation_section(r, ev, where) if ev else
                                _missing("evaluation", where)))
    pictures = [_safe("samples", lambda: _samples(r)), _safe("reconstructions", lambda: _reconstructions(r)),
                _safe("interpolation", lambda: _interpolation(r)), _safe("manifold", lambda: _manifold(r)),
                _safe("traversal", lambda: _traversal(r))]
    titles = ["Samples" if r.model.latent_dims and not isinstance(r.condition, MaskCondition) else "Completions",
              "Reconstructions", "Interpolation", "Manifold", "Traversal"]
    for t, body in zip(titles, pictures, strict=True):
        if body is not None:
            rep.sections.append(Section(t.lower(), t, body))
    if ev is not None and ev.layers:
        rep.sections.append(Section("kl", "KL per latent dimension", _safe("KL per latent dimension",
                                                                           lambda: _kl_bars(r, ev)) or ""))
        rep.sections.append(Section("active", "Active units", _active_units(ev)))
    rep.checks = health_checks(ev, rows, r.state)
    rep.sections.insert(0, Section("health", "Health check", _health_html(rep.checks)))
    return rep


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1b1b}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
pre{background:#f6f6f6;padding:.8em;white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
table.pairs td,table.pairs th{border:none}th.rowlabel{font-weight:normal;color:#555;text-align:right;vertical-align:middle}
img.grid{image-rendering:pixelated;max-width:100%}figure{margin:.5em 0}figcaption,.caption,.note{color:#555;font-size:13px}
.missing{color:#8a4b00;background:#fff6e5;padding:.4em .6em}.meaning{background:#eef5ff;padding:.5em .7em}
ul.health{list-style:none;padding-left:0}ul.health li{margin:.4em 0;padding:.4em .6em;border-left:4px solid #bbb}
li.ok{border-color:#2e9d45!important}li.warn{border-color:#d68a00!important;background:#fff8ea}
.config{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}.config h3{margin:.3em 0;font-size:1em}
.config td{font-size:13px;padding:1px 6px}
.tag{font-size:12px;color:#555;display:inline-block;min-width:4.5em}nav a{margin-right:.8em}
"""


def render_html(rep: Report) -> str:
    """The report as one HTML document (no scripts, no external resources)."""
    r = rep.run
    title = f"vaelab report: {r.root.name}"
    head = (f"<p>Run <code>{_esc(r.root.resolve())}</code>, checkpoint <code>{_esc(r.checkpoint.name)}</code> "
            f"(epoch {_esc(r.state.get('epoch'))}, step {_esc(r.state.get('step'))}); model "
            f"<b>{_esc(r.config.model.model)}</b> with latent layers {_esc(list(r.model.latent_dims) or 'none')}, "
            f"likelihood {_esc(r.config.model.likelihood)}, data <b>{_esc(r.config.data.name)}</b> "
            f"(binarize: {_esc(r.config.data.binarize)}).</p>")
    nav = "<nav>" + "".join(f'<a href="#{s.id}">{_esc(s.title)}</a>' for s in rep.sections) + "</nav>"
    body = "".join(f'<section id="{s.id}"><h2>{_esc(s.title)}</h2>{s.body}</section>' for s in rep.sections)
    gen_by = f"<p class=\"note\">Written by <code>{_esc(command_or(_call(r)))}</code>.</p>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>{head}{nav}{body}{gen_by}</body></html>\n")


def write_report(run: RunLike, out: str | os.PathLike[str] | None = None, *, which: str = "best", k: int = 100,
                 limit: int | None = 2000, evaluate: bool = True, data_dir: str | None = None,
                 device: str = "cpu") -> Path:
    """Write ``RUN/report.html`` (or ``out``): one self-contained HTML file about a trained run.

    The evaluation of this checkpoint already in ``RUN/eval`` is used (the largest k); otherwise, with
    ``evaluate``, the first ``limit`` test images are evaluated now with ``k`` importance samples
    (nothing is written to RUN/eval). Returns the path written."""
    out_path = output_path(out, "report.html") if out is not None else None
    rep = build_report(run, which=which, k=k, limit=limit, evaluate=evaluate, data_dir=data_dir, device=device)
    p = out_path or rep.run.root / "report.html"
    atomic_write(p, render_html(rep).encode("utf-8"))
    return p
