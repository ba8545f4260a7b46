"""Is a new site like the reference the model was validated on? Two-sample tests on the model's
features, on image properties and on predictions; a performance estimate without labels; a
distance of each new film to the reference. Arrays in, dicts and frames out: no files, no figures
(``tools.stages.drift`` writes them).

Definitions
-----------
Independent films (``one_per_patient``): the two-sample tests (features and image properties)
take the films of each sample as independent draws, which several films of one patient are not:
the reference keeps one film per patient (drawn at random), and the new site's films, whose
patients are unknown, are taken as films of different patients (a folder of many repeat films of
the same patients can make a site look unlike the reference).

Reduced features (``reduce_pooled``): the pooled backbone features of both samples, standardised
and projected on at most DRIFT_COMPONENTS whitened principal components (``tools.discover.
fit_reducer``, fitted on both samples together: it never sees which film came from where, so
the permutation tests below keep their level).

Domain classifier (``domain_classifier``): a logistic regression (L2, C = 1) from the reduced
features to "film of the new site", scored out of fold over CV_FOLDS folds (the reference's films
grouped by patient, so no patient is on both sides of a fold). Its AUROC is 0.5 when the sites
cannot be told apart. 95% interval: the hull of a bootstrap of the units (reference patients and
new films) and the AUROC's score interval (``tools.stats``). p-value: the domain labels are
permuted and the whole cross-validation rerun ``n_permutations`` times; p is the normal tail of
the observed AUROC against the permutation distribution's mean and standard deviation, so it can
fall below 1 / n_permutations as a correction over many tests needs (the plain count
(1 + #{permuted >= observed}) / (1 + n_permutations) is kept as ``p_permutation``).

Maximum mean discrepancy (``mmd_test``, Gretton et al., JMLR 2012): on the reduced features,
``MMD^2 = mean k(r, r') + mean k(n, n') - 2 mean k(r, n)`` over the reference films r and new films
n, all pairs (the biased estimate, >= 0), with the Gaussian kernel ``k(a, b) = exp(-|a - b|^2 /
(2 s^2))`` and s the median distance between all pooled pairs (the median heuristic). The
permutation null is computed exactly as many times; p is the upper tail of a gamma distribution
with the permutation null's mean and variance (the moment-matched null of Gretton et al., NIPS
2009), ``p_permutation`` the plain count.

Verdict (``verdict``): drift is detected when either test's Holm-adjusted p-value is below ALPHA
(Holm 1979 over the two tests: the smaller p is doubled). ``p_value`` of the pair is that
adjusted smaller p.

Image-property drift (``property_drift``): per property (every column of the two tables but
``image_path``, so a new property, a DICOM tag, is tested by being a column): a numeric property
with more than CATEGORICAL_MAX_VALUES distinct values is compared by the two-sample
Kolmogorov-Smirnov test (distance: the KS statistic, the largest gap between the two cumulative
distributions); any other is categorical (missing values a category of their own): the
chi-square test of the 2 x k table of counts, distance: the total variation distance (half the
sum of the absolute differences of the two samples' shares). Both distances lie in [0, 1]; each
carries a 95% percentile interval over PROPERTY_RESAMPLES resamples of both tables' films.

Prediction drift (``prediction_drift``): per label, the mean predicted probability and the share
at or above 0.5 on each side; the new minus the reference with a 95% percentile interval from
independent bootstraps of the two samples (reference patients, new films) and the bootstrap
p-value of "no difference" (``tools.stats.bootstrap_p``).

Performance without labels (``expected_metrics``, ``estimate_performance``): confidence-based
performance estimation (CBPE, as NannyML defines it): each calibrated probability q_i is taken as
the chance that film i is positive. The calibration is Platt scaling per label fitted on the
labelled reference (``tools.calibration.fit_platt``: a temperature and a bias; a temperature alone
cannot undo the shift of every logit that training with pos_weight leaves, and CBPE needs each
label calibrated in the large). With the model's decisions d_i = [p_i >= 0.5] (p its own
probability), the expected confusion counts are TP = sum q d, FN = sum q (1 - d), FP = sum (1 - q)
d, TN = sum (1 - q)(1 - d), which give sensitivity TP / (TP + FN), specificity TN / (TN + FP) and
F1 2 TP / (2 TP + FP + FN); the expected AUROC under independent Bernoulli(q) labels is ``sum over
i != j of q_i (1 - q_j) ([p_i > p_j] + [p_i = p_j] / 2) / sum over i != j of q_i (1 - q_j)``: the
weighted AUROC of the films counted once as positives with weight q and once as negatives with
weight 1 - q (one sort, ``tools.metrics``), less each film's pair with itself. Interval: labels
are drawn y ~ Bernoulli(q) ``n_sim`` times, each time with q from a calibration refitted on a
bootstrap resample of the reference, and the 2.5th and 97.5th percentiles of the drawn labels'
metrics are taken: where the true metric of these films falls when the calibration holds, with
the calibration's own fitting noise. Valid only without concept shift and inside the reference's
support: the caller marks it invalid when feature drift is detected.

Out-of-distribution score (``ood_scores``): the Mahalanobis distance of a film's features to the
reference's (each feature standardised by the reference), with the Ledoit-Wolf shrunk covariance
(``ShrunkGaussian``; on all 1,024 features: the shrinkage keeps it invertible with fewer films than
features, and a lateral or inverted film departs from the reference in directions a few principal
components would drop). A new film is flagged when its distance exceeds the OOD_QUANTILE quantile
of the reference's own distances computed out of sample (cross-fitting over OOD_FOLDS patient
folds: each reference film is scored by the Gaussian fitted without its patient), so about 1% of
films like the reference's are flagged; in-sample distances are smaller, and a threshold taken
from them would flag films like the reference's far more often. The count is tested against that
1% (binomial, one-sided).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binom, chi2_contingency, gamma, ks_2samp, norm

from tools.calibration import apply_platt, logistic_fit
from tools.discover import fit_reducer
from tools.metrics import (Resamples, binary_metrics_weighted, bootstrap_resamples, cluster_codes, percentile_ci,
                           sigmoid)
from tools.stats import bootstrap_p, hull, score_interval, wilson

ALPHA = 0.05
DRIFT_COMPONENTS = 10        # whitened principal components the drift tests run on (at most)
CV_FOLDS = 5                 # folds of the domain classifier
CATEGORICAL_MAX_VALUES = 10  # a numeric property with this many distinct values or fewer is categorical
PROPERTY_RESAMPLES = 200     # resamples of the interval of each property's distance
# The two tables' columns: SPEC's contract first, in its order, then what else each row says.
PROPERTY_COLUMNS = ["property", "statistic", "distance", "p_value", "reference_mean", "new_mean", "kind",
                    "reference_mode", "new_mode", "n_reference", "n_new", "distance_ci_low", "distance_ci_high"]
PREDICTION_COLUMNS = ["label", "reference_mean_prob", "new_mean_prob", "ci_low", "ci_high", "reference_positive_rate",
                      "new_positive_rate", "difference", "p_value", "positive_rate_difference", "positive_rate_ci_low",
                      "positive_rate_ci_high"]
OOD_FOLDS = 10               # cross-fitting folds for the reference's own distances
OOD_QUANTILE = 0.99          # a new film farther than this quantile of the reference's distances is flagged
MIN_IMAGES = 10              # fewer films on either side: no test is run
MMD_MAX_FILMS = 2000         # films per side the MMD compares at most (its kernel matrix grows with the square)


# ====== features: two-sample tests ======

def one_per_patient(clusters, seed: int = 0) -> np.ndarray:
    """Positions of one film per patient (cluster), drawn at random with ``seed``, in row order:
    the tests below compare films taken as independent, which several films of one patient are
    not (they resemble each other more than films of two patients do)."""
    codes, k = cluster_codes(clusters)
    order = np.random.default_rng(seed).permutation(len(codes))
    first = np.full(k, len(codes))
    np.minimum.at(first, codes[order], np.arange(len(codes)))
    return np.sort(order[first])


def reduce_pooled(reference, new, n_components: int = DRIFT_COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """Both samples' features on the whitened principal components of the two pooled."""
    reference, new = np.asarray(reference, float), np.asarray(new, float)
    reducer = fit_reducer(np.vstack([reference, new]), n_components)
    return reducer(reference), reducer(new)


