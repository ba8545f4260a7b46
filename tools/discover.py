"""Failures no column names: slices found on the model's features, shortcut probes, label issues.

Everything here works on arrays the model passes already produced: the penultimate (backbone)
features, labels (NaN unknown), probabilities, the table's metadata and the image properties of
``tools.image_stats``. No figures, no files (``tools.stages.discover`` writes them).

Slice discovery (the Domino idea: Eyuboglu et al., ICLR 2022, https://arxiv.org/abs/2203.14960):
the features are reduced by a whitened PCA (fitted on the features of both splits: it sees no
label and no prediction), then a mixture of Gaussians over the features (one diagonal covariance shared by the
components), with a Bernoulli term for the label and one for the predicted probability (weighted
by LABEL_WEIGHT), is fitted on the *discover* split, per label and once for "any error". The label and prediction
terms pull the components towards groups where the model errs. Components are ranked by their
AUROC gap on that split. On the analysed split, membership comes from the **features alone**
(the component's Gaussian): a slice's rows there are not chosen by their errors, so the gap
measured on them, its interval and p-value are honest.

Shortcut probes (after Zech et al., PLOS Medicine 2018): how well a cross-validated logistic
regression on the features predicts a metadata column or an image property (AUROC, one-vs-rest
macro for several values), and how much each label's prevalence differs across that column's
groups. Both together are a shortcut risk. Where the model is at hand, the risk is looked at
through Grad-CAM (Selvaraju et al., ICCV 2017): the region where the mean film of the group with
the highest prevalence differs most from the mean of the others (a burned-in marker, a collimation
edge) and how densely the label's Grad-CAM covers it, on that group's films against the others'.

Label issues (confident learning: Northcutt et al., JAIR 2021, https://arxiv.org/abs/1911.00068):
per label, the per-class thresholds are the mean predicted probability of the class's members; a
given label is contradicted with confidence when the other class's probability reaches its
threshold (and is the larger one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logsumexp
from scipy.stats import chi2_contingency, fisher_exact, mannwhitneyu, norm

from tools.metrics import binary_metrics, binary_metrics_weighted, bootstrap_resamples, nanmean_rows, percentile_ci
from tools.slicing import defined_by_labels, group_values
from tools.stats import bootstrap_p, hull, score_interval, wilson

ANY = "any error"            # the target of slices where the model errs on any label
PCA_COMPONENTS = 8           # at most; fewer when the discover split is small
MIXTURE_COMPONENTS = 5       # at most (more cut a coherent subset into pieces); one per 20 rows below that
MIN_FIT_MEMBERS = 8          # a component with fewer rows on the discover split is not a slice
LABEL_WEIGHT = 1.0           # weight of the label and prediction terms against the features
SLICES_PER_TARGET = 2        # the worst components per label (and for any error) are reported
MIN_CLASS = 5                # a slice is tested only with this many positives and negatives on both sides
PROBE_FOLDS = 5
MIN_PROBE_AUROC = 0.6        # a column the features predict less well than this is not a risk
MIN_PREVALENCE_GAP = 0.05    # nor one whose groups' prevalences differ by less than this
REGION_LEVEL = 0.5           # a group's region: pixels whose mean differs by half the largest difference or more
MIN_GROUP_ROWS = 10          # groups smaller than this do not enter a prevalence gap
MAX_DESCRIBED_VALUES = 50    # a text column with more distinct values is an identifier, not a description
ID_COLUMNS = {"image_path", "split", "patient_id", "study_id", "study_uid", "subject_id", "dicom_id", "Path"}


# ====== features ======

@dataclass
class Reducer:
    """Standardise, then project on the leading principal components (fitted on one split)."""
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (d, k)

    def __call__(self, features) -> np.ndarray:
        return ((np.asarray(features, float) - self.mean) / self.scale) @ self.components


def fit_reducer(features, n_components: int = PCA_COMPONENTS) -> Reducer:
    """PCA of the standardised ``features`` with at most ``n_components`` and at most n/8
    components (so a mixture on a small split stays estimable), whitened: every component scaled
    to unit variance, so that a direction that separates a subset cleanly (a device, a protocol)
    counts as much as the directions of largest variance (sites, exposure)."""
    x = np.asarray(features, float)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    k = int(max(2, min(n_components, len(x) // 8, x.shape[1])))
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    sd = s[:k] / np.sqrt(max(len(x) - 1, 1))
    return Reducer(mean, scale, vt[:k].T / np.where(sd > 0, sd, 1.0))


# ====== the error-aware mixture ======

@dataclass
class Mixture:
    weights: np.ndarray   # (k,)
    means: np.ndarray     # (k, d)
    variances: np.ndarray  # (k, d)
    rates: np.ndarray     # (k, m): Bernoulli parameter of each target column

    def feature_loglik(self, z) -> np.ndarray:
        """(n, k) log p(z, component) from the features alone."""
        z = np.asarray(z, float)
        quad = ((z[:, None, :] - self.means[None]) ** 2 / self.variances[None]).sum(-1)
        return np.log(self.weights)[None] - 0.5 * (quad + np.log(2 * np.pi * self.variances).sum(-1)[None])

    def membership(self, z) -> np.ndarray:
        """(n, k) posterior of each component given the features alone."""
        ll = self.feature_loglik(z)
        return np.exp(ll - logsumexp(ll, axis=1, keepdims=True))


def fit_mixture(z, targets, k: int, weight: float = LABEL_WEIGHT, seed: int = 0, iters: int = 200) -> Mixture:
    """EM for a mixture of Gaussians (one diagonal covariance shared by the components) over ``z``
    (n, d) times Bernoulli terms over the columns of ``targets`` (n, m, values in [0, 1]: a label,
    a predicted probability, an error share), whose log-likelihood is multiplied by ``weight``.
    Started from k-means on ``z`` and the weighted targets."""
    from sklearn.cluster import KMeans

    z, t = np.asarray(z, float), np.asarray(targets, float)
    n, d = z.shape
    k = int(min(k, n))
    start = KMeans(k, n_init=4, random_state=seed).fit_predict(np.hstack([z, np.sqrt(weight) * t]))
    resp = np.eye(k)[start]
    previous = -np.inf
    for _ in range(iters):
        nk = resp.sum(0) + 1e-12
        mix = Mixture(weights=nk / n, means=(resp.T @ z) / nk[:, None],
                      variances=np.broadcast_to(_pooled_variance(z, resp, nk), (k, d)),
                      rates=np.clip((resp.T @ t + 0.5) / (nk[:, None] + 1.0), 1e-4, 1 - 1e-4))
        ll = mix.feature_loglik(z) + weight * (t @ np.log(mix.rates).T + (1 - t) @ np.log(1 - mix.rates).T)
        total = logsumexp(ll, axis=1)
        resp = np.exp(ll - total[:, None])
        if total.sum() - previous < 1e-6 * abs(previous):
            break
        previous = total.sum()
    return mix


def _pooled_variance(z, resp, nk) -> np.ndarray:
    """Within-component variance per feature, pooled over the components (one diagonal
    covariance shared by all: a small slice's own variances would be too noisy to assign new rows
    by), floored at 1e-3 of the feature's variance."""
    means = (resp.T @ z) / nk[:, None]
    pooled = sum((resp[:, c:c + 1] * (z - means[c]) ** 2).sum(0) for c in range(len(nk))) / len(z)
    return np.maximum(pooled, 1e-3 * z.var(0) + 1e-9)


