"""What dllab's results are expected to be: ranges with their sources, read from ``claims.json``.

A claim names a study, a kind, the settings a run must have for it to apply (``match``), one
summary metric, and either its expected range (``min`` and/or ``max``) or an expected order
across the study's runs (``order_by`` a setting, ``direction`` "increasing" or "decreasing": the
VAE's KL falls as beta grows), with the ``source`` of that expectation: a mean and spread over
seeds measured here (with the command), or a published figure with its citation.
:func:`judge` checks one run against the range claims that apply to it (the report opens with
these verdicts); :func:`judge_order` checks an order claim on a study's runs.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Claim:
    name: str
    study: str
    kind: str
    match: dict
    metric: str
    source: str
    min: float | None = None
    max: float | None = None
    order_by: str | None = None
    direction: str | None = None

    def applies_to(self, config: dict) -> bool:
        return config.get("kind") == self.kind and all(config.get(k) == v for k, v in self.match.items())

    def range_text(self) -> str:
        if self.order_by is not None:
            return f"{self.direction} with {self.order_by}"
        if self.min is not None and self.max is not None:
            return f"{self.min:g} to {self.max:g}"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"

    def holds(self, value: Any) -> bool | None:
        """True/False for a number; None when the run has no such number."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    value: Any
    passed: bool | None  # None: the run has no value for the claim's metric (not finished)


@functools.lru_cache(maxsize=1)
def _packaged() -> str:
    return resources.files("dllab").joinpath("claims.json").read_text()


def load_claims(text: str | None = None) -> list[Claim]:
    """The claims of ``claims.json`` in the package (read once; or of ``text``); ValueError on a
    bad entry."""
    raw = json.loads(text if text is not None else _packaged())
    claims = []
    for i, entry in enumerate(raw["claims"]):
        try:
            claim = Claim(**entry)
        except TypeError as e:
            raise ValueError(f"claims.json entry {i}: {e}") from None
        ranged = claim.min is not None or claim.max is not None
        ordered = claim.order_by is not None and claim.direction in ("increasing", "decreasing")
        if ranged == ordered or not claim.source.strip():
            raise ValueError(f"claims.json entry {i} ({claim.name}): needs either min/max or order_by "
                             "with direction increasing|decreasing, and a source")
        claims.append(claim)
    return claims


def judge(config: dict, summary: dict, claims: list[Claim] | None = None) -> list[Verdict]:
    """Every claim that applies to a run with ``config``, judged on its ``summary``."""
    claims = load_claims() if claims is None else claims
    return [Verdict(c, summary.get(c.metric), c.holds(summary.get(c.metric)))
            for c in claims if c.order_by is None and c.applies_to(config)]


def judge_order(claim: Claim, runs: list[tuple[dict, dict]]) -> Verdict:
    """An order claim on ``(config, summary)`` pairs: the metric's mean per value of
    ``order_by`` (over seeds) must rise (or fall) strictly from each value to the next."""
    groups: dict = {}
    for config, summary in runs:
        if claim.applies_to(config):
            value = summary.get(claim.metric)
            groups.setdefault(config.get(claim.order_by), []).append(value)
    means = []
    for key in sorted(groups, key=lambda k: (k is None, k)):
        values = groups[key]
        if any(Claim.holds(claim, v) is None for v in values):  # a missing or non-finite number
            return Verdict(claim, None, None)
        means.append((key, sum(values) / len(values)))
    if len(means) < 2:
        return Verdict(claim, means, None)
    steps = [b[1] - a[1] for a, b in zip(means, means[1:])]
    passed = all(d > 0 for d in steps) if claim.direction == "increasing" else all(d < 0 for d in steps)
    return Verdict(claim, means, passed)


__all__ = ["Claim", "Verdict", "load_claims", "judge", "judge_order"]
