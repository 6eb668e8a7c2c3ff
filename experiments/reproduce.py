"""Reproduce a paper's table with one command: train each model of the table from its config in
configs/, evaluate it, and write a results table (Markdown + JSON) with the paper's number beside ours
and whether the paper's ordering holds.

    python experiments/reproduce.py iwae-table1 --budget small     # 2 CPU cores, Fashion-MNIST, < 30 min
    python experiments/reproduce.py vampprior --budget small
    python experiments/reproduce.py iwae-table1 --budget full --device cuda   # the papers' settings (a GPU)
    python experiments/reproduce.py --list

Tables are described in experiments/tables/<name>.toml: the entries (a config, the paper's number),
the orderings to check, and per budget the data set, the overrides (``section.key=value``, as
``vaelab train --set``) and the evaluation (k, how many test images). Runs go to OUT/<table>-<budget>/
<entry>/; running the command again continues unfinished runs and re-evaluates. The paper's numbers are
on MNIST; the small budget trains on a subset of (binarized) Fashion-MNIST for a few passes, so only the
orderings, not the values, are comparable with the paper's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vaelab import RunConfig, VaelabError, evaluate_run, train
from vaelab.config import apply_overrides, load_config_file

ROOT = Path(__file__).resolve().parent.parent
TABLES = Path(__file__).resolve().parent / "tables"


def tables() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.toml"))


def load_table(name: str) -> dict[str, Any]:
    path = TABLES / f"{name}.toml"
    if not path.is_file():
        raise VaelabError(f"unknown table {name!r}; known: {', '.join(tables())}")
    return tomllib.loads(path.read_text())


def entry_config(entry: dict[str, Any], budget: dict[str, Any], data: str, data_dir: str | None,
                 device: str | None, extra: list[str]) -> RunConfig:
    """The paper's config for ``entry`` with the budget's overrides, the data set, then ``extra``."""
    d = load_config_file(ROOT / entry["config"])
    sets = [*budget.get("set", []), f"data.name={data}", *extra]
    if data_dir:
        sets.append(f"data.data_dir={data_dir}")
    if device:
        sets.append(f"train.device={device}")
    return RunConfig.from_dict(apply_overrides(d, sets))


def check_orderings(orderings: list[list[str]], nll: dict[str, float]) -> list[dict[str, Any]]:
    """For each paper ordering (best last), whether our -L_k decreases strictly along it."""
    out = []
    for chain in orderings:
        values = [nll[n] for n in chain]
        holds = all(a > b for a, b in zip(values, values[1:], strict=False))
        out.append({"ordering": " > ".join(chain), "holds": holds, "values": values})
    return out


def markdown(table: dict[str, Any], budget: str, rows: list[dict[str, Any]], checks: list[dict[str, Any]],
             meta: dict[str, Any]) -> str:
    k = meta["eval_k"]
    lines = [f"# {table['title']}", "",
             f"Budget **{budget}**: data `{meta['data']}` (dynamically binarized), evaluated by -L_{k} on "
             f"{meta['eval_n']} test images; paper: {table['paper_metric']}.", "",
             f"| model | paper | ours: -L_{k} ± s.e. | ours: -ELBO | active units | epochs | train time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        au = " + ".join(f"{a}/{d}" for a, d in r["active_units"])
        lines.append(f"| {r['label']} | {r['paper']:.2f} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} | "
                     f"{r['neg_elbo']:.2f} | {au} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min |")
    lines += ["", "Orderings (in NLL, best last):", ""]
    for c in checks:
        vals = " > ".join(f"{v:.2f}" for v in c["values"])
        lines.append(f"- {c['ordering']}: {'holds' if c['holds'] else 'does not hold'} ({vals})")
    lines += ["", f"Total time: {meta['seconds'] / 60:.1f} min. Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def reproduce(name: str, budget_name: str, out: Path, data: str | None = None, data_dir: str | None = None,
              device: str | None = None, extra: list[str] = (), eval_k: int | None = None,
              eval_limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    table = load_table(name)
    if budget_name not in table["budget"]:
        raise VaelabError(f"table {name!r} has no budget {budget_name!r}; known: {', '.join(table['budget'])}")
    budget = table["budget"][budget_name]
    data = data or budget["data"]
    k = eval_k or budget["eval_k"]
    limit = eval_limit if eval_limit is not None else budget.get("eval_limit")
    folder = out / f"{name}-{budget_name}"
    t_all = time.perf_counter()
    rows = []
    for entry in table["entry"]:
        cfg = entry_config(entry, budget, data, data_dir, device, list(extra))
        print(f"== {entry['name']}: {entry['label']}", flush=True)
        res = train(cfg, folder / entry["name"])
        seconds = res.state.elapsed  # training time, summed over resumed sessions
        ev = evaluate_run(folder / entry["name"], k=k, limit=limit, progress=progress, device=cfg.train.device,
                          data_dir=data_dir)
        rows.append({"name": entry["name"], "label": entry["label"], "paper": entry["paper"], "nll": ev.nll,
                     "nll_stderr": ev.nll_stderr, "neg_elbo": ev.neg_elbo, "epochs": res.state.epoch,
                     "active_units": [(ly["active_units"], ly["dim"]) for ly in ev.layers],
                     "train_seconds": round(seconds, 1), "config": cfg.to_dict()})
        print(f"   -L_{k} {ev.nll:.2f} ± {ev.nll_stderr:.2f} nats (paper, MNIST: {entry['paper']:.2f})", flush=True)
    nll = {r["name"]: r["nll"] for r in rows}
    checks = check_orderings(table.get("orderings", []), nll)
    meta = {"table": name, "budget": budget_name, "data": data, "eval_k": k, "eval_n": ev.n,
            "seconds": round(time.perf_counter() - t_all, 1),
            "command": " ".join(["python", "experiments/reproduce.py", *sys.argv[1:]])}
    result = {**meta, "title": table["title"], "rows": rows, "orderings": checks}
    folder.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-{budget_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(table, budget_name, rows, checks, meta)
    (out / f"{name}-{budget_name}.md").write_text(md)
    print(md)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", help=f"one of: {', '.join(tables())}")
    p.add_argument("--budget", default="small", help="small (2 CPU cores) | full (the papers' settings)")
    p.add_argument("--out", default="results", help="folder for the runs and the tables (default: results/)")
    p.add_argument("--data", default=None, help="data set (default: the budget's: fashion-mnist small, mnist full)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda | ... (default: the configs')")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra overrides")
    p.add_argument("--eval-k", type=int, default=None, help="importance draws (default: the budget's)")
    p.add_argument("--eval-limit", type=int, default=None, help="test images to evaluate (default: the budget's)")
    p.add_argument("--list", action="store_true", help="list the tables")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.list or not args.table:
        for name in tables():
            t = load_table(name)
            print(f"{name:14s} {t['title']} (budgets: {', '.join(t['budget'])})")
        return 0
    try:
        sets = list(args.set) + (["train.progress=false"] if args.no_progress else [])
        reproduce(args.table, args.budget, Path(args.out), args.data, args.data_dir, args.device, sets,
                  args.eval_k, args.eval_limit, progress=not args.no_progress)
    except VaelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
