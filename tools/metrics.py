"""The metrics module: one implementation of every number the suite reports about discrimination.

Binary metrics per label, computed on the rows whose label is known (NaN = unknown, masked):

- ``auroc``: area under the ROC curve (trapezoids through every operating point); equals
  ``sklearn.metrics.roc_auc_score``.
- ``auprc``: average precision, sum over thresholds of (R_k - R_{k-1}) * P_k, no interpolation;
  equals ``sklearn.metrics.average_precision_score``.
- ``f1@0.5``: F1 of the decision ``p >= 0.5``; undefined when there is no positive and none predicted.
- ``sens@0.5`` and ``spec@0.5``: sensitivity (share of positives with ``p >= 0.5``) and specificity
  (share of negatives with ``p < 0.5``) of the same decision: the error rates at the operating
  point, which F1 mixes (a group with more false positives and fewer misses can keep its F1).
- ``sens@95spec``: the largest sensitivity over ROC operating points with specificity >= 0.95
  (all points, as ``sklearn.metrics.roc_curve(drop_intermediate=False)``).

AUROC, AUPRC, the sensitivities and the specificity are undefined (NaN, written as JSON null) for
a label with one class only. Macro = mean over labels whose metric is defined; micro = all known
(image, label) pairs pooled.

Everything accepts resample weights. A patient bootstrap resample is held as the number of times
each patient was drawn (:class:`Resamples`). One sort per label serves every resample: the items in
score order are cut into runs (the negatives before each tie group that holds a positive, split at
0.5, the negatives tied with it, its positives), and each run's weight in every resample is one
sparse matrix product of the runs' patients with the counts. Cumulative sums over the runs give
every point where the ROC and precision-recall curves can change, so AUROC, AUPRC, sensitivity and
F1 follow exactly; integer weights are summed exactly (float32 below 2**24, else float64) and the
metrics are formed in float64.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from tools.runtime import available_cores
from tools.stats import MIN_BOOT, SCORE_METRICS, bootstrap_p, hull, score_interval

SPEC_METRICS = ("auroc", "auprc", "f1@0.5", "sens@95spec")  # the metrics schema's, in its order
METRICS = (*SPEC_METRICS, "sens@0.5", "spec@0.5")
# 0.01, 0.02, ..., 0.99: integer / 100 is the correctly rounded double, so 0.5 is exactly 0.5.
THRESHOLDS = np.arange(1, 100) / 100.0
REFERENCE_THRESHOLD = 0.5
_SPEC_TOL = 1e-12
_BLOCK = 64  # resamples per block of counts
_CHUNK = 1 << 23  # elements of one work array (runs x resamples) at most
_ROWS = 2048  # runs per block of a ranking: a block's sums for a chunk of resamples stay in cache


def sigmoid(x) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-x))`` without overflow for large |x|; NaN stays NaN."""
    x = np.asarray(x, dtype=float)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class Resamples:
    """``B`` bootstrap resamples of ``n`` rows held as cluster multiplicities: in resample ``b`` row
    ``i`` has weight ``counts[codes[i], b]``, the number of times its cluster (patient) was drawn.
    A subset of rows keeps the same resamples (:meth:`rows`), and a sum over rows is a product with
    the counts (:meth:`totals`), one number per cluster instead of one per row. The counts are kept
    in blocks of ``_BLOCK`` resamples, each contiguous, so that one block stays in cache while it
    is multiplied."""

    def __init__(self, codes, counts, integral: bool | None = None):
        self.codes = np.asarray(codes, np.intp).ravel()
        if isinstance(counts, tuple):
            self.n_clusters, self.blocks = counts
        else:
            counts = np.asarray(counts)
            counts = counts.reshape(-1, 1) if counts.ndim == 1 else counts
            self.n_clusters = len(counts)
            self.blocks = tuple(np.ascontiguousarray(counts[:, i:i + _BLOCK]) for i in range(0, counts.shape[1], _BLOCK))
        if integral is None:
            integral = all(np.array_equal(b, np.rint(b)) and (b >= 0).all() for b in self.blocks)
        self.integral = bool(integral)
        self._row_mass = None

    @classmethod
    def from_weights(cls, weights) -> Resamples:
        """Row weights (B, n), or (n,) for one resample: every row is its own cluster."""
        w = np.atleast_2d(np.asarray(weights))
        if not np.issubdtype(w.dtype, np.floating):
            w = w.astype(np.float64)
        return cls(np.arange(w.shape[1]), w.T)

    @classmethod
    def single(cls, n: int) -> Resamples:
        """One resample in which every row has weight 1: the data as given."""
        return cls(np.zeros(n, np.intp), np.ones((1, 1), np.float32), integral=True)

    @property
    def n_boot(self) -> int:
        return sum(b.shape[1] for b in self.blocks)

    @property
    def n_rows(self) -> int:
        return len(self.codes)

    @property
    def counts(self) -> np.ndarray:
        """(clusters, B)."""
        return np.concatenate(self.blocks, axis=1) if self.blocks else np.zeros((self.n_clusters, 0), np.float32)

    def head(self, n: int) -> Resamples:
        """The first ``n`` resamples."""
        blocks, left = [], n
        for block in self.blocks:
            if left <= 0:
                break
            blocks.append(np.ascontiguousarray(block[:, :left]) if block.shape[1] > left else block)
            left -= block.shape[1]
        return Resamples(self.codes, (self.n_clusters, tuple(blocks)), self.integral)

    def rows(self, keep) -> Resamples:
        """The same resamples restricted to rows ``keep`` (a mask or positions)."""
        out = Resamples(self.codes[keep], (self.n_clusters, self.blocks), self.integral)
        out._row_mass = self.max_row_mass()  # a bound for all the rows bounds a subset's too
        return out

    def weights(self) -> np.ndarray:
        """Row weights (B, n)."""
        return np.ascontiguousarray(self.counts.T[:, self.codes])

    def max_row_mass(self) -> float:
        """An upper bound (within float32 rounding) on any resample's total row weight."""
        if self._row_mass is None:
            per_cluster = np.bincount(self.codes, minlength=self.n_clusters).astype(np.float64)
            self._row_mass = max((float(np.einsum("k,kb->b", per_cluster, b).max(initial=0.0)) for b in self.blocks),
                                 default=0.0) * (1 + 1e-9)
        return self._row_mass

    def exact_dtype(self, per_row: int):
        """float32 where sums of up to ``per_row`` items per row are integers below 2**24 (exact),
        else float64."""
        exact = self.integral and self.max_row_mass() * per_row < 2 ** 24
        return np.float32 if exact else np.float64

    def chunks(self, step: int, dtype):
        """The counts in consecutive chunks of at most ``step`` resamples (a divisor of
        ``_BLOCK``), each (clusters, step) contiguous in ``dtype``."""
        for block in self.blocks:
            if step >= block.shape[1] and block.dtype == dtype:
                yield block
                continue
            for i in range(0, block.shape[1], step):
                yield np.ascontiguousarray(block[:, i:i + step], dtype=dtype)

    def cluster_sums(self, values) -> np.ndarray:
        """(clusters, F): ``values`` (n, F) summed over the rows of each cluster."""
        values = np.asarray(values, np.float64)
        k, n = self.n_clusters, self.n_rows
        if k == n and np.array_equal(self.codes, np.arange(n)):
            return values
        return sparse.csr_matrix((np.ones(n), (self.codes, np.arange(n))), shape=(k, n)) @ values

    def totals(self, values) -> np.ndarray:
        """(B, F) in float64: per resample, the sum over rows of weight x ``values`` (n, F)."""
        values = np.asarray(values, np.float64)
        squeeze = values.ndim == 1
        per_cluster = self.cluster_sums(values.reshape(self.n_rows, -1))
        parts = [block.T.astype(np.float64) @ per_cluster for block in self.blocks]
        out = np.concatenate(parts) if parts else np.zeros((0, per_cluster.shape[1]))
        return out[:, 0] if squeeze else out


