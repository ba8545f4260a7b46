"""Calibration of multi-label sigmoid outputs: temperature scaling, Platt scaling (a temperature
and a bias per label, for the label-free estimates of ``tools.drift``) and calibration metrics.

Inputs are numpy arrays: ``logits`` / ``probs`` of shape (N, L) and labels ``y`` of the same shape
holding 0/1, with NaN for an unknown label. Unknown (image, label) pairs are masked out of every
computation; the remaining pairs are the "known pairs". A metric that is undefined (no known pair,
one class only for an AUROC) is NaN from the float functions and ``None`` in the report dicts, so
that it is written to JSON as ``null``.

Definitions
-----------
Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks",
https://arxiv.org/abs/1706.04599): calibrated probability ``sigmoid(logit / T)`` with one T > 0,
shared by all labels or one per label, chosen to minimise the binary NLL on the known pairs of a
held-out split. Dividing by T > 0 is monotone, so rankings (AUROC) do not change.
T is found in log space within [0.01, 100]: the NLL is convex in 1/T (a one-feature logistic
regression without intercept), so a 41-point grid over log T followed by golden-section search
around the best grid point finds the minimum deterministically, with numpy only.

Reliability bins: ``n_bins`` (15) equal-width bins of [0, 1] with edges
``np.linspace(0, 1, n_bins + 1)``; bin i holds ``edges[i] <= p < edges[i + 1]``, and p = 1.0 goes
in the last bin.

ECE (expected calibration error), pooled over all known (image, label) pairs:
``sum over bins of (count_b / n) * |mean p in b - positive rate in b|``, with p the
positive-class probability.

Top-label ECE: the same binning applied to confidence ``max(p, 1 - p)`` against correctness
``(p >= 0.5) == y``. Confidence is binned on [0, 1], as in Guo et al. and the usual
multi-class implementation, so for binary decisions only the bins from 7/15 upwards can be
filled; the value is therefore comparable with top-label ECEs reported elsewhere.

NLL: mean binary cross-entropy over known pairs, probabilities clipped to [1e-7, 1 - 1e-7].
Brier score: mean of ``(p - y) ** 2`` over known pairs.
"""

import numpy as np

from tools.metrics import as_resamples, binary_metrics, sigmoid

N_BINS = 15
PROB_CLIP = 1e-7
# Search interval for T: wide enough for any sensible network, narrow enough to stay finite
# when the data are separable (the NLL then keeps falling as T -> 0).
T_MIN, T_MAX = 1e-2, 1e2


# ====== input handling ======

def _as_pairs(values, y, name="probs"):
    """Flatten ``values`` and ``y`` to 1-D arrays of the known pairs (``y`` not NaN).

    Raises ValueError when the shapes differ or a known pair has a non-finite value: that is a
    bug upstream, not something to average away.
    """
    values = np.asarray(values, dtype=float)
    y = np.asarray(y, dtype=float)
    if values.shape != y.shape:
        raise ValueError(f"{name} has shape {values.shape} but y has shape {y.shape}")
    known = ~np.isnan(y)
    v, t = values[known], y[known]
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} holds a non-finite value on a known (image, label) pair")
    return v, t


def _columns(a):
    """View a 1-D array as a single column so per-label code handles (N,) and (N, L) alike."""
    a = np.asarray(a, dtype=float)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def none_if_nan(x):
    """A Python float, or None for NaN (JSON ``null``)."""
    x = float(x)
    return None if np.isnan(x) else x


# ====== temperature scaling ======

def _nll_from_logits(z, t):
    """Mean binary NLL of ``sigmoid(z)`` for labels ``t``: ``softplus(z) - t * z``, exact in logits."""
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


def _fit_temperature_1d(z, t, n_grid=41, tol=1e-6):
    """T in [T_MIN, T_MAX] minimising the NLL of ``sigmoid(z / T)`` (1-D arrays of known pairs).

    As a function of 1/T the NLL is that of a one-feature logistic regression, hence convex, so
    in u = log T it has a single minimum (possibly at a bound). A coarse grid over log T picks the
    bracket around the best point, then golden-section search narrows it to ``tol`` in log T.
    Deterministic, bounded, and needs no starting value. Returns 1.0 when there is nothing to fit
    (no known pair, or all logits zero so T has no effect).
    """
    if z.size == 0 or not np.any(z):
        return 1.0

    def loss(u):
        return _nll_from_logits(z * np.exp(-u), t)

    grid = np.linspace(np.log(T_MIN), np.log(T_MAX), n_grid)
    losses = np.array([loss(u) for u in grid])
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, n_grid - 1)]

    inv_phi = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = loss(d)
    candidates = [(loss(u), u) for u in (a, b, 0.5 * (a + b))] + [(losses[best], grid[best])]
    return float(np.exp(min(candidates)[1]))


