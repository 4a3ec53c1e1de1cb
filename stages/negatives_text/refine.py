"""Adversarial refinement of text negatives against a blind (text-only) classifier.

Why
---
A negative expression must be rejected because of the *image*, not because of how it reads. If
"the table on the cup" only ever occurs as a negative, a model learns to reject it without looking.
SugarCrepe (Hsieh et al., 2023) found such artifacts in earlier compositionality benchmarks and
removed them: it scored every positive and negative caption with text-only models (Vera, a
commonsense plausibility model, and a grammar model) and kept negatives so that, per negative
type, the blind models prefer the positive and the negative equally often (the blind score
*gap* is balanced). This module is the cheap offline analogue, fitted on the build's own
expressions instead of borrowed models:

1. :class:`BlindTextClassifier`: bag of words and word bigrams (with sentence-boundary markers),
   binary features, L2-regularised logistic regression fitted by Newton-CG in numpy
   (deterministic; identical texts are pooled into weighted rows, so templated builds fit fast).
2. :func:`cross_fit_scores`: every sample gets an *out-of-fold* score from a model that never saw
   its image: folds are split by group (the image id), so an image's positive and its negatives are
   always on the same side.
3. :func:`refine`: score positives and negatives out of fold; the held-out AUROC of positives vs
   negatives is ``auroc_before``. Then, per negative type, keep negatives so that their blind-score
   histogram (over bins at the quantiles of the positives' scores) matches the positives': within
   each type the bins where negatives are over-represented relative to the positives are subsampled
   (seeded, uniformly inside a bin); the degree of matching is relaxed as far as the predicted
   AUROC allows, so as many negatives as possible are kept, and a type that cannot be matched
   (e.g. it has nothing in some bin) is thinned rather than dropped whenever the target allows it.
   Refit on positives + kept negatives, re-score out of fold and repeat until the held-out AUROC
   is ``<= target_auroc`` or ``max_rounds`` selection rounds have run; if the refit lands well under
   the target, relax the last selection again (verified by another refit). ``auroc_after`` is the
   held-out AUROC of the final kept set, never an in-sample number.

Floors (no type is emptied silently)
------------------------------------
Negatives are also grouped into *strata*, one per (type, level) (``neg_levels``; by type alone when
no levels are given). Stratum ``s`` with ``n_s`` candidates has the floor
``min(n_s, max(ceil(floor * n_s), floor_min))`` (``floor_min >= 1``): a round never takes a stratum
below it; where the selection would, the stratum keeps its floor's worth of its least separable
negatives (lowest held-out blind scores, ties by index) and :attr:`RefineResult.floored` names it.
So no round empties a stratum, the kept set is never empty while there are candidates, and the
held-out AUROC stays defined (an emptied set used to give ``nan``, which stopped the reduce and
restore loops and ended a build with zero text negatives). When floors bind, the final AUROC may
stay above the target: :attr:`RefineResult.met` is False then, and the stage warns.

The selection in one formula: for type ``t`` and score bin ``b`` let ``rho[t, b]`` be the share of
``t``'s negatives in ``b`` over the share of positives in ``b``. At level ``g`` the cell keeps the
fraction ``min(1, max(g, g_t) / rho[t, b])`` of its negatives, where ``g_t = min_b rho[t, b]`` is
the type's exact-match level (``g <= g_t``: the largest subset of the type whose histogram equals the
positives'; ``g -> inf``: everything). The AUROC a level predicts is the mean, over the negatives it
keeps, of their rank among the positives' scores (ties one half); the largest level (one for all
types) whose prediction meets the goal wins.

Performance: only tokenisation is Python; n-gram ids, the pooled CSR design, the Newton-CG fits
(``np.add.reduceat`` / ``np.bincount`` matrix-vector products) and the selection are numpy. A
typical build needs three cross-fits (before, after one round, one restore probe), each five
fits warm-started across rounds.

Differences from SugarCrepe: SugarCrepe used pretrained plausibility/grammar models and paired
comparisons (positive vs its own negative); here the blind model is trained on the build itself
(so it catches the build's own template artifacts, which a pretrained model may not) and the
criterion is distributional (AUROC over the whole set, histogram-matched per type).

Labels: throughout, ``1`` marks a negative expression (the class the blind model tries to detect)
and ``0`` a positive one; an AUROC of 0.5 means the blind model cannot tell them apart.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BlindTextClassifier",
    "RefineResult",
    "auroc",
    "cross_fit_scores",
    "floor_counts",
    "group_folds",
    "refine",
]

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


# ---------------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------------


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random label-1 item > score of a random label-0 item),
    ties counted one half (the Mann-Whitney U statistic over ``n1 * n0``). ``nan`` when one class is
    missing.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> auroc([0.5, 0.5, 0.5], [0, 1, 1])
    0.5
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    # average ranks (1-based) over runs of ties
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], ss.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


# ---------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------


def _features(text: str) -> set[str]:
    """The features of a text, by name (the reference for :class:`_Design`, which computes the same set
    numerically): ``"u w"`` per word, ``"b w1 w2"`` per adjacent pair with ``<s>``/``</s>`` at the ends."""
    toks = _TOKEN.findall(text.lower())
    feats = {f"u {t}" for t in toks}
    seq = ["<s>", *toks, "</s>"]
    feats.update(f"b {a} {b}" for a, b in zip(seq, seq[1:], strict=False))
    return feats


_BOS, _EOS, _UNK = 0, 1, (1 << 24) - 1
_SHIFT = 24  # feature key: a word id for unigrams, ((left + 1) << 24) | right for bigrams


@dataclass
class _Vocab:
    tokens: dict[str, int] = field(default_factory=lambda: {"<s>": _BOS, "</s>": _EOS})
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted; index = feature id


class _Design:
    """Binary word/bigram rows of the distinct texts (by their words) in CSR form (``indptr``, ``indices``), and ``uid``:
    the unique row of each input text. Fitting mode (``vocab=None``) builds the vocabulary, keeping
    features present in at least ``min_df`` input texts; with a given ``vocab`` unseen features are
    dropped. Only tokenisation is Python; n-gram ids, deduplication and counts are numpy."""

    def __init__(self, texts: Sequence[str], vocab: _Vocab | None = None, min_df: int = 1):
        fitting = vocab is None
        self.vocab = _Vocab() if vocab is None else vocab
        find = _TOKEN.findall
        tok = self.vocab.tokens

        def words_of(text: str) -> tuple:
            # fitting: the word ids (a word gets its id the first time a text shows it, as it did over the
            # distinct texts in first-seen order), so no text's words stay alive as strings (a refine
            # block's peak); else the words, mapped to ids below
            if fitting:
                return tuple([tok.setdefault(w, len(tok)) for w in find(text.lower())])
            return tuple(find(text.lower()))

        rows_of: dict[tuple, int] = {}  # texts with the same words share a row
        self.uid = np.fromiter((rows_of.setdefault(words_of(t), len(rows_of)) for t in texts), dtype=np.int64,
                               count=len(texts))
        n = self.n_rows = len(rows_of)
        flat: list[int] = []
        lengths = np.zeros(n, dtype=np.int64)
        for i, words in enumerate(rows_of):
            flat.extend(words if fitting else (tok.get(w, _UNK) for w in words))
            lengths[i] = len(words)
        if len(tok) >= _UNK:
            raise ValueError("more than 16 million distinct words")
        words_arr = np.asarray(flat, dtype=np.int64)
        del rows_of, flat  # the words as Python objects: gone before the arrays below
        # sequences with boundary markers, concatenated row after row
        seq_len = lengths + 2
        ends = np.cumsum(seq_len)
        starts = ends - seq_len
        seq = np.empty(int(ends[-1]) if n else 0, dtype=np.int64)
        inner = np.ones(seq.size, dtype=bool)
        inner[starts] = False
        inner[ends - 1] = False
        seq[starts] = _BOS
        seq[ends - 1] = _EOS
        seq[inner] = words_arr
        pair_ok = np.ones(max(seq.size - 1, 0), dtype=bool)
        pair_ok[(ends - 1)[:-1]] = False  # no pair across two texts
        left, right = seq[:-1][pair_ok], seq[1:][pair_ok]
        del seq, inner, pair_ok
        keys = np.r_[words_arr, ((left + 1) << _SHIFT) | right]
        del left, right, words_arr
        rows = np.r_[np.repeat(np.arange(n), lengths), np.repeat(np.arange(n), seq_len - 1)]
        if not fitting:  # unknown words and unseen n-grams have no feature
            known = np.searchsorted(self.vocab.keys, keys)
            ok = known < self.vocab.keys.size
            ok[ok] = self.vocab.keys[known[ok]] == keys[ok]  # never true for keys with _UNK in them
            keys, rows, fid = keys[ok], rows[ok], known[ok]
            n_feat = self.vocab.keys.size
        else:
            ukeys, fid = np.unique(keys, return_inverse=True)
            n_feat = ukeys.size
        cell = rows * max(n_feat, 1) + fid
        del rows, fid, keys
        cell.sort()  # one entry per (row, feature), sorted by row
        cell = cell[np.r_[True, cell[1:] != cell[:-1]]] if cell.size else cell
        rows, fid = cell // max(n_feat, 1), cell % max(n_feat, 1)
        del cell
        if fitting:
            df = np.bincount(fid, weights=np.bincount(self.uid, minlength=n)[rows], minlength=n_feat)
            keep = df >= min_df
            remap = np.cumsum(keep) - 1
            sel = keep[fid]
            rows, fid = rows[sel], remap[fid[sel]]
            self.vocab.keys = ukeys[keep]
        self.indices = fid.astype(np.int64)
        self.rowids = rows.astype(np.int64)
        self.indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n))].astype(np.int64)

    def feature_names(self) -> list[str]:
        inv = {i: w for w, i in self.vocab.tokens.items()}
        out = []
        for k in self.vocab.keys.tolist():
            if k >> _SHIFT:
                out.append(f"b {inv[(k >> _SHIFT) - 1]} {inv[k & _UNK]}")
            else:
                out.append(f"u {inv[k]}")
        return out

    @property
    def n_features(self) -> int:
        return int(self.vocab.keys.size)

    def subset(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, rowids)`` of the given unique rows (renumbered 0..len(rows)-1)."""
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        total = int(lengths.sum())
        rowids = np.repeat(np.arange(rows.size), lengths)
        offsets = np.repeat(self.indptr[rows] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        return self.indices[np.arange(total) + offsets], rowids


# ---------------------------------------------------------------------------------------------------
# logistic regression (Newton-CG on pooled rows)
# ---------------------------------------------------------------------------------------------------


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product without BLAS: a threaded BLAS call this small only spins extra cores."""
    return float(np.add.reduce(a * b))


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(_dot(a, a)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _rowsum(values: np.ndarray, rowids: np.ndarray, n_rows: int) -> np.ndarray:
    """Per-row sums of CSR ``values`` (rows given by sorted ``rowids``)."""
    if values.size == 0:
        return np.zeros(n_rows)
    starts = np.flatnonzero(np.r_[True, rowids[1:] != rowids[:-1]])
    out = np.zeros(n_rows)
    out[rowids[starts]] = np.add.reduceat(values, starts)
    return out


def _fit_pooled(indices: np.ndarray, rowids: np.ndarray, n_rows: int, n_features: int, c1: np.ndarray,
                c0: np.ndarray, l2: float, w0: np.ndarray | None = None, max_newton: int = 40,
                tol: float = 1e-3, max_cg: int = 50) -> np.ndarray:
    """Weights ``[w..., bias]`` minimising ``sum_r c1_r*softplus(-z_r) + c0_r*softplus(z_r) + l2/2*|w|^2``
    with ``z = X w + bias`` (X binary, CSR ``indices`` with sorted ``rowids``); the bias is unpenalised.

    Newton-CG (Jacobi-preconditioned CG, Armijo backtracking) until the gradient norm falls below
    ``tol`` times its initial value: blind scores are only ranked, so 1e-3 is ample."""
    n = c1 + c0
    starts = np.flatnonzero(np.r_[True, rowids[1:] != rowids[:-1]]) if rowids.size else np.zeros(0, np.int64)
    first_rows = rowids[starts] if rowids.size else starts
    dense = first_rows.size == n_rows  # every row has a feature: reduceat straight into the output

    def xv(v: np.ndarray) -> np.ndarray:
        vals = v[:-1][indices]
        if dense:
            return np.add.reduceat(vals, starts) + v[-1]
        out = np.full(n_rows, v[-1])
        if vals.size:
            out[first_rows] += np.add.reduceat(vals, starts)
        return out

    def xtr(r: np.ndarray) -> np.ndarray:
        return np.r_[np.bincount(indices, weights=r[rowids], minlength=n_features), r.sum()]

    def loss(z: np.ndarray, v: np.ndarray) -> float:
        return _dot(c1, _softplus(-z)) + _dot(c0, _softplus(z)) + 0.5 * l2 * _dot(v[:-1], v[:-1])

    reg = np.full(n_features + 1, l2)
    reg[-1] = 0.0
    # the base-rate model (w = 0, bias = log-odds of the labels): the cold start, and the reference
    # gradient that ``tol`` is relative to (also for a warm start, so a good start means fewer steps)
    base = (c1.sum() + 0.5) / (n.sum() + 1.0)
    g0 = max(_norm(xtr(n * base - c1)[:-1]), 1e-12)
    if w0 is None:
        w = np.zeros(n_features + 1)
        w[-1] = np.log(base / (1 - base))
    else:
        w = w0.copy()
    z = xv(w)
    f = loss(z, w)
    for _ in range(max_newton):
        s = _sigmoid(z)
        g = xtr(n * s - c1) + reg * w
        gn = _norm(g)
        if gn <= tol * g0 or gn < 1e-8:
            break
        d_w = n * s * (1 - s)
        diag = np.r_[np.bincount(indices, weights=d_w[rowids], minlength=n_features), d_w.sum()] + reg
        diag = np.maximum(diag, 1e-12)
        # preconditioned CG on H p = -g, forcing term sqrt(|g|/|g0|)
        eta = min(0.5, np.sqrt(min(gn / g0, 1.0)))
        p = np.zeros_like(w)
        r = -g
        y = r / diag
        q = y.copy()
        ry = _dot(r, y)
        for _ in range(max_cg):
            hq = xtr(d_w * xv(q)) + reg * q
            qhq = _dot(q, hq)
            if qhq <= 0:
                break
            alpha = ry / qhq
            p += alpha * q
            r -= alpha * hq
            if _norm(r) <= eta * gn:
                break
            y = r / diag
            ry_new = _dot(r, y)
            q = y + (ry_new / ry) * q
            ry = ry_new
        if not np.any(p):
            break
        # backtracking (Armijo) line search
        zp = xv(p)
        slope = _dot(g, p)
        step = 1.0
        while True:
            wn = w + step * p
            zn = z + step * zp
            fn = loss(zn, wn)
            if fn <= f + 1e-4 * step * slope or step < 1e-8:
                break
            step *= 0.5
        w, z, f = wn, zn, fn
    return w


class BlindTextClassifier:
    """A text-only classifier: binary word and word-bigram features, L2-regularised logistic
    regression (Newton-CG, numpy, deterministic).

    ``labels`` are 0/1; :meth:`predict_proba` returns P(label 1) as a 1-D array (features never seen
    in :meth:`fit` are ignored).

    >>> clf = BlindTextClassifier().fit(["the red ball", "the blue ball", "the zebra cup", "a zebra box"],
    ...                                 [0, 0, 1, 1])
    >>> bool(clf.predict_proba(["a zebra"])[0] > clf.predict_proba(["the blue ball"])[0])
    True
    """

    def __init__(self, l2: float = 1.0, min_df: int = 1):
        self.l2 = l2
        self.min_df = min_df
        self.vocab: _Vocab | None = None
        self.coef_: np.ndarray | None = None

    def fit(self, texts: Sequence[str], labels: Sequence[int] | np.ndarray) -> BlindTextClassifier:
        y = np.asarray(labels, dtype=np.float64)
        if y.shape != (len(texts),):
            raise ValueError("texts and labels must have the same length")
        design = _Design(texts, min_df=self.min_df)
        self.vocab = design.vocab
        c1 = np.bincount(design.uid, weights=y, minlength=design.n_rows)
        c0 = np.bincount(design.uid, weights=1 - y, minlength=design.n_rows)
        self.coef_ = _fit_pooled(design.indices, design.rowids, design.n_rows, design.n_features, c1, c0, self.l2)
        return self

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("fit the classifier first")
        design = _Design(texts, vocab=self.vocab)
        z = _rowsum(self.coef_[:-1][design.indices], design.rowids, design.n_rows) + self.coef_[-1]
        return z[design.uid]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return _sigmoid(self.decision_function(texts))


# ---------------------------------------------------------------------------------------------------
# cross-fitting by group
# ---------------------------------------------------------------------------------------------------


def group_folds(groups: Sequence[Hashable], folds: int = 5, seed: int = 0) -> np.ndarray:
    """A fold number per sample such that every group lies in one fold; folds are balanced by
    sample count (largest groups first onto the lightest fold, ties broken by a seeded shuffle).
    Uses ``min(folds, number of groups)`` folds."""
    keys = [str(g) for g in groups]
    if not keys:
        return np.zeros(0, dtype=np.int64)
    # groups numbered in sorted order, as np.unique would (code point order), without a fixed-width
    # unicode array of every key and its sorted copies (tens of MB for a refine block of long image ids)
    uniq = sorted(set(keys))
    number = {g: i for i, g in enumerate(uniq)}
    inv = np.fromiter((number[g] for g in keys), dtype=np.int64, count=len(keys))
    del keys, number
    sizes = np.bincount(inv, minlength=len(uniq))
    k = max(1, min(folds, len(uniq)))
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(uniq))
    order = np.lexsort((tiebreak, -sizes))
    heap = [(0, f) for f in range(k)]
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for gi in order:
        load, f = heapq.heappop(heap)
        fold_of_group[gi] = f
        heapq.heappush(heap, (load + int(sizes[gi]), f))
    return fold_of_group[inv]


def _cross_fit(design: _Design, uid: np.ndarray, y: np.ndarray, fold: np.ndarray, l2: float,
               warm: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Out-of-fold P(label 1) for the samples ``uid`` (rows of ``design``) with labels ``y``."""
    scores = np.full(uid.size, 0.5)
    for f in np.unique(fold):
        test = fold == f
        train = ~test
        if y[train].min(initial=1) == y[train].max(initial=0):  # one class (or none) to learn from
            continue
        rows, inv = np.unique(uid[train], return_inverse=True)
        c1 = np.bincount(inv, weights=y[train], minlength=rows.size)
        c0 = np.bincount(inv, weights=1 - y[train], minlength=rows.size)
        indices, rowids = design.subset(rows)
        w = _fit_pooled(indices, rowids, rows.size, design.n_features, c1, c0, l2,
                        w0=None if warm is None else warm.get(int(f)))
        if warm is not None:
            warm[int(f)] = w
        trows, tinv = np.unique(uid[test], return_inverse=True)
        tind, trowids = design.subset(trows)
        z = _rowsum(w[:-1][tind], trowids, trows.size) + w[-1]
        scores[test] = _sigmoid(z)[tinv]
    return scores


def cross_fit_scores(texts: Sequence[str], labels: Sequence[int] | np.ndarray, groups: Sequence[Hashable],
                     folds: int = 5, seed: int = 0, l2: float = 1.0, min_df: int = 2) -> np.ndarray:
    """Out-of-fold blind scores P(label 1): each sample is scored by a model fitted on the other
    folds, folds split by ``groups`` (:func:`group_folds`). With a single group nothing can be held
    out and every score is 0.5.

    Features seen in fewer than ``min_df`` texts are dropped: a feature of a single text can only
    ever be on one side of a split, so it cannot carry a held-out signal (it would only act as that
    text's private slack in training)."""
    y = np.asarray(labels, dtype=np.float64)
    if not (len(texts) == y.size == len(groups)):
        raise ValueError("texts, labels and groups must have the same length")
    design = _Design(texts, min_df=min_df)
    return _cross_fit(design, design.uid, y, group_folds(groups, folds, seed), l2)


# ---------------------------------------------------------------------------------------------------
# refinement
# ---------------------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """What :func:`refine` kept and why it rejected the rest. Indices refer to the negatives' input order.

    ``scores``: per negative, its latest held-out blind score (for a rejected one, the score it was
    rejected with). ``history``: the held-out AUROC of every set evaluated, in order: all negatives,
    then after each round (restore probes included, accepted or not); ``auroc_after`` is the kept set's.
    AUROCs are ``nan`` when they are undefined (no positives, no negatives, or a single group).
    """

    kept: list[int]
    rejected: dict[int, str]
    auroc_before: float
    auroc_after: float
    rounds: int
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    scores: np.ndarray
    history: list[float] = field(default_factory=list)
    target_auroc: float = 0.6
    strata_before: dict[str, int] = field(default_factory=dict)
    strata_after: dict[str, int] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    floored: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        """Whether the kept set's held-out AUROC is at most the target (False when undefined)."""
        return bool(self.auroc_after <= self.target_auroc)


def _select(sp: np.ndarray, sn: np.ndarray, types: np.ndarray, n_types: int, goal: float, bins: int,
            key: np.ndarray, exact: bool) -> tuple[np.ndarray, ...]:
    """Histogram matching of negatives' scores ``sn`` to positives' ``sp``, per type.

    Returns, per negative: keep mask; its (type, bin) cell's density ratio to the positives (the cell's
    share of the type's negatives over the bin's share of the positives); how many of the cell are
    kept; the cell's size.
    """
    edges = np.unique(np.quantile(sp, np.linspace(0, 1, bins + 1)[1:-1]))
    nb = edges.size + 1
    pb = np.bincount(np.searchsorted(edges, sp, side="right"), minlength=nb) / sp.size
    bn = np.searchsorted(edges, sn, side="right")
    sps = np.sort(sp)
    a = (np.searchsorted(sps, sn, side="left") + np.searchsorted(sps, sn, side="right")) / (2.0 * sp.size)
    cell = types * nb + bn
    n = np.bincount(cell, minlength=n_types * nb).reshape(n_types, nb).astype(np.float64)
    asum = np.bincount(cell, weights=a, minlength=n_types * nb).reshape(n_types, nb)
    nt = n.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(nt > 0, n / np.maximum(nt, 1), 0.0)
        rho = np.where(pb > 0, share / np.where(pb > 0, pb, 1), np.where(n > 0, np.inf, 0.0))
        amean = np.where(n > 0, asum / np.maximum(n, 1), 0.0)
    covered = pb > 0
    gmin = np.where(covered[None, :], rho, np.inf).min(axis=1)  # exact-match level per type
    gmin = np.where(np.isfinite(gmin), gmin, 0.0)

    finite = rho[np.isfinite(rho) & (rho > 0)]
    grid = np.unique(np.r_[0.0, finite, np.geomspace(max(finite.min(), 1e-3), finite.max(), 256)]
                     if finite.size else np.r_[0.0])
    if exact:
        grid = np.r_[0.0]
    g = np.maximum(grid[:, None], gmin[None, :])[:, :, None]            # (G, T, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(rho[None] > 0, np.minimum(1.0, g / rho[None]), 1.0)  # (G, T, B); inf rho -> 0
    k = np.minimum(n[None], np.floor(frac * n[None] + 0.5))
    total = k.sum(axis=(1, 2))
    pred = np.where(total > 0, (k * amean[None]).sum(axis=(1, 2)) / np.maximum(total, 1), 0.0)
    feasible = pred <= goal
    best = int(np.flatnonzero(feasible)[np.argmax(total[feasible])]) if feasible.any() else int(np.argmin(pred))
    keep_k = k[best]

    # inside each (type, bin) cell keep a seeded uniform subset of the chosen size (``key`` orders it)
    order = np.lexsort((key, cell))
    sorted_cells = cell[order]
    first = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank = np.arange(sn.size) - first
    keep = np.empty(sn.size, dtype=bool)
    keep[order] = rank < keep_k.reshape(-1)[sorted_cells]
    return keep, rho.reshape(-1)[cell], keep_k.reshape(-1)[cell], n.reshape(-1)[cell]


def floor_counts(strata: Sequence[str], floor: float = 0.0, floor_min: int = 1) -> dict[str, int]:
    """The floor of every stratum: ``min(n, max(ceil(floor * n), floor_min))`` of its ``n`` negatives.

    >>> floor_counts(["a/L1"] * 10 + ["b/L2"] * 3, floor=0.25, floor_min=1)
    {'a/L1': 3, 'b/L2': 1}
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError("floor is a fraction between 0 and 1")
    if floor_min < 1:
        raise ValueError("floor_min must be at least 1: a round never empties a stratum")
    n = Counter(strata)
    return {s: min(c, max(math.ceil(floor * c - 1e-9), floor_min)) for s, c in sorted(n.items())}


def _floor(keep: np.ndarray, kidx: np.ndarray, strata: np.ndarray, floors: np.ndarray,
           scores: np.ndarray) -> tuple[np.ndarray, set[int]]:
    """``keep`` (over ``kidx``) topped up so that every stratum keeps at least its floor: the stratum's
    lowest-scored negatives that the selection rejected come back. Returns it and the strata topped up."""
    codes = strata[kidx]
    kept_n = np.bincount(codes[keep], minlength=floors.size)
    short = np.flatnonzero(kept_n < floors)
    if short.size == 0:
        return keep, set()
    keep = keep.copy()
    for c in short:
        cand = np.flatnonzero((codes == c) & ~keep)
        order = np.lexsort((kidx[cand], scores[kidx[cand]]))
        keep[cand[order[: int(floors[c] - kept_n[c])]]] = True
    return keep, {int(c) for c in short}


def refine(pos_texts: Sequence[str], pos_groups: Sequence[Hashable], neg_texts: Sequence[str],
           neg_groups: Sequence[Hashable], neg_types: Sequence[str], *, target_auroc: float = 0.6,
           max_rounds: int = 5, seed: int = 0, folds: int = 5, bins: int = 10, l2: float = 1.0,
           margin: float = 0.02, min_df: int = 2, neg_levels: Sequence[str] | None = None,
           floor: float = 0.0, floor_min: int = 1) -> RefineResult:
    """Keep the negatives a blind text model cannot tell from the positives (module docstring).

    *Floors*: no round takes a (type, level) stratum (``neg_levels`` given) or a type below
    :func:`floor_counts` (``floor`` fraction, ``floor_min`` count; module docstring).

    *Reduce*: each round selects with the current held-out scores, aiming the AUROC that those
    scores predict for the kept set at ``target_auroc - margin``, then refits and re-scores out of
    fold. (A round that would reject nothing while the held-out AUROC is still above the target falls
    back to exact histogram matching; if that rejects nothing either, refinement stops.)

    *Restore*: a refit usually lands *below* the prediction (the features that gave the rejected
    negatives away lose their weight once those negatives are gone), so when the held-out AUROC ends
    more than ``margin`` under the target, the last round's selection is relaxed along the same
    one-parameter family (each relaxation keeps a superset: same bins, same seeded order inside a
    bin), aiming by the secant between the two measured points at ``target_auroc - margin / 2``; a
    relaxed set is accepted only if its own held-out AUROC is ``<= target_auroc``. At most two
    such probes, and every probe counts against ``max_rounds``.
    """
    n_pos, n_neg = len(pos_texts), len(neg_texts)
    if len(pos_groups) != n_pos or not (len(neg_groups) == len(neg_types) == n_neg):
        raise ValueError("texts, groups and types must have matching lengths")
    types_list = [str(t) for t in neg_types]
    if neg_levels is not None and len(neg_levels) != n_neg:
        raise ValueError("texts, groups, types and levels must have matching lengths")
    strata_list = types_list if neg_levels is None else [f"{t}/{lv}" for t, lv in zip(types_list, neg_levels,
                                                                                      strict=True)]
    floors = floor_counts(strata_list, floor, floor_min)
    counts_before = dict(sorted(Counter(types_list).items()))
    strata_before = dict(sorted(Counter(strata_list).items()))
    all_groups = [*pos_groups, *neg_groups]
    nan = float("nan")
    if n_pos == 0 or n_neg == 0 or len({str(g) for g in all_groups}) < 2:
        return RefineResult(list(range(n_neg)), {}, nan, nan, 0, counts_before, dict(counts_before),
                            np.full(n_neg, 0.5), [], target_auroc, strata_before, dict(strata_before), floors, [])
    strata_names, strata_codes = np.unique(np.asarray(strata_list), return_inverse=True)
    floor_arr = np.array([floors[str(x)] for x in strata_names], dtype=np.int64)
    floored: set[int] = set()

    design = _Design([*pos_texts, *neg_texts], min_df=min_df)
    fold_all = group_folds(all_groups, folds, seed)
    type_names, type_codes = np.unique(np.asarray(types_list), return_inverse=True)
    rng = np.random.default_rng(seed)
    warm: dict[int, np.ndarray] = {}

    def held_out(mask: np.ndarray) -> tuple[float, np.ndarray]:
        idx = np.r_[np.arange(n_pos), n_pos + np.flatnonzero(mask)]
        y = np.r_[np.zeros(n_pos), np.ones(int(mask.sum()))]
        sc = _cross_fit(design, design.uid[idx], y, fold_all[idx], l2, warm)
        return auroc(sc, y), sc

    kept = np.ones(n_neg, dtype=bool)
    neg_scores = np.full(n_neg, 0.5)
    rejected: dict[int, str] = {}
    a, s = held_out(kept)
    neg_scores[:] = s[n_pos:]
    history = [a]
    rounds = 0
    last = None  # the last reduce round: what it selected from, and the two measured points
    while a > target_auroc and rounds < max_rounds:
        kidx = np.flatnonzero(kept)
        sp, sn, codes = s[:n_pos], s[n_pos:], type_codes[kidx]
        key = rng.random(kidx.size)
        goal = target_auroc - margin
        exact = False
        keep, ratio, n_kept, n_cell = _select(sp, sn, codes, type_names.size, goal, bins, key, exact)
        keep, short = _floor(keep, kidx, strata_codes, floor_arr, neg_scores)
        if keep.all():  # the relaxed matching predicts the target is met, but the refit says it is not
            exact = True
            keep, ratio, n_kept, n_cell = _select(sp, sn, codes, type_names.size, goal, bins, key, exact)
            keep, short = _floor(keep, kidx, strata_codes, floor_arr, neg_scores)
            if keep.all():
                break
        floored |= short
        rounds += 1
        for j, r, k, c in zip(kidx[~keep], ratio[~keep], n_kept[~keep], n_cell[~keep], strict=True):
            how = ("in a bin over-represented among" if r > 1 else "thinned to match the positives' histogram among")
            dens = "no positives" if np.isinf(r) else f"{r:.1f}x the positives' density"
            rejected[int(j)] = (f"blind-text score {neg_scores[j]:.2f} {how} {types_list[j]} negatives "
                                f"({dens}, {int(k)} of {int(c)} kept; round {rounds})")
        before = a
        kept[kidx[~keep]] = False
        a, s = held_out(kept)
        neg_scores[kept] = s[n_pos:]
        history.append(a)
        last = None if exact else {"kidx": kidx, "sp": sp, "sn": sn, "codes": codes, "key": key,
                                   "lo": (goal, a), "hi": (before, before)}

    probes = 0
    while last is not None and a < target_auroc - margin and rounds < max_rounds and probes < 2:
        (g_lo, a_lo), (g_hi, a_hi) = last["lo"], last["hi"]
        if a_hi <= a_lo or g_hi <= g_lo:
            break
        aim = target_auroc - margin / 2
        g = g_lo + (aim - a_lo) * (g_hi - g_lo) / (a_hi - a_lo)
        keep = _select(last["sp"], last["sn"], last["codes"], type_names.size, g, bins, last["key"], False)[0]
        cand = kept.copy()
        cand[last["kidx"][keep]] = True
        if (cand == kept).all():
            break
        rounds += 1
        probes += 1
        a_c, s_c = held_out(cand)
        history.append(a_c)
        if a_c <= target_auroc:
            for j in np.flatnonzero(cand & ~kept):
                rejected.pop(int(j), None)
            kept, a = cand, a_c
            neg_scores[kept] = s_c[n_pos:]
            last["lo"] = (g, a_c)
        else:
            last["hi"] = (g, a_c)
    kept_idx = np.flatnonzero(kept)
    counts_after = Counter(types_list[j] for j in kept_idx)
    strata_after = Counter(strata_list[j] for j in kept_idx)
    return RefineResult([int(j) for j in kept_idx], rejected, history[0], a, rounds,
                        counts_before, {t: counts_after.get(t, 0) for t in counts_before}, neg_scores, history,
                        target_auroc, strata_before, {t: strata_after.get(t, 0) for t in strata_before}, floors,
                        sorted(str(strata_names[c]) for c in floored))