def n_components_for(n: int) -> int:
    """Mixture size for a discover split of ``n`` rows: about one component per 20 rows."""
    return int(max(2, min(MIXTURE_COMPONENTS, n // 20)))


def target_columns(y, p, j: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, targets) the mixture of one target is fitted on: for label ``j`` its known rows with
    (label, probability); for any error (``j`` None) every row with one known label or more and
    (share of its known labels decided wrongly at 0.5)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    if j is not None:
        rows = np.flatnonzero(~np.isnan(y[:, j]))
        return rows, np.stack([y[rows, j], p[rows, j]], 1)
    known = ~np.isnan(y)
    rows = np.flatnonzero(known.any(1))
    wrong = np.where(known, (p >= 0.5) != (y == 1), False)[rows]
    return rows, (wrong.sum(1) / known[rows].sum(1))[:, None]


def auroc_gap(y, p, member: np.ndarray, j: int | None) -> float:
    """AUROC of the members minus that of the rest (macro over labels for ``j`` None): NaN where
    either side lacks a class."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    cols = range(y.shape[1]) if j is None else [j]
    gaps = [binary_metrics(y[member, c], p[member, c])["auroc"] - binary_metrics(y[~member, c], p[~member, c])["auroc"]
            for c in cols]
    gaps = np.asarray(gaps, float)
    return float(np.nanmean(gaps)) if np.isfinite(gaps).any() else float("nan")


@dataclass
class Slice:
    """One discovered slice: its target (a label or ANY), the component of that target's mixture,
    and the gap on the discover split that ranked it."""
    target: str
    j: int | None
    mixture: Mixture
    component: int
    fit_gap: float
    fit_n: int


def discover_slices(z_fit, y_fit, p_fit, labels, seed: int = 0, per_target: int = SLICES_PER_TARGET) -> list[Slice]:
    """Per label and for ANY: fit the mixture on the discover split, assign its rows by the
    features alone, and keep the (at most ``per_target``) components of at least MIN_FIT_MEMBERS
    rows whose AUROC gap there is negative, worst first."""
    found = []
    for j, target in [*enumerate(labels), (None, ANY)]:
        rows, targets = target_columns(y_fit, p_fit, j)
        if len(rows) < 2 * MIN_FIT_MEMBERS:
            continue
        mix = fit_mixture(z_fit[rows], targets, n_components_for(len(rows)), seed=seed)
        assigned = mix.membership(z_fit).argmax(1)
        ranked = []
        for c in range(len(mix.weights)):
            member = assigned == c
            if member.sum() >= MIN_FIT_MEMBERS:
                gap = auroc_gap(y_fit, p_fit, member, j)
                if np.isfinite(gap) and gap < 0:
                    ranked.append(Slice(target, j, mix, c, gap, int(member.sum())))
        found += sorted(ranked, key=lambda s: s.fit_gap)[:per_target]
    return found


def assign(slices: list[Slice], z) -> tuple[np.ndarray, np.ndarray]:
    """(members (S, n) bool, typicality (S, n)) of each slice on rows ``z``: the rows whose most
    probable component, from the features alone, is the slice's, and that posterior."""
    members, typical = [], []
    for s in slices:
        post = s.mixture.membership(z)
        members.append(post.argmax(1) == s.component)
        typical.append(post[:, s.component])
    n = len(np.asarray(z))
    return (np.array(members, bool).reshape(len(slices), n), np.array(typical, float).reshape(len(slices), n))


# ====== describing a group of rows ======

def describable_columns(df: pd.DataFrame, labels, y) -> list[str]:
    """Metadata columns a slice or a probe can be described by: not an identifier, a label, a
    prediction or a column defined by the labels; two values or more (after binning numbers)."""
    out = []
    for col in df.columns:
        if col in ID_COLUMNS or col in labels or col.endswith(("_prob", "_logit", "_std", "_mean", "_uncal")):
            continue
        values, _ = group_values(df[col])
        distinct = len(pd.unique(values))
        numeric = pd.api.types.is_numeric_dtype(df[col])
        if distinct < 2 or (not numeric and distinct > MAX_DESCRIBED_VALUES):
            continue
        if defined_by_labels(values, np.asarray(y, float)):
            continue
        out.append(col)
    return out


def over_represented(member: np.ndarray, df: pd.DataFrame, columns) -> dict | None:
    """The metadata value whose share among the members exceeds its share overall the most, with
    Fisher's exact test of members against the rest (two-sided)."""
    best = None
    for col in columns:
        values, _ = group_values(df[col])
        for value in pd.unique(values):
            has = values == value
            share, overall = float(has[member].mean()), float(has.mean())
            if best is None or share - overall > best["top_share"] - best["overall_share"]:
                best = {"top_column": col, "top_value": str(value), "top_share": share, "overall_share": overall,
                        "_table": [[int((has & member).sum()), int((~has & member).sum())],
                                   [int((has & ~member).sum()), int((~has & ~member).sum())]]}
    if best is None:
        return None
    best["top_p"] = float(fisher_exact(best.pop("_table"))[1])
    return best


def property_differences(member: np.ndarray, props: pd.DataFrame) -> list[dict]:
    """Numeric image properties of the members against the rest: means, standardised difference
    (pooled SD; infinite when each side is constant and they differ) and the Mann-Whitney p-value,
    largest |difference| first."""
    out = []
    for col in props.columns:
        if col == "image_path" or not pd.api.types.is_numeric_dtype(props[col]):
            continue
        v = props[col].to_numpy(float)
        a, b = v[member & np.isfinite(v)], v[~member & np.isfinite(v)]
        if len(a) < 2 or len(b) < 2:
            continue
        sd = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        diff = (a.mean() - b.mean()) / sd if sd > 0 else (0.0 if a.mean() == b.mean() else np.sign(a.mean() - b.mean()) * np.inf)
        p = 1.0 if np.ptp(np.r_[a, b]) == 0 else float(mannwhitneyu(a, b).pvalue)
        out.append({"property": col, "slice_mean": float(a.mean()), "rest_mean": float(b.mean()),
                    "std_difference": float(diff), "p_value": p})
    return sorted(out, key=lambda r: -abs(r["std_difference"]))


# ====== shortcut probes ======

def _weighted_auroc(y01, score, weights) -> np.ndarray:
    return np.atleast_1d(binary_metrics_weighted(y01, score, weights)["auroc"])


def probe(z, values: np.ndarray, clusters, n_boot: int = 1000, seed: int = 0) -> dict:
    """How well the features ``z`` predict the group ``values``: out-of-fold probabilities of a
    logistic regression (folds grouped by ``clusters``, i.e. patients), their AUROC (one-vs-rest
    macro for more than two groups) with a 95% interval (hull of the cluster bootstrap and, for two
    groups, the score interval) and the one-sided p-value of "no better than chance" (0.5).
    Groups with fewer than PROBE_FOLDS rows join an "other" group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    values = np.asarray(values).astype(str)
    names, counts = np.unique(values, return_counts=True)
    values = np.where(np.isin(values, names[counts < PROBE_FOLDS]), "(other)", values)
    classes = np.unique(values)
    out = {"n_groups": int(len(classes)), "probe_auroc": None, "ci95": None, "p_value": None}
    codes = np.searchsorted(classes, values)
    groups = np.unique(np.asarray(clusters).astype(str), return_inverse=True)[1].ravel()
    if len(classes) < 2 or len(np.unique(groups)) < PROBE_FOLDS:
        return out
    oof = np.full((len(values), len(classes)), np.nan)
    for train, test in GroupKFold(PROBE_FOLDS).split(z, codes, groups):
        present = np.unique(codes[train])
        if len(present) < 2:
            oof[np.ix_(test, present)] = 1.0
            continue
        fit = LogisticRegression(C=1.0, max_iter=2000).fit(z[train], codes[train])
        oof[np.ix_(test, fit.classes_)] = fit.predict_proba(z[test])
    oof = np.nan_to_num(oof, nan=0.0)
    weights = bootstrap_resamples(clusters, n_boot, seed) if n_boot > 0 else None
    scored = [1] if len(classes) == 2 else range(len(classes))
    point = np.mean([_weighted_auroc(codes == c, oof[:, c], np.ones(len(codes)))[0] for c in scored])
    out["probe_auroc"] = float(point)
    if weights is None:
        return out
    boot = nanmean_rows(np.stack([_weighted_auroc(codes == c, oof[:, c], weights) for c in scored], axis=-1))
    ci = percentile_ci(boot)
    if len(classes) == 2:
        n_pos = int((codes == 1).sum())
        lo, hi = score_interval("auroc", point, n_pos, len(codes) - n_pos)
        ci = hull(ci, [float(lo), float(hi)])
    out["ci95"] = ci
    se = np.nanstd(boot, ddof=1)
    out["p_value"] = None if ci is None else float(norm.sf((point - 0.5) / se)) if se > 0 else float(point <= 0.5)
    return out


def prevalence_gaps(values: np.ndarray, y, labels, clusters) -> dict:
    """Per label: the largest minus the smallest prevalence over the groups with at least
    MIN_GROUP_ROWS known labels, and the p-value of a chi-square test of independence of group
    and label on those groups, each film counted 1 / (films of its patient), so that the test sees
    about as many units as there are patients."""
    values = np.asarray(values).astype(str)
    ids, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    per_patient = 1.0 / np.bincount(inverse.ravel())[inverse.ravel()]
    out = {}
    for j, lbl in enumerate(labels):
        known = ~np.isnan(y[:, j])
        kept = [g for g in np.unique(values[known]) if (known & (values == g)).sum() >= MIN_GROUP_ROWS]
        if len(kept) < 2:
            out[lbl] = {"gap": None, "p_value": None}
            continue
        prev = [float(np.mean(y[known & (values == g), j])) for g in kept]
        table = np.array([[per_patient[known & (values == g) & (y[:, j] == c)].sum() for c in (0, 1)] for g in kept])
        p = 1.0 if (table.sum(0) == 0).any() else float(chi2_contingency(table, correction=False)[1])
        out[lbl] = {"gap": max(prev) - min(prev), "p_value": p,
                    "highest": kept[int(np.argmax(prev))], "lowest": kept[int(np.argmin(prev))]}
    return out


def shortcut_row(column: str, values, z, y, labels, clusters, n_boot: int, seed: int) -> dict:
    """One row of ``shortcut_probes.csv`` with the test behind ``risk``: the features predict the
    column (probe AUROC >= MIN_PROBE_AUROC) and some label's prevalence differs across its groups
    by MIN_PREVALENCE_GAP or more. Both must hold, so the p-value is the larger of the probe's and
    the prevalence test's (Bonferroni over the labels)."""
    pr = probe(z, values, clusters, n_boot, seed)
    gaps = prevalence_gaps(values, y, labels, clusters)
    row = {"column": column, "probe_auroc": pr["probe_auroc"], "ci_low": (pr["ci95"] or [None, None])[0],
           "ci_high": (pr["ci95"] or [None, None])[1], "n_groups": pr["n_groups"]}
    for lbl in labels:
        row[f"prevalence_gap_{lbl}"] = gaps[lbl]["gap"]
    tied = [lbl for lbl in labels if gaps[lbl]["gap"] is not None and gaps[lbl]["gap"] >= MIN_PREVALENCE_GAP]
    p_prev = [gaps[lbl]["p_value"] for lbl in tied]
    p_prev = min(1.0, len(labels) * min(p_prev)) if p_prev else None
    row["p_value"] = None if pr["p_value"] is None or p_prev is None else float(max(pr["p_value"], p_prev))
    row["risk"] = bool(row["p_value"] is not None and row["p_value"] < 0.05 and pr["probe_auroc"] >= MIN_PROBE_AUROC)
    worst = max(tied, key=lambda lbl: gaps[lbl]["gap"]) if tied else None
    row["label"] = worst
    row["group"] = None if worst is None else gaps[worst]["highest"]
    row["detail"] = (None if worst is None else
                     f"{worst} prevalence {gaps[worst]['highest']} vs {gaps[worst]['lowest']}: "
                     f"{gaps[worst]['gap']:+.3f}")
    return row


def difference_region(mean_group: np.ndarray, mean_rest: np.ndarray, level: float = REGION_LEVEL) -> np.ndarray:
    """Boolean (H, W) mask of the pixels where the group's mean film differs from the mean film of
    the others by at least ``level`` times the largest such difference (in absolute value): where
    the group's films look most different, whatever the difference is (a tag, an edge, a band)."""
    diff = np.abs(np.asarray(mean_group, float) - np.asarray(mean_rest, float))
    peak = float(diff.max())
    return diff >= level * peak if peak > 0 else np.zeros(diff.shape, bool)


def concentration(maps: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per heat map (N, H, W): its mean inside ``region`` over its mean over the film (1 = no more
    heat there than anywhere; the share of its mass inside over the region's share of the film);
    NaN for an all-zero map or an empty region."""
    maps = np.asarray(maps, float)
    total = maps.sum(axis=(1, 2))
    inside = (maps * region).sum(axis=(1, 2))
    area = float(np.mean(region))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total > 0) & (area > 0), inside / np.where(total > 0, total, 1.0) / max(area, 1e-12), np.nan)


def attention_gap(group, rest, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean concentration of Grad-CAM in the region on the group's films minus that on the
    others', with a 95% bootstrap interval (films resampled within each side) and the one-sided
    p-value of "no more attention there on the group's films" (normal approximation with the
    bootstrap's standard error, as for the probes)."""
    a = np.asarray(group, float)
    b = np.asarray(rest, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"concentration_group": float(a.mean()) if len(a) else None,
           "concentration_rest": float(b.mean()) if len(b) else None,
           "n_group": int(len(a)), "n_rest": int(len(b)), "difference": None, "ci95": None, "p_value": None}
    if not len(a) or not len(b):
        return out
    out["difference"] = float(a.mean() - b.mean())
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boot = (a[rng.integers(0, len(a), (n_boot, len(a)))].mean(axis=1)
                - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(axis=1))
        out["ci95"] = percentile_ci(boot)
        se = float(np.std(boot, ddof=1))
        out["p_value"] = float(norm.sf(out["difference"] / se)) if se > 0 else float(out["difference"] <= 0)
    return out


def property_label_auroc(props: pd.DataFrame, y, labels, clusters, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Does an image property alone predict a label? AUROC of each numeric property as a score
    for each label (above 0.5: higher values go with positives), with the hull of the cluster
    bootstrap and score intervals and the two-sided p-value of "0.5"."""
    weights = bootstrap_resamples(clusters, n_boot, seed) if n_boot > 0 else None
    rows = []
    for col in props.columns:
        if col == "image_path" or not pd.api.types.is_numeric_dtype(props[col]):
            continue
        v = props[col].to_numpy(float)
        if not np.isfinite(v).any() or np.nanstd(v) == 0:
            continue
        for j, lbl in enumerate(labels):
            ok = ~np.isnan(y[:, j]) & np.isfinite(v)
            t, s = y[ok, j], v[ok]
            auc = float(_weighted_auroc(t, s, np.ones(len(t)))[0])
            if not np.isfinite(auc):
                continue
            ci = p = None
            if weights is not None:
                boot = _weighted_auroc(t, s, weights.rows(ok))
                n_pos = int(t.sum())
                lo, hi = score_interval("auroc", auc, n_pos, len(t) - n_pos)
                ci = hull(percentile_ci(boot), [float(lo), float(hi)])
                p = bootstrap_p(auc - 0.5, boot - 0.5)
            rows.append({"property": col, "label": lbl, "auroc": auc, "ci_low": None if ci is None else ci[0],
                         "ci_high": None if ci is None else ci[1], "p_value": p})
    return pd.DataFrame(rows, columns=["property", "label", "auroc", "ci_low", "ci_high", "p_value"])


# ====== label issues ======

def label_issues(y, p, labels) -> pd.DataFrame:
    """Given labels the model contradicts with confidence, per label (confident learning): with
    thresholds t1 = mean probability of the given positives and t0 = mean of (1 - p) over the
    given negatives, a given 0 is contradicted when p >= t1 and p > 1 - p, a given 1 when
    1 - p >= t0 and 1 - p > p. ``margin`` = probability of the other class minus that of the
    given one (the normalised margin); rows ranked by it, per label, from 1. Columns: ``row``,
    ``label``, ``given``, ``prob``, ``margin``, ``rank``."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    parts = []
    for j, lbl in enumerate(labels):
        flagged, _ = contradicted(y[:, j], p[:, j])
        rows = np.flatnonzero(flagged)
        given = y[rows, j]
        margin = np.where(given == 1, 1 - 2 * p[rows, j], 2 * p[rows, j] - 1)
        part = pd.DataFrame({"row": rows, "label": lbl, "given": given.astype(int), "prob": p[rows, j],
                             "margin": margin}).sort_values("margin", ascending=False, kind="mergesort")
        part["rank"] = np.arange(1, len(part) + 1)
        parts.append(part)
    columns = ["row", "label", "given", "prob", "margin", "rank"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def contradicted(y: np.ndarray, p: np.ndarray, p_chance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, chance): which known labels are contradicted with confidence, and for each row
    the probability that it would be flagged, with the same thresholds, were its label drawn from
    ``p_chance`` (calibrated probabilities; default ``p``): 1 - p_chance where p clears the
    positive threshold, p_chance where 1 - p clears the negative one."""
    known = ~np.isnan(y)
    pos, neg = known & (y == 1), known & (y == 0)
    t1 = p[pos].mean() if pos.any() else np.inf
    t0 = (1 - p[neg]).mean() if neg.any() else np.inf
    says_pos = (p >= t1) & (p > 0.5)
    says_neg = (1 - p >= t0) & (p < 0.5)
    flagged = (neg & says_pos) | (pos & says_neg)
    pc = p if p_chance is None else p_chance
    chance = np.where(known, np.where(says_pos, 1 - pc, 0.0) + np.where(says_neg, pc, 0.0), 0.0)
    return flagged, chance


def label_issue_test(y: np.ndarray, p: np.ndarray, p_calibrated: np.ndarray) -> dict:
    """Whether one label has more confident contradictions than labels drawn from the calibrated
    probabilities would give: the count, its share of the known labels with a Wilson interval,
    the count expected by chance and the p-value P(X >= count) for X a sum of independent
    Bernoulli(chance) (the Poisson-binomial tail, computed exactly)."""
    flagged, chance = contradicted(y, p, p_calibrated)
    known = ~np.isnan(y)
    count, n = int(flagged.sum()), int(known.sum())
    lo, hi = wilson(count, n)
    return {"count": count, "n": n, "value": count / n if n else None,
            "ci95": None if not n else [float(lo), float(hi)], "expected": float(chance[known].sum()),
            "p_value": poisson_binomial_tail(chance[known], count) if n else None}


def poisson_binomial_tail(q: np.ndarray, k: int) -> float:
    """P(X >= k) for X the number of successes of independent Bernoulli(q_i): dynamic programme
    over the distribution of X truncated at k (states 0..k-1 and ">= k")."""
    if k <= 0:
        return 1.0
    dist = np.zeros(k + 1)
    dist[0] = 1.0
    for qi in np.asarray(q, float)[np.asarray(q) > 0]:
        moved = dist[:-1] * qi
        dist[:-1] *= 1 - qi
        dist[1:] += moved
    return float(min(1.0, max(0.0, dist[k])))