def fit_temperature(logits, y, per_label=False):
    """Temperature T > 0 minimising the binary NLL of ``sigmoid(logits / T)`` on the known pairs.

    One scalar T over all pairs pooled, or with ``per_label`` an array of one T per label (column);
    a label with no known pair gets 1.0. T is searched in log space within [0.01, 100]
    (Guo et al. 2017, https://arxiv.org/abs/1706.04599).
    """
    logits = np.asarray(logits, dtype=float)
    y = np.asarray(y, dtype=float)
    if not per_label:
        z, t = _as_pairs(logits, y, name="logits")
        return _fit_temperature_1d(z, t)
    logits, y = _columns(logits), _columns(y)
    if logits.shape != y.shape:
        raise ValueError(f"logits has shape {logits.shape} but y has shape {y.shape}")
    return np.array([_fit_temperature_1d(*_as_pairs(logits[:, j], y[:, j], name="logits"))
                     for j in range(logits.shape[1])])


def apply_temperature(logits, T):
    """Scaled logits ``logits / T``; an array T (one per label) broadcasts over the last axis."""
    T = np.asarray(T, dtype=float)
    if np.any(~(T > 0)):
        raise ValueError(f"temperature must be positive, got {T}")
    return np.asarray(logits, dtype=float) / T


# ====== Platt scaling: a temperature and a bias per label ======

def logistic_fit(x, y, c: float = 1.0, weights=None, iters: int = 100) -> np.ndarray:
    """Coefficients (d + 1, B), intercept last, of one L2-penalised logistic regression per column
    of ``y`` (n, B; 0/1) on ``x`` (n, d), each minimising ``c * sum of weighted log-losses +
    |w|^2 / 2`` with the intercept unpenalised (scikit-learn's ``LogisticRegression(C=c)``);
    ``weights`` (n, B): each row's weight in each fit (bootstrap multiplicities; default 1).
    Newton's method on every column at once, so a test's permutations or a bootstrap's resamples
    cost about one fit."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    pairs = (a[:, :, None] * a[:, None, :]).reshape(n, -1)  # the Hessian is a weighted sum of these
    penalty = np.diag(np.r_[np.ones(d), 0.0]) / c
    w = np.ones(y.shape) if weights is None else np.asarray(weights, float)
    beta = np.zeros((d + 1, y.shape[1]))
    for _ in range(iters):
        p = sigmoid(a @ beta)
        grad = a.T @ (w * (y - p)) - penalty @ beta
        hess = ((w * p * (1 - p)).T @ pairs).reshape(-1, d + 1, d + 1) + penalty
        step = np.linalg.solve(hess, grad.T[..., None])[..., 0].T
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return beta


PLATT_C = 1e6  # practically no penalty: two parameters per label need none


def fit_platt(logits, y, weights=None) -> np.ndarray:
    """Platt scaling per label: (slope, bias) with ``sigmoid(slope * logit + bias)`` the calibrated
    probability, fitted by maximum likelihood on the label's known rows (Platt 1999; temperature
    scaling is the slope alone, T = 1 / slope, which cannot undo a shift of every logit, such as
    the log(n_neg / n_pos) a pos_weight-trained model carries). Shape (L, 2); with ``weights``
    (bootstrap resamples: :class:`tools.metrics.Resamples` or multiplicities (B, N)) one fit per
    resample, (B, L, 2). A label with one class or none known gets (1, 0): left as it is."""
    logits, y = _columns(logits), _columns(y)
    res = None if weights is None else as_resamples(weights, len(logits))
    boot = 1 if res is None else res.n_boot
    out = np.tile([1.0, 0.0], (boot, logits.shape[1], 1))
    for j in range(logits.shape[1]):
        known = ~np.isnan(y[:, j])
        t = y[known, j]
        if len(np.unique(t)) < 2:
            continue
        w = None if res is None else res.rows(known).weights().T
        target = np.broadcast_to(t[:, None], (len(t), boot))
        beta = logistic_fit(logits[known, j][:, None], target, PLATT_C, w)
        out[:, j] = beta.T
    return out[0] if res is None else out


def apply_platt(logits, params) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(slope * logits + bias)``; ``params`` (L, 2) from
    :func:`fit_platt` broadcasts over the rows."""
    params = np.asarray(params, float)
    return sigmoid(np.asarray(logits, float) * params[..., 0] + params[..., 1])


# ====== calibration metrics ======

