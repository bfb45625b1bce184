"""Transferability estimators: hand-computed cases, known bounds, input checks."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
from sklearn import covariance

from transfer_tf import estimators


def one_hot(indices, depth):
    return np.eye(depth)[np.asarray(indices)]


def random_probabilities(rng, n, k):
    logits = rng.normal(size=(n, k)) * 3
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- LEEP


def test_leep_of_a_perfect_source_is_zero():
    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    permutation = np.array([3, 0, 2])  # target class y <-> source class z
    probabilities = one_hot(permutation[labels], depth=5)  # 5 source classes
    assert estimators.leep(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_leep_is_never_positive():
    rng = np.random.default_rng(0)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, 50)
        probabilities = random_probabilities(rng, 50, 7)
        assert estimators.leep(probabilities, labels) <= 1e-12


def test_leep_of_a_source_independent_of_the_labels_is_minus_label_entropy():
    labels = np.array([0, 0, 1, 2])  # P(y) = (1/2, 1/4, 1/4)
    probabilities = np.tile([0.1, 0.6, 0.3], (4, 1))  # the same for every example
    minus_entropy = -(0.5 * math.log(2) + 2 * 0.25 * math.log(4))  # -1.5 ln 2
    assert estimators.leep(probabilities, labels) == pytest.approx(minus_entropy)
    assert estimators.entropy(labels) == pytest.approx(-minus_entropy)


def test_leep_by_hand():
    # P(y, z) = [[0.4, 0.1], [0.2, 0.3]], P(z) = (0.6, 0.4), so
    # P(y|z) = [[2/3, 1/4], [1/3, 3/4]]; both examples then score
    # 2/3 * 0.8 + 1/4 * 0.2 = 1/3 * 0.4 + 3/4 * 0.6 = 7/12.
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert estimators.leep(probabilities, [0, 1]) == pytest.approx(math.log(7 / 12))


def test_leep_ignores_source_classes_without_mass():
    probabilities = np.array([[0.8, 0.2, 0.0], [0.4, 0.6, 0.0]])
    assert estimators.leep(probabilities, [0, 1]) == pytest.approx(math.log(7 / 12))


# ---------------------------------------------------------------------------- NCE


def test_nce_of_a_perfect_source_is_zero():
    labels = np.array([0, 1, 2, 2, 1, 0])
    assert estimators.nce(2 * labels + 1, labels) == pytest.approx(0.0, abs=1e-12)


def test_nce_of_a_source_independent_of_the_labels_is_minus_label_entropy():
    # Each of y = 0 (4 examples) and y = 1 (2 examples) is split evenly over z = 0, 1,
    # so the empirical joint is the product of its marginals.
    labels = np.array([0, 0, 0, 0, 1, 1])
    source = np.array([0, 1, 0, 1, 0, 1])
    minus_entropy = -(2 / 3 * math.log(3 / 2) + 1 / 3 * math.log(3))
    assert estimators.nce(source, labels) == pytest.approx(minus_entropy)
    # LEEP of the corresponding hard (one-hot) predictions is the same.
    assert estimators.leep(one_hot(source, 2), labels) == pytest.approx(minus_entropy)


def test_nce_by_hand():
    # z = 0 holds y = (0, 0, 1): H(Y|z=0) = H(2/3, 1/3); z = 1 holds y = 1 only.
    value = estimators.nce([0, 0, 0, 1], [0, 0, 1, 1])
    expected = -3 / 4 * (2 / 3 * math.log(3 / 2) + 1 / 3 * math.log(3))
    assert value == pytest.approx(expected)


# -------------------------------------------------------------------------- LogME


def dense_log_evidence(features, target, alpha, beta):
    """The evidence of Bayesian linear regression straight from its definition."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ target)
    return (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - np.linalg.slogdet(a)[1] / 2
        - beta / 2 * np.sum((features @ m - target) ** 2)
        - alpha / 2 * m @ m
    ) / n


