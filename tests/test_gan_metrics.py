"""GAN metrics against hand-computed cases and closed forms."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dllab.metrics.gan import (FEATURE_SPACE_CLASSIFIER, InceptionWeightsMissing, class_coverage,
                               classifier_feature_metrics, coverage_from_hist, feature_statistics,
                               fid_from_features, frechet_distance, inception_metrics,
                               mean_pairwise_distance, nearest_neighbours, precision_recall)


def _random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T) / d + 0.1 * np.eye(d)


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- FID

def test_frechet_distance_of_a_distribution_with_itself_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=16), _random_cov(rng, 16)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    feats = rng.normal(size=(500, 8))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)
    # fewer samples than dimensions: a singular covariance is still fine
    few = rng.normal(size=(10, 64))
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_diagonal_closed_form():
    # for commuting (here diagonal) covariances sqrt(S1 S2) is elementwise:
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = 9 + 0 + 16 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(1 + 1)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(1)
    for d in (2, 10, 50):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=3.0)
        fd = frechet_distance(mu1, s1, mu2, s2)
        assert fd == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-9)
        assert fd == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    # torch inputs work too
    t = torch.as_tensor
    assert frechet_distance(t(mu1), t(s1), t(mu2), t(s2)) == pytest.approx(fd, rel=1e-12)


def test_fid_of_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=2.0)
    want = frechet_distance(mu1, s1, mu2, s2)
    assert want == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-9)
    errors = []
    for n in (500, 50_000):
        x = rng.multivariate_normal(mu1, s1, size=n)
        y = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(fid_from_features(x, y) - want))
    assert errors[1] < 0.02 * want
    assert errors[1] < errors[0]


def test_feature_statistics_and_shape_checks():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(40, 5))
    mu, sigma = feature_statistics(torch.as_tensor(f, dtype=torch.float32))
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    assert np.allclose(mu, f.mean(0), atol=1e-6)
    assert np.allclose(sigma, np.cov(f, rowvar=False), atol=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((3, 2), np.nan), f[:, :2])


# ----------------------------------------------------------------------------- precision/recall

def test_precision_recall_identical_and_far_apart():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 6))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_hand_case_in_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])   # k=1 radii: 1, 1, 1, 1
    fake = np.array([[0.5], [1.9], [10.0], [4.5]])  # k=1 radii: 1.4, 1.4, 5.5, 2.6
    # precision: 0.5 and 1.9 lie in a real ball; 10 and 4.5 (1.5 from 3) do not
    # recall: 0, 1, 2 are within 1.4 of 0.5 or 1.9; 3 is 1.1 from 1.9, inside its 1.4 ball
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert precision_recall(real, fake, k=1, chunk_size=1) == (0.5, 1.0)


def test_precision_recall_detects_a_dropped_mode():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 8))
    b = rng.normal(size=(200, 8)) + 50.0
    real = np.concatenate([a, b])
    precision, recall = precision_recall(real, a.copy(), k=3, chunk_size=64)
    assert precision == 1.0 and recall == 0.5
    with pytest.raises(ValueError, match="k=5"):
        precision_recall(real[:5], a[:5], k=5)


# ----------------------------------------------------------------------------- coverage, diversity

def test_class_coverage_hand_histogram():
    labels = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 5  # class 4 never generated
    cov = class_coverage(torch.tensor(labels), 5, smoothing=0.0)
    # uniform data: covered iff share >= 1/(2*5) = 0.1 -> classes 0, 1, 2
    assert cov["class_hist"] == [50, 30, 15, 5, 0]
    assert cov["covered"] == [True, True, True, False, False]
    assert cov["modes_covered"] == 3 and cov["num_modes"] == 5
    want = 0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.15 * math.log(0.75) + 0.05 * math.log(0.25)
    assert cov["kl_gen_data"] == pytest.approx(want, rel=1e-12)
    assert class_coverage(labels, 5)["kl_gen_data"] == pytest.approx(want, rel=1e-4)  # smoothed


def test_class_coverage_non_uniform_data_and_dropped_modes():
    # data 60/20/20; generated 30/50/20: class 0 has 0.3 >= 0.5*0.6 -> covered (just)
    cov = class_coverage([0] * 3 + [1] * 5 + [2] * 2, 3, data_class_probs=[6, 2, 2], smoothing=0.0)
    assert cov["data_probs"] == pytest.approx([0.6, 0.2, 0.2])
    assert cov["covered"] == [True, True, True]
    # dropping m of K equally likely classes evenly: KL = log(K / (K - m))
    cov = coverage_from_hist([10, 10, 10, 10, 0, 0, 0, 0, 0, 0], smoothing=0.0)
    assert cov["modes_covered"] == 4
    assert cov["kl_gen_data"] == pytest.approx(math.log(10 / 4), rel=1e-12)
    # a class the data lacks is not a mode
    cov = class_coverage([0, 1, 2], 3, data_class_probs=[0.5, 0.5, 0.0])
    assert cov["num_modes"] == 2 and cov["modes_covered"] == 2 and math.isfinite(cov["kl_gen_data"])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_coverage([0, 3], 3)
    with pytest.raises(ValueError, match="dtype"):
        class_coverage(torch.tensor([0.0, 1.0]), 3)


def test_mean_pairwise_distance_by_hand():
    pts = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 3, 4
    assert mean_pairwise_distance(pts) == pytest.approx(4.0, rel=1e-12)
    assert mean_pairwise_distance(pts, chunk_size=1) == pytest.approx(4.0, rel=1e-12)
    assert mean_pairwise_distance(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(pts[:1])


def test_nearest_neighbours_tiny_example():
    ref = torch.tensor([[0.0], [10.0], [3.0], [7.0]])
    query = torch.tensor([[2.9], [8.0]])
    idx, dist = nearest_neighbours(query, ref, k=2, chunk_size=1)
    assert idx.tolist() == [[2, 0], [3, 1]]
    assert torch.allclose(dist, torch.tensor([[0.1, 2.9], [1.0, 2.0]], dtype=torch.float64))
    # images are flattened: an exact copy is found at distance 0
    imgs = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    idx, dist = nearest_neighbours(imgs[[4, 1]], imgs)
    assert idx[:, 0].tolist() == [4, 1] and torch.all(dist[:, 0] < 1e-6)
    with pytest.raises(ValueError, match="k=7"):
        nearest_neighbours(imgs, imgs, k=7)


# ----------------------------------------------------------------------------- classifier space

def _fake_classifier():
    w = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def features(x):
        calls.append(x.shape[0])
        return x.flatten(1)

    def logits(x):
        return x.flatten(1) @ w

    logits.weight = w  # the last layer alone: features -> logits
    return features, logits, calls


def test_classifier_feature_metrics_keys_and_values():
    features, logits, calls = _fake_classifier()
    g = torch.Generator().manual_seed(1)
    real = torch.rand(60, 1, 4, 4, generator=g) * 2 - 1
    same = classifier_feature_metrics(features, logits, real, real.clone(), batch_size=25)
    assert max(calls) == 25  # called in batches
    assert same["feature_space"] == FEATURE_SPACE_CLASSIFIER
    assert "NOT Inception" in same["feature_space"]
    assert all(k.startswith("clf_") for k in same if k != "feature_space")
    assert same["clf_fid"] == pytest.approx(0.0, abs=1e-8)
    assert same["clf_precision"] == 1.0 and same["clf_recall"] == 1.0
    assert same["clf_kl_gen_data"] == pytest.approx(0.0, abs=1e-9)
    assert same["clf_modes_covered"] == same["clf_num_modes"]
    assert same["clf_pairwise_fake"] == pytest.approx(same["clf_pairwise_real"])
    # a collapsed generator: one image repeated
    collapsed = real[:1].repeat(60, 1, 1, 1)
    col = classifier_feature_metrics(features, logits, real, collapsed)
    assert col["clf_pairwise_fake"] == pytest.approx(0.0, abs=1e-9)
    assert col["clf_recall"] < 0.2 and col["clf_modes_covered"] == 1
    assert col["clf_fid"] > 1.0
    no_cls = classifier_feature_metrics(features, None, real, real)
    assert "clf_modes_covered" not in no_cls and "clf_fid" in no_cls
    with pytest.raises(ValueError, match="differ in shape"):
        classifier_feature_metrics(features, logits, real, torch.zeros(5, 1, 5, 5))
    # precomputed real features and logits from the fake features: the same numbers, fewer passes
    from dllab.metrics.gan import apply_batched

    fake = torch.rand(60, 1, 4, 4, generator=g) * 2 - 1
    plain = classifier_feature_metrics(features, logits, real, fake)
    calls.clear()
    cached = classifier_feature_metrics(features, logits, real, fake, real_features=apply_batched(features, real),
                                        head_fn=lambda f: f.float() @ logits.weight)
    assert sum(calls) == 60 + 60  # the real features once (above), the fake ones once: no logits pass
    assert cached == plain


# ----------------------------------------------------------------------------- Inception

def test_inception_metrics_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("DLLAB_INCEPTION_WEIGHTS", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    imgs = torch.zeros(12, 1, 28, 28)
    with pytest.raises(InceptionWeightsMissing) as info:
        inception_metrics(imgs, imgs)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("weights-inception-2015-12-05-6726825d.pth",
                   "pt_inception-2015-12-05-6726825d.pth", "92 MB", "torch-fidelity",
                   "weights_path", "classifier_feature_metrics", str(tmp_path / "hub")):
        assert needle in msg
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(InceptionWeightsMissing, match="nowhere.pth"):
        inception_metrics(imgs, imgs, weights_path=missing)
    monkeypatch.setenv("DLLAB_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(InceptionWeightsMissing, match="env.pth"):
        inception_metrics(imgs, imgs)


@pytest.mark.slow
def test_inception_metrics_plumbing_with_random_weights(tmp_path):
    """The real weights cannot be had offline: build a randomly initialised network of the same
    architecture, save it, and check that FID and IS come back through torchmetrics (the values
    mean nothing). About 30-120 s on 2 CPU cores (Inception-v3 at 299x299)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe  # the "metrics" extra
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(cls, "load_state_dict", lambda *a, **k: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), path)
    torch.manual_seed(0)
    out = inception_metrics(torch.rand(4, 1, 28, 28) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1,
                            weights_path=path, splits=2)
    assert out["inception_num_fake"] == 4 and out["inception_num_real"] == 3
    assert math.isfinite(out["inception_fid"]) and out["inception_fid"] >= 0
    assert out["inception_is_mean"] >= 1.0 - 1e-6
    assert "Inception" in out["feature_space"]
