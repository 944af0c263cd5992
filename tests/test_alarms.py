"""Live alarms: each rule on histories that must and must not sound it, and each alarm on a real
run built to trigger it (a VAE with a huge beta, a classifier with a huge learning rate, a DCGAN
whose generator cannot learn), through metrics.jsonl, summary.json, the report and --on-alarm."""

from __future__ import annotations

import json

import pytest

from dllab.cli import main
from dllab.metrics import alarms as A
from dllab.runs import Run, read_metrics

BASE = ["--limit", "256", "--batch-size", "32", "--device", "cpu", "--quiet"]


def fired(run_dir) -> dict[str, dict]:
    return {r["alarm"]: r for r in read_metrics(run_dir) if r["split"] == "alarm"}


# ---- the rules -----------------------------------------------------------------------------
def test_posterior_collapse_rule_waits_for_the_warm_up():
    warm = [{"active_units": 0, "test_kl": 0.3}] * A.POSTERIOR_WARMUP_EPOCHS  # a VAE starts collapsed
    assert A.posterior_collapse(warm, 16) is None
    assert A.posterior_collapse([*warm, {"active_units": 16, "test_kl": 20.0}], 16) is None
    assert "8 of 16 latent units active" in A.posterior_collapse([*warm, {"active_units": 8, "test_kl": 20.0}], 16)
    assert "KL 0.010 nats" in A.posterior_collapse([*warm, {"active_units": 16, "test_kl": 0.16}], 16)


def test_mode_collapse_rule_waits_for_the_warm_up_then_watches_coverage():
    early = [{"clf_modes_covered": 1, "clf_fid": 100.0}] * A.MODE_WARMUP_EPOCHS
    assert A.mode_collapse(early, 10) is None  # every GAN starts from one or two "classes"
    assert "1 of 10 classes" in A.mode_collapse([*early, {"clf_modes_covered": 1, "clf_fid": 95.0}], 10)
    # few classes but the FID falling fast: still learning, not collapsed
    assert A.mode_collapse([*early, {"clf_modes_covered": 2, "clf_fid": 70.0}], 10) is None
    healthy = [*early, *({"clf_modes_covered": m} for m in (7, 8, 6, 7, 5))]
    assert A.mode_collapse(healthy, 10) is None
    assert "fell from 8 to 4" in A.mode_collapse([*healthy, {"clf_modes_covered": 4}], 10)


def test_divergence_rule_needs_d_winning_and_g_loss_climbing():
    def epoch(d_fake, g_loss):
        return {"train_d_fake_after": d_fake, "train_g_loss": g_loss}

    assert A.gan_divergence([epoch(0.01, 3.0)]) is None  # one epoch: nothing climbs yet
    assert "D(G(z)) = 0.010" in A.gan_divergence([epoch(0.1, 3.0), epoch(0.01, 4.0)])
    assert A.gan_divergence([epoch(0.1, 5.0), epoch(0.01, 4.0)]) is None  # G recovering
    assert A.gan_divergence([epoch(0.1, 3.0), epoch(0.2, 4.0)]) is None  # D not winning


def test_past_best_rule_on_studiogans_dcgan_log():
    """StudioGAN's DCGAN CIFAR-10 FIDs (best 49.03 at 42k, then 90 at 46k): the alarm sounds once
    every epoch in the window is more than 10 % worse than the best, not on noise."""
    fids = [120, 80, 60, 49.03, 52, 50, 51, 53, 52]  # noise within 10 % of the best: quiet
    history = [{"clf_fid": f} for f in fids]
    assert A.past_best(history, patience=5) is None
    history += [{"clf_fid": f} for f in (60, 70, 80, 85, 90)]
    message = A.past_best(history, patience=5)
    assert "49.03 at epoch 4" in message and "now 90" in message


def test_classifier_divergence_rule():
    assert A.classifier_divergence([{"test_loss": 9.0, "test_acc": 0.1}], 10) is None  # epoch 1
    good = [{"test_loss": 0.3, "test_acc": 0.9}] * 2
    assert A.classifier_divergence(good, 10) is None
    assert "no better than a uniform guess" in A.classifier_divergence([*good, {"test_loss": 2.31}], 10)
    assert "test loss nan" in A.classifier_divergence([*good, {"test_loss": float("nan")}], 10)
    assert "chance level" in A.classifier_divergence([*good, {"test_loss": 1.0, "test_acc": 0.12}], 10)


# ---- real runs built to trigger them ------------------------------------------------------------
def test_a_vae_with_a_huge_beta_sounds_posterior_collapse_everywhere(tmp_path, capsys):
    """In the log, the summary, the report, and on stderr: there even with --quiet (a warning, not
    progress)."""
    out = tmp_path / "vae"
    judged = A.POSTERIOR_WARMUP_EPOCHS + 1
    assert "--quiet" in BASE
    assert main(["train", "vae", *BASE, "--epochs", str(judged), "--latent-dim", "4", "--beta", "50",
                 "--tsne-points", "60", "--out", str(out)]) == 0
    assert f"dllab vae: ALARM after epoch {judged}: posterior collapse" in capsys.readouterr().err
    alarm = fired(out)["posterior_collapse"]
    assert alarm["epoch"] == judged  # sounded once, at the first epoch after the warm-up
    summary = Run.open(out).summary()
    assert summary["status"] == "complete" and [a["alarm"] for a in summary["alarms"]] == ["posterior_collapse"]
    report = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(report)]) == 0
    assert f"ALARM after epoch {judged}: posterior collapse" in report.read_text()