def unit_codes(reference_clusters, n_new: int) -> np.ndarray:
    """One code per sampling unit: the reference's patients (or films), then each new film."""
    codes, k = cluster_codes(reference_clusters)
    return np.r_[codes, k + np.arange(n_new)]


def group_folds(units: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row positions of ``folds`` folds, each unit wholly in one fold (units shuffled
    by ``seed``, then dealt round), independent of any label."""
    ids = np.unique(units)
    fold_of = np.empty(ids.max() + 1 if len(ids) else 0, np.intp)
    fold_of[np.random.default_rng(seed).permutation(ids)] = np.arange(len(ids)) % folds
    fold = fold_of[units]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(folds) if (fold == f).any()]


def out_of_fold(z: np.ndarray, y: np.ndarray, folds) -> np.ndarray:
    """Out-of-fold decision values (n, B) of ``logistic_fit`` from ``z`` to each column of ``y``
    (n, B); a training fold with one class gives its test fold that class's side (+-1)."""
    out = np.zeros(y.shape)
    for train, test in folds:
        yt = y[train]
        one_class = yt.min(0) == yt.max(0)
        if (~one_class).any():
            beta = logistic_fit(z[train], yt[:, ~one_class])
            out[np.ix_(test, np.flatnonzero(~one_class))] = z[test] @ beta[:-1] + beta[-1]
        out[np.ix_(test, np.flatnonzero(one_class))] = 2 * yt[0, one_class] - 1
    return out


def _auroc(y: np.ndarray, score: np.ndarray, weights=None):
    """AUROC of ``score`` for 0/1 ``y`` (``tools.metrics``), per resample when ``weights`` are given."""
    w = Resamples.single(len(y)) if weights is None else weights
    values = binary_metrics_weighted(y, score, w)["auroc"]
    return float(values[0]) if weights is None else values


def domain_classifier(z_reference, z_new, reference_clusters, n_permutations: int = 200, n_boot: int = 1000,
                      seed: int = 0, folds: int = CV_FOLDS) -> dict:
    """Can a classifier tell the new films from the reference's (module docstring)? ``auroc``,
    ``ci95``, ``p_value``, ``p_permutation``, ``null_mean``, ``null_sd``, ``permutations``, and
    ``scores``: each film's out-of-fold decision value (reference rows first)."""
    z = np.vstack([z_reference, z_new])
    y = np.r_[np.zeros(len(z_reference)), np.ones(len(z_new))]
    units = unit_codes(reference_clusters, len(z_new))
    split = group_folds(units, folds, seed)
    scores = out_of_fold(z, y[:, None], split)[:, 0]
    auroc = _auroc(y, scores)
    out = {"auroc": auroc, "ci95": None, "p_value": None, "p_permutation": None, "null_mean": None, "null_sd": None,
           "permutations": int(n_permutations), "folds": len(split), "scores": scores}
    if n_boot > 0:
        boot = _auroc(y, scores, bootstrap_resamples(units, n_boot, seed))
        lo, hi = score_interval("auroc", auroc, len(z_new), len(z_reference))
        out["ci95"] = hull(percentile_ci(boot), [float(lo), float(hi)])
    if n_permutations > 1:
        rng = np.random.default_rng(seed + 1)
        permuted = np.stack([rng.permutation(y) for _ in range(n_permutations)], axis=1)
        null_scores = out_of_fold(z, permuted, split)
        null = np.array([_auroc(permuted[:, b], null_scores[:, b]) for b in range(n_permutations)])
        out.update(_null_p(auroc, null, "normal"))
    return out


def mmd_test(z_reference, z_new, n_permutations: int = 1000, seed: int = 0) -> dict:
    """Gaussian-kernel MMD^2 between the two samples with its permutation test (module docstring):
    ``mmd``, ``bandwidth``, ``p_value``, ``p_permutation``, ``null_mean``, ``null_sd``. A side with
    more than MMD_MAX_FILMS films is represented by that many drawn at random."""
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(seed + 2)
    sides = [np.asarray(side, float) for side in (z_reference, z_new)]
    sides = [side[np.sort(rng.choice(len(side), MMD_MAX_FILMS, replace=False))] if len(side) > MMD_MAX_FILMS else side
             for side in sides]
    z = np.vstack(sides)
    m, n = len(sides[0]), len(sides[1])
    dist = pdist(z, "sqeuclidean")
    bandwidth = float(np.sqrt(np.median(dist))) if len(dist) else 1.0
    kernel = np.exp(-squareform(dist) / (2 * max(bandwidth, 1e-12) ** 2))
    total, row = kernel.sum(), kernel.sum(1)

    def mmd2(first: np.ndarray) -> np.ndarray:
        """MMD^2 for each column of ``first`` (rows x B, 1 = counted as reference)."""
        within = np.einsum("ib,ib->b", first, kernel @ first)
        cross = first.T @ row - within
        return within / m ** 2 + (total - 2 * first.T @ row + within) / n ** 2 - 2 * cross / (m * n)

    observed = float(mmd2(np.r_[np.ones(m), np.zeros(n)][:, None])[0])
    out = {"mmd": observed, "bandwidth": bandwidth, "p_value": None, "p_permutation": None, "null_mean": None,
           "null_sd": None, "permutations": int(n_permutations)}
    if n_permutations > 1:
        first = np.zeros((m + n, n_permutations))
        for b in range(n_permutations):
            first[rng.permutation(m + n)[:m], b] = 1.0
        out.update(_null_p(observed, mmd2(first), "gamma"))
    return out


def _null_p(observed: float, null: np.ndarray, shape: str) -> dict:
    """p-values of ``observed`` against a permutation null: the upper tail of a normal or gamma
    distribution with the null's mean and variance, and the plain count."""
    null = null[np.isfinite(null)]
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    if sd == 0:
        p = 1.0 if observed <= mean else 0.0
    elif shape == "normal":
        p = float(norm.sf((observed - mean) / sd))
    else:
        p = float(gamma.sf(observed, mean ** 2 / sd ** 2, scale=sd ** 2 / mean)) if mean > 0 else 1.0
    return {"p_value": p, "p_permutation": float((1 + np.sum(null >= observed)) / (1 + len(null))),
            "null_mean": mean, "null_sd": sd}


def verdict(domain_p, mmd_p, alpha: float = ALPHA) -> dict:
    """``drift_detected`` when either p-value, Holm-adjusted over the two, is below ``alpha``;
    ``p_value``: the adjusted smaller one (None when neither test ran)."""
    ps = [p for p in (domain_p, mmd_p) if p is not None]
    if not ps:
        return {"drift_detected": False, "p_value": None, "rule": None}
    adjusted = min(1.0, len(ps) * min(ps))
    return {"drift_detected": bool(adjusted < alpha), "p_value": adjusted,
            "rule": f"either test's Holm-adjusted p-value (Holm over {len(ps)}) below {alpha}"}


def feature_drift(reference_features, reference_clusters, new_features, n_permutations: int = 200,
                  n_boot: int = 1000, seed: int = 0) -> dict:
    """Both tests on the backbone features and the verdict: one reference film per patient
    (``tested``: their positions), the pooled reduction, the domain classifier and the MMD
    (``domain``, ``mmd``), and ``verdict``'s keys."""
    tested = one_per_patient(reference_clusters, seed)
    z_ref, z_new = reduce_pooled(np.asarray(reference_features)[tested], new_features)
    domain = domain_classifier(z_ref, z_new, np.arange(len(tested)), n_permutations, n_boot, seed)
    mmd = mmd_test(z_ref, z_new, n_permutations, seed)
    return {"tested": tested, "components": int(z_ref.shape[1]), "domain": domain, "mmd": mmd,
            **verdict(domain["p_value"], mmd["p_value"])}


# ====== image properties ======

def property_drift(reference: pd.DataFrame, new: pd.DataFrame, n_boot: int = PROPERTY_RESAMPLES,
                   seed: int = 0) -> pd.DataFrame:
    """One row per property both tables have (module docstring), columns ``PROPERTY_COLUMNS``; the
    distance's 95% interval is the percentile interval over ``n_boot`` resamples of each table's
    rows (none when ``n_boot`` is 0)."""
    rng = np.random.default_rng([seed, 11])
    rows = []
    for col in [c for c in reference.columns if c != "image_path" and c in new.columns]:
        a, b = reference[col], new[col]
        numeric = pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b)
        distinct = pd.concat([a, b]).nunique(dropna=True)
        row = {"property": col, "n_reference": int(a.notna().sum()), "n_new": int(b.notna().sum()),
               "reference_mean": float(a.mean()) if numeric and a.notna().any() else None,
               "new_mean": float(b.mean()) if numeric and b.notna().any() else None,
               "reference_mode": None, "new_mode": None, "distance_ci_low": None, "distance_ci_high": None}
        if numeric and distinct > CATEGORICAL_MAX_VALUES:
            x, y = a.dropna().to_numpy(float), b.dropna().to_numpy(float)
            test = ks_2samp(x, y) if len(x) and len(y) else None
            row |= {"kind": "numeric", "statistic": "ks", "distance": None if test is None else float(test.statistic),
                    "p_value": None if test is None else float(test.pvalue)}
            samples, distance = (x, y), ks_distance
        else:
            codes = pd.factorize(pd.concat([categories(a), categories(b)]))[0]
            samples, distance = (codes[:len(a)], codes[len(a):]), tv_distance
            row |= {"kind": "categorical", "statistic": "chi2", "reference_mode": _mode(a), "new_mode": _mode(b),
                    **_categorical(*samples)}
        if row["distance"] is not None and n_boot > 0 and min(map(len, samples)):
            draws = [distance(*(v[rng.integers(0, len(v), len(v))] for v in samples)) for _ in range(n_boot)]
            row["distance_ci_low"], row["distance_ci_high"] = percentile_ci(np.asarray(draws))
        rows.append(row)
    return pd.DataFrame(rows, columns=PROPERTY_COLUMNS)


