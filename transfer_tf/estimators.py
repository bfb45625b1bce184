"""Transferability estimators: how well will a source net transfer, before training?

Each estimator is a plain function of NumPy arrays computed on the *target* task's
training examples passed through the *source* net, so that many candidate sources
(or cut layers) can be ranked in seconds instead of fine-tuning each:

- :func:`leep` (Nguyen et al. 2020, "LEEP: A New Measure to Evaluate
  Transferability of Learned Representations") takes the source's softmax outputs.
- :func:`nce` (Tran et al. 2019, "Transferability and Hardness of Supervised
  Classification Tasks") takes the source's hard predicted labels.
- :func:`logme` (You et al. 2021, "LogME: Practical Assessment of Pre-trained
  Models for Transfer Learning") and :func:`h_score` (Bao et al. 2019, "An
  Information-theoretic Approach to Transferability in Task Transfer Learning";
  regularised by Ibrahim et al. 2022, "Newer is not always better: Rethinking
  transferability metrics, their peculiarities, stability and performance") take
  features, e.g. from ``features.extract_features``.

Higher is better for all four. :func:`rank_correlations` says how well an
estimator's ranking of candidates agrees with the accuracies measured after
training them (Spearman's rho and Kendall's tau, as in the papers). The names and
the kind of input of each estimator are in :data:`ESTIMATORS`.

Inputs are validated (shapes, label ranges, probabilities, NaN) with errors that name
the argument. All arithmetic is in float64.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
from scipy import stats

# A softmax computed in float32 sums to 1 within a few ulps per class; 1e-3 also
# admits bfloat16 outputs but rejects logits and unnormalised scores.
PROBABILITY_TOLERANCE = 1e-3
LOGME_MAX_ITERATIONS = 1000
LOGME_TOLERANCE = 1e-6
SHRINKAGES = ("ledoit_wolf",)


# --------------------------------------------------------------------- validation


def _labels(labels, name="labels", length=None) -> np.ndarray:
    """Non-negative integer class ids as a 1-D int64 array."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(
            f"{name} has {len(array)} entries but there are {length} examples"
        )
    if len(array) == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if not np.all(array == np.round(array)):
            raise ValueError(f"{name} must be integer class ids, got fractions")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{name} must be integer class ids, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.min() < 0:
        raise ValueError(f"{name} must be class ids >= 0, got {array.min()}")
    return array


def _matrix(values, name, min_rows=1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (examples, dims), got shape {array.shape}"
        )
    if array.shape[0] < min_rows or array.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least {min_rows} examples and 1 dimension, got shape "
            f"{array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _probabilities(values, name="source_probabilities") -> np.ndarray:
    array = _matrix(values, name)
    if array.min() < 0:
        raise ValueError(
            f"{name} has negative entries ({array.min():.3g}); pass softmax "
            "probabilities, not logits"
        )
    worst = float(np.max(np.abs(array.sum(axis=1) - 1.0)))
    if worst > PROBABILITY_TOLERANCE:
        raise ValueError(
            f"rows of {name} must sum to 1 (within {PROBABILITY_TOLERANCE}), one is "
            f"off by {worst:.3g}; pass softmax probabilities, not logits"
        )
    return array


def _at_least_two_classes(labels, name="labels"):
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{name} has a single class; an estimator needs at least 2")


def _entropy_term(p) -> np.ndarray:
    """p log p with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _gram(x) -> np.ndarray:
    """The smaller of ``x xᵀ`` (N x N) and ``xᵀ x`` (D x D); both have the squared
    singular values of ``x`` as their non-zero eigenvalues."""
    return x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x


def _spectrum(x, gram) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors (N x k) and squared singular values (k,) of ``x``.

    From the eigendecomposition of the smaller Gram matrix: O(N D min(N, D)) for
    the product and O(min(N, D)³) for the decomposition, a few times faster than
    an SVD. Eigenvalues at or below ``max(N, D) * eps`` times the largest are at
    the Gram matrix's rounding level and are treated as zero, so ``k`` is the
    numerical rank.
    """
    sigma, vectors = np.linalg.eigh(gram)
    keep = sigma > sigma.max() * max(x.shape) * np.finfo(np.float64).eps
    sigma, vectors = sigma[keep], vectors[:, keep]
    if x.shape[0] > x.shape[1]:
        vectors = x @ vectors / np.sqrt(sigma)  # u = x v / s
    return vectors, sigma


