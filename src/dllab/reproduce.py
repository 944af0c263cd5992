"""``dllab reproduce [STUDY ...] [--list] [--quick] [--seeds N]``: the project's claims, checked.

A study is a set of runs that together test one claim of the seed project (batch norm and
max-pool change a ResNet; beta trades reconstruction for posterior collapse; ...). Its expected
results live in the package's ``claims.json`` (:mod:`dllab.metrics.claims`), each with its
source. ``reproduce`` trains the study's runs into ``--out`` (default ``runs/reproduce``),
reusing every complete run whose settings match exactly and resuming unfinished ones (``--quick``
runs go to ``--out/STUDY-quick``), then
prints one pass/fail line per claim, writes the same table to ``claims.md`` and an HTML report
of the runs (which opens with each run's verdicts).

``--quick`` trains every study at a smoke-test size (a few hundred images, one or two epochs):
it checks that the study runs, and its runs match no claim, so nothing is judged.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dllab.metrics.claims import Claim, Verdict, judge, judge_order, load_claims

QUICK = {"limit": 256, "epochs": 1}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run of a study: its folder (under the study's), kind and settings."""

    label: str
    kind: str
    settings: dict


@dataclasses.dataclass(frozen=True)
class Curve:
    """A per-epoch test metric reduced to one number from ``first_epoch`` on: its minimum
    (``how="min"``) or the number of epochs at or below ``threshold`` (``how="count_at_most"``)."""

    how: str
    first_epoch: int
    threshold: float = 0.0

    def reduce(self, points: list[list[float]]) -> float | None:
        values = [v for epoch, v in points if epoch >= self.first_epoch]
        if not values:
            return None
        return min(values) if self.how == "min" else float(sum(v <= self.threshold for v in values))


@dataclasses.dataclass(frozen=True)
class Column:
    """One measured number of a study's results table: ``kind``'s summary ``metric``, printed with
    ``fmt`` after multiplying by ``scale`` (100 for a percentage), then ``unit``."""

    header: str
    kind: str
    metric: str
    fmt: str = "{:.3g}"
    scale: float = 1.0
    unit: str = ""
    mean_fmt: str | None = None  # for a mean and spread over seeds, where ``fmt`` is too coarse
    curve: Curve | None = None  # a reduction of the metric's per-epoch record instead of its final value

    def number(self, value: float, fmt: str | None = None) -> str:
        return (fmt or self.fmt).format(value * self.scale)

    def text(self, value: float, std: float | None = None) -> str:
        """``value`` (with `` +- std`` when given: a mean over seeds) and the unit."""
        if std is None:
            return f"{self.number(value)}{self.unit}"
        return f"{self.number(value, self.mean_fmt)} +- {self.number(std, self.mean_fmt)}{self.unit}"


