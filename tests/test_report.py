"""Reports: escaping of run-folder strings, self-contained HTML, Markdown twin, compare table, and a
headless-Chromium check that the report's images load and that nothing from run data runs."""

from __future__ import annotations

import argparse
import html.parser
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from dllab.report import (
    CSP,
    caption_for,
    chromium_command,
    compare_table,
    format_value,
    load_run,
    order_metrics,
    run_labels,
    screenshot,
    write_report,
)
from dllab.runs import RunFolderError

# Strings a hostile or careless run folder may hold. Folder names cannot contain "/", so the
# folder-name payload is an attribute breakout with an event handler instead of a <script> block.
SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
BREAKOUT = '"><img src=x onerror=window.__pwned=1>'
EVIL_NAME = BREAKOUT + r" $\bad$"  # "$\bad$" would also break matplotlib's mathtext in legends
EVIL_FIGURE = 'x"><img src=x onerror=alert(1)>.png'


# ---- fake but complete run folders -------------------------------------------------------------
def _environment() -> dict:
    return {"dllab": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.2",
            "platform": "Linux-x86_64", "cuda": None, "gpu": None, "cpu_threads": 2}


def _digits(n: int, seed: int):
    """(n, 1, 8, 8) real handwritten digits in [0, 1] (scikit-learn's bundled set) and labels."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).choice(len(d.images), n, replace=False)
    return torch.tensor(d.images[idx] / 16.0, dtype=torch.float32)[:, None], d.target[idx]


def _figure(path: Path, style: str, records: list[dict], seed: int) -> None:
    """A real image file drawn with matplotlib through dllab's figure helpers."""
    import matplotlib.pyplot as plt
    import torch

    from dllab.figures.common import plot_curves, save_figure, save_image_grid

    rng = np.random.default_rng(seed)
    if style == "curves":
        series = {}
        for split in ("train", "test"):
            recs = [r for r in records if r["split"] == split]
            series[f"{split} loss"] = ([r["epoch"] for r in recs], [r["loss"] for r in recs])
        plot_curves(series, path, xlabel="epoch", ylabel="loss", title="loss")
    elif style == "lr":
        recs = [r for r in records if r["split"] == "train"]
        plot_curves({"lr": ([r["step"] for r in recs], [r["lr"] for r in recs])}, path,
                    xlabel="step", ylabel="learning rate", title="learning rate")
    elif style == "matrix":
        cm = np.diag(rng.integers(40, 50, 10)) + rng.integers(0, 4, (10, 10))
        fig, ax = plt.subplots(figsize=(4, 3.6))
        ax.imshow(cm, cmap="Blues")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix")
        save_figure(fig, path)
    elif style == "digits":
        x, _ = _digits(32, seed)
        save_image_grid(x, path, nrow=8, title=path.stem)
    elif style == "gif":
        from PIL import Image

        x, _ = _digits(3, seed)
        frames = [Image.fromarray((torch.kron(im[0], torch.ones(4, 4)) * 255).byte().numpy())
                  for im in x]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=300, loop=0)
    elif style == "broken":
        path.write_text("<html>not an image</html>")
    else:
        raise ValueError(f"unknown figure style {style!r}")


def _test_value(key: str, epoch: int, seed: int, i: int) -> float:
    decay = 1 / (1 + 0.8 * (epoch - 1))
    if "acc" in key:
        return 0.99 - (0.12 + 0.03 * seed) * decay
    return (1 + i + 0.15 * seed) * (0.3 + 0.7 * decay)


