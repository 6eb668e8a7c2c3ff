"""Reproduce a paper's table with one command: train each model of the table from its config in
configs/, evaluate it, and write a results table (Markdown + JSON) with the paper's number beside ours
and whether the paper's ordering holds.

    python experiments/reproduce.py iwae-table1 --budget small     # 2 CPU cores, Fashion-MNIST, < 30 min
    python experiments/reproduce.py vampprior --budget small
    python experiments/reproduce.py iwae-table1 --budget full --device cuda   # the papers' settings (a GPU)
    python experiments/reproduce.py --list

Tables are described in experiments/tables/<name>.toml: the entries (a config, the paper's number, and
optionally overrides of their own: ``set``, and ``budget_set.<budget>``, e.g. the epochs that give every
model the same wall-clock), the orderings to check (with ``margin``: by more than that many nats and
more than the seed-to-seed spread), entries whose every stochastic layer must be active
(``all_groups_active``), and per budget the data set, the overrides (``section.key=value``, as
``vaelab train --set``), the evaluation (k, how many test images) and ``seeds`` (each entry trained once
per seed; the orderings compare the means over seeds). Runs go to OUT/<table>-<budget>/<entry>/ (or
<entry>-s<seed>/); running the command again continues unfinished runs and reuses the rows already in the table
(same run, same checkpoint step, same settings). Stopped mid-way (Ctrl-C, SIGTERM, an error in one row), it
writes the table so far (the rows not done marked so) where the full table goes and prints the command that
continues it. The table records the environment (torch, vaelab, git commit, CPU/GPU, threads, date). The paper's numbers are
on MNIST; the small budget trains on a subset of (binarized) Fashion-MNIST for a few passes, so only the
orderings, not the values, are comparable with the paper's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import vaelab
from vaelab import RunConfig, VaelabError, evaluate_run, train
from vaelab.config import apply_overrides, load_config_file
from vaelab.errors import Interrupted
from vaelab.runs.checkpoint import atomic_write

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
                 device: str | None, extra: list[str], budget_name: str = "", seed: int | None = None) -> RunConfig:
    """The paper's config for ``entry`` with the budget's overrides, the entry's own (``set``, and
    ``budget_set.<budget>``: e.g. its epochs for equal wall-clock), the data set, the seed, then ``extra``."""
    d = load_config_file(ROOT / entry["config"])
    sets = [*budget.get("set", []), *entry.get("set", []), *entry.get("budget_set", {}).get(budget_name, []),
            f"data.name={data}", *([] if seed is None else [f"train.seed={seed}"]), *extra]
    if data_dir:
        sets.append(f"data.data_dir={data_dir}")
    if device:
        sets.append(f"train.device={device}")
    return RunConfig.from_dict(apply_overrides(d, sets))


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (training turns it into :class:`Interrupted` itself)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def git_commit(timeout: float = 5.0) -> str | None:
    """The checkout's commit (``-dirty`` when tracked files differ), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=timeout)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """What the numbers were computed with: versions, commit, hardware, threads, date."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "vaelab": vaelab.__version__}
    commit = git_commit()
    if commit:
        env["git_commit"] = commit
    env["cpu"] = cpu_name()
    env["cpu_count"] = os.cpu_count()
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["torch_threads"] = torch.get_num_threads()
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def command_line(argv: list[str] | None) -> str:
    """The command that runs reproduce.py with ``argv`` (what to re-run to continue)."""
    script = sys.argv[0] if Path(sys.argv[0]).name == "reproduce.py" else "experiments/reproduce.py"
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def entry_stats(rows: list[dict[str, Any]], entries: list[str]) -> dict[str, dict[str, Any]]:
    """Per entry whose every seed is done: the mean -L_k over its seeds and their spread (max - min)."""
    stats = {}
    for name in entries:
        mine = [r for r in rows if r.get("entry", r["name"]) == name]
        if mine and all(r.get("done", True) for r in mine):
            vals = [r["nll"] for r in mine]
            stats[name] = {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals), "seeds": len(vals),
                           "train_seconds": sum(r["train_seconds"] for r in mine) / len(mine)}
    return stats


