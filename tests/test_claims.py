"""The claims file and `dllab reproduce`: every claim is well formed and sourced, README's copy of
the claims table is the generated one, range and order claims judge what they should, and a
quick study trains, reuses its runs and writes its table and report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dllab.cli import main
from dllab.metrics.claims import Claim, judge, judge_order, load_claims
from dllab.reproduce import STUDIES, claims_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_claim_is_sourced_and_names_a_study_and_a_declared_metric():
    from dllab.train import metric_names

    claims = load_claims()
    assert claims, "claims.json holds no claim"
    for c in claims:
        assert c.study in STUDIES, c.name
        names = metric_names(c.kind)
        assert c.metric in (*names.headline, *names.cost), (c.name, c.metric)
        assert len(c.source) > 20, c.name  # a real source, not a placeholder


def test_readme_claims_table_is_the_generated_one():
    text = README.read_text()
    block = re.search(r"<!-- claims:begin -->\n(.*?)<!-- claims:end -->", text, flags=re.S)
    assert block, "README lacks the claims block"
    assert block.group(1) == claims_markdown(), "README's claims table is stale: paste claims_markdown()"


def test_a_bad_claims_file_is_refused_by_entry():
    with pytest.raises(ValueError, match="entry 0 .*needs either min/max or order_by"):
        load_claims(json.dumps({"claims": [{"name": "x", "study": "demo", "kind": "vae", "match": {},
                                            "metric": "knn_acc", "source": "somewhere reliable"}]}))


def test_range_and_order_claims_judge_what_they_should():
    rng = Claim("acc", "demo", "classifier", {"width": 8}, "test_acc", "a measured source", min=0.97)
    assert [v.passed for v in judge({"kind": "classifier", "width": 8}, {"test_acc": 0.98}, [rng])] == [True]
    assert [v.passed for v in judge({"kind": "classifier", "width": 8}, {"test_acc": 0.5}, [rng])] == [False]
    assert judge({"kind": "classifier", "width": 16}, {"test_acc": 0.5}, [rng]) == []  # other settings
    assert [v.passed for v in judge({"kind": "classifier", "width": 8}, {}, [rng])] == [None]
    order = Claim("kl", "beta", "vae", {}, "test_kl", "a measured source", order_by="beta",
                  direction="decreasing")
    runs = [({"kind": "vae", "beta": b}, {"test_kl": kl}) for b, kl in ((4.0, 7.0), (0.1, 47.0), (1.0, 20.0),
                                                                         (1.0, 22.0))]
    verdict = judge_order(order, runs)
    assert verdict.passed and verdict.value == [(0.1, 47.0), (1.0, 21.0), (4.0, 7.0)]  # seeds averaged
    runs[0] = ({"kind": "vae", "beta": 4.0}, {"test_kl": 30.0})
    assert judge_order(order, runs).passed is False


def test_reproduce_list_prints_every_study_and_claim(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in STUDIES:
        assert re.search(rf"^{re.escape(name)}: ", out, flags=re.M), name
    for c in load_claims():
        assert c.name in out and c.source in out


def test_an_unknown_study_is_a_usage_error(capsys):
    assert main(["reproduce", "gan-nb"]) == 2
    assert "unknown study gan-nb" in capsys.readouterr().err


def test_a_quick_study_trains_reuses_and_reports(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "tsne", "--quick", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "not judged" in printed and f"report: {out / 'report.html'}" in printed
    runs = sorted(p.name for p in (out / "tsne-quick").iterdir())  # apart from full-size runs
    assert runs == ["vae-seed0", "vae-seed1"]
    assert (out / "claims.md").exists() and "At a glance" in (out / "report.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("tsne-quick/*/summary.json")}
    assert len(stamps) == 2
    assert main(["reproduce", "tsne", "--quick", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("tsne-quick/*/summary.json")} == stamps  # reused
