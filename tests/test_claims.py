"""The claims file and `dllab reproduce`: every claim is well formed and sourced, README's copy of
the claims table is the generated one, range and order claims judge what they should, and a
quick study trains, reuses its runs and writes its table and report."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import pytest

from dllab.cli import main
from dllab.metrics.claims import Claim, judge, judge_order, load_claims
from dllab.reproduce import STUDIES, claims_markdown, readme_blocks, results_markdown, update_readme

README = Path(__file__).resolve().parents[1] / "README.md"
RECORDS = README.parent / "docs" / "results"


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


def test_reproduce_list_of_named_studies_prints_only_those(capsys):
    assert main(["reproduce", "--list", "tsne", "demo", "tsne"]) == 0
    studies = re.findall(r"^(\S+): ", capsys.readouterr().out, flags=re.M)
    assert studies == ["tsne", "demo"]  # in the order given, each once
    assert main(["reproduce", "--list", "tsne", "gan-nb"]) == 2  # a typo is named, not ignored
    assert "unknown study gan-nb" in capsys.readouterr().err


def test_an_unknown_study_is_a_usage_error(capsys):
    assert main(["reproduce", "gan-nb"]) == 2
    assert "unknown study gan-nb" in capsys.readouterr().err


def test_a_quick_study_trains_reuses_and_reports(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "tsne", "--quick", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "not judged" in printed and f"report: {out / 'report.html'}" in printed
    runs = sorted(p.name for p in (out / "tsne-quick").iterdir() if p.is_dir())  # apart from full-size runs
    assert runs == ["vae-seed0", "vae-seed1"]
    record = json.loads((out / "tsne-quick" / "results.json").read_text())
    assert record["command"] == "dllab reproduce tsne --seeds 2 --quick"
    assert [r["label"] for r in record["runs"]] == runs and record["runs"][1]["settings"]["seed"] == 1
    assert all(isinstance(r["summary"]["knn_acc"], float) for r in record["runs"])
    today = _dt.date.today().isoformat()  # (a run that began just before midnight: yesterday)
    assert set(record["machine"]["created"]) == {"first", "last"}
    assert record["machine"]["created"]["last"] in (today, (_dt.date.today() - _dt.timedelta(days=1)).isoformat())
    table = (out / "tsne-quick" / "results.md").read_text()
    assert table == results_markdown(record) and "| seed 0 | seed 1 | all seeds |" in table
    assert (out / "claims.md").exists() and "At a glance" in (out / "report.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("tsne-quick/*/summary.json")}
    assert len(stamps) == 2
    capsys.readouterr()
    assert main(["reproduce", "tsne", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    assert "run 2/2 vae-seed1 (finished: reused if its settings match)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("tsne-quick/*/summary.json")} == stamps  # reused


def _record(study: str, runs: list[tuple[dict, dict]], kind: str) -> dict:
    return {"study": study, "command": f"dllab reproduce {study} --seeds 2",
            "machine": {"cpu": "Test CPU", "bf16_flags": ["avx512_bf16"], "threads": [2], "torch": ["2.14.1"],
                        "gpu": [], "created": {"first": "2026-11-29", "last": "2026-11-30"}},
            "runs": [{"label": f"run{i}", "kind": kind, "settings": settings, "summary": summary}
                     for i, (settings, summary) in enumerate(runs)]}


def test_a_results_table_gives_each_variant_its_mean_spread_and_seeds():
    runs = [({"norm": norm, "maxpool": "on", "seed": seed}, {"test_acc": acc, "test_loss": 0.1, "ece": 0.02,
                                                              "precision": "bfloat16"})
            for norm, accs in ((True, (0.98, 0.97)), (False, (0.10, 0.95))) for seed, acc in enumerate(accs)]
    table = results_markdown(_record("ablation", runs, "classifier"))
    lines = table.splitlines()
    assert lines[0].startswith("`dllab reproduce ablation --seeds 2`: Test CPU (avx512_bf16), 2 thread(s), "
                               "torch 2.14.1, 2026-11-29 to 2026-11-30; classifier in bfloat16; seeds 0, 1")
    assert lines[2] == ("| batch norm | max-pool after the stem | test accuracy | test accuracy, seeds 0 / 1 | "
                        "test loss | ECE |")
    assert lines[4] == "| on | on | 97.5 +- 0.7 % | 98.0 / 97.0 % | 0.100 +- 0.000 | 0.020 +- 0.000 |"
    assert lines[5].startswith("| off | on | 52.5 +- 60.1 % | 10.0 / 95.0 % |")
    older = _record("ablation", runs, "classifier")  # records written before the dates were labelled
    older["machine"]["dates"] = list(older["machine"].pop("created").values())
    assert results_markdown(older).splitlines()[0] == lines[0]


def test_a_study_without_variants_gets_a_column_per_seed_and_a_missing_value_shows():
    runs = [({"seed": 0}, {"knn_acc": 0.9, "test_elbo": -120.0, "active_units": 16}),
            ({"seed": 1}, {"knn_acc": 0.8, "active_units": 15})]
    lines = results_markdown(_record("tsne", runs, "vae")).splitlines()
    assert lines[2] == "| measured | seed 0 | seed 1 | all seeds |"
    assert lines[4] == "| k-NN accuracy of the latent means | 0.900 | 0.800 | 0.850 +- 0.071 |"
    assert lines[5] == "| test ELBO (nats) | -120.0 | - | -120.0 |"
    assert lines[6] == "| active units (of 16) | 16 | 15 | 15.5 +- 0.7 |"  # a mean of counts is not one


def test_a_recorded_run_is_judged_only_by_its_own_studys_claims():
    """A range claim (what ``judge`` checks per run) of another study applies to a recorded run only
    where that study records a run with the very same settings (the demo's classifier, which demo-bf16 trains too): the fp32 VAE claims
    must not judge the bf16 VAEs, nor the other way round."""
    records = {p.stem: json.loads(p.read_text()) for p in RECORDS.glob("*.json")}
    claims = load_claims()
    for study, record in records.items():
        for run in record["runs"]:
            config = {**run["settings"], "kind": run["kind"]}
            for claim in claims:
                if claim.order_by is None and claim.applies_to(config) and claim.study != study:
                    twins = [r for r in records.get(claim.study, {"runs": []})["runs"]
                             if r["kind"] == run["kind"] and r["settings"] == run["settings"]]
                    assert twins, f"{claim.name!r} ({claim.study}) judges {study}'s {run['label']}"


def test_readme_results_tables_are_generated_from_the_recorded_studies():
    blocks = readme_blocks(RECORDS)
    recorded = sorted(p.stem for p in RECORDS.glob("*.json"))
    assert recorded, "docs/results holds no study record"
    assert sorted(t.split(":", 1)[1] for t in blocks if t.startswith("results:")) == recorded
    text = README.read_text()
    in_readme = sorted(re.findall(r"<!-- results:([\w-]+):begin -->", text))
    assert in_readme == recorded, "README's results blocks and docs/results/ name different studies"
    for tag, body in blocks.items():
        found = re.search(rf"<!-- {re.escape(tag)}:begin -->\n(.*?)<!-- {re.escape(tag)}:end -->", text, flags=re.S)
        assert found, f"README lacks the {tag} block"
        assert found.group(1) == body, f"README's {tag} table is stale: run make readme-results"
    for name in recorded:
        record = json.loads((RECORDS / f"{name}.json").read_text())
        assert record["study"] == name and record["command"].startswith(f"dllab reproduce {name} ")


def test_update_readme_copies_a_study_record_and_rewrites_its_block(tmp_path):
    out, records, readme = tmp_path / "runs", tmp_path / "records", tmp_path / "README.md"
    record = _record("tsne", [({"seed": 0}, {"knn_acc": 0.9})], "vae")
    (out / "tsne").mkdir(parents=True)
    (out / "tsne" / "results.json").write_text(json.dumps(record))
    readme.write_text("intro\n<!-- claims:begin -->\nSTALE\n<!-- claims:end -->\n"
                      "<!-- results:tsne:begin -->\nSTALE table\n<!-- results:tsne:end -->\nend\n")
    assert update_readme(readme, records, out) == ["claims", "results:tsne"]
    assert json.loads((records / "tsne.json").read_text()) == record
    text = readme.read_text()
    assert results_markdown(record) in text and "STALE" not in text and text.endswith("end\n")
    (out / "beta").mkdir()
    (out / "beta" / "results.json").write_text(json.dumps({**record, "study": "beta"}))
    with pytest.raises(ValueError, match="README has no <!-- results:beta:begin -->"):
        update_readme(readme, records, out)
    assert not (records / "beta.json").exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="does not exist"):
        update_readme(readme, records, tmp_path / "no such folder")
    (tmp_path / "quick" / "tsne-quick").mkdir(parents=True)
    (tmp_path / "quick" / "tsne-quick" / "results.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="a --quick study's record is never copied"):
        update_readme(readme, records, tmp_path / "quick")


def test_reproduce_into_one_studys_folder_is_refused(tmp_path, capsys):
    study = tmp_path / "repro" / "tsne-quick"
    (study / "vae-seed0").mkdir(parents=True)
    (study / "vae-seed0" / "config.json").write_text('{"kind": "vae", "environment": {}}')
    assert main(["reproduce", "tsne", "--quick", "--out", str(study), "--quiet"]) == 2
    assert f"{study} is one study's folder, not dllab reproduce's" in capsys.readouterr().err
    assert sorted(p.name for p in study.iterdir()) == ["vae-seed0"]


def test_every_recorded_run_passes_the_claims_that_apply_to_it():
    """README's results tables and its claims table agree: a recorded measurement outside a claimed
    range means the claim or the code changed, and one of them must be looked at."""
    claims = load_claims()
    for path in sorted(RECORDS.glob("*.json")):
        record = json.loads(path.read_text())
        runs = [({**r["settings"], "kind": r["kind"]}, r["summary"]) for r in record["runs"]]
        mine = [c for c in claims if c.study == record["study"]]  # as dllab reproduce judges them
        verdicts = [v for config, summary in runs for v in judge(config, summary, mine)]
        verdicts += [judge_order(c, runs) for c in mine if c.order_by]
        failed = [(v.claim.name, v.value) for v in verdicts if v.passed is not True]
        assert not failed, f"{path.name}: {failed}"