def check_orderings(orderings: list[list[str]], stats: dict[str, dict[str, Any]],
                    margin: float = 0.0) -> list[dict[str, Any]]:
    """For each paper ordering (best last), whether our -L_k (the mean over seeds) decreases along it by
    more than ``margin`` and more than the seed-to-seed spread of either model (``holds`` None, not
    checked, while a row of it is not done). With one seed and no margin: strictly decreasing."""
    out = []
    for chain in orderings:
        if any(n not in stats for n in chain):
            out.append({"ordering": " > ".join(chain), "holds": None,
                        "values": [stats[n]["mean"] if n in stats else None for n in chain]})
            continue
        values = [stats[n]["mean"] for n in chain]
        needed = [max(margin, stats[a]["spread"], stats[b]["spread"]) for a, b in zip(chain, chain[1:], strict=False)]
        gaps = [a - b for a, b in zip(values, values[1:], strict=False)]
        holds = all(g > n if n > 0 else g > 0 for g, n in zip(gaps, needed, strict=True))
        out.append({"ordering": " > ".join(chain), "holds": holds, "values": values, "gaps": gaps,
                    "needed": needed, "spreads": [stats[n]["spread"] for n in chain]})
    return out


def check_groups_active(entries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each entry marked ``all_groups_active``: whether every stochastic layer of every seed's run has
    more than one active unit."""
    out = []
    for e in entries:
        if not e.get("all_groups_active"):
            continue
        mine = [r for r in rows if r.get("entry", r["name"]) == e["name"] and r.get("done", True)]
        holds = bool(mine) and all(a > 1 for r in mine for a, _ in r["active_units"])
        out.append({"entry": e["name"], "holds": holds if mine else None,
                    "active_units": [r["active_units"] for r in mine]})
    return out


def _paper(row: dict[str, Any]) -> str:
    return "—" if row.get("paper") is None else f"{row['paper']:.2f}"


def markdown(table: dict[str, Any], budget: str, rows: list[dict[str, Any]], checks: list[dict[str, Any]],
             meta: dict[str, Any]) -> str:
    k = meta["eval_k"]
    bpd = any(r.get("bits_per_dim") is not None for r in rows if r.get("done", True))
    seeded = any(r.get("seed") is not None for r in rows)
    lines = [f"# {table['title']}", "",
             f"Budget **{budget}**: data `{meta['data']}` ({table.get('data_note', 'dynamically binarized')}), "
             f"evaluated by -L_{k} on {meta['eval_n']} test images; paper: {table['paper_metric']}.", "",
             f"| model | {'seed | ' if seeded else ''}paper | ours: -L_{k} ± s.e. | "
             f"{'bits/dim | ' if bpd else ''}ours: -ELBO | active units | epochs | train time |",
             "|---|---|---|---|---|---|---|" + ("---|" if seeded else "") + ("---|" if bpd else "")]
    for r in rows:
        seed = f"{r.get('seed')} | " if seeded else ""
        if not r.get("done", True):
            lines.append(f"| {r['label']} | {seed}{_paper(r)} | not done | | | | |" + (" |" if bpd else ""))
            continue
        au = " + ".join(f"{a}/{d}" for a, d in r["active_units"])
        b = (f"{r['bits_per_dim']:.4f} | " if r.get("bits_per_dim") is not None else "n/a | ") if bpd else ""
        lines.append(f"| {r['label']} | {seed}{_paper(r)} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} | {b}"
                     f"{r['neg_elbo']:.2f} | {au} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min |")
    margin = table.get("margin", 0.0)
    rule = (f"the mean over seeds lower by more than {margin:g} nats and more than either model's seed-to-seed "
            "spread" if seeded or margin else "strictly lower")
    lines += ["", f"Orderings (in NLL, best last; holds: {rule}):", ""]
    for c in checks:
        if c["holds"] is None:
            lines.append(f"- {c['ordering']}: not checked (a row is not done)")
            continue
        vals = " > ".join(f"{v:.2f}" for v in c["values"])
        detail = ""
        if seeded or margin:
            detail = "; gaps " + ", ".join(f"{g:.2f} (needed > {n:.2f})" for g, n in zip(c["gaps"], c["needed"],
                                                                                      strict=True))
            detail += "; seed spreads " + ", ".join(f"{v:.2f}" for v in c["spreads"])
        lines.append(f"- {c['ordering']}: {'holds' if c['holds'] else 'does not hold'} ({vals}{detail})")
    for g in meta.get("groups_active", []):
        state = {None: "not checked (a row is not done)", True: "holds", False: "does not hold"}[g["holds"]]
        units = "; ".join(" + ".join(f"{a}/{d}" for a, d in au) for au in g["active_units"])
        lines.append(f"- every group of {g['entry']} active (more than one active unit): {state} ({units})")
    lines += ["", f"Time (this invocation): {meta['seconds'] / 60:.1f} min. Command: `{meta['command']}`", ""]
    if not meta.get("complete", True):
        lines[2:2] = [f"**Partial table**: {meta['stopped']}. Continue it with `{meta['command']}`.", ""]
    env = meta.get("environment", {})
    if env:
        lines += ["Environment:", ""]
        lines += [f"- {key}: {value}" for key, value in env.items()]
        lines.append("")
    return "\n".join(lines)


def previous_rows(path: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The finished rows of the table already at ``path`` when it was made with the same evaluation."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or any(old.get(key) != meta[key] for key in ("data", "eval_k", "eval_limit")):
        return {}
    return {r["name"]: r for r in old.get("rows", []) if isinstance(r, dict) and r.get("done", True) and "name" in r}


def write_table(out: Path, name: str, budget_name: str, table: dict[str, Any], rows: list[dict[str, Any]],
                meta: dict[str, Any]) -> str:
    """Write OUT/<table>-<budget>.json and .md atomically (a partial table too); returns the Markdown."""
    stats = entry_stats(rows, [e["name"] for e in table["entry"]])
    # the threads training ran with (train.threads; null: torch's default, the environment's torch_threads)
    threads = {r["config"]["train"].get("threads") for r in rows if r.get("done", True)}
    if threads:
        meta["environment"]["train_threads"] = threads.pop() if len(threads) == 1 else sorted(threads, key=str)
    checks = check_orderings(table.get("orderings", []), stats, table.get("margin", 0.0))
    meta["groups_active"] = check_groups_active(table["entry"], rows)
    result = {**meta, "title": table["title"], "rows": rows, "orderings": checks, "models": stats}
    atomic_write(out / f"{name}-{budget_name}.json", (json.dumps(result, indent=2) + "\n").encode())
    md = markdown(table, budget_name, rows, checks, meta)
    atomic_write(out / f"{name}-{budget_name}.md", md.encode())
    return md


def reproduce(name: str, budget_name: str, out: Path, data: str | None = None, data_dir: str | None = None,
              device: str | None = None, extra: list[str] = (), eval_k: int | None = None,
              eval_limit: int | None = None, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train and evaluate each row of table ``name`` (reusing the rows of an earlier table whose run has
    not changed) and write the table. Stopped by an exception (Ctrl-C, SIGTERM, an error in one row),
    it writes the rows done so far, the others marked not done, then lets the exception go on."""
    table = load_table(name)
    if budget_name not in table["budget"]:
        raise VaelabError(f"table {name!r} has no budget {budget_name!r}; known: {', '.join(table['budget'])}")
    budget = table["budget"][budget_name]
    data = data or budget["data"]
    k = eval_k or budget["eval_k"]
    limit = eval_limit if eval_limit is not None else budget.get("eval_limit")
    folder = out / f"{name}-{budget_name}"
    t_all = time.perf_counter()
    meta: dict[str, Any] = {"table": name, "budget": budget_name, "data": data, "eval_k": k, "eval_limit": limit,
                            "eval_n": None, "complete": True, "seconds": 0.0,
                            "command": command or command_line(None), "environment": environment()}
    before = previous_rows(out / f"{name}-{budget_name}.json", meta)
    rows: list[dict[str, Any]] = []
    seeds: list[int | None] = list(budget.get("seeds", [None]))
    entries = [(e, s) for e in table["entry"] for s in seeds]  # every entry once per seed
    try:
        for entry, seed in entries:
            row_name = entry["name"] if seed is None else f"{entry['name']}@s{seed}"
            run_dir = folder / (entry["name"] if seed is None else f"{entry['name']}-s{seed}")
            cfg = entry_config(entry, budget, data, data_dir, device, list(extra), budget_name, seed)
            print(f"== {row_name}: {entry['label']}", flush=True)
            res = train(cfg, run_dir)  # continues an unfinished run; a finished one is kept
            config = json.loads(json.dumps(cfg.to_dict()))
            old = before.get(row_name)
            if old is not None and old.get("step") == res.state.step and old.get("config") == config:
                row = {**old, "label": entry["label"], "paper": entry.get("paper")}
                print(f"   reused from the earlier table (run unchanged at step {res.state.step})", flush=True)
            else:
                ev = evaluate_run(run_dir, k=k, limit=limit, progress=progress,
                                  device=cfg.train.device, data_dir=data_dir)
                row = {"name": row_name, "entry": entry["name"], "seed": seed, "label": entry["label"],
                       "paper": entry.get("paper"), "done": True,
                       "nll": ev.nll, "nll_stderr": ev.nll_stderr, "neg_elbo": ev.neg_elbo, "eval_n": ev.n,
                       "bits_per_dim": ev.bits_per_dim, "epochs": res.state.epoch, "step": res.state.step,
                       "active_units": [(ly["active_units"], ly["dim"]) for ly in ev.layers],
                       "train_seconds": round(res.state.elapsed, 1),  # summed over resumed sessions
                       "config": config}
            rows.append(row)
            meta["eval_n"] = row.get("eval_n", meta["eval_n"])
            print(f"   -L_{k} {row['nll']:.2f} ± {row['nll_stderr']:.2f} nats (paper: {_paper(row)})",
                  flush=True)
    except BaseException as e:
        at = f"at row {entries[len(rows)][0]['name']!r} " if len(rows) < len(entries) else ""
        if isinstance(e, Interrupted):
            why = f"stopped by {signal.Signals(e.exit_code - 128).name} during training"
        elif isinstance(e, KeyboardInterrupt):
            why = "stopped by SIGTERM" if isinstance(e, Terminated) else "stopped by Ctrl-C"
        else:
            why = f"stopped by an error ({type(e).__name__})"
        meta.update(complete=False, stopped=f"{why} {at}({len(rows)} of {len(entries)} done)",
                    seconds=round(time.perf_counter() - t_all, 1))
        if isinstance(e, VaelabError):  # said here, before the command that continues (not vaelab train's)
            label = "interrupted" if isinstance(e, Interrupted) else "error"
            print(f"{label}: {str(e).split('; resume with:')[0]}", file=sys.stderr, flush=True)
            e.reported = True
        rows += [{"name": x["name"] if sd is None else f"{x['name']}@s{sd}", "entry": x["name"], "seed": sd,
                  "label": x["label"], "paper": x.get("paper"), "done": False} for x, sd in entries[len(rows):]]
        try:
            write_table(out, name, budget_name, table, rows, meta)
        except Exception as w:  # the original exception matters more
            print(f"reproduce: could not write the partial table: {w}", file=sys.stderr)
        else:
            print(f"reproduce: {meta['stopped']}; the partial table is in {out / f'{name}-{budget_name}.md'} "
                  f"(and .json); continue it (finished rows are reused, an unfinished run resumes) with:\n"
                  f"  {meta['command']}", file=sys.stderr, flush=True)
        raise
    meta["seconds"] = round(time.perf_counter() - t_all, 1)
    md = write_table(out, name, budget_name, table, rows, meta)
    print(md)
    return json.loads((out / f"{name}-{budget_name}.json").read_text())


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
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # SIGTERM outside training: the partial table
    try:
        sets = list(args.set) + (["train.progress=false"] if args.no_progress else [])
        reproduce(args.table, args.budget, Path(args.out), args.data, args.data_dir, args.device, sets,
                  args.eval_k, args.eval_limit, progress=not args.no_progress, command=command_line(argv))
    except Interrupted as e:  # training stopped by a signal, its checkpoint written; said with the hint
        return e.exit_code
    except KeyboardInterrupt as e:
        return 143 if isinstance(e, Terminated) else 130
    except VaelabError as e:
        if not getattr(e, "reported", False):
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