@dataclasses.dataclass(frozen=True)
class Table:
    """How a study's results read in README: one row per variant (the values of ``variants``, each
    a (header, setting, {value: text}) triple) with every column as mean +- std over the seeds, and
    the first column's seeds one by one; a study without variants has one row per column and one
    column per seed."""

    columns: tuple[Column, ...]
    variants: tuple[tuple[str, str, dict], ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    description: str
    cost: str  # how long it takes, measured (2 cores unless said)
    table: Table

    def runs(self, seeds: int, quick: bool) -> list[Spec]:
        return _PLANS[self.name](seeds, quick)


def _seeded(label: str, kind: str, settings: dict, seed: int, quick: bool) -> Spec:
    settings = {**settings, "seed": seed, **(QUICK if quick else {})}
    return Spec(f"{label}-seed{seed}", kind, settings)


def _demo_runs(seeds: int, quick: bool, *, label: str = "", vae: dict | None = None, dcgan: dict | None = None
               ) -> list[Spec]:
    """Per seed, the demo's classifier, its VAE and its DCGAN, scored by that classifier; ``vae`` and
    ``dcgan`` are settings over the demo's, and ``label`` is added to those two runs' names."""
    from dllab.demo import QUICK as DEMO

    specs = []
    for s in range(seeds):
        clf = _seeded("classifier", "classifier", DEMO["classifier"], s, quick)
        specs += [clf, _seeded(f"vae{label}", "vae", {**DEMO["vae"], **(vae or {})}, s, quick),
                  _seeded(f"dcgan{label}", "dcgan", {**DEMO["dcgan"], **(dcgan or {}), "classifier_run": clf.label},
                          s, quick)]
    return specs


def _demo(seeds: int, quick: bool) -> list[Spec]:
    return _demo_runs(seeds, quick)


def _demo_bf16(seeds: int, quick: bool) -> list[Spec]:
    """The demo's VAE and DCGAN in bf16 autocast, the DCGAN scored by the demo's classifier (trained
    as the demo does)."""
    bf16 = {"precision": "bf16"}
    return _demo_runs(seeds, quick, label="-bf16", vae=bf16, dcgan=bf16)


ABLATION = {"width": 8, "epochs": 8}


def _ablation(seeds: int, quick: bool) -> list[Spec]:
    variants = {"bn+pool": {"norm": True, "maxpool": "on"}, "bn": {"norm": True, "maxpool": "off"},
                "pool": {"norm": False, "maxpool": "on"}, "plain": {"norm": False, "maxpool": "off"}}
    return [_seeded(name, "classifier", {**ABLATION, **v}, s, quick)
            for s in range(seeds) for name, v in variants.items()]


def _layers(seeds: int, quick: bool) -> list[Spec]:
    return [_seeded(backend, "classifier", {**ABLATION, "layers": backend}, s, quick)
            for s in range(seeds) for backend in ("torch", "scratch")]


BETAS = (0.1, 0.5, 1.0, 2.0, 4.0)


def _beta(seeds: int, quick: bool) -> list[Spec]:
    return [_seeded(f"beta={b:g}", "vae", {"beta": b, "epochs": 20, "iw_samples": 100}, s, quick)
            for s in range(seeds) for b in BETAS]


def _tsne(seeds: int, quick: bool) -> list[Spec]:
    return [_seeded("vae", "vae", {"epochs": 10}, s, quick) for s in range(seeds)]


GAN_BN = {"g_width": 32, "d_width": 32, "epochs": 20, "no_d_norm": True}


def _gan_bn(seeds: int, quick: bool) -> list[Spec]:
    specs = [_seeded("classifier", "classifier", ABLATION, 0, quick)]
    clf = specs[0].label
    for s in range(seeds):
        specs += [_seeded("g-bn", "dcgan", {**GAN_BN, "classifier_run": clf}, s, quick),
                  _seeded("no-g-bn", "dcgan", {**GAN_BN, "no_g_norm": True, "classifier_run": clf}, s, quick)]
    return specs


FASHION = {"dataset": "fashion-mnist", "width": 16, "epochs": 24, "channels_last": True,
           "label_smoothing": 0.1, "tta": True}


def _fashion(seeds: int, quick: bool) -> list[Spec]:
    return [_seeded("classifier", "classifier", FASHION, s, quick) for s in range(seeds)]


_PLANS = {"demo": _demo, "demo-bf16": _demo_bf16, "ablation": _ablation, "layers": _layers, "beta": _beta,
          "tsne": _tsne, "gan-bn": _gan_bn, "fashion": _fashion}

PERCENT = {"fmt": "{:.1f}", "scale": 100.0, "unit": " %"}
COUNT = {"fmt": "{:.0f}", "mean_fmt": "{:.1f}"}  # whole numbers, whose mean over seeds is not
ON_OFF = {True: "on", False: "off", "on": "on", "off": "off"}

STUDIES = {s.name: s for s in [
    Study("demo", "the three demo models on MNIST-5k: classifier accuracy, VAE ELBO and k-NN, DCGAN "
          "FID and class coverage", "about 5 minutes per seed on 1 thread of a busy 2-core machine",
          Table((Column("classifier test accuracy", "classifier", "test_acc", **PERCENT),
                 Column("VAE test ELBO (nats)", "vae", "test_elbo", "{:.1f}"),
                 Column("VAE latent k-NN accuracy", "vae", "knn_acc", "{:.3f}"),
                 Column("DCGAN classifier-FID", "dcgan", "clf_fid", "{:.1f}"),
                 Column("DCGAN classes covered (of 10)", "dcgan", "clf_modes_covered", **COUNT)))),
    Study("demo-bf16", "the demo's VAE and DCGAN in bf16 autocast, held to the fp32 claims: ELBO, "
          "classifier-FID and class coverage (the DCGAN scored by the demo's classifier, trained as "
          "the demo trains it)", "about 4 minutes per seed on a CPU with AVX512-BF16 or AMX (about 10x more where "
          "bf16 is emulated, as on an AVX2-only CPU)",
          Table((Column("VAE test ELBO (nats)", "vae", "test_elbo", "{:.1f}"),
                 Column("VAE latent k-NN accuracy", "vae", "knn_acc", "{:.3f}"),
                 Column("DCGAN classifier-FID", "dcgan", "clf_fid", "{:.1f}"),
                 Column("DCGAN classes covered (of 10)", "dcgan", "clf_modes_covered", **COUNT),
                 Column("DCGAN recall", "dcgan", "clf_recall", "{:.2f}")))),
    Study("ablation", "batch norm x max-pool in ResNet-18 (width 8, 8 epochs, MNIST-5k): batch norm "
          "makes the learning rate safe", "about 2 minutes per seed",
          Table((Column("test accuracy", "classifier", "test_acc", **PERCENT),
                 Column("test loss", "classifier", "test_loss", "{:.3f}"),
                 Column("ECE", "classifier", "ece", "{:.3f}")),
                (("batch norm", "norm", ON_OFF), ("max-pool after the stem", "maxpool", ON_OFF)))),
    Study("layers", "ResNet-18 (width 8, 8 epochs, MNIST-5k) with dllab's from-scratch layers "
          "against torch.nn: the same seed, data and initial weights, the same accuracy",
          "about 3 minutes per seed",
          Table((Column("test accuracy", "classifier", "test_acc", **PERCENT),
                 Column("test loss", "classifier", "test_loss", "{:.3f}")),
                (("layers", "layers", {"torch": "torch.nn", "scratch": "dllab.layers (from scratch)"}),))),
    Study("beta", "beta-VAE on MNIST-5k (20 epochs): as beta grows the KL (rate) falls and the "
          "reconstruction (distortion) rises", "about 4 minutes per seed",
          Table((Column("test ELBO", "vae", "test_elbo", "{:.1f}"),
                 Column("reconstruction", "vae", "test_recon", "{:.1f}"),
                 Column("KL (rate)", "vae", "test_kl", "{:.1f}"),
                 Column("bits/dim", "vae", "bits_per_dim", "{:.3f}"),
                 Column("active units (of 16)", "vae", "active_units", **COUNT),
                 Column("k-NN acc.", "vae", "knn_acc", "{:.3f}"),
                 Column("IWAE log p(x), k = 100", "vae", "iw_log_likelihood", "{:.1f}")),
                (("beta", "beta", {}),))),
    Study("tsne", "the default VAE's latent means cluster by class: k-NN accuracy, t-SNE at three "
          "perplexities", "about 1 minute per seed",
          Table((Column("k-NN accuracy of the latent means", "vae", "knn_acc", "{:.3f}"),
                 Column("test ELBO (nats)", "vae", "test_elbo", "{:.1f}"),
                 Column("active units (of 16)", "vae", "active_units", **COUNT)))),
    Study("gan-bn", "batch norm in the generator against mode collapse (D without batch norm, 20 "
          "epochs, MNIST-5k)", "about 5 minutes per seed",
          Table((Column("recall", "dcgan", "clf_recall", "{:.2f}"),
                 Column("classifier-FID", "dcgan", "clf_fid", "{:.1f}"),
                 Column("precision", "dcgan", "clf_precision", "{:.2f}"),
                 Column("classes covered (of 10)", "dcgan", "clf_modes_covered", **COUNT),
                 Column("fewest classes covered, epoch 4 on", "dcgan", "clf_modes_covered", "{:.1f}",
                        curve=Curve("min", 4)),
                 Column("epochs from 4 on with at most 2 classes", "dcgan", "clf_modes_covered", "{:.1f}",
                        curve=Curve("count_at_most", 4, 2)),
                 Column("KL(gen ‖ data classes)", "dcgan", "clf_kl_gen_data", "{:.2f}")),
                (("batch norm in G", "no_g_norm", {False: "on", True: "off"}),))),
    Study("fashion", "ResNet-18 (width 16) on the real Fashion-MNIST to 94.5 % or better",
          "about 50 minutes per seed",
          Table((Column("test accuracy (flip-averaged)", "classifier", "test_acc", "{:.2f}", 100.0, " %"),
                 Column("test loss", "classifier", "test_loss", "{:.3f}"),
                 Column("ECE", "classifier", "ece", "{:.3f}")))),
]}


@dataclasses.dataclass
class Outcome:
    study: str
    verdicts: list[tuple[str, Verdict]]  # (run label or "all runs", verdict)
    runs: list[Path]


def _train_or_reuse(spec: Spec, folder: Path, quiet: bool, again: str) -> Path:
    from dllab.demo import train_or_reuse
    from dllab.engine import Interrupted

    settings = {**spec.settings, "out": str(folder)}
    if "classifier_run" in settings:  # a label of the same study
        settings["classifier_run"] = str(folder.parent / settings["classifier_run"])
    try:
        return train_or_reuse(spec.kind, settings, "dllab reproduce", quiet)
    except Interrupted as e:  # the same reproduce reuses the finished runs and continues this one
        raise e.continued_by(again) from None


def run_study(name: str, out: Path, seeds: int = 1, quick: bool = False, quiet: bool = False,
              claims: list[Claim] | None = None, again: str | None = None) -> Outcome:
    """Train (or reuse) the study's runs under ``out/NAME`` and judge the claims on them; a Ctrl-C
    names ``again`` (default: this study's ``dllab reproduce`` command) as what continues them."""
    from dllab.demo import reuse_state
    from dllab.runs import Run

    again = again or reproduce_command([name], out, seeds, quick)
    claims = load_claims() if claims is None else claims
    specs = STUDIES[name].runs(seeds, quick)
    base = out / (f"{name}-quick" if quick else name)  # never mixed with the full-size runs
    folders = []
    for i, spec in enumerate(specs):
        if not quiet:
            print(f"dllab reproduce {name}: run {i + 1}/{len(specs)} {spec.label}"
                  f"{reuse_state(base / spec.label)}", file=sys.stderr, flush=True)
        folders.append(_train_or_reuse(spec, base / spec.label, quiet, again))
    runs = [(run.config, run.summary()) for run in map(Run.open, folders)]
    study_claims = [c for c in claims if c.study == name and not quick]  # a smoke test judges nothing
    verdicts = [(f.name, v) for f, (config, summary) in zip(folders, runs)
                for v in judge(config, summary, study_claims)]
    verdicts += [("all runs", judge_order(c, runs)) for c in study_claims if c.order_by is not None]
    return Outcome(name, verdicts, folders)


# -- results tables: what a study measured, recorded and rendered for README ----------------------


def _machine(configs: list[dict]) -> dict:
    """Where the study's runs were measured: the CPU (model name and its bf16 matrix flags), the
    threads, torch and when the runs began (``created``: the first and the last run's date), from
    the runs' own config.json (runs from before dllab recorded the CPU are counted, not guessed)."""
    envs = [c.get("environment", {}) for c in configs]
    dates = sorted(str(c.get("created", ""))[:10] for c in configs if c.get("created"))
    cpus = {(e["cpu"], tuple(e.get("cpu_bf16", ()))) for e in envs if e.get("cpu")}
    cpu = " / ".join(sorted(c for c, _ in cpus)) or None
    flags = list(next(iter(cpus))[1]) if len(cpus) == 1 else None  # None: several CPUs, or none recorded
    return {"cpu": cpu, "bf16_flags": flags, "runs_without_cpu": sum(not e.get("cpu") for e in envs),
            "threads": sorted({e.get("cpu_threads") for e in envs if e.get("cpu_threads")}),
            "torch": sorted({str(e.get("torch")) for e in envs if e.get("torch")}),
            "gpu": sorted({str(e["gpu"]) for e in envs if e.get("gpu")}),
            "created": {"first": dates[0], "last": dates[-1]} if dates else {}}


def results_record(name: str, seeds: int, folders: list[Path]) -> dict:
    """The study's measurements as JSON-ready data: each run's label, kind, settings and scalar
    summary metrics, with the command and the machine that produced them."""
    from dllab.report import scalar_metrics
    from dllab.runs import Run

    curves = {c.metric for c in STUDIES[name].table.columns if c.curve is not None}
    runs, configs = [], []
    for folder in folders:
        run = Run.open(folder)
        config = dict(run.config)
        configs.append(config)
        settings = {k: v for k, v in config.items() if k not in ("out", "environment", "created")}
        summary = run.summary() or {}
        entry = {"label": folder.name, "kind": config.get("kind"), "settings": settings,
                 "summary": scalar_metrics(summary),
                 "alarms": [[a.get("alarm"), a.get("epoch")] for a in summary.get("alarms", [])]}
        test = [m for m in run.metrics() if m.get("split") == "test"]
        entry["curves"] = {k: [[m["epoch"], m[k]] for m in test if isinstance(m.get(k), (int, float))]
                           for k in sorted(curves)}
        runs.append(entry)
    return {"study": name, "command": f"dllab reproduce {name} --seeds {seeds}",
            "machine": _machine(configs), "runs": runs}


def _cell(column: Column, values: list[float]) -> str:
    from dllab.utils import mean_std

    return column.text(*mean_std(values)) if values else "-"


def _seeds(runs: list[dict]) -> list:
    return sorted({r["settings"].get("seed") for r in runs}, key=lambda s: (s is None, s))


def _value(run: dict, column: Column) -> float | None:
    if run["kind"] != column.kind:
        return None
    if column.curve is not None:
        return column.curve.reduce(run.get("curves", {}).get(column.metric, []))
    value = run["summary"].get(column.metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _values(runs: list[dict], column: Column) -> list[float]:
    return [v for v in (_value(r, column) for r in runs) if v is not None]


def _caption(record: dict) -> str:
    m = record["machine"]
    flags = m.get("bf16_flags")
    bf16 = "" if flags is None else f" ({', '.join(flags)})" if flags else " (no bf16 matrix instructions)"
    where = f"{', '.join(m['gpu'])}" if m.get("gpu") else f"{m['cpu']}{bf16}" if m.get("cpu") else "CPU unrecorded"
    if m.get("runs_without_cpu") and m.get("cpu"):
        where += f" ({m['runs_without_cpu']} of {len(record['runs'])} runs recorded no CPU)"
    threads = "/".join(str(t) for t in m.get("threads", [])) or "?"
    created = m.get("created") or dict(zip(("first", "last"), m.get("dates", [])))  # (older records: a pair)
    dates = " to ".join(dict.fromkeys(created.values())) or "undated"
    seeds = _seeds(record["runs"])
    precisions = sorted({f"{r['kind']} in {r['summary']['precision']}" for r in record["runs"]
                         if r["summary"].get("precision")})
    return (f"`{record['command']}`: {where}, {threads} thread(s), torch {', '.join(m.get('torch', []))}, "
            f"{dates}; {', '.join(precisions) or 'precision unrecorded'}; seeds {', '.join(map(str, seeds))}"
            + ("; mean +- sample standard deviation over the seeds." if len(seeds) > 1 else "."))


def results_markdown(record: dict) -> str:
    """The README table of one study's record (see :class:`Table`), with a caption naming the
    command and the machine that measured it."""
    study = STUDIES[record["study"]]
    table, runs = study.table, record["runs"]
    kinds = {c.kind for c in table.columns}
    runs = [r for r in runs if r["kind"] in kinds]
    seeds = _seeds(runs)
    lines = [_caption(record), ""]
    if not table.variants:
        overall = [" all seeds |"] if len(seeds) > 1 else []
        lines += ["| measured | " + " | ".join(f"seed {s}" for s in seeds) + " |" + "".join(overall),
                  "| --- |" + " --- |" * (len(seeds) + len(overall))]
        for col in table.columns:
            per_seed = [_values([r for r in runs if r["settings"].get("seed") == s], col) for s in seeds]
            lines.append(f"| {col.header} | " + " | ".join(_cell(col, v) for v in per_seed) + " |"
                         + (f" {_cell(col, _values(runs, col))} |" if overall else ""))
        return "\n".join(lines) + "\n"
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r["settings"].get(key) for _, key, _ in table.variants), []).append(r)
    first = table.columns[0]
    headers = [h for h, _, _ in table.variants] + [c.header for c in table.columns]
    if len(seeds) > 1:
        headers.insert(len(table.variants) + 1, f"{first.header}, seeds {' / '.join(map(str, seeds))}")
    lines += ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for variant, members in groups.items():
        cells = [names.get(v, _format_setting(v)) for (_, _, names), v in zip(table.variants, variant)]
        cells += [_cell(c, _values(members, c)) for c in table.columns]
        if len(seeds) > 1:
            one_by_one = [_values([m for m in members if m["settings"].get("seed") == s], first) for s in seeds]
            cells.insert(len(table.variants) + 1,
                         " / ".join(first.number(v[0]) if v else "-" for v in one_by_one) + first.unit)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_setting(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _block(text: str, tag: str, body: str) -> str:
    """``text`` with what stands between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` replaced."""
    begin, end = f"<!-- {tag}:begin -->\n", f"<!-- {tag}:end -->"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"README has no {begin.strip()} ... {end} block")
    return text[:start + len(begin)] + body + text[stop:]