def bin_index(p, n_bins=N_BINS):
    """Reliability bin of each probability: bin i holds ``edges[i] <= p < edges[i + 1]`` with
    ``edges = linspace(0, 1, n_bins + 1)``; p = 1.0 goes in the last bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


def reliability_bins(probs, y, n_bins=N_BINS):
    """Equal-width reliability bins of the positive-class probability over the known pairs.

    Returns a dict of arrays: ``edges`` (n_bins + 1), ``count`` (pairs per bin), ``mean_pred``
    (mean probability per bin) and ``frac_pos`` (mean label, i.e. observed positive rate, per bin);
    both means are NaN for an empty bin. Bin i holds ``edges[i] <= p < edges[i + 1]``; p = 1.0 goes
    in the last bin. Probabilities outside [0, 1] raise ValueError.
    """
    p, t = _as_pairs(probs, y)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    edges, idx = bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=t, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_pred": mean_pred, "frac_pos": frac_pos}


def _ece_from_bins(bins):
    """ECE from a ``reliability_bins`` dict: mass-weighted mean |mean_pred - frac_pos|."""
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    filled = bins["count"] > 0
    gaps = np.abs(bins["mean_pred"][filled] - bins["frac_pos"][filled])
    return float(np.sum(bins["count"][filled] / n * gaps))


def ece(probs, y, n_bins=N_BINS):
    """Expected calibration error of the positive-class probability, pooled over known pairs.

    ``sum_b (n_b / n) * |mean p in b - positive rate in b|`` over ``n_bins`` equal-width bins of
    [0, 1] (see ``reliability_bins``); NaN with no known pair.
    """
    return _ece_from_bins(reliability_bins(probs, y, n_bins))


def decision_correct(probs, y):
    """Correctness of the decision at 0.5: 1.0 where ``(p >= 0.5) == y``, 0.0 where not, NaN where y is."""
    probs = np.asarray(probs, dtype=float)
    y = np.asarray(y, dtype=float)
    correct = ((probs >= 0.5) == (y == 1)).astype(float)
    return np.where(np.isnan(y), np.nan, correct)


def ece_toplabel(probs, y, n_bins=N_BINS):
    """Top-label ECE: confidence ``max(p, 1 - p)`` against accuracy of the decision at 0.5.

    ``sum_b (n_b / n) * |mean confidence in b - accuracy in b|`` over ``n_bins`` equal-width bins
    of confidence on [0, 1] (Guo et al. 2017), pooled over known pairs; NaN with no known pair.
    """
    probs = np.asarray(probs, dtype=float)
    confidence = np.maximum(probs, 1.0 - probs)
    return _ece_from_bins(reliability_bins(confidence, decision_correct(probs, y), n_bins))


def nll(probs, y):
    """Mean binary cross-entropy over known pairs, p clipped to [1e-7, 1 - 1e-7]; NaN if none."""
    p, t = _as_pairs(probs, y)
    if p.size == 0:
        return float("nan")
    p = np.clip(p, PROB_CLIP, 1.0 - PROB_CLIP)
    return float(-np.mean(t * np.log(p) + (1.0 - t) * np.log1p(-p)))


def brier(probs, y):
    """Brier score: mean of ``(p - y) ** 2`` over known pairs; NaN if none."""
    p, t = _as_pairs(probs, y)
    if p.size == 0:
        return float("nan")
    return float(np.mean((p - t) ** 2))


def _auroc(scores, targets):
    """ROC AUC of 1-D ``scores`` for binary ``targets`` (the metrics module's); NaN unless both classes occur."""
    return binary_metrics(targets, scores)["auroc"]


def auroc(probs, y):
    """Micro AUROC: ROC AUC over all known pairs pooled; NaN if undefined."""
    return _auroc(*_as_pairs(probs, y))


def calibration_report(probs, y, labels):
    """Pooled and per-label calibration metrics of ``probs`` (N, L) against ``y`` (N, L).

    Returns ``{"ece", "ece_toplabel", "nll", "brier", "auroc", "per_class": {label: {"ece",
    "nll", "brier", "auroc"}}}``, pooled values over all known pairs (AUROC is micro), floats or
    None where undefined.
    """
    probs, y = _columns(probs), _columns(y)
    if probs.shape != y.shape:
        raise ValueError(f"probs has shape {probs.shape} but y has shape {y.shape}")
    labels = list(labels)
    if len(labels) != probs.shape[1]:
        raise ValueError(f"{len(labels)} labels given for {probs.shape[1]} probability columns")

    def metrics(p, t):
        return {"ece": ece(p, t), "nll": nll(p, t), "brier": brier(p, t), "auroc": auroc(p, t)}

    report = {k: none_if_nan(v) for k, v in metrics(probs, y).items()}
    report["ece_toplabel"] = none_if_nan(ece_toplabel(probs, y))
    report["per_class"] = {
        label: {k: none_if_nan(v) for k, v in metrics(probs[:, j], y[:, j]).items()}
        for j, label in enumerate(labels)}
    return report


def error_detection_auroc(spread, probs, y):
    """AUROC of ``spread`` (e.g. predictive std) for detecting a wrong decision at 0.5.

    Over the known pairs, the positive class is ``(p >= 0.5) != y``; higher spread should mean
    more likely wrong, so 0.5 is chance and 1.0 perfect. None when undefined (no error or no
    correct decision).
    """
    s, _ = _as_pairs(spread, y, name="spread")
    p, t = _as_pairs(probs, y)
    wrong = 1.0 - decision_correct(p, t)
    return none_if_nan(_auroc(s, wrong))


# ====== intervals ======

def calibration_resamples(probs, y, weights, n_bins=N_BINS) -> dict:
    """ECE, NLL and Brier score of ``probs`` on each bootstrap resample: ``weights`` are the
    resamples of the N rows (:class:`tools.metrics.Resamples`, or multiplicities (B, N)); a row's
    known pairs come along. Returns {"ece", "nll", "brier"}: arrays (B,).

    The reliability bin of a pair does not depend on the resample, so every resample's sums of p
    and y per bin, its number of pairs, NLL and Brier sums are one product of the counts with
    per-row sums: ``|sum of p - sum of y|`` per bin, summed over bins and divided by the
    resample's number of pairs, is the ECE of :func:`ece` on that resample."""
    probs, y = _columns(probs), _columns(y)
    res = as_resamples(weights, len(probs))
    known = ~np.isnan(y)
    p = np.where(known, probs, 0.0)
    t = np.where(known, y, 0.0)
    _, idx = bin_index(p, n_bins)
    rows, cols = np.nonzero(known)
    cell = rows * n_bins + idx[rows, cols]
    per_row = [np.bincount(cell, weights=v[rows, cols], minlength=len(p) * n_bins).reshape(len(p), n_bins)
               for v in (p, t)]
    pc = np.clip(p, PROB_CLIP, 1.0 - PROB_CLIP)
    row_nll = np.where(known, -(t * np.log(pc) + (1.0 - t) * np.log1p(-pc)), 0.0).sum(1)
    row_brier = np.where(known, (p - t) ** 2, 0.0).sum(1)
    sums = res.totals(np.column_stack([*per_row, known.sum(1), row_nll, row_brier]))
    sum_p, sum_y, (total, nll_sum, brier_sum) = sums[:, :n_bins], sums[:, n_bins:2 * n_bins], sums[:, 2 * n_bins:].T
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"ece": np.abs(sum_p - sum_y).sum(1) / total, "nll": nll_sum / total, "brier": brier_sum / total}