def ks_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical
    cumulative distribution functions (scipy's ``ks_2samp(x, y).statistic``)."""
    grid = np.concatenate([x, y])
    fx = np.searchsorted(np.sort(x), grid, side="right") / len(x)
    fy = np.searchsorted(np.sort(y), grid, side="right") / len(y)
    return float(np.abs(fx - fy).max())


def tv_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation distance of two samples of category codes (0..k-1): half the sum of the
    absolute differences of their shares."""
    k = int(max(a.max(initial=0), b.max(initial=0))) + 1
    return float(0.5 * np.abs(np.bincount(a, minlength=k) / len(a) - np.bincount(b, minlength=k) / len(b)).sum())


def categories(values: pd.Series) -> pd.Series:
    """Values as text categories, a missing value its own category."""
    return values.astype(object).where(values.notna(), "(missing)").astype(str)


def _mode(values: pd.Series):
    counts = categories(values).value_counts()
    return None if counts.empty else str(counts.index[0])


def _categorical(a: np.ndarray, b: np.ndarray) -> dict:
    """Total variation distance (``tv_distance``) of two samples of category codes (0..k-1, each
    code in one of them at least) and the chi-square test of their 2 x k table of counts (p = 1
    with a single category; neither when a sample is empty)."""
    if not len(a) or not len(b):
        return {"distance": None, "p_value": None}
    k = int(max(a.max(), b.max())) + 1
    counts = np.stack([np.bincount(a, minlength=k), np.bincount(b, minlength=k)]).astype(float)
    p = 1.0 if k < 2 else float(chi2_contingency(counts, correction=False)[1])
    return {"distance": tv_distance(a, b), "p_value": p}


# ====== predictions ======

def prediction_drift(p_reference, p_new, labels, reference_clusters, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per label: mean probability and share at or above 0.5 on each side, the new minus the
    reference with a 95% interval and p-value (module docstring). Columns: ``PREDICTION_COLUMNS``."""
    p_reference, p_new = np.asarray(p_reference, float), np.asarray(p_new, float)
    values_ref = np.hstack([p_reference, p_reference >= 0.5])
    values_new = np.hstack([p_new, p_new >= 0.5])
    point = values_new.mean(0) - values_ref.mean(0)
    boot = None
    if n_boot > 0:
        res_ref = bootstrap_resamples(reference_clusters, n_boot, seed)
        res_new = bootstrap_resamples(np.arange(len(p_new)), n_boot, seed + 1)
        boot = (res_new.totals(values_new) / res_new.totals(np.ones(len(p_new)))[:, None]
                - res_ref.totals(values_ref) / res_ref.totals(np.ones(len(p_reference)))[:, None])
    rows, n_labels = [], len(labels)
    for j, label in enumerate(labels):
        ci = percentile_ci(boot[:, j]) if boot is not None else None
        rate_ci = percentile_ci(boot[:, n_labels + j]) if boot is not None else None
        rows.append({"label": label, "reference_mean_prob": float(p_reference[:, j].mean()),
                     "new_mean_prob": float(p_new[:, j].mean()), "difference": float(point[j]),
                     "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                     "p_value": bootstrap_p(point[j], boot[:, j]) if boot is not None else None,
                     "reference_positive_rate": float(values_ref[:, n_labels + j].mean()),
                     "new_positive_rate": float(values_new[:, n_labels + j].mean()),
                     "positive_rate_difference": float(point[n_labels + j]),
                     "positive_rate_ci_low": rate_ci[0] if rate_ci else None,
                     "positive_rate_ci_high": rate_ci[1] if rate_ci else None})
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


# ====== performance without labels (CBPE) ======

ESTIMATED = ("auroc", "f1@0.5", "sensitivity", "specificity")


def expected_metrics(q, p) -> dict:
    """Expected AUROC, F1@0.5, sensitivity and specificity of the scores ``p`` (the model's
    probabilities, decisions at 0.5) when film i is positive with probability ``q[i]``, and the
    expected prevalence (module docstring); NaN where undefined."""
    q, p = np.asarray(q, float), np.asarray(p, float)
    n = len(q)
    both = np.r_[np.ones(n), np.zeros(n)]
    weighted = binary_metrics_weighted(both, np.r_[p, p], np.r_[q, 1 - q])
    positives, negatives, self_pairs = q.sum(), (1 - q).sum(), float(np.sum(q * (1 - q)))
    # the weighted AUROC counts each film's pair with itself as a tie: take those pairs out
    wrong = (1 - weighted["auroc"]) * positives * negatives - self_pairs / 2
    pairs = positives * negatives - self_pairs
    decided = p >= 0.5
    d = decided.astype(float)
    tp, fn, fp, tn = q @ d, q @ (1 - d), (1 - q) @ d, (1 - q) @ (1 - d)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"auroc": float(1 - wrong / pairs) if pairs > 0 else float("nan"),
                "f1@0.5": float(weighted["f1@0.5"]), "sensitivity": float(tp / (tp + fn)),
                "specificity": float(tn / (tn + fp)), "prevalence": float(q.mean()) if n else float("nan")}


