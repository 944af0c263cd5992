"""``dllab sweep`` and ``dllab ablate``: many runs, one table.

``dllab sweep KIND --flag v1 v2 ... [--other v]`` takes any ``dllab train KIND`` flag with several
values and trains one run per combination (the product of all multi-valued flags), each in its own
folder under the sweep folder. Every combination is parsed and checked before the first run
starts. A complete run (`Run.complete`) is not trained again, so an interrupted sweep
continues where it stopped. The results go to ``sweep.md`` and ``sweep.csv`` and overlaid test
curves to ``sweep_curves.png``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import itertools
import shlex
from pathlib import Path

from dllab.config import check_compile_mode, from_mapping
from dllab.runs import Run, check_runs_folder, check_same_settings, never_trained, read_json, read_metrics


def _columns(kind: str) -> list[str]:
    """The summary columns worth a table for ``kind``: its headline metrics, then cost."""
    from dllab.train import metric_names

    names = metric_names(kind)
    return [*names.headline, *names.cost]


def split_flags(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``["--lr", "0.1", "0.2", "--quiet"]`` -> ``[("--lr", ["0.1", "0.2"]), ("--quiet", [])]``."""
    groups: list[tuple[str, list[str]]] = []
    for tok in tokens:
        if tok.startswith("--"):
            if "=" in tok:
                flag, value = tok.split("=", 1)
                groups.append((flag, [value]))
            else:
                groups.append((tok, []))
        elif groups:
            groups[-1][1].append(tok)
        else:
            raise ValueError(f"unexpected value {tok!r} before any --flag")
    return groups


def _label(flag: str, value: str | None) -> str:
    name = flag.lstrip("-")
    return name if value is None else f"{name}={value}"


def plan(kind: str, groups: list[tuple[str, list[str]]]) -> list[tuple[str, list[str], dict]]:
    """Every combination as (run name, train argv, {flag: value}); parsed and checked now."""
    from dllab.train import train_parser

    for flag, _ in groups:
        if flag in ("--out", "--resume"):
            raise ValueError(f"{flag} is set by the sweep itself (use --sweep-out)")
    fixed = [tok for flag, values in groups if len(values) <= 1 for tok in [flag, *values]]
    swept = [(flag, values) for flag, values in groups if len(values) > 1]
    parser = train_parser(kind)
    parser.prog = f"dllab sweep {kind}"  # its errors name the command the user typed
    if not swept:
        parser.parse_args(fixed)  # an unknown flag or a bad value is named first
        raise ValueError("nothing to sweep: give at least one flag several values, e.g. "
                         f"dllab sweep {kind} --lr 0.01 0.1 (`dllab train {kind}` trains a single run)")
    for flag, values in swept:  # one run would be trained and shown twice (as ablate's --seeds)
        if len(set(values)) < len(values):
            raise ValueError(f"{flag} repeats a value: {' '.join(values)}")
    combos = []
    for choice in itertools.product(*[values for _, values in swept]):
        chosen = {flag: value for (flag, _), value in zip(swept, choice)}
        name = "_".join(_label(f, v) for f, v in chosen.items())
        argv = [*fixed, *[t for f, v in chosen.items() for t in (f, v)]]
        parsed = parser.parse_args(argv)  # exits with code 2 and a one-line message on a bad value
        check_compile_mode(parsed.compile, parsed.compile_mode)  # before the first run, not at the second
        combos.append((name, argv, chosen))
    return combos


def check_new_runs(kind: str, combos, out: Path) -> None:
    """Each run the command will begin (none in ``out`` yet, or one that stopped before its first
    checkpoint) checked as ``dllab train`` checks a new run (:func:`dllab.train.check_new_run`),
    before the folder is made and the first run trains; runs it continues or reuses keep their
    settings, as a resume does."""
    from dllab.train import check_new_run, command_line_config, config_class, train_parser, with_preset

    parser = train_parser(kind)
    for name, argv, _ in combos:
        run_dir = out / name
        if (run_dir / "config.json").exists() and never_trained(run_dir) is None:
            continue
        settings = with_preset(kind, command_line_config(kind, parser.parse_args(argv), argv, resume=False))
        check_new_run(kind, from_mapping(config_class(kind), settings))