# -------------------------------------------------------------------- LEEP and NCE


def leep(source_probabilities, labels) -> float:
    """Log Expected Empirical Prediction (Nguyen et al. 2020).

    With ``θ(x_i)`` the source's softmax over its classes ``z`` for target example
    ``i`` and ``y_i`` its target label, the empirical joint distribution is
    ``P(y, z) = 1/N Σ_{i: y_i = y} θ(x_i)_z``, the conditional
    ``P(y | z) = P(y, z) / Σ_y' P(y', z)``, and

        LEEP = 1/N Σ_i log Σ_z P(y_i | z) θ(x_i)_z.

    It is the mean log-likelihood of the "expected empirical predictor", which
    re-labels the source's predictions through ``P(y | z)``: at most 0, which a
    source whose predictions determine the target labels reaches, and ``-H(Y)``
    (the empirical label entropy) for a source whose outputs do not depend on the
    example. A source class that no example puts mass on gets ``P(y | z) = 0``.

    Args:
      source_probabilities: (N, source classes) softmax outputs, rows summing to 1.
      labels: (N,) target class ids.

    Returns:
      LEEP, a float <= 0 (in nats).
    """
    theta = _probabilities(source_probabilities)
    y = _labels(labels, length=len(theta))
    num_target = int(y.max()) + 1
    joint = np.zeros((num_target, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)
    marginal = joint.sum(axis=0)
    conditional = np.divide(
        joint, marginal, out=np.zeros_like(joint), where=marginal > 0
    )
    expected = np.sum(conditional[y] * theta, axis=1)
    # A probability of the true label of 0 can only come from rounding (every
    # label's own example contributes to P(y|z)); it would make LEEP -inf.
    expected = np.maximum(expected, np.finfo(np.float64).tiny)
    return float(np.mean(np.log(expected)))


def nce(source_labels, labels) -> float:
    """Negative Conditional Entropy (Tran et al. 2019): ``-H(Y | Z)``.

    ``Z`` is the source's hard prediction (its argmax) for each target example and
    ``Y`` the target label; with the empirical joint ``P(y, z)``,

        NCE = Σ_{y,z} P(y, z) log P(y | z)   (nats).

    It is 0 when the source's predictions determine the target labels and
    ``-H(Y)`` when they are independent of them (empirically).

    Args:
      source_labels: (N,) the source's predicted class ids (e.g.
        ``argmax(source_probabilities, axis=1)``).
      labels: (N,) target class ids.

    Returns:
      NCE, a float <= 0.
    """
    z = _labels(source_labels, "source_labels")
    y = _labels(labels, length=len(z))
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(y)
    marginal = joint.sum(axis=0)
    return float(np.sum(_entropy_term(joint)) - np.sum(_entropy_term(marginal)))


def entropy(labels) -> float:
    """Empirical entropy H(Y) of class ids, in nats (the floor of LEEP and NCE)."""
    y = _labels(labels)
    p = np.bincount(y) / len(y)
    return float(-np.sum(_entropy_term(p)))


# -------------------------------------------------------------------------- LogME


@dataclasses.dataclass(frozen=True)
class LogMEDetails:
    """LogME with what the evidence maximisation did, per target class.

    Attributes:
      score: mean over classes of the maximised log evidence per example.
      classes: the target classes, in the order of the tuples below.
      evidence: per class, the maximised log evidence divided by N.
      alpha, beta: per class, the maximising prior precision of the weights and
        noise precision.
      iterations: per class, fixed-point iterations run.
      converged: per class, whether the iteration met the tolerance (see
        :func:`logme_details`) before ``max_iterations``.
    """

    score: float
    classes: tuple[int, ...]
    evidence: tuple[float, ...]
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    iterations: tuple[int, ...]
    converged: tuple[bool, ...]


def _logme_terms(sigma, x2, residual_outside, ratio):
    """||m||² and ||F m - t||² of the posterior mean at ``ratio = alpha / beta``."""
    shrink = sigma + ratio
    m2 = float(np.sum(sigma * x2 / shrink**2))
    res2 = float(np.sum(x2 * (ratio / shrink) ** 2) + residual_outside)
    return m2, res2


def _log_evidence(n, d, sigma, alpha, beta, m2, res2) -> float:
    # log|A| with A = alpha I + beta FᵀF: the k non-zero eigenvalues of FᵀF and
    # D - k zero ones (when D > N, or F is rank-deficient) contributing log(alpha).
    log_det = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
    return float(
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - log_det / 2
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )


def logme_details(
    features,
    labels,
    max_iterations: int = LOGME_MAX_ITERATIONS,
    tolerance: float = LOGME_TOLERANCE,
) -> LogMEDetails:
    """LogME (You et al. 2021) and the convergence of its fixed-point iteration.

    For each target class c, the one-hot column ``t = [y_i == c]`` is modelled by
    Bayesian linear regression on the features ``F`` (N x D):
    ``t = F w + noise``, ``w ~ N(0, alpha^-1 I)``, ``noise ~ N(0, beta^-1)``. Its
    log evidence is

        log p(t | F, alpha, beta) = D/2 log alpha + N/2 log beta - N/2 log 2π
            - 1/2 log|A| - beta/2 ||F m - t||² - alpha/2 ||m||²,

    with ``A = alpha I + beta FᵀF`` and ``m = beta A⁻¹ Fᵀ t``. It is maximised over
    alpha and beta by the paper's fixed point (MacKay's): with ``σ_j²`` the squared
    singular values of F (the eigenvalues of FᵀF) and
    ``gamma = Σ_j beta σ_j² / (alpha + beta σ_j²)``, repeat
    ``alpha <- gamma / ||m||²`` and ``beta <- (N - gamma) / ||F m - t||²``, starting
    from ``alpha = beta = 1``. One singular value decomposition of F (see
    :func:`_spectrum`), shared by all classes, makes each iteration O(min(N, D))
    and the whole O(N D min(N, D) + min(N, D)³). The score is the
    maximised evidence divided by N, averaged over the classes present in
    ``labels``. (The authors' later code leaves out the ``(D - N)/2 log alpha`` of
    the zero eigenvalues of FᵀF when D > N; it is included here, so the two
    scores, and their rankings, differ then: see "LogME here vs the official
    code" in docs/fine_tuning.md.)

    The features are used as they are (the paper does not standardise them).

    Args:
      features: (N, D) features of the target examples.
      labels: (N,) target class ids; at least two classes.
      max_iterations: cap on the fixed-point iterations per class.
      tolerance: stop when ``alpha / beta`` changes by at most this, relative
        (an interior maximum; the authors' code uses 1e-3 and at most 11
        iterations), or the evidence per example by at most this, in nats. The
        second covers features that do not explain a class at all: there the
        evidence keeps rising towards its limit as ``alpha -> inf`` (no weights,
        all noise) and ``alpha / beta`` grows geometrically without converging.

    Returns:
      A LogMEDetails; ``.score`` is LogME.
    """
    f = _matrix(features, "features", min_rows=2)
    y = _labels(labels, length=len(f))
    _at_least_two_classes(y)
    if max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations!r} must be at least 1")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be positive")
    n, d = f.shape
    if not np.any(f):
        raise ValueError("features are all zero")
    u, sigma = _spectrum(f, _gram(f))
    tiny = np.finfo(np.float64).tiny
    classes = np.unique(y)
    rows = []
    for c in classes:
        t = (y == c).astype(np.float64)
        x2 = (u.T @ t) ** 2
        residual_outside = max(float(t @ t - x2.sum()), 0.0)  # t outside F's range
        alpha, beta = 1.0, 1.0
        evidence, converged, iteration = -np.inf, False, 0
        while iteration < max_iterations and not converged:
            iteration += 1
            ratio = alpha / beta
            gamma = float(np.sum(sigma / (sigma + ratio)))
            m2, res2 = _logme_terms(sigma, x2, residual_outside, ratio)
            alpha = gamma / max(m2, tiny)
            beta = max(n - gamma, tiny) / max(res2, tiny)
            m2, res2 = _logme_terms(sigma, x2, residual_outside, alpha / beta)
            previous = evidence
            evidence = _log_evidence(n, d, sigma, alpha, beta, m2, res2) / n
            converged = (
                abs(alpha / beta - ratio) <= tolerance * ratio
                or abs(evidence - previous) <= tolerance
            )
        rows.append((evidence, alpha, beta, iteration, converged))
    evidence, alphas, betas, iterations, converged = zip(*rows, strict=True)
    return LogMEDetails(
        score=float(np.mean(evidence)),
        classes=tuple(int(c) for c in classes),
        evidence=tuple(float(e) for e in evidence),
        alpha=tuple(float(a) for a in alphas),
        beta=tuple(float(b) for b in betas),
        iterations=tuple(int(i) for i in iterations),
        converged=tuple(bool(c) for c in converged),
    )


