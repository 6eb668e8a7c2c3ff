"""The model card (README.md) of an exported folder: what the model is, how to load it, how it
scores (every ``RUN/eval/*.json`` that ``vaelab evaluate`` wrote), how it was trained, its samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import DataSpec, RunConfig
from ..safeio import json_loads, read_regular


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def read_evaluations(folder: Path) -> list[dict[str, Any]]:
    """The evaluation results saved in ``folder`` (``eval/*.json``), sorted by split and k; files that
    are not evaluation results (or not readable) are left out."""
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json_loads(read_regular(p, ValueError, "evaluation"), str(p), ValueError)  # type: ignore[arg-type]
        except (ValueError, OSError):
            continue
        if isinstance(d, dict) and {"split", "k", "n", "neg_elbo", "nll"} <= set(d):
            out.append(d)
    return sorted(out, key=lambda d: (str(d.get("split")), d.get("k") if isinstance(d.get("k"), int) else 0))


def evaluation_table(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return ("No evaluation was saved with the run. Evaluate the exported model with "
                "`vaelab evaluate DIR -k 1000` (it writes `DIR/eval/`).")
    rows = ["| split | images | k | -ELBO (nats) | -log p(x) ≈ -L_k (nats) | bits/dim | active units |",
            "|---|---|---|---|---|---|---|"]
    for d in evals:
        au = f"{d.get('active_units', '–')} / {d.get('latent_dim', '–')}"
        rows.append(f"| {d['split']} | {d['n']} | {d['k']} | {_num(d['neg_elbo'])} ± {_num(d.get('neg_elbo_stderr'))} "
                    f"| {_num(d['nll'])} ± {_num(d.get('nll_stderr'))} | {_num(d.get('bits_per_dim'), 4)} | {au} |")
    meaning = evals[-1].get("meaning")
    if meaning:
        rows += ["", f"Note: {meaning}."]
    return "\n".join(rows)


def model_card(config: RunConfig, spec: DataSpec, *, source: str, trained: dict[str, Any], dtype: str,
               evals: list[dict[str, Any]], last_metrics: dict[str, Any] | None, samples: str | None,
               samples_note: str, onnx: dict[str, dict[str, Any]], onnx_notes: list[str], version: str) -> str:
    m, t, d = config.model, config.train, config.data
    title = f"{m.model} ({m.encoder}/{m.decoder} networks, {m.likelihood} likelihood) on {d.name}"
    latent = f"latent size {m.latent_dim}" if m.model != "regressor" else "no latent variable"
    lines = [
        f"# {title}",
        "",
        f"A model trained with vaelab {version}: {latent}, "
        f"hidden sizes {list(m.hidden)}, condition `{m.condition}`; data: {spec.describe()}. "
        f"Weights stored in {dtype} (`model.safetensors`); the configuration in `config.json`.",
        "",
        "## Use",
        "",
        "```python",
        "import vaelab",
        'model = vaelab.from_pretrained("THIS_FOLDER")          # eval mode, float32, on the CPU',
        "x = ...                                                # (B, C, H, W) intensities in [0, 1]",
        "q = model.encode(x)[-1]                                # the top layer's posterior: q.mean, q.logvar",
        "images = model.decode(q.mean).mean                     # reconstructions",
        "lk = vaelab.iwae_bound(model, x, k=1000)               # log p(x) estimate per image",
        "```",
        "",
        "Every `vaelab` command that takes a run also takes this folder: "
        "`vaelab sample THIS_FOLDER -n 64`, `vaelab evaluate THIS_FOLDER -k 1000` (the data set comes from "
        "the configuration; `--data-dir` says where it is).",
        "",
        "## Evaluation",
        "",
        evaluation_table(evals),
        "",
        "## Training",
        "",
        f"- exported from `{source}` (checkpoint `{trained.get('checkpoint', '?')}`), after "
        f"{trained.get('epoch', '?')} of {t.epochs} epochs, {trained.get('step', '?')} optimizer steps"
        + (f", {trained['elapsed_s'] / 60:.1f} minutes of training" if isinstance(trained.get("elapsed_s"), (int, float)) else ""),
        f"- objective: {'the IWAE bound L_' + str(t.iwae_k) if t.iwae_k > 1 else 'the ELBO'}"
        + (f" with beta = {t.beta}" if t.beta != 1.0 else "")
        + (f", KL warm-up over {t.warmup_epochs} epochs" if t.warmup_epochs else "")
        + (f", free bits {t.free_bits}" if t.free_bits else "")
        + f"; Adam, lr {t.lr}, batch size {t.batch_size}, seed {t.seed}, precision {t.precision}",
        f"- data: `{d.name}`, binarize `{d.binarize}`, {d.val_size} examples held out for validation (seed {d.seed})",
    ]
    if last_metrics:
        lines.append(f"- last epoch ({last_metrics.get('epoch')}): train loss {_num(last_metrics.get('train_loss'))}, "
                     f"validation -ELBO {_num(-last_metrics['val_elbo'] if isinstance(last_metrics.get('val_elbo'), (int, float)) else None)} nats")
    lines += ["", "<details><summary>The full configuration</summary>", "", "```json",
              json.dumps(config.to_dict(), indent=2, sort_keys=True), "```", "", "</details>", "", "## Samples", ""]
    lines.append(f"![samples from the prior]({samples})" if samples else samples_note)
    if samples:
        lines += ["", samples_note]
    lines += ["", "## ONNX", ""]
    if onnx:
        for g in onnx.values():
            lines.append(f"- `{g['file']}`: inputs {', '.join(f'`{n}`' for n in g['inputs'])} → outputs "
                         f"{', '.join(f'`{n}`' for n in g['outputs'])} (batch axis dynamic)")
        lines += ["", "The encoder returns the top stochastic layer's posterior `mean` and `logvar` (and, for a "
                  "model with several layers, the lower layers' as `mean_<i>`, `logvar_<i>`); the decoder returns "
                  "the likelihood's parameters. See vaelab's docs/export.md for serving without PyTorch."]
    else:
        lines.append("Not exported (`vaelab export RUN DIR --onnx` writes `encoder.onnx` and `decoder.onnx`).")
    lines += [f"- {n}" for n in onnx_notes]
    return "\n".join(lines) + "\n"
