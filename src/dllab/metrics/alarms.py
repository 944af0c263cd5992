"""Live alarms: rules that read a run's per-epoch history and say when it is going wrong.

Each rule takes the history, one dict per finished epoch, and returns a message when it fires,
or None. The record holds the epoch's test metrics (``test_loss``, ``active_units``,
``clf_fid``, ...) and the means of its training metrics over the epoch, prefixed ``train_``
(``train_d_fake_after``, ``train_g_loss``, ...). The engine runs a kind's rules after every
epoch (:meth:`dllab.engine.Trainer.alarms`). It writes what fires to the progress bar,
``metrics.jsonl`` (``{"split": "alarm", ...}``), ``summary.json`` and the report, and
``--on-alarm stop`` stops the run there.

Each threshold below is a named constant, with its reason and source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Active units: a latent unit u is active when Cov_x(E_q[z_u | x]) > 0.01 (Burda, Grosse &
#: Salakhutdinov 2016, "Importance Weighted Autoencoders", section 5.2). The alarm fires when at
#: most this fraction of the latent units is active.
ACTIVE_FRACTION = 0.5

#: Epochs before the VAE is judged: a VAE often starts collapsed and recovers. The default VAE on
#: MNIST-5k had 0 of 16 units active and 0.02 nats of KL per dimension after epoch 1, 10 of 16
#: after epoch 2 and 15 of 16 after epoch 3.
POSTERIOR_WARMUP_EPOCHS = 2

#: KL(q(z|x) || p(z)) per latent dimension, in nats, below which the posterior carries almost no
#: information about x: the collapse of Bowman et al. (2016, "Generating Sentences from a
#: Continuous Space", section 3.1), where the KL term goes to zero. A healthy beta = 1 VAE on
#: MNIST-5k keeps about 1.2 nats per dimension (README: 20 nats over 16 dimensions).
KL_PER_DIM_MIN = 0.05

#: Epochs before mode coverage is judged: a DCGAN starts from noise that a classifier calls one
#: or two classes, and on MNIST-5k it takes 1-3 epochs to cover more (README, "Mode collapse
#: without batch norm in G").
MODE_WARMUP_EPOCHS = 3

#: Mode collapse: at most this fraction of the classes covered (a class is covered when it gets
#: at least half its share of the samples, as in dllab.metrics.gan), or a drop of DROP_MODES or
#: more from the best epoch. Counting the modes a classifier sees in samples follows Metz et al.
#: (2017, "Unrolled GANs") and Srivastava et al. (2017, "VEEGAN"). Low coverage counts as
#: collapse only while the FID is not falling by MODE_FID_PROGRESS or more per epoch: a small
#: generator still learning covers few classes for a while with its FID falling fast (the demo's
#: DCGAN: 2 classes at epoch 4, FID 59 -> 43). Set on README's MNIST-5k runs (20 epochs,
#: per-epoch coverage): the collapsed no-batch-norm generators sat at 1-2 of 10 for whole epochs
#: with a stalled or rising FID, the healthy ones at 5-8 after epoch 3 and never fell by 4.
MODES_FRACTION = 0.2
MODE_FID_PROGRESS = 0.10
DROP_MODES = 4

#: Divergence: D(G(z)) after D's step, averaged over the epoch, below this, while the G loss
#: climbs. When D wins outright, G's gradients vanish (Arjovsky & Bottou 2017, "Towards
#: Principled Methods for Training GANs", section 2.2); pytorch/examples issue #822 shows users
#: finding it by eye, with the D loss near 0 and the G loss climbing toward 100. On README's
#: MNIST-5k runs the healthy default dipped to 0.035 in epoch 3 and recovered; the collapsing
#: ones fell to 0.002-0.018 with the G loss climbing epoch after epoch.
D_FAKE_MIN = 0.02

#: Epochs the DCGAN may go on past its best classifier-feature FID, every one of them more than
#: FID_TOLERANCE worse than the best, before the alarm fires. In StudioGAN's DCGAN CIFAR-10 log
#: the best FID (49.03) came at step 42k, and the run then diverged (90 at 46k, 137 at 200k):
#: 79 % of its compute came after its best checkpoint. The tolerance keeps epoch-to-epoch noise
#: (about 10 % on 1,000 samples in README's runs) from sounding it.
FID_PATIENCE = 5
FID_TOLERANCE = 0.10

#: A classifier no better than a uniform guess, tested from this epoch on: its test loss at or
#: above ln C (the cross-entropy of predicting 1/C for every class), or its accuracy at most
#: CHANCE_FACTOR / C. README's ablation shows no-batch-norm runs ending at 10 % and loss ln 10.
DIVERGED_FROM_EPOCH = 2
CHANCE_FACTOR = 1.5


def _last(history: Sequence[dict], key: str) -> float | None:
    value = history[-1].get(key) if history else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def posterior_collapse(history: Sequence[dict], latent_dim: int) -> str | None:
    """VAE, after its warm-up: too few active units, or a KL term that has fallen to almost
    nothing per dimension."""
    if len(history) <= POSTERIOR_WARMUP_EPOCHS:
        return None
    active, kl = _last(history, "active_units"), _last(history, "test_kl")
    if active is not None and active <= ACTIVE_FRACTION * latent_dim:
        return (f"posterior collapse: {active:.0f} of {latent_dim} latent units active (alarm at "
                f"{ACTIVE_FRACTION:.0%} or fewer; Burda et al. 2016)")
    if kl is not None and kl / latent_dim < KL_PER_DIM_MIN:
        return (f"posterior collapse: KL {kl / latent_dim:.3f} nats per latent dimension (alarm "
                f"below {KL_PER_DIM_MIN}; Bowman et al. 2016)")
    return None


def mode_collapse(history: Sequence[dict], num_classes: int) -> str | None:
    """DCGAN with classifier metrics: few classes covered, or coverage falling from its best."""
    if len(history) <= MODE_WARMUP_EPOCHS:
        return None
    modes = _last(history, "clf_modes_covered")
    if modes is None:
        return None
    best = max(float(r["clf_modes_covered"]) for r in history if "clf_modes_covered" in r)
    fid, fid_before = _last(history, "clf_fid"), _last(history[:-1], "clf_fid")
    learning = fid is not None and fid_before is not None and fid < (1 - MODE_FID_PROGRESS) * fid_before
    if modes <= MODES_FRACTION * num_classes and not learning:
        return (f"mode collapse: {modes:.0f} of {num_classes} classes covered (alarm at "
                f"{MODES_FRACTION:.0%} or fewer while the FID falls by less than "
                f"{MODE_FID_PROGRESS:.0%} an epoch)")
    if best - modes >= DROP_MODES:
        return f"mode collapse: classes covered fell from {best:.0f} to {modes:.0f}"
    return None


def gan_divergence(history: Sequence[dict]) -> str | None:
    """DCGAN: D calls G's samples fake with near certainty while G's loss keeps climbing."""
    if len(history) < 2:
        return None
    d_fake, g_now, g_before = (_last(history, "train_d_fake_after"), _last(history, "train_g_loss"),
                               _last(history[:-1], "train_g_loss"))
    if None in (d_fake, g_now, g_before):
        return None
    if d_fake < D_FAKE_MIN and g_now > g_before:
        return (f"divergence: D(G(z)) = {d_fake:.3f} (alarm below {D_FAKE_MIN}) while the G loss "
                f"climbs ({g_before:.2f} -> {g_now:.2f})")
    return None


def past_best(history: Sequence[dict], key: str = "clf_fid", patience: int = FID_PATIENCE) -> str | None:
    """A metric to minimise (the FID) whose best epoch lies ``patience`` or more epochs back."""
    values = [(i + 1, float(r[key])) for i, r in enumerate(history)
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return None
    best_epoch, best = min(values, key=lambda v: v[1])
    epoch = len(history)
    recent = [v for e, v in values if e > epoch - patience]
    if epoch - best_epoch >= patience and all(v > best * (1 + FID_TOLERANCE) for v in recent):
        return (f"past its best: {key} was {best:.4g} at epoch {best_epoch}, and each of the last "
                f"{patience} epochs was more than {FID_TOLERANCE:.0%} worse (now {values[-1][1]:.4g}); "
                "best.pt keeps the best epoch")
    return None


def classifier_divergence(history: Sequence[dict], num_classes: int) -> str | None:
    """Classifier: a test loss that is not finite, or no better than a uniform guess."""
    if len(history) < DIVERGED_FROM_EPOCH:
        return None
    loss, acc = _last(history, "test_loss"), _last(history, "test_acc")
    chance = math.log(num_classes)
    if loss is not None and (not math.isfinite(loss) or loss >= chance):
        return (f"diverged: test loss {loss:.4g}, no better than a uniform guess (ln {num_classes} = "
                f"{chance:.3f}); try a lower --lr")
    if acc is not None and acc <= CHANCE_FACTOR / num_classes:
        return f"diverged: test accuracy {acc:.1%}, chance level for {num_classes} classes; try a lower --lr"
    return None


__all__ = ["POSTERIOR_WARMUP_EPOCHS", "posterior_collapse", "mode_collapse", "gan_divergence", "past_best",
           "classifier_divergence", "ACTIVE_FRACTION", "KL_PER_DIM_MIN", "MODE_WARMUP_EPOCHS",
           "MODES_FRACTION", "MODE_FID_PROGRESS", "DROP_MODES", "D_FAKE_MIN", "FID_PATIENCE", "FID_TOLERANCE",
           "DIVERGED_FROM_EPOCH",
           "CHANCE_FACTOR"]