@pytest.mark.parametrize("n, d", [(200, 12), (40, 90)])  # N > D and N < D
def test_logme_converges_to_the_maximum_evidence(n, d):
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, d))
    scores = features @ rng.normal(size=(d, 3)) + rng.normal(size=(n, 3))
    labels = np.argmax(scores, axis=1)  # random, but related to the features
    details = estimators.logme_details(features, labels)
    assert all(details.converged)
    assert max(details.iterations) < estimators.LOGME_MAX_ITERATIONS
    assert details.classes == (0, 1, 2)
    assert details.score == pytest.approx(np.mean(details.evidence))
    for c, alpha, beta, evidence in zip(
        details.classes, details.alpha, details.beta, details.evidence, strict=True
    ):
        target = (labels == c).astype(float)
        # The SVD shortcut computes the textbook evidence ...
        dense = dense_log_evidence(features, target, alpha, beta)
        assert evidence == pytest.approx(dense, rel=1e-7)
        # ... and the fixed point is a maximum over alpha and beta.
        for da, db in ((0.8, 1), (1.25, 1), (1, 0.8), (1, 1.25)):
            assert dense_log_evidence(features, target, alpha * da, beta * db) < (
                evidence + 1e-9
            )


def test_logme_of_noise_converges_to_the_no_weights_limit():
    # Features unrelated to a class: the evidence rises towards its supremum as
    # alpha -> inf (w = 0, t pure noise with the best beta = N / ||t||²), i.e.
    # -(1 + log(2 pi p)) / 2 per example for a class of frequency p.
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 5))
    labels = rng.integers(0, 2, 400)
    details = estimators.logme_details(features, labels)
    assert all(details.converged)
    rows = zip(details.classes, details.evidence, details.alpha, strict=True)
    for c, evidence, alpha in rows:
        p = np.mean(labels == c)
        limit = -(1 + math.log(2 * math.pi * p)) / 2
        assert limit - 1e-5 <= evidence <= limit + 0.01  # a supremum, nearly met
        if alpha > 1e6:  # this class's maximum is the limit itself
            assert evidence == pytest.approx(limit, abs=1e-5)
    assert max(details.alpha) > 1e6


def test_logme_is_higher_for_features_that_determine_the_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    informative = one_hot(labels, 4) + 0.1 * rng.normal(size=(300, 4))
    informative = np.hstack([informative, rng.normal(size=(300, 12))])
    noise = rng.normal(size=(300, 16))
    assert estimators.logme(informative, labels) > estimators.logme(noise, labels) + 1
    assert all(estimators.logme_details(informative, labels).converged)


def test_logme_reports_a_capped_iteration():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(30, 80)), rng.integers(0, 3, 30)
    details = estimators.logme_details(features, labels, max_iterations=2)
    assert details.iterations == (2, 2, 2) and not any(details.converged)


# ------------------------------------------ LogME as the authors' code computes it


class _OfficialLogME(typing.NamedTuple):
    score: float
    alpha: np.ndarray  # per class 0..max(labels)
    kept: int  # singular values in the truncated spectrum