def run_all(kind: str, combos, out: Path, quiet: bool, again: str, option: str = "--sweep-out") -> list[dict]:
    """Train (or reuse, or continue) each combination's run in ``out``; a Ctrl-C names ``again``,
    the command that continues them all. A finished run is reused only when it was trained with
    the settings this command gives (``option`` is the way out otherwise)."""
    from dllab.engine import Interrupted
    from dllab.train import command_line_config, given_settings, train, train_parser

    parser = train_parser(kind)
    rows = []
    for name, argv, chosen in combos:
        run_dir = out / name
        run = Run.open(run_dir) if (run_dir / "config.json").exists() else None
        run_argv = [*argv, "--out", str(run_dir)]
        args = parser.parse_args(run_argv)
        if run is not None and run.complete:
            asked = command_line_config(kind, args, run_argv, resume=False)
            what = {"--sweep-out": "the sweep", "--ablate-out": "the ablation"}.get(option, "it")
            check_same_settings(run_dir, {k: asked[k] for k in given_settings(kind, argv) if k in asked},
                                what, option)
        else:
            # as the CLI does: on resume the flags given, the rest as the run saved them; a run that
            # stopped before its first checkpoint is begun again with the flags given (smaller, say)
            resume = run is not None and never_trained(run_dir) is None
            config = command_line_config(kind, args, run_argv, resume=resume)
            try:
                run = train(kind, config, resume=resume, quiet=quiet or bool(args.quiet))
            except Interrupted as e:  # the same command reuses the finished runs and continues this one
                raise e.continued_by(again) from None
        summary = run.summary()
        rows.append({**summary, "run": name, **{k.lstrip("-"): v for k, v in chosen.items()},
                     "_path": str(run_dir)})
    return rows


