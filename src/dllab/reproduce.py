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
class Study:
    name: str
    description: str
    cost: str  # how long it takes, measured (2 cores unless said)

    def runs(self, seeds: int, quick: bool) -> list[Spec]:
        return _PLANS[self.name](seeds, quick)


def _seeded(label: str, kind: str, settings: dict, seed: int, quick: bool) -> Spec:
    settings = {**settings, "seed": seed, **(QUICK if quick else {})}
    return Spec(f"{label}-seed{seed}", kind, settings)


def _demo(seeds: int, quick: bool) -> list[Spec]:
    from dllab.demo import QUICK as DEMO

    specs = []
    for s in range(seeds):
        clf = _seeded("classifier", "classifier", DEMO["classifier"], s, quick)
        specs += [clf, _seeded("vae", "vae", DEMO["vae"], s, quick),
                  _seeded("dcgan", "dcgan", {**DEMO["dcgan"], "classifier_run": clf.label}, s, quick)]
    return specs


ABLATION = {"width": 8, "epochs": 8}


def _ablation(seeds: int, quick: bool) -> list[Spec]:
    variants = {"bn+pool": {"norm": True, "maxpool": "on"}, "bn": {"norm": True, "maxpool": "off"},
                "pool": {"norm": False, "maxpool": "on"}, "plain": {"norm": False, "maxpool": "off"}}
    return [_seeded(name, "classifier", {**ABLATION, **v}, s, quick)
            for s in range(seeds) for name, v in variants.items()]


BETAS = (0.1, 1.0, 4.0)


def _beta(seeds: int, quick: bool) -> list[Spec]:
    return [_seeded(f"beta={b:g}", "vae", {"beta": b, "epochs": 20}, s, quick)
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


_PLANS = {"demo": _demo, "ablation": _ablation, "beta": _beta, "tsne": _tsne, "gan-bn": _gan_bn,
          "fashion": _fashion}

STUDIES = {s.name: s for s in [
    Study("demo", "the three demo models on MNIST-5k: classifier accuracy, VAE ELBO and k-NN, DCGAN "
          "FID and class coverage", "about 5 minutes per seed on 1 thread of a busy 2-core machine"),
    Study("ablation", "batch norm x max-pool in ResNet-18 (width 8, 8 epochs, MNIST-5k): batch norm "
          "makes the learning rate safe", "about 2 minutes per seed"),
    Study("beta", "beta-VAE on MNIST-5k (20 epochs): as beta grows the KL (rate) falls and the "
          "reconstruction (distortion) rises", "about 10 minutes per seed on 1 thread"),
    Study("tsne", "the default VAE's latent means cluster by class: k-NN accuracy, t-SNE at three "
          "perplexities", "about 1 minute per seed"),
    Study("gan-bn", "batch norm in the generator against mode collapse (D without batch norm, 20 "
          "epochs, MNIST-5k)", "about 5 minutes per seed on 1 thread"),
    Study("fashion", "ResNet-18 (width 16) on the real Fashion-MNIST to 94.5 % or better",
          "about 50 minutes per seed"),
]}


@dataclasses.dataclass
class Outcome:
    study: str
    verdicts: list[tuple[str, Verdict]]  # (run label or "all runs", verdict)
    runs: list[Path]


def _train_or_reuse(spec: Spec, folder: Path, quiet: bool) -> Path:
    from dllab.demo import train_or_reuse

    settings = {**spec.settings, "out": str(folder)}
    if "classifier_run" in settings:  # a label of the same study
        settings["classifier_run"] = str(folder.parent / settings["classifier_run"])
    return train_or_reuse(spec.kind, settings, "dllab reproduce", quiet)


def run_study(name: str, out: Path, seeds: int = 1, quick: bool = False, quiet: bool = False,
              claims: list[Claim] | None = None) -> Outcome:
    """Train (or reuse) the study's runs under ``out/NAME`` and judge the claims on them."""
    from dllab.runs import Run

    claims = load_claims() if claims is None else claims
    specs = STUDIES[name].runs(seeds, quick)
    base = out / (f"{name}-quick" if quick else name)  # never mixed with the full-size runs
    folders = []
    for i, spec in enumerate(specs):
        if not quiet:
            print(f"dllab reproduce {name}: run {i + 1}/{len(specs)} {spec.label}", file=sys.stderr,
                  flush=True)
        folders.append(_train_or_reuse(spec, base / spec.label, quiet))
    runs = [(run.config, run.summary()) for run in map(Run.open, folders)]
    study_claims = [c for c in claims if c.study == name and not quick]  # a smoke test judges nothing
    verdicts = [(f.name, v) for f, (config, summary) in zip(folders, runs)
                for v in judge(config, summary, study_claims)]
    verdicts += [("all runs", judge_order(c, runs)) for c in study_claims if c.order_by is not None]
    return Outcome(name, verdicts, folders)


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


def list_studies(claims: list[Claim] | None = None) -> str:
    claims = load_claims() if claims is None else claims
    out = []
    for s in STUDIES.values():
        out.append(f"{s.name}: {s.description} ({s.cost}; {len(s.runs(1, False))} run(s) per seed)")
        mine = [c for c in claims if c.study == s.name]
        out += [f"  {c.name}: {c.metric} {c.range_text()}  [{c.source}]" for c in mine]
        if not mine:
            out.append("  no claims yet")
    return "\n".join(out)


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
    outcomes = [run_study(s, out, seeds, quick, quiet) for s in studies]
    rows = verdict_rows(outcomes)
    md = ["| study | run | claim | measured | verdict | source |", "| --- | --- | --- | --- | --- | --- |"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "claims.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    html, _ = write_report([str(f) for o in outcomes for f in o.runs], str(out / "report.html"))
    return outcomes, html


__all__ = ["STUDIES", "Study", "Spec", "Outcome", "reproduce", "run_study", "list_studies",
           "claims_markdown", "verdict_rows"]