def _official_logme(
    features, labels, tolerance=1e-3, max_iterations=11, epsilon=1e-5
) -> _OfficialLogME:
    """LogME as github.com/thuml/LogME computes it (``LogME.fit``, i.e. its
    ``_fit_fixed_point``), re-implemented from the algorithm for comparison.

    The spectrum of F is truncated: for N > D the eigenvalues of FᵀF whose square
    roots exceed 1e-10, for N <= D the N squared singular values of a thin SVD.
    Per class, the same fixed point as ``estimators.logme_details`` runs from
    alpha = beta = 1, with ``epsilon`` added to the denominators of the updates,
    until alpha / beta moves by at most ``tolerance`` (relative) or for
    ``max_iterations`` (the defaults are the authors'); the evidence is then

        D/2 log α + N/2 log β - 1/2 Σ_kept log(α + β σ²) - β/2 res² - α/2 m²
            - N/2 log 2π

    with res² and m² of the last update's starting point. The log-determinant
    sums over the kept spectrum only: the D - kept zero eigenvalues of FᵀF, each
    worth -1/2 log α in log|A|, are left out.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    if n > d:
        _, eigenvalues, vt = np.linalg.svd(f.T @ f)  # symmetric: vt rows = eigvecs
        keep = np.sqrt(eigenvalues) > 1e-10
        sigma = eigenvalues[keep]
        u = f @ vt[keep].T / np.sqrt(sigma)
    else:
        u, singular, _ = np.linalg.svd(f, full_matrices=False)
        sigma = singular**2
    evidences, alphas = [], []
    for c in range(int(y.max()) + 1):
        t = (y == c).astype(np.float64)
        along = (u.T @ t) ** 2
        outside = max(float(t @ t - along.sum()), 0.0)
        alpha = beta = 1.0
        for _ in range(max_iterations):
            ratio = alpha / beta
            gamma = np.sum(sigma / (sigma + ratio))
            m2 = np.sum(sigma * along / (sigma + ratio) ** 2)
            res2 = np.sum(along * (ratio / (sigma + ratio)) ** 2) + outside
            alpha = gamma / (m2 + epsilon)
            beta = (n - gamma) / (res2 + epsilon)
            if abs(alpha / beta - ratio) <= tolerance * ratio:
                break
        log_det = np.sum(np.log(alpha + beta * sigma))  # no (D - kept) log alpha
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - log_det / 2
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
        alphas.append(alpha)
    return _OfficialLogME(float(np.mean(evidences)), np.array(alphas), len(sigma))


# Both iterations run to their fixed point: only the evidence formula differs.
CONVERGED = {"tolerance": 1e-12, "max_iterations": 5000}


def mislabelled(rng, n, d, flips=3, noise=0.1, classes=3):
    """Features of the true classes, labels with ``flips`` of them changed.

    The flipped labels are what the features cannot explain, so even with D > N
    the evidence has an interior maximum (finite alpha and beta), which both
    iterations reach; without them beta grows without bound (interpolation).
    """
    true = np.arange(n) % classes
    features = np.eye(classes)[true] @ rng.normal(size=(classes, d))
    features += noise * rng.normal(size=(n, d))
    labels = true.copy()
    flipped = rng.choice(n, flips, replace=False)
    labels[flipped] = (labels[flipped] + 1) % classes
    return features, labels


@pytest.mark.parametrize("n, d", [(200, 12), (60, 40)])
def test_logme_equals_the_official_code_when_examples_outnumber_dims(n, d):
    rng = np.random.default_rng(d)
    features = rng.normal(size=(n, d))
    scores = features @ rng.normal(size=(d, 3)) + rng.normal(size=(n, 3))
    labels = np.argmax(scores, axis=1)
    official = _official_logme(features, labels, **CONVERGED, epsilon=0.0)
    assert official.kept == d  # full rank: no zero eigenvalue to leave out
    ours = estimators.logme(features, labels, **CONVERGED)
    assert ours == pytest.approx(official.score, rel=1e-9, abs=1e-9)
    # The authors' looser stopping rule (and epsilon) matter little here.
    assert estimators.logme(features, labels) == pytest.approx(
        _official_logme(features, labels).score, abs=1e-3
    )


@pytest.mark.parametrize("n, d", [(24, 60), (18, 50), (30, 400)])
def test_official_logme_adds_the_zero_eigenvalues_term_when_dims_exceed_examples(n, d):
    # Official - ours = mean over classes of (D - kept)/2 log(alpha_c) / N, kept
    # = N: the official log-determinant misses (D - N) log alpha, halved, at the
    # same maximising alpha (the fixed point does not involve the term).
    rng = np.random.default_rng(n)
    features, labels = mislabelled(rng, n, d)
    details = estimators.logme_details(features, labels, **CONVERGED)
    assert all(details.converged) and max(details.beta) < 1e3  # interior maxima
    official = _official_logme(features, labels, **CONVERGED, epsilon=0.0)
    assert official.kept == n
    np.testing.assert_allclose(official.alpha, details.alpha, rtol=1e-4)
    dropped = np.mean((d - n) / 2 * np.log(official.alpha) / n)
    assert dropped > 1  # nats per example: not a rounding-level difference
    assert official.score - details.score == pytest.approx(dropped, abs=1e-8)
    # From our alphas (stopped when the evidence, flat at its maximum, moved by
    # 1e-12, so alpha is within ~1e-6): what docs/fine_tuning.md's snippet does.
    from_ours = np.mean((d - n) / 2 * np.log(details.alpha) / n)
    assert official.score - details.score == pytest.approx(from_ours, rel=1e-6)


def test_official_logme_ranks_candidates_differently_when_dims_exceed_examples():
    # Two candidate feature sets for the same 30 labelled examples: a wide one
    # (D = 100 > N) that separates the classes well but whose values are small,
    # like the activations of a weakly firing layer, and a narrow, noisier one
    # (D = 8 < N). Scaling F by s is w -> w / s with prior precision alpha s²:
    # the maximised evidence is unchanged, but the official score, which misses
    # (D - N)/2 log(alpha) / N, moves by (D - N) log(s) / N.
    rng = np.random.default_rng(0)
    n = 30
    wide, labels = mislabelled(rng, n, 100)
    small = 0.01 * wide
    narrow = np.eye(3)[np.arange(n) % 3] @ rng.normal(size=(3, 8))
    narrow += rng.normal(size=(n, 8))
    ours = {
        "small": estimators.logme(small, labels),
        "narrow": estimators.logme(narrow, labels),
    }
    official = {  # the authors' settings: what their code reports
        "small": _official_logme(small, labels).score,
        "narrow": _official_logme(narrow, labels).score,
    }
    assert ours["small"] > ours["narrow"] + 0.3  # ours: the wide features first
    assert official["narrow"] == pytest.approx(ours["narrow"], abs=1e-4)  # N > D
    assert official["small"] < official["narrow"] - 3  # official: narrow first
    # The scale is all that moved the official score.
    assert estimators.logme(wide, labels) == pytest.approx(ours["small"], abs=1e-6)
    shift = (100 - n) * math.log(0.01) / n
    assert _official_logme(small, labels, **CONVERGED, epsilon=0.0).score == (
        pytest.approx(
            _official_logme(wide, labels, **CONVERGED, epsilon=0.0).score + shift,
            abs=1e-5,
        )
    )


# ------------------------------------------------------------------------ H-score


def separated(rng, classes=4, dims=6, per_class=50, noise=1e-3):
    """Class means on orthogonal axes, tiny within-class noise."""
    labels = np.repeat(np.arange(classes), per_class)
    features = 3 * np.eye(dims)[labels] + noise * rng.normal(size=(len(labels), dims))
    return features, labels


def test_h_score_reaches_its_bound_for_perfectly_separated_classes():
    rng = np.random.default_rng(0)
    features, labels = separated(rng)
    # Bound: min(C - 1, D) = 3, reached when nothing varies within a class.
    assert estimators.h_score(features, labels, shrinkage=0) == pytest.approx(
        3, abs=1e-4
    )
    regularised = estimators.h_score(features, labels)
    noisy = separated(rng, noise=0.5)[0]
    random = rng.normal(size=features.shape)
    others = [
        estimators.h_score(f, labels, shrinkage=s)
        for f in (noisy, random)
        for s in (0, "ledoit_wolf")
    ]
    assert 2.9 < regularised <= 3 and max(others) < regularised


def test_h_score_stays_within_its_bound():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        n, d = rng.integers(20, 60), rng.integers(2, 80)
        labels = rng.integers(0, 5, n)
        features = rng.normal(size=(n, d)) + 0.5 * labels[:, None]
        bound = min(len(np.unique(labels)) - 1, d)
        for shrinkage in (0, 0.3, "ledoit_wolf"):
            value = estimators.h_score(features, labels, shrinkage=shrinkage)
            assert -1e-9 <= value <= bound + 1e-9
        assert estimators.h_score(features, labels, shrinkage=1.0) == 0


@pytest.mark.parametrize("n, d", [(80, 10), (25, 60)])
def test_h_score_equals_the_textbook_formula(n, d):
    rng = np.random.default_rng(d)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, d)) * rng.uniform(0.2, 3, d) + labels[:, None]
    centred = features - features.mean(axis=0)
    means = np.zeros_like(centred)
    for c in np.unique(labels):
        means[labels == c] = centred[labels == c].mean(axis=0)
    cov_f, cov_g = centred.T @ centred / n, means.T @ means / n
    raw = np.trace(np.linalg.pinv(cov_f, rcond=1e-10) @ cov_g)
    assert estimators.h_score(features, labels, shrinkage=0) == pytest.approx(raw)
    shrunk, a = covariance.ledoit_wolf(features)
    assert estimators.ledoit_wolf_shrinkage(features) == pytest.approx(a)
    regularised = np.trace(np.linalg.solve(shrunk, (1 - a) * cov_g))
    assert estimators.h_score(features, labels) == pytest.approx(regularised)


# -------------------------------------------------------------- rank correlations


def test_rank_correlations_of_monotone_and_reversed_pairs():
    scores = [0.1, 0.5, 0.7, 2.0]
    measured = [0.30, 0.31, 0.50, 0.90]  # same order, different spacing
    same = estimators.rank_correlations(scores, measured)
    assert same["spearman"] == pytest.approx(1) and same["kendall"] == pytest.approx(1)
    assert same["candidates"] == 4 and 0 <= same["spearman_p"] <= 1
    reversed_ = estimators.rank_correlations(scores, measured[::-1])
    assert reversed_["spearman"] == pytest.approx(-1)
    assert reversed_["kendall"] == pytest.approx(-1)


@pytest.mark.parametrize(
    "scores, measured, match",
    [
        ([1, 2], [1, 2], "at least 3 candidates"),
        ([1, 2, 3], [1, 2], "scores has 3 candidates but measured has 2"),
        ([1, 2, np.nan], [1, 2, 3], "scores contains NaN"),
        ([1, 2, 3], [5, 5, 5], "measured is constant"),
    ],
)
def test_rank_correlations_fail_clearly(scores, measured, match):
    with pytest.raises(ValueError, match=match):
        estimators.rank_correlations(scores, measured)


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: estimators.leep([[0.5, 0.6]], [0]), "source_probabilities.*sum to 1"),
        (lambda: estimators.leep([[2.0, -1.0]], [0]), "negative.*not logits"),
        (lambda: estimators.leep([[0.5, 0.5]], [0, 1]), "labels has 2 entries"),
        (lambda: estimators.leep([[np.nan, 1.0]], [0]), "source_probabilities.*NaN"),
        (lambda: estimators.leep([0.5, 0.5], [0]), "source_probabilities must be 2-D"),
        (lambda: estimators.nce([0, -1], [0, 1]), "source_labels must be class ids"),
        (lambda: estimators.nce([0, 1], [0, 1.5]), "labels must be integer"),
        (lambda: estimators.nce([0, 1], [[0, 1]]), "labels must be 1-D"),
        (lambda: estimators.logme([[1.0], [np.inf]], [0, 1]), "features.*infinite"),
        (lambda: estimators.logme([[1.0], [2.0]], [0, 0]), "single class"),
        (lambda: estimators.logme([[0.0], [0.0]], [0, 1]), "all zero"),
        (lambda: estimators.h_score([[1.0], [2.0]], [0, 1], shrinkage=2), "in \\[0"),
        (lambda: estimators.h_score([[1.0], [2.0]], [0, 1], "oas"), "shrinkage='oas'"),
        (lambda: estimators.h_score([[1.0], [1.0]], [0, 1]), "features are constant"),
        (lambda: estimators.estimator("leap"), "unknown estimator 'leap'.*'leep'"),
    ],
)
def test_bad_inputs_fail_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_names_each_estimator_and_its_input():
    assert sorted(estimators.ESTIMATORS) == ["h_score", "leep", "logme", "nce"]
    assert estimators.estimator("logme").takes == "features"
    assert estimators.estimator("leep").function is estimators.leep