def write_table(rows: list[dict], keys: list[str], kind: str, out: Path, stem: str) -> tuple[Path, Path]:
    """``stem.md`` and ``stem.csv`` with one row per run."""
    from dllab.checkpoint import atomic_write_bytes

    metric_cols = [c for c in _columns(kind) if any(c in r for r in rows)]
    cols = ["run", *keys, *metric_cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(cols)
    writer.writerows([[r.get(c, "") for c in cols] for r in rows])
    md_path = atomic_write_bytes(out / f"{stem}.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    csv_path = atomic_write_bytes(out / f"{stem}.csv", lambda f: f.write(buf.getvalue().encode()))
    return md_path, csv_path


def plot_overlaid(rows: list[dict], kind: str, out: Path, stem: str) -> list[Path]:
    """Overlaid per-epoch test curves (and train loss) of every run."""
    from dllab.figures.common import plot_curves
    from dllab.train import metric_names

    paths = []
    metric = metric_names(kind).curves[0]
    for split, key in (("test", metric), ("train", "loss")):
        series = {}
        for r in rows:
            recs = [m for m in read_metrics(r["_path"]) if m.get("split") == split and key in m]
            series[r["run"]] = ([m["epoch"] for m in recs], [m[key] for m in recs])
        if any(len(xs) for xs, _ in series.values()):
            paths.append(plot_curves(series, out / f"{stem}_{split}_{key}.png", xlabel="epoch",
                                     ylabel=key, title=f"{split} {key}"))
    return paths


def sweep_main(args, argv: list[str]) -> int:
    """``dllab sweep KIND --flag v1 v2 ...``"""
    tokens = argv[argv.index(args.kind) + 1:]
    tokens = _drop_option(tokens, "--sweep-out")
    groups = split_flags(tokens)
    combos = plan(args.kind, groups)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.sweep_out or f"runs/sweep-{args.kind}-{stamp}")
    check_runs_folder(out, "--sweep-out")  # new, empty, or this sweep's own runs
    check_new_runs(args.kind, combos, out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = any(flag == "--quiet" for flag, _ in groups)
    again = shlex.join(["dllab", *_drop_option(argv, "--sweep-out"), "--sweep-out", str(out)])
    rows = run_all(args.kind, combos, out, quiet, again)
    keys = [flag.lstrip("-") for flag, values in groups if len(values) > 1]
    md, csv_path = write_table(rows, keys, args.kind, out, "sweep")
    plot_overlaid(rows, args.kind, out, "sweep")
    module = __import__(f"dllab.train.{args.kind}", fromlist=["sweep_figures"])
    if hasattr(module, "sweep_figures"):
        module.sweep_figures(rows, out)
    print(md.read_text(), end="")
    print(f"table: {md}\ncsv: {csv_path}")
    return 0


ABLATIONS = {
    "bn+pool": [("--maxpool", "on")],
    "bn": [("--maxpool", "off")],
    "pool": [("--no-norm", None), ("--maxpool", "on")],
    "none": [("--no-norm", None), ("--maxpool", "off")],
}


def ablate_main(args, argv: list[str]) -> int:
    """``dllab ablate classifier [train flags]``: {BN on/off} x {max-pool on/off}.

    With ``--seeds S1 S2 ...`` every variant is trained once per seed (runs ``VARIANT-seedS``),
    and ``ablation_summary.md`` gives each variant's mean and standard deviation over the seeds,
    so that a difference between variants can be read against the spread between seeds.
    """
    tokens = argv[argv.index(args.kind) + 1:]
    tokens = _drop_option(tokens, "--ablate-out")
    tokens = _drop_option(tokens, "--seeds", values=len(args.seeds or []))
    tokens = [t for t in tokens if t != "--both-layers"]
    groups = split_flags(tokens)
    for flag, _ in groups:
        if flag in ("--norm", "--no-norm", "--maxpool", "--out", "--resume", "--layers"):
            raise ValueError(f"{flag} is set by the ablation itself")
        if flag == "--seed" and args.seeds:
            raise ValueError("give either --seed or --seeds, not both")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}")
    base = [tok for flag, values in groups for tok in [flag, *values]]
    layer_sets = ["torch", "scratch"] if args.both_layers else [None]
    from dllab.train import train_parser

    parser = train_parser("classifier")
    parser.prog = "dllab ablate classifier"
    combos = []
    for seed, layers, (name, extra) in itertools.product(args.seeds or [None], layer_sets, ABLATIONS.items()):
        argv_i = [*base, *[t for f, v in extra for t in (f, v) if t is not None]]
        chosen = {"batch_norm": "--no-norm" not in argv_i, "max_pool": dict(extra).get("--maxpool") == "on"}
        if layers:
            argv_i += ["--layers", layers]
            name, chosen["layers"] = f"{name}-{layers}", layers
        if seed is not None:
            argv_i += ["--seed", str(seed)]
            name, chosen["seed"] = f"{name}-seed{seed}", seed
        parsed = parser.parse_args(argv_i)
        check_compile_mode(parsed.compile, parsed.compile_mode)  # before the folder is made
        combos.append((name, argv_i, chosen))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.ablate_out or f"runs/ablate-classifier-{stamp}")
    check_runs_folder(out, "--ablate-out")  # new, empty, or this ablation's own runs
    check_new_runs("classifier", combos, out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = any(flag == "--quiet" for flag, _ in groups)
    again = shlex.join(["dllab", *_drop_option(argv, "--ablate-out"), "--ablate-out", str(out)])
    rows = run_all("classifier", combos, out, quiet, again, "--ablate-out")
    keys = ["batch_norm", "max_pool"] + (["layers"] if args.both_layers else [])
    md, csv_path = write_table(rows, keys + (["seed"] if args.seeds else []), "classifier", out, "ablation")
    plot_overlaid(rows, "classifier", out, "ablation")
    print(md.read_text(), end="")
    print(f"table: {md}\ncsv: {csv_path}")
    if args.seeds:
        summary = write_seed_summary(rows, keys, "classifier", out, "ablation_summary")
        print(summary.read_text(), end="")
        print(f"summary over seeds {args.seeds}: {summary}")
    return 0


def _seed_columns(kind: str) -> list[str]:
    """The columns averaged over seeds: the kind's headline metrics and the training time."""
    from dllab.train import metric_names

    return [*metric_names(kind).headline, "train_seconds"]


def seed_summary(rows: list[dict], keys: list[str], kind: str) -> list[dict]:
    """One entry per variant (the values of ``keys``): n, and (mean, std) of each summary column
    (:func:`dllab.utils.mean_std`: the sample standard deviation, None with one seed).
    """
    from dllab.utils import mean_std

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for variant, members in groups.items():
        entry = {**dict(zip(keys, variant)), "n": len(members)}
        for col in _seed_columns(kind):
            values = [float(m[col]) for m in members if isinstance(m.get(col), (int, float))]
            if not values:
                continue
            entry[col] = mean_std(values)
        out.append(entry)
    return out


def write_seed_summary(rows: list[dict], keys: list[str], kind: str, out: Path, stem: str) -> Path:
    """``stem.md``: one row per variant, each metric as ``mean +- std`` over its seeds."""
    from dllab.checkpoint import atomic_write_bytes

    entries = seed_summary(rows, keys, kind)
    cols = [c for c in _seed_columns(kind) if any(c in e for e in entries)]

    def fmt(v):
        if isinstance(v, tuple):
            mean, std = v
            return f"{mean:.4g}" if std is None else f"{mean:.4g} +- {std:.2g}"
        return "" if v is None else str(v)

    md = ["| " + " | ".join([*keys, "seeds", *cols]) + " |", "|" + "|".join("---" for _ in [*keys, 0, *cols]) + "|"]
    md += ["| " + " | ".join([*(fmt(e.get(k)) for k in keys), str(e["n"]), *(fmt(e.get(c)) for c in cols)]) + " |"
           for e in entries]
    return atomic_write_bytes(out / f"{stem}.md", lambda f: f.write(("\n".join(md) + "\n").encode()))


def _drop_option(tokens: list[str], option: str, values: int = 1) -> list[str]:
    """Remove ``option`` with its ``values`` following tokens (or ``option=VALUE``) from a token list."""
    out, skip = [], 0
    for tok in tokens:
        if skip:
            skip -= 1
            continue
        if tok == option:
            skip = values
            continue
        if tok.startswith(option + "="):
            continue
        out.append(tok)
    return out