def readme_blocks(records: Path | dict[str, bytes]) -> dict[str, str]:
    """Every generated README block: the claims table and each recorded study's results table
    (``records/STUDY.json``, copied from a ``dllab reproduce`` output by :func:`update_readme`;
    or the records' contents by study name)."""
    import json

    if isinstance(records, Path):
        records = {p.stem: p.read_bytes() for p in records.glob("*.json")} if records.is_dir() else {}
    blocks = {"claims": claims_markdown()}
    for name in STUDIES:
        if name in records:
            blocks[f"results:{name}"] = results_markdown(json.loads(records[name]))
    return blocks


def update_readme(readme: Path, records: Path, out: Path | None = None) -> list[str]:
    """Copy each study's ``out/STUDY/results.json`` (when ``out`` is given) into ``records`` and
    rewrite README's generated blocks from the records; returns the blocks written."""
    from dllab.checkpoint import atomic_write_bytes

    if out is not None and not out.is_dir():
        raise FileNotFoundError(f"{out} does not exist: give the --out of a finished dllab reproduce")
    found = {name: out / name / "results.json" for name in STUDIES} if out is not None else {}
    new = {name: src.read_bytes() for name, src in found.items() if src.is_file()}
    if out is not None and not new:  # a --quick study's record (STUDY-quick) is a smoke test: never copied
        raise FileNotFoundError(f"no STUDY/results.json under {out} (a --quick study's record is never "
                                "copied into README)")
    kept = {p.stem: p.read_bytes() for p in records.glob("*.json") if p.stem not in new} if records.is_dir() else {}
    blocks = readme_blocks({**kept, **new})
    text = readme.read_text()
    for tag, body in blocks.items():  # every block is made before anything is written
        text = _block(text, tag, body)
    for name, data in new.items():
        records.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(records / f"{name}.json", lambda f, b=data: f.write(b))
    atomic_write_bytes(readme, lambda f: f.write(text.encode()))
    return list(blocks)