def make_run(root: Path, name: str, kind: str = "classifier", *, seed: int = 0, epochs: int = 4,
             config_extra: dict | None = None, summary: dict | None = None,
             figures: dict[str, str] | None = None, eval_json: dict | None = None,
             test_keys: tuple[str, ...] = ("loss", "acc", "ece")) -> Path:
    """A run folder as dllab's trainers write it: config, metrics.jsonl, summary, figures."""
    path = root / name
    (path / "figures").mkdir(parents=True)
    (path / "checkpoints").mkdir()
    config = {"kind": kind, "dataset": "mnist5k", "epochs": epochs, "batch_size": 128, "lr": 0.1,
              "seed": seed, "device": "cpu", "out": str(path), **(config_extra or {}),
              "environment": _environment(), "created": "2026-11-23T10:00:00"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    records, steps_per_epoch = [], 32
    for e in range(1, epochs + 1):
        for q in range(1, 5):
            t = e - 1 + q / 4
            warm = min(1.0, t / 0.6)
            lr = 0.1 * warm * (0.5 + 0.5 * np.cos(np.pi * min(1.0, t / epochs)))
            records.append({"split": "train", "step": int(t * steps_per_epoch), "epoch": t,
                            "loss": float(1.8 * np.exp(-1.2 * t) + 0.12 + 0.04 * rng.random()),
                            "acc": float(0.99 - 0.6 * np.exp(-1.5 * t)), "lr": float(lr),
                            "time": round(t * 9.5, 3)})
        records.append({"split": "test", "step": e * steps_per_epoch, "epoch": e,
                        "time": round(e * 9.8, 3),
                        **{k: _test_value(k, e, seed, i) for i, k in enumerate(test_keys)}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary, indent=2))
    if eval_json is not None:
        (path / "eval.json").write_text(json.dumps(eval_json, indent=2))
    for i, (fname, style) in enumerate((figures or {}).items()):
        _figure(path / "figures" / fname, style, records, seed + i)
    return path


CLF_FIGURES = {"curves.png": "curves", "lr_schedule.png": "lr", "confusion_matrix.png": "matrix"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    clf_a = make_run(
        root, "clf-a", seed=0,
        summary={"test_acc": 0.981234, "test_loss": 0.0612345, "ece": 0.0123, "params": 11173962,
                 "epochs": 4, "train_seconds": 812.5, "images_per_second": 61.23,
                 "per_class_acc": {str(c): 0.95 + c / 1000 for c in range(10)},
                 "best": {"epoch": 3, "test_acc": 0.981234}},
        figures={**CLF_FIGURES, "eval_confusion_matrix.png": "matrix"},
        eval_json={"checkpoint": "best", "epoch": 3, "test_acc": 0.9815, "tta": True})
    clf_b = make_run(
        root, "clf-b", seed=1,
        summary={"test_acc": 0.9712, "test_loss": 0.09876, "ece": 0.031, "params": 701466,
                 "epochs": 4, "train_seconds": 95.25},  # complete: the 4 epochs its config plans
        figures=CLF_FIGURES)
    vae = make_run(
        root, "vae-beta1", kind="vae", seed=2, test_keys=("loss", "recon", "kl"),
        config_extra={"beta": 1.0, "latent_dim": 16},
        summary={"kind": "vae", "dataset": "mnist5k", "test_elbo": -98.7654, "test_recon": 74.1,
                 "test_kl": 24.66, "bits_per_dim": 0.1817, "active_units": 11, "device": "cpu",
                 "train_seconds": 120.0},
        figures={"curves.png": "curves", "reconstructions.png": "digits", "samples.png": "digits",
                 "progress.gif": "gif"})
    evil = make_run(
        root, EVIL_NAME, seed=3,
        config_extra={"dataset": SCRIPT, SCRIPT: BREAKOUT, "notes": "a | b\nline two `x`"},
        summary={"test_acc": 0.5, BREAKOUT: 1.25, "comment": SCRIPT,
                 "nested": {SCRIPT: BREAKOUT}, "listed": [SCRIPT, 1]},
        figures={EVIL_FIGURE: "curves", "broken.png": "broken"},
        eval_json={SCRIPT: BREAKOUT})
    unfinished = make_run(root, "unfinished", seed=4)  # no summary.json yet
    return {"clf_a": clf_a, "clf_b": clf_b, "vae": vae, "evil": evil, "unfinished": unfinished}


# ---- an HTML walker: the structure a browser would build ------------------------------------
class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "ul", "li",
                "a", "span", "code", "br", "table", "tr", "th", "td", "details", "summary", "pre",
                "div", "figure", "img", "figcaption", "b"}


# ---- HTML ----------------------------------------------------------------------------------
def test_html_escapes_every_run_folder_string(runs, tmp_path):
    out, md = write_report([str(runs["clf_a"]), str(runs["evil"])], str(tmp_path / "r.html"))
    page = out.read_text()
    doc = parse(page)
    # no element or attribute that the run data could have injected
    assert {tag for tag, _ in doc.tags} <= ALLOWED_TAGS
    assert "<script" not in page.lower()
    for tag, attrs in doc.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:40]
        if tag == "a":
            assert attrs["href"].startswith("#")
    # the payloads are there, as text
    text = "".join(doc.text)
    for payload in (SCRIPT, BREAKOUT, EVIL_NAME, EVIL_FIGURE):
        assert payload in text
    assert html_escaped(SCRIPT) in page and html_escaped(BREAKOUT) in page
    # the evil figure is still shown (escaped alt/caption); the broken one is reported, not embedded
    alts = [a["alt"] for t, a in doc.tags if t == "img"]
    assert EVIL_FIGURE in alts
    assert "broken.png: not embedded" in text