def logme(features, labels, **kwargs) -> float:
    """LogME (You et al. 2021): see :func:`logme_details`, which also reports
    the convergence of the evidence maximisation.

    Returns:
      The mean over target classes of the maximised log evidence per example.
    """
    return logme_details(features, labels, **kwargs).score


# ------------------------------------------------------------------------ H-score


def ledoit_wolf_shrinkage(features) -> float:
    """Ledoit & Wolf's (2004) shrinkage coefficient of the features' covariance.

    The same number as ``sklearn.covariance.ledoit_wolf_shrinkage`` (features
    centred), computed from whichever Gram matrix is smaller, N x N or D x D, so
    that it costs O(N D min(N, D)) for high-dimensional features.
    """
    x = _matrix(features, "features", min_rows=2)
    x = x - x.mean(axis=0)
    return _ledoit_wolf(x, _gram(x))


def _ledoit_wolf(x, gram) -> float:
    n, d = x.shape
    trace = float(np.trace(gram)) / n  # tr S, S = xᵀx / N
    mu = trace / d
    squared_norm = float(np.sum(gram * gram)) / n**2  # ||S||_F²
    fourth = float(np.sum(np.sum(x * x, axis=1) ** 2))  # Σ_i ||x_i||⁴
    beta = (fourth / n - squared_norm) / (d * n)
    delta = (squared_norm - 2 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else beta / delta


def h_score(features, labels, shrinkage="ledoit_wolf") -> float:
    """H-score (Bao et al. 2019), by default regularised (Ibrahim et al. 2022).

    With ``cov(f)`` the features' covariance and ``cov(E[f|y])`` the covariance of
    the class-conditional means (each example replaced by its class's mean feature
    vector), both normalised by N,

        H = tr(cov(f)⁺ cov(E[f|y])).

    Since ``cov(f) = cov(E[f|y]) + E[cov(f|y)]`` (law of total covariance), every
    eigenvalue of ``cov(f)^-1/2 cov(E[f|y]) cov(f)^-1/2`` is in [0, 1] and
    ``cov(E[f|y])`` has rank at most C - 1 for C classes, so
    ``0 <= H <= min(C - 1, D)``; the bound is reached when the features do not vary
    within classes. The raw covariance of high-dimensional features is singular
    (rank < N) and its small eigenvalues are noise that H-score divides by, so
    Ibrahim et al. shrink it:
    ``cov_a(f) = (1 - a) cov(f) + a (tr cov(f) / D) I`` and
    ``H_a = tr(cov_a(f)⁻¹ (1 - a) cov(E[f|y]))``, which obeys the same bound and
    is below it for ``a > 0``. (Their code normalises the two covariances by N and
    N - 1, which inflates H_a by N / (N - 1); both use N here.)

    The class means are combinations of the examples, so everything is computed
    in the space of the smaller of N and D (one eigendecomposition of a Gram
    matrix, as in :func:`logme_details`).

    Args:
      features: (N, D) features of the target examples.
      labels: (N,) target class ids; at least two classes.
      shrinkage: ``"ledoit_wolf"`` (default): ``a`` is Ledoit & Wolf's estimate
        (:func:`ledoit_wolf_shrinkage`), as in Ibrahim et al. A float in [0, 1]
        fixes ``a``; ``0`` (or ``None``) is Bao et al.'s original H-score with the
        pseudo-inverse (eigenvalues at or below ``max(N, D) * eps`` times the
        largest are treated as zero).

    Returns:
      The (regularised) H-score, a float in [0, min(C - 1, D)].
    """
    x = _matrix(features, "features", min_rows=2)
    y = _labels(labels, length=len(x))
    _at_least_two_classes(y)
    if shrinkage is None:
        shrinkage = 0.0
    if isinstance(shrinkage, str) and shrinkage not in SHRINKAGES:
        raise ValueError(
            f"shrinkage={shrinkage!r} is not one of {list(SHRINKAGES)} or a number "
            "in [0, 1]"
        )
    if not isinstance(shrinkage, str) and not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage={shrinkage!r} must be in [0, 1]")
    n, d = x.shape
    x = x - x.mean(axis=0)
    if not np.any(x):
        raise ValueError("features are constant: their covariance is zero")
    gram = _gram(x)
    a = _ledoit_wolf(x, gram) if isinstance(shrinkage, str) else float(shrinkage)
    if a == 1.0:
        return 0.0
    # cov(E[f|y]) = xᵀ M Mᵀ x with M[i, c] = [y_i = c] / sqrt(n_c N), and with
    # x = U diag(s) Vᵀ, cov_a(f)⁻¹ = V diag(1 / ((1 - a) s² / N + a mu)) Vᵀ + (the
    # complement of V, which x never reaches). Hence
    # H_a = (1 - a) Σ_j s_j² ||u_jᵀ M||² / ((1 - a) s_j² / N + a mu).
    u, sigma = _spectrum(x, gram)
    classes, index, counts = np.unique(y, return_inverse=True, return_counts=True)
    m = np.zeros((n, len(classes)))
    m[np.arange(n), index] = 1.0 / np.sqrt(counts[index] * n)
    projected = np.sum((u.T @ m) ** 2, axis=1)
    mu = float(np.trace(gram)) / (n * d)
    return float((1 - a) * np.sum(sigma * projected / ((1 - a) * sigma / n + a * mu)))


# ----------------------------------------------------------- agreement with training


def rank_correlations(scores, measured) -> dict:
    """How well an estimator's scores rank candidates by their measured accuracy.

    Args:
      scores: an estimator's score per candidate (source net, layer, ...).
      measured: the same candidates' accuracy (or any quality) after training.

    Returns:
      ``{"spearman": rho, "spearman_p": p, "kendall": tau, "kendall_p": p,
      "candidates": n}`` from ``scipy.stats.spearmanr`` and ``kendalltau``
      (tau-b, which handles ties; two-sided p-values).

    Raises:
      ValueError: lengths differ, fewer than 3 candidates, NaN, or constant input
        (a correlation with a constant is undefined).
    """
    values = {}
    for name, array in (("scores", scores), ("measured", measured)):
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
        values[name] = array
    if len(values["scores"]) != len(values["measured"]):
        raise ValueError(
            f"scores has {len(values['scores'])} candidates but measured has "
            f"{len(values['measured'])}"
        )
    if len(values["scores"]) < 3:
        raise ValueError(
            f"rank correlations need at least 3 candidates, got {len(values['scores'])}"
        )
    for name, array in values.items():
        if np.all(array == array[0]):
            raise ValueError(f"{name} is constant: its rank correlation is undefined")
    spearman = stats.spearmanr(values["scores"], values["measured"])
    kendall = stats.kendalltau(values["scores"], values["measured"])
    return {
        "spearman": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
        "kendall": float(kendall.statistic),
        "kendall_p": float(kendall.pvalue),
        "candidates": len(values["scores"]),
    }


# ---------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An estimator and the input it takes from the source net."""

    function: Callable
    takes: str  # "probabilities", "predicted_labels" or "features"
    reference: str


ESTIMATORS = {
    "leep": Estimator(leep, "probabilities", "Nguyen et al. 2020"),
    "nce": Estimator(nce, "predicted_labels", "Tran et al. 2019"),
    "logme": Estimator(logme, "features", "You et al. 2021"),
    "h_score": Estimator(h_score, "features", "Bao et al. 2019; Ibrahim et al. 2022"),
}


def estimator(name: str) -> Estimator:
    """The estimator called ``name`` (see :data:`ESTIMATORS`)."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}"
        )
    return ESTIMATORS[name]


# The estimators that score a layer's features (LEEP and NCE score a source's
# own classifier outputs).
LAYER_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if e.takes == "features")


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score(name: str, layer: str, x, labels) -> dict:
    """One estimator on one layer's features (or a classifier's logits), timed:
    ``{layer, estimator, dim, score, seconds}`` (LogME also ``converged``); a
    score that cannot be computed (constant features) is None with the reason
    as ``error``."""
    chosen = estimator(name)
    started = time.perf_counter()
    entry = {"layer": layer, "estimator": name, "dim": int(x.shape[1])}
    try:
        if chosen.takes == "probabilities":
            entry["score"] = chosen.function(_softmax(x), labels)
        elif chosen.takes == "predicted_labels":
            entry["score"] = chosen.function(x.argmax(axis=1), labels)
        elif name == "logme":
            details = logme_details(x, labels)
            entry.update(score=details.score, converged=all(details.converged))
        else:
            entry["score"] = chosen.function(x, labels)
    except ValueError as e:
        entry.update(score=None, error=str(e))
    entry["seconds"] = time.perf_counter() - started
    return entry