def temperature_resamples(logits, y, weights, temperature, per_label=False, n_grid=97) -> np.ndarray:
    """The temperature refitted on each bootstrap resample (``weights``: the resamples of the N
    rows, :class:`tools.metrics.Resamples` or multiplicities (B, N)): shape (B,), or (B, L) with
    ``per_label``.

    The resample's NLL is linear in its weights, so on a grid of log T around the fitted value it
    is one matrix product for all resamples; each minimum is refined by a parabola through the
    best grid point and its neighbours (the NLL is convex in 1/T). A grid that a minimum touches
    at its end is widened, within [T_MIN, T_MAX]."""
    logits, y = _columns(logits), _columns(y)
    res = as_resamples(weights, len(logits))
    groups = [[j] for j in range(logits.shape[1])] if per_label else [list(range(logits.shape[1]))]
    fitted = np.atleast_1d(np.asarray(temperature, dtype=float))
    out = np.empty((res.n_boot, len(groups)))
    for g, cols in enumerate(groups):
        centre, span = np.log(fitted[g if per_label else 0]), 0.5
        while True:
            grid = np.clip(centre + np.linspace(-span, span, n_grid), np.log(T_MIN), np.log(T_MAX))
            loss = np.zeros((len(logits), n_grid))
            for j in cols:
                known = ~np.isnan(y[:, j])
                z = np.where(known, logits[:, j], 0.0)[:, None] * np.exp(-grid)[None, :]
                t = np.where(known, y[:, j], 0.0)[:, None]
                loss += np.where(known[:, None], np.logaddexp(0.0, z) - t * z, 0.0)
            total = res.totals(loss)
            best = np.argmin(total, axis=1)
            at_edge = ((best == 0) & (grid[0] > np.log(T_MIN))) | ((best == n_grid - 1) & (grid[-1] < np.log(T_MAX)))
            if not at_edge.any() or span >= 8:
                break
            span *= 2
        i = np.clip(best, 1, n_grid - 2)
        rows = np.arange(res.n_boot)
        f0, f1, f2 = total[rows, i - 1], total[rows, i], total[rows, i + 1]
        curve = f0 - 2 * f1 + f2
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.where(curve > 0, 0.5 * (f0 - f2) / curve, 0.0)
        step = grid[1] - grid[0]
        u = np.where((best == i), grid[i] + np.clip(shift, -1, 1) * step, grid[best])
        out[:, g] = np.exp(u)
    return out if per_label else out[:, 0]