def verdict_rows(outcomes: list[Outcome]) -> list[list[str]]:
    from dllab.report import format_value

    rows = []
    for o in outcomes:
        if not o.verdicts:
            rows.append([o.study, "-", "-", "-", "not judged (no claim matches these runs' settings)", ""])
        for label, v in o.verdicts:
            mark = {True: "pass", False: "FAIL", None: "not measured"}[v.passed]
            value = (", ".join(f"{k}: {format_value(m)}" for k, m in v.value)
                     if isinstance(v.value, list) else format_value(v.value))
            rows.append([o.study, label, v.claim.name, value, f"{mark} (expected {v.claim.range_text()})",
                         v.claim.source])
    return rows


def claims_markdown(claims: list[Claim] | None = None) -> str:
    """The claims file as a Markdown table (README's copy is kept equal to it by a test)."""
    claims = load_claims() if claims is None else claims
    lines = ["| study | claim | expected | source |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.study} | {c.name} | {c.metric} {c.range_text()} | {c.source} |" for c in claims]
    return "\n".join(lines) + "\n"


def list_studies(claims: list[Claim] | None = None, names: list[str] | None = None) -> str:
    """Each study (those in ``names``, or all) with its cost and its claims, one per line."""
    claims = load_claims() if claims is None else claims
    out = []
    for s in (STUDIES[n] for n in (names or STUDIES)):
        out.append(f"{s.name}: {s.description} ({s.cost}; {len(s.runs(1, False))} run(s) for one seed)")
        mine = [c for c in claims if c.study == s.name]
        out += [f"  {c.name}: {c.metric} {c.range_text()}  [{c.source}]" for c in mine]
        if not mine:
            out.append("  no claims yet")
    return "\n".join(out)


