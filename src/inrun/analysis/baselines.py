"""Simple baselines a skeptic compares In-Run Data Shapley with: KNN-Shapley and BM25.

* :func:`knn_shapley`: the exact Shapley values of the K-nearest-neighbour classifier's utility
  (Jia et al. 2019, "Efficient task-specific data valuation for nearest neighbor algorithms",
  Theorem 1), in ``O(N log N)`` per test point by their recursion.
* :class:`BM25`: Okapi BM25 lexical scores of every document for a query (k1 = 1.5, b = 0.75 as in
  the paper's Table 2/3), with :func:`code_terms` as a tokenizer for source code.

Both are small and dependency-free (numpy only) so the case studies need no extra package.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["BM25", "code_terms", "knn_shapley"]


def knn_shapley(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 5,
    batch: int = 256,
) -> np.ndarray:
    """Exact KNN-Shapley value of every training point, averaged over the test points.

    The utility of a subset ``S`` for one test point is the unweighted KNN likelihood of its
    label, ``U(S) = (1/k) Σ_{j ≤ min(k, |S|)} 1[y_{α_j(S)} = y_test]`` (``α_j(S)``: the j-th nearest
    point of ``S``, Euclidean distance, ties broken by index). Sorting the training points by
    distance, ``α_1`` nearest, the Shapley values are::

        s_{α_N} = 1[y_{α_N} = y_test] / N          (1[...] / k if k > N)
        s_{α_i} = s_{α_{i+1}} + (1[y_{α_i} = y_test] − 1[y_{α_{i+1}} = y_test]) / k · min(k, i) / i

    Args:
        train_x: ``[N, D]`` features. train_y: ``[N]`` labels.
        test_x: ``[M, D]`` features. test_y: ``[M]`` labels.
        k: neighbours.
        batch: test points per distance computation (bounds memory at ``batch · N``).

    Returns:
        ``[N]`` float64 values; positive = helps classify the test points correctly.

    Example:
        >>> x = np.array([[0.0], [1.0], [5.0]]); y = np.array([0, 0, 1])
        >>> knn_shapley(x, y, np.array([[0.2]]), np.array([0]), k=1).round(3)
        array([0.5, 0.5, 0. ])
    """
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    n = train_x.shape[0]
    if n == 0 or test_x.shape[0] == 0:
        raise ValueError("knn_shapley needs at least one training and one test point")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    i = np.arange(1, n + 1, dtype=np.float64)
    weight = np.minimum(k, i[:-1]) / i[:-1] / k  # for positions 1..N-1 (1-based)
    total = np.zeros(n, dtype=np.float64)
    sq_train = (train_x**2).sum(1)
    for start in range(0, test_x.shape[0], batch):
        xt = test_x[start : start + batch]
        dist = sq_train[None, :] - 2 * xt @ train_x.T + (xt**2).sum(1)[:, None]  # [b, N]
        order = np.argsort(dist, axis=1, kind="stable")
        match = (train_y[order] == test_y[start : start + batch, None]).astype(np.float64)  # [b, N]
        s = np.empty_like(match)
        s[:, -1] = match[:, -1] * min(k, n) / (n * k)  # 1[...]/N when k <= N
        # s_i = s_{i+1} + (m_i − m_{i+1}) · w_i, done as a reversed cumulative sum.
        steps = (match[:, :-1] - match[:, 1:]) * weight[None, :]
        s[:, :-1] = s[:, -1:] + np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
        np.add.at(total, order.ravel(), s.ravel())
    return total / test_x.shape[0]


_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def code_terms(text: str) -> list[str]:
    """Lower-cased words of source code: identifiers split at ``_``, case changes and digits.

    >>> code_terms("def getHTTPResponse(self, max_len=10):")
    ['def', 'get', 'http', 'response', 'self', 'max', 'len', '10']
    """
    return [w.lower() for w in _WORD.findall(text)]


class BM25:
    """Okapi BM25 over a fixed list of documents (each a list of terms).

    ``idf(t) = ln(1 + (N − df + 0.5) / (df + 0.5))`` (the Lucene form, never negative);
    ``score(d, q) = Σ_{t ∈ q} idf(t) · tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 − b + b |d| / avgdl))``,
    summing over the query's terms with repetition.

    Example:
        >>> bm = BM25([["a", "b"], ["b", "c", "c"]])
        >>> int(bm.scores(["c"]).argmax())
        1
    """

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        if not documents:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.n = len(documents)
        lengths = np.array([len(d) for d in documents], dtype=np.float64)
        avgdl = lengths.mean() if lengths.mean() > 0 else 1.0
        self._norm = k1 * (1 - b + b * lengths / avgdl)  # [N]
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for j, doc in enumerate(documents):
            for term, tf in Counter(doc).items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(j)
                tfs.append(tf)
        self._postings = {
            t: (np.asarray(d, dtype=np.int64), np.asarray(f, dtype=np.float64)) for t, (d, f) in postings.items()
        }

    def idf(self, term: str) -> float:
        df = len(self._postings[term][0]) if term in self._postings else 0
        return math.log(1 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: Sequence[str]) -> np.ndarray:
        """``[N]`` float64 BM25 score of every document for ``query``."""
        out = np.zeros(self.n, dtype=np.float64)
        for term, q in Counter(query).items():
            if term not in self._postings:
                continue
            docs, tf = self._postings[term]
            out[docs] += q * self.idf(term) * tf * (self.k1 + 1) / (tf + self._norm[docs])
        return out