def simulated_metrics(q_draws, p, seed: int = 0) -> dict:
    """{metric: (B,)} of the scores ``p`` against labels drawn y ~ Bernoulli(q) once per row of
    ``q_draws`` (B, n): the distribution of the true metric under the calibration."""
    q_draws, p = np.atleast_2d(np.asarray(q_draws, float)), np.asarray(p, float)
    labels = (np.random.default_rng(seed).random(q_draws.shape) < q_draws).astype(np.float32)
    n = len(p)
    both = np.r_[np.ones(n), np.zeros(n)]
    drawn = binary_metrics_weighted(both, np.r_[p, p], Resamples(np.arange(2 * n), np.hstack([labels, 1 - labels]).T,
                                                                  integral=True))
    decided = (p >= 0.5).astype(np.float32)
    pos, neg = labels.sum(1), (1 - labels).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"auroc": drawn["auroc"], "f1@0.5": drawn["f1@0.5"],
                "sensitivity": np.where(pos > 0, labels @ decided / pos, np.nan),
                "specificity": np.where(neg > 0, (1 - labels) @ (1 - decided) / neg, np.nan)}


def estimate_performance(logits, calibration, labels, calibration_draws=None, n_sim: int = 1000,
                         seed: int = 0) -> dict:
    """Per label: the expected metrics of the model's probabilities ``sigmoid(logits)`` with the
    Platt-calibrated probabilities (``calibration``: (L, 2) slope and bias, from
    ``tools.calibration.fit_platt`` on the reference) as each film's chance of being positive, and
    their 95% intervals ``<metric>_ci`` from ``n_sim`` label draws, draw b calibrated with
    ``calibration_draws[b]`` (refits on bootstrap resamples of the reference, (B, L, 2); the fitted
    calibration when None)."""
    logits, calibration = np.asarray(logits, float), np.asarray(calibration, float)
    draws = None
    if calibration_draws is not None and n_sim > 0:
        draws = np.asarray(calibration_draws, float)
        draws = draws[np.arange(n_sim) % len(draws)]
    out = {}
    for j, label in enumerate(labels):
        p = sigmoid(logits[:, j])
        block = expected_metrics(apply_platt(logits[:, j], calibration[j]), p)
        if n_sim > 0:
            params = draws[:, j] if draws is not None else np.tile(calibration[j], (n_sim, 1))
            sims = simulated_metrics(apply_platt(logits[None, :, j], params[:, None, :]), p, seed + j)
            block |= {f"{m}_ci": percentile_ci(sims[m]) for m in ESTIMATED}
        else:
            block |= {f"{m}_ci": None for m in ESTIMATED}
        out[label] = block
    return out