def html_escaped(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_html_is_self_contained_with_a_strict_csp(runs, tmp_path):
    out, _ = write_report([str(runs["clf_a"]), str(runs["vae"])], str(tmp_path / "r.html"))
    page = out.read_text()
    head = page.split("</head>")[0]
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in head
    assert "default-src 'none'" in CSP and "img-src data:" in CSP
    doc = parse(page)
    for tag, attrs in doc.tags:
        for name, value in attrs.items():
            if name in ("src", "href"):
                assert value.startswith(("data:", "#")), (tag, name, value[:60])
    assert not re.search(r"https?://", page)
    # the GIF is embedded as a GIF
    assert 'src="data:image/gif;base64,' in page


def test_single_run_report_has_every_section(runs, tmp_path):
    run = shutil.copytree(runs["clf_a"], tmp_path / "clf-a")
    out, md = write_report([str(run)], None)
    assert out == run / "report.html" and md == run / "report.md"
    assert not any(tmp_path.glob("*_figures"))  # no overlays for one run
    page = out.read_text()
    text = "".join(parse(page).text)
    for section in ("Summary", "Evaluation (eval.json)", "Figures", "Config", "environment"):
        assert section in text
    assert "Comparison" not in text
    # scalar metrics to 4 significant digits, nested ones in details
    assert "<td class=\"num\">0.9812</td>" in page and "<td class=\"num\">11173962</td>" in page
    assert "<details><summary>per_class_acc</summary>" in page
    # every figure embedded once with its caption: the one that says the most at the top (At a
    # glance), then the others, trained figures before eval_ ones
    imgs = [a for t, a in parse(page).tags if t == "img"]
    assert [a["alt"] for a in imgs] == ["confusion_matrix.png", "curves.png", "lr_schedule.png",
                                        "eval_confusion_matrix.png"]
    assert text.index("At a glance") < text.index("Details") < text.index("Summary")
    assert "98.1% test accuracy on mnist5k" in text
    assert caption_for("confusion_matrix.png", "classifier") in text
    assert "Recomputed by dllab eval" in text


def test_several_runs_get_comparison_tables_and_overlaid_curves(runs, tmp_path):
    paths = [str(runs[k]) for k in ("clf_a", "clf_b", "vae")]
    out, _ = write_report(paths, str(tmp_path / "cmp" / "report.html"))
    figs = sorted(p.name for p in (tmp_path / "cmp" / "report_figures").iterdir())
    # classifier runs share test acc/loss/ece; the lone VAE run gets no overlay
    assert figs == ["compare_classifier_acc.png", "compare_classifier_ece.png",
                    "compare_classifier_loss.png"]
    for f in figs:
        assert (tmp_path / "cmp" / "report_figures" / f).read_bytes()[:4] == b"\x89PNG"
    page = out.read_text()
    text = "".join(parse(page).text)
    assert "Comparison" in text and "classifier runs" in text and "vae runs" in text
    assert page.index("test_acc</th>") < page.index("train_seconds</th>")
    # clf-b has no images_per_second: a missing cell, not an empty string or a zero
    row_b = page[page.index('>clf-b</a></th>'):].split("</tr>")[0]
    assert '<td class="missing">' in row_b
    n_imgs = sum(1 for t, _ in parse(page).tags if t == "img")
    assert n_imgs == 3 + 4 + 3 + 4  # overlays + clf-a + clf-b + vae (png + gif)


def test_overlay_legend_survives_mathtext_in_run_names(runs, tmp_path):
    write_report([str(runs["clf_a"]), str(runs["evil"])], str(tmp_path / "r.html"))
    assert (tmp_path / "r_figures" / "compare_classifier_acc.png").exists()


def test_unfinished_run_is_reported_not_refused(runs, tmp_path):
    out, _ = write_report([str(runs["unfinished"])], str(tmp_path / "u.html"))
    assert "No summary.json" in out.read_text()


# ---- Markdown ------------------------------------------------------------------------------
def test_markdown_has_the_same_sections_and_working_relative_links(runs, tmp_path):
    paths = [str(runs[k]) for k in ("clf_a", "clf_b", "evil")]
    _, md = write_report(paths, str(tmp_path / "notes" / "report.html"))
    text = md.read_text()
    assert md == tmp_path / "notes" / "report.md"
    for heading in ("# dllab report: clf-a, clf-b,", "## Comparison", "### Overlaid test curves",
                    "## clf-a", "### Summary", "### Evaluation (eval.json)", "### Figures",
                    "### Config"):
        assert heading in text, heading
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(links) == 3 + 4 + 3 + 2  # overlays + clf-a + clf-b + evil (incl. the broken file)
    for link in links:
        assert not link.startswith("/")
        assert (md.parent / urllib.parse.unquote(link)).is_file(), link
    # run-folder text is inert: no raw tags, table pipes and newlines escaped
    assert "<script" not in text.lower() and "<img" not in text.lower()
    assert "&lt;script&gt;" in text
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, re.S)]
    assert [SCRIPT, 1] in blocks  # nested values: the same JSON, with <, > as \u escapes
    row = next(line for line in text.splitlines() if line.startswith("| notes |"))
    assert row.count(" | ") == 1 and "a \\| b line two \\`x\\`" in row
    assert "| test_acc | 0.9812 |" in text
    assert "| 0.9812 |" in text.split("## clf-a")[0]  # the comparison table