def _write_results(outcome: Outcome, seeds: int, quick: bool) -> None:
    """``results.json`` (the record README's tables are made from) and ``results.md`` (its table)
    in the study's folder."""
    import json

    from dllab.checkpoint import atomic_write_bytes

    record = results_record(outcome.study, seeds, outcome.runs)
    if quick:
        record["command"] += " --quick"
    base = outcome.runs[0].parent
    atomic_write_bytes(base / "results.json", lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    atomic_write_bytes(base / "results.md", lambda f: f.write(results_markdown(record).encode()))


def reproduce_command(studies: list[str], out: Path, seeds: int, quick: bool) -> str:
    """The ``dllab reproduce`` command of these arguments (what continues them when stopped)."""
    import shlex

    return shlex.join(["dllab", "reproduce", *studies, "--seeds", str(seeds), "--out", str(out)]
                      + (["--quick"] if quick else []))


def reproduce(studies: list[str], out: Path, seeds: int = 1, quick: bool = False,
              quiet: bool = False) -> tuple[list[Outcome], Path]:
    """Run the studies; returns their outcomes and the report's path (claims.md beside it)."""
    from dllab.checkpoint import atomic_write_bytes
    from dllab.report import write_report

    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown study {', '.join(unknown)}; choose from {', '.join(STUDIES)} "
                         "(dllab reproduce --list)")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    from dllab.runs import RunFolderError, check_runs_folder, is_run

    check_runs_folder(out, "--out")  # new, empty, or earlier studies' runs (reused or continued)
    if out.is_dir() and any(is_run(child) for child in out.iterdir()):
        raise RunFolderError(f"{out} is one study's folder, not dllab reproduce's; choose its parent or "
                             "another --out")
    again = reproduce_command(studies, out, seeds, quick)
    outcomes = [run_study(s, out, seeds, quick, quiet, again=again) for s in studies]
    for o in outcomes:
        _write_results(o, seeds, quick)
    rows = verdict_rows(outcomes)
    md = ["| study | run | claim | measured | verdict | source |", "| --- | --- | --- | --- | --- | --- |"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "claims.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    html, _ = write_report([str(f) for o in outcomes for f in o.runs], str(out / "report.html"))
    return outcomes, html


__all__ = ["STUDIES", "Study", "Spec", "Table", "Column", "Curve", "Outcome", "reproduce", "run_study",
           "list_studies", "claims_markdown", "verdict_rows", "results_record", "results_markdown",
           "readme_blocks", "update_readme"]