# ====== out-of-distribution films ======

@dataclass
class ShrunkGaussian:
    """Reference features as a Gaussian: standardised by the reference's mean and spread, with the
    Ledoit-Wolf shrunk covariance ``(1 - s) S + s m I`` (S the empirical covariance, m its mean
    variance, s the Ledoit-Wolf shrinkage). S has rank below the number of reference films, so the
    covariance is held as its eigen-directions in their span (``basis``, with ``variances``) and
    the variance ``floor`` = s m in every direction outside it."""
    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray      # (k, d), orthonormal rows
    variances: np.ndarray  # (k,)
    floor: float

    def distance(self, features) -> np.ndarray:
        """Mahalanobis distance (not squared) of each row of ``features`` to the reference."""
        x = (np.asarray(features, float) - self.mean) / self.scale
        along = x @ self.basis.T
        inside = (along ** 2 / self.variances).sum(1)
        outside = np.maximum((x ** 2).sum(1) - (along ** 2).sum(1), 0.0)
        return np.sqrt(inside + (outside / self.floor if self.floor > 0 else 0.0))


def fit_shrunk_gaussian(features) -> ShrunkGaussian:
    """:class:`ShrunkGaussian` of ``features`` (n, d); its distances equal those of
    ``sklearn.covariance.LedoitWolf`` on the standardised features, computed in the span of the n
    rows instead of with a d x d inverse."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = np.asarray(features, float)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    centred = (x - mean) / scale
    shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    eigen = sv ** 2 / len(x)
    mu = float(eigen.sum() / x.shape[1])
    keep = eigen > 1e-12 * max(eigen.max(initial=0.0), 1e-300)
    return ShrunkGaussian(mean, scale, vt[keep], (1 - shrinkage) * eigen[keep] + shrinkage * mu, shrinkage * mu)


def ood_scores(reference_features, new_features, reference_clusters, seed: int = 0, folds: int = OOD_FOLDS,
               quantile: float = OOD_QUANTILE) -> dict:
    """Distances of the new films to the reference and the threshold they are flagged at (module
    docstring): ``new_scores``, ``reference_scores`` (out of sample), ``threshold``, ``flagged``
    (bool per new film), ``count``, ``expected`` (the quantile's share of the new films),
    ``share_ci95`` (Wilson), ``p_value`` (P(count or more) at that share)."""
    reference_features = np.asarray(reference_features, float)
    codes, _ = cluster_codes(reference_clusters)
    held_out = np.empty(len(reference_features))
    for train, test in group_folds(codes, min(folds, len(np.unique(codes))), seed):
        held_out[test] = fit_shrunk_gaussian(reference_features[train]).distance(reference_features[test])
    threshold = float(np.quantile(held_out, quantile))
    scores = fit_shrunk_gaussian(reference_features).distance(new_features)
    flagged = scores > threshold
    count, n = int(flagged.sum()), len(scores)
    lo, hi = wilson(count, n)
    rate = 1.0 - quantile
    return {"new_scores": scores, "reference_scores": held_out, "threshold": threshold, "flagged": flagged,
            "count": count, "n": n, "expected": rate * n, "share": count / n if n else None,
            "share_ci95": [float(lo), float(hi)] if n else None, "reference_share": float(np.mean(held_out > threshold)),
            "p_value": float(binom.sf(count - 1, n, rate)) if n else None}