def as_resamples(weights, n: int | None = None) -> Resamples | None:
    """``weights`` as :class:`Resamples` (of ``n`` rows, when given, else of as many as they
    hold): None, Resamples, or row weights (B, n)."""
    if weights is None or isinstance(weights, Resamples):
        res = weights
    else:
        res = Resamples.from_weights(weights)
    if res is not None and n is not None and res.n_rows != n:
        raise ValueError(f"resamples hold {res.n_rows} rows, the data {n}")
    return res


def _csr(rows: np.ndarray, n_rows: int, columns: np.ndarray, n_columns: int, dtype) -> sparse.csr_matrix:
    """0/1 matrix with a one at (rows[i], columns[i]) for every item; ``rows`` non-decreasing;
    repeated entries add up."""
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    matrix = sparse.csr_matrix((np.ones(len(columns), dtype), columns, indptr), shape=(n_rows, n_columns))
    matrix.sum_duplicates()  # sorted columns: the rows of the dense factor are read in order
    return matrix


def map_run_sums(fn, res: Resamples, runs: np.ndarray, n_runs: int, item_rows: np.ndarray, per_row: int = 1,
                 budget: int = _CHUNK) -> list:
    """``fn`` of each run's total weight in every resample, chunk by chunk: ``fn(sums)`` with sums
    (n_runs, resamples of the chunk), results in the order of the resamples; chunks run on every
    core. Item i (row ``item_rows[i]``) belongs to run ``runs[i]`` (non-decreasing); a row holds at
    most ``per_row`` items; a chunk holds at most ``budget`` numbers. Integer weights are summed
    exactly (float32 below 2**24, else float64)."""
    dtype = res.exact_dtype(per_row)
    matrix = _csr(runs, n_runs, res.codes[item_rows], res.n_clusters, dtype)
    step = _BLOCK
    while step > 1 and step * n_runs > budget:
        step //= 2
    return _in_parallel(lambda counts: fn(matrix @ counts), list(res.chunks(step, dtype)))