def test_on_alarm_stop_stops_the_run_and_a_resume_with_warn_finishes_it(tmp_path, capsys):
    out = tmp_path / "vae"
    judged = A.POSTERIOR_WARMUP_EPOCHS + 1
    argv = ["train", "vae", *BASE, "--epochs", str(judged + 1), "--latent-dim", "4", "--beta", "50",
            "--tsne-points", "60", "--out", str(out)]
    assert main([*argv, "--on-alarm", "stop"]) == 1
    err = capsys.readouterr().err
    assert "stopped by the posterior_collapse alarm" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and f"--resume --out {out} --on-alarm warn" in err
    run = Run.open(out)
    assert run.status == "stopped" and run.summary()["epochs"] == judged and run.resumable
    assert main(["train", "vae", "--resume", "--out", str(out), "--on-alarm", "warn", "--quiet"]) == 0
    assert Run.open(out).complete and Run.open(out).summary()["epochs"] == judged + 1
    assert len([r for r in read_metrics(out) if r["split"] == "alarm"]) == 1  # once per run


def test_a_classifier_with_a_huge_learning_rate_sounds_diverged(tmp_path):
    out = tmp_path / "clf"
    assert main(["train", "classifier", *BASE, "--epochs", "2", "--width", "4", "--lr", "20",
                 "--precision", "fp32", "--max-nonfinite", "1000", "--out", str(out)]) == 0
    alarm = fired(out)["diverged"]
    assert alarm["epoch"] == 2 and alarm["message"].startswith("diverged: test ")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf"
    assert main(["train", "classifier", *BASE, "--epochs", "2", "--width", "4", "--precision", "fp32",
                 "--out", str(out)]) == 0
    return out


def test_a_gan_whose_generator_cannot_learn_sounds_divergence_and_mode_collapse(tmp_path, classifier_run):
    """G's learning rate is 1e-7 and D's 2e-3: D wins outright, G's loss climbs, and G's samples
    stay the noise of its initialisation, which the classifier files under one or two classes."""
    out = tmp_path / "gan"
    assert main(["train", "dcgan", *BASE, "--epochs", str(A.MODE_WARMUP_EPOCHS + 1), "--g-width", "8",
                 "--d-width", "8", "--nz", "16", "--lr", "1e-7", "--lr-d", "2e-3", "--eval-samples", "200",
                 "--classifier-run", str(classifier_run), "--out", str(out)]) == 0
    alarms = fired(out)
    assert {"divergence", "mode_collapse"} <= set(alarms)
    assert alarms["mode_collapse"]["epoch"] == A.MODE_WARMUP_EPOCHS + 1
    assert set(alarms) == {a["alarm"] for a in Run.open(out).summary()["alarms"]}


def test_the_fid_alarm_through_the_engine(tmp_path, classifier_run, monkeypatch):
    """The FID the evaluation returns is scripted (the engine's plumbing is under test, not a
    GAN's dynamics): best at epoch 1, then more than 10 % worse for --fid-patience epochs."""
    from dllab.train.dcgan import DCGANTrainer

    script = iter([10.0, 20.0, 21.0, 22.0])
    evaluate = DCGANTrainer.evaluate
    monkeypatch.setattr(DCGANTrainer, "evaluate", lambda self: {**evaluate(self), "clf_fid": next(script)})
    out = tmp_path / "gan"
    assert main(["train", "dcgan", *BASE, "--epochs", "4", "--g-width", "8", "--d-width", "8", "--nz", "16",
                 "--eval-samples", "200", "--fid-patience", "3", "--classifier-run", str(classifier_run),
                 "--out", str(out)]) == 0
    alarm = fired(out)["past_best_fid"]
    assert alarm["epoch"] == 4 and "10 at epoch 1" in alarm["message"]
    assert json.loads((out / "summary.json").read_text())["best"]["epoch"] == 1


# ---- the protocol card of every generative metric -------------------------------------------
def test_generative_metrics_carry_their_protocol_in_summary_eval_and_report(tmp_path, classifier_run,
                                                                            capsys):
    from dllab.checkpoint import sha256_file

    out = tmp_path / "gan"
    assert main(["train", "dcgan", *BASE, "--epochs", "1", "--g-width", "8", "--d-width", "8", "--nz", "16",
                 "--eval-samples", "200", "--ema", "0.9", "--classifier-run", str(classifier_run),
                 "--out", str(out)]) == 0
    card = Run.open(out).summary()["protocol"]
    assert card["feature_extractor_sha256"] == sha256_file(classifier_run / "checkpoints" / "best.pt")
    assert "NOT Inception" in card["feature_extractor"]
    assert (card["generated_samples"], card["reference_samples"], card["noise_seed"]) == (200, 200, 0)
    assert card["generator"] == "generator_ema" and "train, the first 200" in card["reference_split"]
    capsys.readouterr()
    assert main(["eval", str(out), "--num-samples", "300"]) == 0
    printed = capsys.readouterr().out
    assert "protocol.generated_samples" in printed and "protocol.feature_extractor_sha256" in printed
    assert json.loads((out / "eval.json").read_text())["protocol"]["generated_samples"] == 300
    report = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(report)]) == 0
    assert card["feature_extractor_sha256"] in report.read_text()
    vae = tmp_path / "vae"
    assert main(["train", "vae", *BASE, "--epochs", "1", "--latent-dim", "4", "--tsne-points", "60",
                 "--iw-samples", "5", "--out", str(vae)]) == 0
    card = Run.open(vae).summary()["protocol"]
    assert card["iw_samples"] == 5 and "k=5" in card["metrics"]
    assert card["split"] == "mnist5k test, the first 256 images (--limit 256)"
