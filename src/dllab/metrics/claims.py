"""What dllab's results are expected to be: ranges with their sources, read from ``claims.json``.

A claim names a kind, the settings a run must have for it to apply (``match``), one summary
metric, and its expected range (``min`` and/or ``max``), with the ``source`` of that range: a
mean and spread over seeds measured here (with the command), or a published figure with its
citation. :func:`judge` checks a run's config and summary against every claim that applies;
the report opens with the verdicts.
"""

from __future__ import annotations

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

    def applies_to(self, config: dict) -> bool:
        return config.get("kind") == self.kind and all(config.get(k) == v for k, v in self.match.items())

    def range_text(self) -> str:
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


def load_claims(text: str | None = None) -> list[Claim]:
    """The claims of ``claims.json`` in the package (or of ``text``); ValueError on a bad entry."""
    raw = json.loads(text if text is not None else
                     resources.files("dllab").joinpath("claims.json").read_text())
    claims = []
    for i, entry in enumerate(raw["claims"]):
        try:
            claim = Claim(**entry)
        except TypeError as e:
            raise ValueError(f"claims.json entry {i}: {e}") from None
        if claim.min is None and claim.max is None or not claim.source.strip():
            raise ValueError(f"claims.json entry {i} ({claim.name}): needs min or max, and a source")
        claims.append(claim)
    return claims


def judge(config: dict, summary: dict, claims: list[Claim] | None = None) -> list[Verdict]:
    """Every claim that applies to a run with ``config``, judged on its ``summary``."""
    claims = load_claims() if claims is None else claims
    return [Verdict(c, summary.get(c.metric), c.holds(summary.get(c.metric)))
            for c in claims if c.applies_to(config)]


__all__ = ["Claim", "Verdict", "load_claims", "judge"]