def run_numbers(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For non-decreasing ``keys``: each item's run (1, 2, ...: the rank of its key among the
    distinct keys) and the distinct keys."""
    if len(keys) == 0:
        return np.zeros(0, np.intp), keys
    change = np.empty(len(keys), bool)
    change[0], change[1:] = True, keys[1:] != keys[:-1]
    return np.cumsum(change), keys[change]


class _Ranking:
    """Binary outcomes of items ranked by score, high to low, reduced to what the metrics need
    under any weights. Built from items already sorted (``ys`` bool, ``ps`` descending, ``rows``:
    the row of each item, whose weight it takes); ``per_row``: the most items one row holds.

    Positive groups are the tie groups that hold a positive, k = 0..K-1. The negatives form runs:
    those before positive group k with score >= 0.5, those before it with score < 0.5, those tied
    with it; the positives form one run per positive group. With the runs' weights summed in order
    (negatives: FP, positives: TP), positive group k has FP before it, FP through it and TP through
    it: every ROC and precision-recall point where a curve rises. The runs are evaluated in blocks
    of about ``_ROWS`` consecutive runs, so a block's sums stay in cache while every metric takes
    what it needs from them; the cumulative sums carry over from block to block."""

    def __init__(self, ys: np.ndarray, ps: np.ndarray, rows: np.ndarray, per_row: int = 1):
        self.ys, self.ps, self.rows, self.per_row = ys, ps, rows, per_row
        self.n = len(ps)
        group = run_numbers(ps)[0] - 1  # tie group of each item, from 0
        has_pos = np.zeros(group[-1] + 1 if self.n else 0, bool)
        has_pos[group[ys]] = True
        before = np.cumsum(has_pos) - has_pos  # positive groups strictly before each group
        self.k = int(has_pos.sum())
        self.neg = np.flatnonzero(~ys)
        self.pos = np.flatnonzero(ys)
        g_neg = group[self.neg]
        keys = 3 * before[g_neg] + np.where(has_pos[g_neg], 2, np.where(ps[self.neg] >= REFERENCE_THRESHOLD, 0, 1))
        self.neg_run, keys = run_numbers(keys)  # 1, 2, ...
        ends = 3 * np.arange(self.k)
        self.fp_before = np.searchsorted(keys, ends + 1, side="right")  # negative runs before group k
        self.fp_through = np.searchsorted(keys, ends + 2, side="right")  # and the one tied with it
        self.pos_group = before[group[self.pos]]
        rows_through = self.fp_through + np.arange(1, self.k + 1)
        cut = np.flatnonzero(np.diff(rows_through // _ROWS)) + 1
        self.bounds = list(zip(np.r_[0, cut], np.r_[cut, self.k])) if self.k else []

    @classmethod
    def of(cls, y, p, rows, per_row: int = 1) -> _Ranking:
        """The ranking of unsorted items."""
        order = np.argsort(-p)  # ties form one group, so their order does not matter
        return cls(np.asarray(y)[order] == 1, p[order], np.asarray(rows)[order], per_row)

    def subset(self, keep: np.ndarray, renumber: np.ndarray) -> _Ranking:
        """The ranking of the items whose row is kept (``keep``: mask of rows), rows renumbered by
        ``renumber``; no new sort."""
        sel = keep[self.rows]
        return _Ranking(self.ys[sel], self.ps[sel], renumber[self.rows[sel]], self.per_row)

    def evaluate(self, res: Resamples) -> dict[str, np.ndarray]:
        """{metric: (B,)} for every resample of ``res``; NaN where undefined."""
        if self.n == 0:
            return {m: np.full(res.n_boot, np.nan) for m in METRICS}
        dtype = res.exact_dtype(self.per_row)
        codes = res.codes[self.rows]
        above = self.ps >= REFERENCE_THRESHOLD
        # per cluster: its positives, negatives, positives and negatives at or above 0.5
        classes = [self.ys, ~self.ys, self.ys & above, ~self.ys & above]
        per_cluster = sparse.csr_matrix(np.stack([np.bincount(codes[c], minlength=res.n_clusters) for c in classes]),
                                        dtype=dtype)
        blocks = [self._block(k0, k1, codes, res.n_clusters, dtype) for k0, k1 in self.bounds]
        parts = [self._chunk(blocks, per_cluster @ counts, counts) for counts in res.chunks(_BLOCK, dtype)]
        return {m: np.concatenate([part[m] for part in parts]) for m in METRICS}

    def _block(self, k0: int, k1: int, codes: np.ndarray, n_clusters: int, dtype) -> dict:
        """Positive groups k0..k1-1 and the negative runs up to them: one 0/1 matrix from the
        clusters to the runs (first row empty, then the negative runs, an empty row, the positive
        groups), and where each group's FP before and through it sit among the negative rows."""
        first = self.fp_through[k0 - 1] if k0 else 0
        last = self.fp_through[k1 - 1]
        a, b = np.searchsorted(self.neg_run, [first, last], side="right")
        c, d = np.searchsorted(self.pos_group, [k0, k1], side="left")
        n_neg = last - first + 1
        runs = np.concatenate([self.neg_run[a:b] - first, n_neg + 1 + self.pos_group[c:d] - k0])
        items = np.concatenate([self.neg[a:b], self.pos[c:d]])
        fp_before, fp_through = self.fp_before[k0:k1] - first, self.fp_through[k0:k1] - first
        return {"matrix": _csr(runs, n_neg + 1 + k1 - k0, codes[items], n_clusters, dtype), "n_neg": n_neg,
                "fp_before": fp_before, "fp_through": fp_through,
                "ties": not np.array_equal(fp_before, fp_through)}

    def _chunk(self, blocks: list, totals: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The metrics of one chunk of resamples (``counts``: clusters x resamples); ``totals``:
        each resample's positives, negatives, and both at or above 0.5."""
        exact = counts.dtype == np.float32
        n_pos, n_neg, tp5, fp5 = totals.astype(np.float64)
        width = counts.shape[1]
        columns = np.arange(width)
        below, precision_sum, sens_tp = np.zeros(width), np.zeros(width), np.zeros(width)
        carry_fp, carry_tp = np.zeros(width, counts.dtype), np.zeros(width, counts.dtype)
        limit = (0.05 + _SPEC_TOL) * n_neg  # specificity >= 0.95: FP <= 5% of the negatives
        limit = (np.floor(limit) if exact else limit).astype(counts.dtype)
        tiny = np.finfo(counts.dtype).tiny
        for block in blocks:
            sums = block["matrix"] @ counts
            fp, tp = sums[:block["n_neg"]], sums[block["n_neg"]:]
            pos = tp[1:].copy()  # the positives' weight in each positive group
            fp[0], tp[0] = carry_fp, carry_tp
            cumsum_rows(fp)
            cumsum_rows(tp)
            carry_fp, carry_tp = fp[-1].copy(), tp[-1].copy()
            fp_before = fp[block["fp_before"]]
            fp_through, tp_through = (fp[block["fp_through"]] if block["ties"] else fp_before), tp[1:]
            # pairs (positive, negative) in the wrong order, a tie counting one half
            if block["ties"]:
                below += np.einsum("kb,kb->b", pos, np.add(fp_before, fp_through, dtype=np.float64)) / 2
            else:
                below += np.einsum("kb,kb->b", pos, fp_before, dtype=np.float64)
            called = tp_through + fp_through
            np.maximum(called, tiny, out=called)  # 0 only where the group has no positive either
            precision_sum += np.einsum("kb,kb->b", pos, np.divide(tp_through, called, dtype=np.float64))
            # FP rises with k, so the groups within the specificity limit are a prefix
            reach = count_at_most(fp_through, limit)
            sens_tp = np.where(reach > 0, tp_through[np.maximum(reach - 1, 0), columns], sens_tp)
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (n_pos * n_neg - below) / (n_pos * n_neg)
            auprc = precision_sum / n_pos
            sens = sens_tp / n_pos
            denom = 2 * tp5 + fp5 + (n_pos - tp5)
            f1 = np.where(denom > 0, 2 * tp5 / np.where(denom > 0, denom, 1), np.nan)
            sens5 = np.where(n_pos > 0, tp5 / n_pos, np.nan)
            spec5 = np.where(n_neg > 0, 1 - fp5 / n_neg, np.nan)
        defined = (n_pos > 0) & (n_neg > 0)
        return {"auroc": np.where(defined, auroc, np.nan), "auprc": np.where(defined, auprc, np.nan),
                "f1@0.5": f1, "sens@95spec": np.where(defined, sens, np.nan),
                "sens@0.5": np.where(defined, sens5, np.nan), "spec@0.5": np.where(defined, spec5, np.nan)}


def binary_metrics_weighted(y: np.ndarray, p: np.ndarray, w) -> dict[str, np.ndarray]:
    """Every metric of one label for each resample in ``w``: row weights (B, n) or (n,), or
    :class:`Resamples` of the n rows.

    ``y`` in {0, 1} and ``p`` finite, both (n,), rows with unknown labels already removed.
    Returns {metric: array (B,) or scalar}; undefined values are NaN.
    """
    y, p = np.asarray(y, float), np.asarray(p, float)
    squeeze = not isinstance(w, Resamples) and np.ndim(w) == 1
    res = as_resamples(w, len(y))
    out = _Ranking.of(y, p, np.arange(len(y))).evaluate(res)
    return {m: v[0] for m, v in out.items()} if squeeze else out


def count_at_most(columns: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """For each column of ``columns`` (n, B), non-decreasing down the column: how many entries
    are <= ``limit`` (B,). Bisection on long columns, a count on short ones."""
    n, width = columns.shape
    if n <= 4096:
        return np.sum(columns <= limit, axis=0)
    lo, hi, index = np.zeros(width, np.intp), np.full(width, n, np.intp), np.arange(width)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        below = columns[np.minimum(mid, n - 1), index] <= limit
        lo, hi = np.where((lo < hi) & below, mid + 1, lo), np.where((lo < hi) & ~below, mid, hi)
    return lo


def cumsum_rows(x: np.ndarray, block: int = 16) -> np.ndarray:
    """Cumulative sum along the first axis of a 2-D array, in place (:func:`accumulate_rows`)."""
    return accumulate_rows(x, np.add, block)


def accumulate_rows(x: np.ndarray, ufunc=np.add, block: int = 16) -> np.ndarray:
    """``ufunc.accumulate(x, axis=0)`` of a 2-D array, in place, for an associative ``ufunc``
    (add, minimum): equal up to the order of float additions (exact for integers). On long
    arrays, a few vectorised passes over blocks of rows instead of numpy's element-by-element
    accumulation."""
    n = len(x)
    if n < 16 * block or not x.flags.c_contiguous:
        return ufunc.accumulate(x, axis=0, out=x)
    full = n - n % block
    blocks = x[:full].reshape(full // block, block, *x.shape[1:])
    for i in range(1, block):
        ufunc(blocks[:, i], blocks[:, i - 1], out=blocks[:, i])
    carry = ufunc.accumulate(blocks[:, -1], axis=0)
    ufunc(blocks[1:], carry[:-1, None], out=blocks[1:])
    for i in range(full, n):
        ufunc(x[i], x[i - 1], out=x[i])
    return x


def binary_metrics(y, p) -> dict[str, float]:
    """Every metric of one label, unweighted, unknown (NaN) labels masked."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    known = ~np.isnan(y)
    res = binary_metrics_weighted(y[known], p[known], Resamples.single(int(known.sum())))
    return {m: float(v[0]) for m, v in res.items()}


def _label_stats(y: np.ndarray) -> dict:
    known = ~np.isnan(y)
    n, n_pos = int(known.sum()), int(np.nansum(y))
    return {"n": n, "n_pos": n_pos, "prevalence": n_pos / n if n else float("nan")}


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where every entry is NaN (no warning)."""
    count = np.sum(~np.isnan(values), axis=-1)
    total = np.nansum(values, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _in_parallel(fn, items) -> list:
    """``[fn(x) for x in items]`` on one thread per core this process may use (numpy and scipy
    release the GIL in the work that matters here)."""
    items = list(items)
    cores = available_cores()
    if cores < 2 or len(items) < 2:
        return [fn(x) for x in items]
    # one BLAS thread per worker: the workers already use the cores
    with threadpool_limits(1), ThreadPoolExecutor(min(cores, len(items))) as pool:
        return list(pool.map(fn, items))


class Ranked:
    """Every label's known rows and, with ``micro``, all known (row, label) pairs pooled, each
    sorted by score once: what :func:`scores` ranks. :meth:`rows` gives a subset's rankings
    without sorting again."""

    def __init__(self, y, p, micro: bool = True, parts: tuple | None = None):
        if parts is not None:
            self.per_class, self.pooled = parts
            return
        y, p = np.asarray(y, float), np.asarray(p, float)

        def ranking(j):
            if j is None:
                rows, cols = np.nonzero(~np.isnan(y))
                return _Ranking.of(y[rows, cols], p[rows, cols], rows, per_row=max(1, y.shape[1]))
            rows = np.flatnonzero(~np.isnan(y[:, j]))
            return _Ranking.of(y[rows, j], p[rows, j], rows)

        made = _in_parallel(ranking, [*([None] if micro else []), *range(y.shape[1])])
        self.per_class, self.pooled = (made[1:], made[0]) if micro else (made, None)

    def rows(self, keep, micro: bool = True) -> Ranked:
        """The rankings of the rows ``keep`` (a mask), renumbered from 0; ``micro`` False leaves
        the pooled one out."""
        keep = np.asarray(keep)
        if keep.dtype != bool:
            raise ValueError("Ranked.rows takes a mask of the rows")
        renumber = np.cumsum(keep) - 1
        pooled = self.pooled.subset(keep, renumber) if micro and self.pooled is not None else None
        return Ranked(None, None, parts=([r.subset(keep, renumber) for r in self.per_class], pooled))

    def evaluate(self, res: Resamples) -> dict:
        """{"per_class": [ {metric: (B,)} per label ], "macro": {...}, "micro": {...} or None}."""
        rankings = [*([self.pooled] if self.pooled is not None else []), *self.per_class]
        done = _in_parallel(lambda r: r.evaluate(res), rankings) if res.n_boot > 1 else [r.evaluate(res) for r in rankings]
        micro, values = (done[0], done[1:]) if self.pooled is not None else (None, done)
        macro = {m: nanmean_rows(np.stack([v[m] for v in values], axis=-1)) if values else np.full(res.n_boot, np.nan)
                 for m in METRICS}
        return {"per_class": values, "macro": macro, "micro": micro}


def scores(y, p, weights=None, micro: bool = True, ranked: Ranked | None = None) -> dict:
    """Every metric of probabilities ``p`` (N, L) for labels ``y`` (N, L; NaN unknown): ``point``
    on the rows as given and, when ``weights`` are given (:class:`Resamples` of the N rows, or row
    weights (B, N)), ``boot`` on each resample (else None); ``micro`` False leaves the pooled
    metrics out (None); ``ranked``: these rows' :class:`Ranked`, when already sorted. The expensive
    part of every report and comparison, so each is computed once and reused (one clean pass's
    scores serve every corrupted pass compared with it)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    ranked = Ranked(y, p, micro) if ranked is None else ranked
    if not micro:
        ranked = Ranked(None, None, parts=(ranked.per_class, None))
    res = as_resamples(weights, len(y))
    return {"point": ranked.evaluate(Resamples.single(len(y))), "boot": None if res is None else ranked.evaluate(res)}


def metrics_from_scores(y, s: dict, labels, split=None) -> dict:
    """SPEC metrics schema from :func:`scores` of labels ``y``; with resamples, 95% intervals
    (``ci95``) too."""
    y = np.asarray(y, float)
    scalar = lambda d: {m: float(d[m][0]) for m in METRICS}  # noqa: E731
    per_class = {}
    for j, label in enumerate(labels):
        per_class[label] = {**scalar(s["point"]["per_class"][j]), **_label_stats(y[:, j])}
    metrics = {"split": split, "n": int(len(y)), "labels": list(labels),
               "macro": scalar(s["point"]["macro"]), "micro": scalar(s["point"]["micro"]), "per_class": per_class}
    return metrics if s["boot"] is None else _attach_ci(metrics, s["boot"], labels)


def compute_metrics(y, p, labels, split=None) -> dict:
    """SPEC metrics schema for labels ``y`` (N, L; NaN unknown) and probabilities ``p`` (N, L)."""
    return metrics_from_scores(y, scores(y, p), labels, split)


# ====== bootstrap ======

def cluster_codes(clusters) -> tuple[np.ndarray, int]:
    """(code of each row's cluster, 0..k-1 in sorted order of the ids as strings; k)."""
    codes, ids = pd.factorize(np.asarray(clusters).astype(str).ravel(), sort=True)
    return codes.astype(np.intp), len(ids)


@functools.lru_cache(maxsize=2)
def _cluster_draws(k: int, n_boot: int, seed: int) -> tuple[int, tuple]:
    """(k, blocks of (k, <= _BLOCK) float32 multiplicities): k clusters drawn with replacement,
    n_boot times. Read only, and kept for the next analysis of the same split (same number of
    clusters, resamples and seed)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_boot, _BLOCK):
        size = min(_BLOCK, n_boot - start)
        draws = rng.multinomial(k, np.full(k, 1.0 / k), size=size) if k else np.zeros((size, 0))
        block = np.ascontiguousarray(draws.T, dtype=np.float32)
        block.setflags(write=False)
        blocks.append(block)
    return k, tuple(blocks)


def forget_draws() -> None:
    """Drop the kept draws, so the next analysis of a split draws its resamples again."""
    _cluster_draws.cache_clear()


def bootstrap_resamples(clusters, n_boot: int, seed: int) -> Resamples:
    """``n_boot`` cluster-bootstrap resamples of the rows: clusters (patients) are drawn with
    replacement and every row of a drawn cluster comes along (pass ``np.arange(n)`` for rows)."""
    codes, k = cluster_codes(clusters)
    return Resamples(codes, _cluster_draws(k, n_boot, seed), integral=True)


def bootstrap_weights(clusters, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row multiplicities of :func:`bootstrap_resamples`."""
    return bootstrap_resamples(clusters, n_boot, seed).weights()


def percentile_ci(values: np.ndarray) -> list | None:
    """95% percentile interval of the finite bootstrap ``values`` (None with fewer than 10)."""
    values = values[~np.isnan(values)]
    if len(values) < MIN_BOOT:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def honest_ci(metric: str, boot, value, n_pos: int, n: int) -> list | None:
    """The 95% interval the suite reports for one label's metric: the hull of the percentile
    bootstrap and, for AUROC and sensitivity, the score interval (``tools.stats``), which stays
    an interval where the bootstrap collapses to a point (an AUROC of 1.0)."""
    ci = percentile_ci(boot)
    if metric not in SCORE_METRICS or not np.isfinite(value):
        return ci
    lo, hi = score_interval(metric, value, n_pos, n - n_pos)
    return hull(ci, [float(lo), float(hi)])


def _attach_ci(metrics: dict, boot: dict, labels) -> dict:
    metrics["micro"]["ci95"] = {m: percentile_ci(boot["micro"][m]) for m in METRICS}
    for j, label in enumerate(labels):
        block = metrics["per_class"][label]
        block["ci95"] = {m: honest_ci(m, boot["per_class"][j][m], block[m], block["n_pos"], block["n"])
                         for m in METRICS}
    # macro: the hull of its bootstrap interval and the mean of the per-label ends, so a macro
    # average at a boundary is not a point either
    metrics["macro"]["ci95"] = {}
    for m in METRICS:
        ends = [metrics["per_class"][lbl]["ci95"][m] for lbl in labels]
        mean_ends = [float(np.mean([e[0] for e in ends])), float(np.mean([e[1] for e in ends]))] \
            if all(e is not None for e in ends) and m in SCORE_METRICS else None
        metrics["macro"]["ci95"][m] = hull(percentile_ci(boot["macro"][m]), mean_ends)
    return metrics


def metrics_with_ci(y, p, labels, clusters=None, n_boot=1000, seed=0, split=None, ranked: Ranked | None = None) -> dict:
    """:func:`compute_metrics` plus 95% percentile bootstrap intervals (``ci95``) resampling
    ``clusters`` (patient ids; rows when None); ``ranked``: the rows' :class:`Ranked`, when
    already sorted."""
    resamples = None
    if n_boot > 0:
        resamples = bootstrap_resamples(np.arange(len(y)) if clusters is None else clusters, n_boot, seed)
    return metrics_from_scores(y, scores(y, p, resamples, ranked=ranked), labels, split)


def difference(a: dict, b: dict, labels) -> dict:
    """Metrics of :func:`scores` ``a`` minus those of ``b``, macro and per class, with 95%
    intervals when both hold resamples drawn together (the same patients on both sides, so the
    interval is for the difference itself: a group against the rest, a corrupted pass against
    the clean one on the same rows), and then the bootstrap p-value of "no difference"
    (``p_value``)."""
    boot = a["boot"] is not None and b["boot"] is not None

    def block(get):
        out = {m: float(get(a["point"])[m][0] - get(b["point"])[m][0]) for m in METRICS}
        if boot:
            diffs = {m: get(a["boot"])[m] - get(b["boot"])[m] for m in METRICS}
            out["ci95"] = {m: percentile_ci(diffs[m]) for m in METRICS}
            out["p_value"] = {m: bootstrap_p(out[m], diffs[m]) for m in METRICS}
        return out

    return {"macro": block(lambda r: r["macro"]),
            "per_class": {label: block(lambda r, j=j: r["per_class"][j]) for j, label in enumerate(labels)}}


# ====== decisions across thresholds ======

def threshold_sweep(y: np.ndarray, p: np.ndarray, labels, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Confusion counts and rates of the decision ``p >= t`` for every threshold t, per label, on
    the rows whose label is known. Sensitivity = tp/(tp+fn), specificity = tn/(tn+fp), precision
    = tp/(tp+fp), F1 = 2tp/(2tp+fp+fn); each NaN when its denominator is 0.

    Vectorised over thresholds: with the scores of each class sorted, the count of scores >= t is
    the class size minus ``searchsorted(sorted, t, side="left")``."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    t = np.asarray(thresholds, float)
    frames = []
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        pos, neg = np.sort(p[known & (y[:, j] == 1), j]), np.sort(p[known & (y[:, j] == 0), j])
        tp = len(pos) - np.searchsorted(pos, t, side="left")
        fp = len(neg) - np.searchsorted(neg, t, side="left")
        fn, tn = len(pos) - tp, len(neg) - fp
        frames.append(pd.DataFrame({"label": label, "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                                    "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                                    "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}))
    return pd.concat(frames, ignore_index=True)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def best_thresholds(sweep: pd.DataFrame, reference: float = REFERENCE_THRESHOLD) -> list[dict]:
    """Per label: the threshold of the highest F1 (the lowest such threshold on ties; None when F1
    is undefined everywhere) with its F1, sensitivity and specificity, and the same at ``reference``."""
    out = []
    for label, block in sweep.groupby("label", sort=False):
        f1 = block["f1"].to_numpy()
        best = block.iloc[int(np.nanargmax(f1))] if np.isfinite(f1).any() else None
        ref = block[np.isclose(block["threshold"], reference)]
        ref = ref.iloc[0] if len(ref) else None
        pick = lambda r, k: None if r is None else float(r[k])  # noqa: E731
        first = block.iloc[0]  # every row holds the same known rows, split differently
        out.append({"label": label, "n": int(first[["tp", "fp", "tn", "fn"]].sum()),
                    "n_pos": int(first["tp"] + first["fn"]),
                    "best_threshold": pick(best, "threshold"), "best_f1": pick(best, "f1"),
                    "best_sensitivity": pick(best, "sensitivity"), "best_specificity": pick(best, "specificity"),
                    "ref_f1": pick(ref, "f1"), "ref_sensitivity": pick(ref, "sensitivity"),
                    "ref_specificity": pick(ref, "specificity")})
    return out
