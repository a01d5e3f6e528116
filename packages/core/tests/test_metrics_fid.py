"""FID/KID against analytic and brute-force references, with negative controls."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffalign.core.metrics.fid import (
    FeatureExtractor,
    FeatureStats,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    make_fid,
    make_kid,
)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _fid_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_one_dimensional_gaussians_match_closed_form():
    # W2^2 between N(m1, v1) and N(m2, v2) is (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    for m1, v1, m2, v2 in [(0.0, 1.0, 0.0, 1.0), (1.0, 4.0, -2.0, 0.25), (3.0, 9.0, 3.0, 1.0)]:
        expected = (m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2
        got = frechet_distance([m1], [[v1]], [m2], [[v2]])
        assert got == pytest.approx(expected, abs=1e-10)


def test_matches_scipy_sqrtm_on_correlated_covariances():
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_scipy(mu1, s1, mu2, s2), rel=1e-7)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_negative_controls_differ_from_reference():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    reference = _fid_scipy(mu1, s1, mu2, s2)
    forgot_trace_term = float(((mu1 - mu2) ** 2).sum())
    sqrt_of_diagonals = float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.diag(s1) * np.diag(s2)).sum()
    )
    assert abs(forgot_trace_term - reference) > 1e-2 * reference
    assert abs(sqrt_of_diagonals - reference) > 1e-3 * reference
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-7)


def test_feature_stats_round_trip_and_errors(tmp_path):
    feats = np.random.default_rng(2).normal(size=(50, 4))
    stats = feature_statistics(feats)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
    loaded = FeatureStats.load(stats.save(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu) and loaded.n == 50
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(feats[:1])
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _linear_extractor():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    return net


def test_torchmetrics_fid_with_injected_extractor_matches_features():
    net = _linear_extractor()
    gen = torch.Generator().manual_seed(3)
    real = torch.rand(40, 3, 8, 8, generator=gen)
    fake = torch.rand(40, 3, 8, 8, generator=gen) * 0.7 + 0.2
    metric = make_fid(net, num_features=6)
    metric.update(real[:20], real=True)
    metric.update(real[20:], real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        expected = fid_from_features(net(real), net(fake))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)
    # negative control: swapping in different fake images changes the score
    assert fid_from_features(net(real).detach(), net(real.flip(0)).detach()) < 0.5 * expected


def test_feature_extractor_wrapper_checks_output_width():
    wrapped = FeatureExtractor(lambda x: x.flatten(1)[:, :4], num_features=5)
    with pytest.raises(ValueError, match="expected \\[B, 5\\]"):
        wrapped(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="num_features"):
        make_fid(lambda x: x)


def test_kid_brute_force_and_torchmetrics_agree():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) + 0.5

    def brute(x, y):
        d = x.shape[1]
        k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
        m, n = len(x), len(y)
        sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
        return sxx + syy - 2 * sxy

    assert kid_from_features(x, y) == pytest.approx(brute(x, y), rel=1e-9)
    # negative control: the biased estimator (diagonal kept) is different
    d = x.shape[1]
    biased = (
        ((x @ x.T / d + 1) ** 3).mean()
        + ((y @ y.T / d + 1) ** 3).mean()
        - 2 * ((x @ y.T / d + 1) ** 3).mean()
    )
    assert abs(biased - brute(x, y)) > 1e-3

    feats = torch.from_numpy(np.concatenate([x[:25], y]))
    metric = make_kid(torch.nn.Identity(), num_features=5, subsets=1, subset_size=25)
    metric.update(feats[:25], real=True)
    metric.update(feats[25:], real=False)
    mean, _ = metric.compute()
    assert float(mean) == pytest.approx(kid_from_features(x[:25], y), rel=1e-6)