# ---- compare ---------------------------------------------------------------------------------
def _column(table: str, name: str) -> list[str]:
    lines = table.splitlines()
    header = lines[0]
    start = header.index(name)
    end = start + len(name)
    # right-aligned numeric columns end where their header ends
    return [line[:end].split()[-1] for line in lines[2:]]


def test_compare_table_orders_formats_and_aligns(runs):
    table = compare_table([str(runs["clf_b"]), str(runs["clf_a"]), str(runs["vae"])])
    lines = table.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "kind", "test_acc"]
    assert header.index("test_loss") < header.index("test_elbo") < header.index("train_seconds")
    # text-valued entries after the numbers; the summary's own "kind" is not a second column
    assert header[-4:] == ["train_seconds", "images_per_second", "dataset", "device"]
    assert header.count("kind") == 1
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == ["clf-b", "clf-a", "vae-beta1"]
    assert _column(table, "test_acc") == ["0.9712", "0.9812", "-"]
    assert _column(table, "test_elbo") == ["-", "-", "-98.77"]
    assert _column(table, "params") == ["701466", "11173962", "-"]
    assert "per_class_acc" not in table  # nested values are not columns


def test_compare_sorts_with_missing_values_last(runs):
    paths = [str(runs[k]) for k in ("vae", "clf_a", "clf_b")]
    up = compare_table(paths, sort="test_acc", descending=False)
    down = compare_table(paths, sort="test_acc", descending=True)
    assert [ln.split()[0] for ln in up.splitlines()[2:]] == ["clf-b", "clf-a", "vae-beta1"]
    assert [ln.split()[0] for ln in down.splitlines()[2:]] == ["clf-a", "clf-b", "vae-beta1"]
    by_time = compare_table(paths, sort="train_seconds", descending=True)
    assert [ln.split()[0] for ln in by_time.splitlines()[2:]] == ["clf-a", "vae-beta1", "clf-b"]
    by_name = compare_table(paths, sort="run")
    assert [ln.split()[0] for ln in by_name.splitlines()[2:]] == ["clf-a", "clf-b", "vae-beta1"]


def test_compare_unknown_sort_key_lists_the_metrics(runs):
    with pytest.raises(ValueError, match=r"unknown sort metric 'accuracy'; available: run, kind, "
                                         r"test_acc, test_loss"):
        compare_table([str(runs["clf_a"])], sort="accuracy")


def test_cli_dispatch_calls_report_and_compare(runs, tmp_path, capsys):
    from dllab.cli import _dispatch

    rc = _dispatch(argparse.Namespace(command="compare", runs=[str(runs["clf_a"]), str(runs["clf_b"])],
                                      sort="test_loss", desc=False), [])
    out = capsys.readouterr().out
    assert rc == 0 and out.index("clf-a") < out.index("clf-b")
    rc = _dispatch(argparse.Namespace(command="report", runs=[str(runs["clf_a"])],
                                      out=str(tmp_path / "x.html")), [])
    assert rc == 0 and (tmp_path / "x.html").exists() and (tmp_path / "x.md").exists()
    assert f"report: {tmp_path / 'x.html'}" in capsys.readouterr().out


# ---- errors and helpers ----------------------------------------------------------------------
def test_not_a_run_folder_is_a_clear_error(runs, tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        write_report([str(tmp_path / "nope")], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match=r"not a dllab run folder \(no config.json\)"):
        compare_table([str(runs["clf_a"]), str(tmp_path / "empty")])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunFolderError, match="is not a folder"):
        load_run(tmp_path / "file.txt")
    bad = shutil.copytree(runs["clf_b"], tmp_path / "bad")
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="summary.json is not valid JSON"):
        load_run(bad)
    with pytest.raises(ValueError, match="no run folders"):
        compare_table([])
    with pytest.raises(ValueError, match="ends in .md"):
        write_report([str(runs["clf_a"])], str(tmp_path / "r.md"))
    for out in ("file.txt/r.html", "file.txt/sub/"):  # under a file: said before anything is written
        with pytest.raises(ValueError, match=f"{tmp_path / 'file.txt'} is a file, not a folder"):
            write_report([str(runs["clf_a"])], str(tmp_path / out))
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "report.html").mkdir()
    with pytest.raises(ValueError, match="report.html is a folder"):
        write_report([str(runs["clf_a"])], str(tmp_path / "named"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty", "file.txt", "named"]
    # an existing file that is not a dllab report (a run's own files, the user's notes) is never
    # written over: a newcomer's report --out RUN/summary.json broke the run; a report is redone
    run = runs["clf_a"]
    for victim in (run / "summary.json", run / "metrics.jsonl", tmp_path / "file.txt"):
        before = victim.read_bytes()
        with pytest.raises(ValueError, match="exists and is not a dllab report"):
            write_report([str(run)], str(victim))
        assert victim.read_bytes() == before
    (tmp_path / "notes.md").write_text("my notes")  # the Markdown twin's place
    with pytest.raises(ValueError, match="notes.md exists and is not a dllab report"):
        write_report([str(run)], str(tmp_path / "notes.html"))
    html, md = write_report([str(run)], str(tmp_path / "mine.html"))
    assert write_report([str(run)], str(tmp_path / "mine.html")) == (html, md)  # its own report: redone
    assert issubclass(RunFolderError, ValueError)  # the CLI maps it to exit code 2


def test_failed_write_leaves_no_partial_file(runs, tmp_path, monkeypatch):
    import dllab.report as report

    out = tmp_path / "r.html"
    out.write_text("<title>dllab report: an older one</title>")  # a report of dllab's: written over

    def boom(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        write_report([str(runs["clf_b"])], str(out))
    assert out.read_text() == "<title>dllab report: an older one</title>" and not list(tmp_path.glob(".r.*tmp*"))


@pytest.mark.parametrize("name, kind, expect", [
    ("confusion_matrix.png", "classifier", "Confusion matrix"),
    ("eval_confusion_matrix.png", "classifier", "Recomputed by dllab eval"),
    ("test_confusion.png", "", "Confusion matrix"),
    ("curves.png", "vae", "posterior collapse"),
    ("curves.png", "classifier", "over-fitting"),
    ("samples_epoch10.png", "dcgan", "mode collapse"),
    ("samples.png", "vae", "prior N(0, I)"),
    ("losses.png", "dcgan", "D loss near 0"),
    ("latent_tsne.png", "vae", "t-SNE"),
    ("progress.gif", "dcgan", "fixed noise"),
    ("nearest_neighbours.png", "dcgan", "memorised"),
    ("something_new.png", "vae", "no caption is known"),
])
def test_captions_match_by_substring(name, kind, expect):
    assert expect in caption_for(name, kind)


def test_wide_figures_span_the_row_and_sizes_are_read_from_headers(runs, tmp_path):
    from PIL import Image

    from dllab.report import image_size

    assert image_size(runs["vae"] / "figures" / "progress.gif") == (32, 32)
    Image.new("RGB", (300, 100)).save(tmp_path / "wide.png")
    assert image_size(tmp_path / "wide.png") == (300, 100)
    run = shutil.copytree(runs["clf_b"], tmp_path / "clf-b")
    Image.new("RGB", (300, 100), "white").save(run / "figures" / "samples_strip.png")
    page = write_report([str(run)], None)[0].read_text()
    figures = re.findall(r'<figure( class="wide-fig")?><img src="[^"]+" alt="([^"]+)"', page)
    assert {alt: bool(cls) for cls, alt in figures} == {
        "curves.png": False, "lr_schedule.png": False, "confusion_matrix.png": False,
        "samples_strip.png": True}


def test_formatting_ordering_and_labels():
    assert format_value(0.000123456) == "0.0001235" and format_value(1234567.0) == "1.235e+06"
    assert format_value(42) == "42" and format_value(True) == "true" and format_value(None) == ""
    assert order_metrics(["train_seconds", "zeta", "test_loss", "alpha", "test_acc"]) == [
        "test_acc", "test_loss", "zeta", "alpha", "train_seconds"]
    assert run_labels(["a/run", "b/run", "c/other"]) == ["a/run", "b/run", "other"]
    assert run_labels(["x/run", "x/run"]) == ["run", "run#2"]


# ---- headless Chromium ---------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium)")

# Test-only scripts injected into a copy of the report (the report itself has none).
HOOK = "<script>window.__alerts = 0; window.alert = function () { window.__alerts++; };</script>"
CHECKER = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var all = Array.prototype.slice.call(document.querySelectorAll('*'));
  var r = {
    images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    not_data: imgs.filter(function (i) { return i.src.slice(0, 5) !== 'data:'; }).length,
    scripts: document.scripts.length,
    handlers: all.filter(function (e) { return Array.prototype.some.call(e.attributes,
      function (a) { return a.name.slice(0, 2) === 'on'; }); }).length,
    pwned: window.__pwned === undefined ? 0 : 1,
    alerts: window.__alerts
  };
  var pre = document.createElement('pre');
  pre.id = 'dllab-check';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _dump_dom(page: Path, profile: Path) -> str:
    cmd = chromium_command(page.as_uri(), profile, "--virtual-time-budget=5000", "--dump-dom")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _check(page_text: str, tmp_path: Path, name: str) -> dict:
    checked = tmp_path / name
    checked.write_text(page_text.replace("<head>", "<head>\n" + HOOK, 1)
                       .replace("</body>", CHECKER + "\n</body>", 1))
    dom = _dump_dom(checked, tmp_path / f"profile-{name}")
    found = re.search(r'<pre id="dllab-check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    return json.loads(found.group(1))


@pytest.mark.chromium
@needs_chromium
def test_chromium_renders_report_images_load_and_nothing_from_run_data_runs(runs, tmp_path):
    from PIL import Image

    paths = [str(runs[k]) for k in ("clf_a", "clf_b", "vae", "evil")]
    out, _ = write_report(paths, str(tmp_path / "report.html"))
    page = out.read_text()

    # 1. a screenshot of the report as shipped (CSP on), 1200x2000 scaled to 800 px wide: the
    #    same call that makes the README picture
    shot = screenshot(out, tmp_path / "shot.png", window=(1200, 2000), width=800)
    assert shot.stat().st_size < 300_000
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1333, 800)
    assert image.std() > 10  # text and figures, not a blank page

    # 2. the same page with the CSP removed (so escaping alone must hold) and test-only scripts
    #    that record whether images decoded and whether anything from the run data executed
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    assert page.count(meta) == 1
    result = _check(page.replace(meta, ""), tmp_path, "checked.html")
    n_imgs = page.count("<img ")
    assert result == {"images": n_imgs, "loaded": n_imgs, "not_data": 0, "scripts": 2,
                      "handlers": 0, "pwned": 0, "alerts": 0}, result
    assert n_imgs == 3 + 4 + 3 + 4 + 1  # overlays + clf-a + clf-b + vae + evil's real figure

    # 3. control: the same checker does see an unescaped payload (so 2. could have failed)
    control = _check(page.replace(meta, "").replace("</body>", BREAKOUT + SCRIPT + "</body>", 1),
                     tmp_path, "control.html")
    assert control["pwned"] == 1 and control["alerts"] == 1 and control["handlers"] == 1
    assert control["loaded"] == control["images"] - 1  # the injected <img src=x> is broken


@pytest.mark.chromium
@needs_chromium
def test_chromium_enforces_the_reports_csp(runs, tmp_path):
    """Second line of defence: with the CSP kept, even an injected inline script does not run."""
    out, _ = write_report([str(runs["clf_b"])], str(tmp_path / "report.html"))
    payload = ("<script>document.body.setAttribute('data-ran', 'y' + 'es');</script>"
               "<img src=x onerror=\"document.body.setAttribute('data-err', 'y' + 'es')\">")
    injected = tmp_path / "injected.html"
    injected.write_text(out.read_text().replace("</body>", payload + "</body>", 1))
    dom = _dump_dom(injected, tmp_path / "profile")
    assert "<body" in dom and 'data-ran="yes"' not in dom and 'data-err="yes"' not in dom
    # and without the CSP the same payload does run (the check above can fail)
    no_csp = tmp_path / "no_csp.html"
    no_csp.write_text(injected.read_text().replace(
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">', ""))
    dom = _dump_dom(no_csp, tmp_path / "profile2")
    assert 'data-ran="yes"' in dom


def test_report_out_without_a_suffix_is_a_folder(tmp_path):
    from dllab.report import report_paths

    assert report_paths(["a", "b"], str(tmp_path / "rep1")) == (tmp_path / "rep1" / "report.html",
                                                               tmp_path / "rep1" / "report.md")
    assert report_paths(["a"], str(tmp_path / "r.html")) == (tmp_path / "r.html", tmp_path / "r.md")
