"""KNN-Shapley against brute-force Shapley enumeration; BM25 against a hand computation."""

import doctest
import itertools
import math

import numpy as np
import pytest

import inrun.analysis.baselines as baselines
from inrun.analysis.baselines import BM25, code_terms, knn_shapley


def knn_utility(subset, train_x, train_y, x, y, k):
    """(1/k) Σ over the min(k, |S|) nearest points of S of 1[label = y], ties by index."""
    if not subset:
        return 0.0
    idx = np.array(sorted(subset))
    d = ((train_x[idx] - x) ** 2).sum(1)
    nearest = idx[np.argsort(d, kind="stable")[:k]]
    return float((train_y[nearest] == y).sum()) / k


def brute_force_shapley(train_x, train_y, test_x, test_y, k):
    n = len(train_x)
    values = np.zeros(n)
    for x, y in zip(test_x, test_y):
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for size in range(n):
                w = 1.0 / (n * math.comb(n - 1, size))
                for s in itertools.combinations(others, size):
                    gain = knn_utility([*s, i], train_x, train_y, x, y, k) - knn_utility(list(s), train_x, train_y, x, y, k)
                    values[i] += w * gain
    return values / len(test_x)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_shapley_equals_enumeration(k, seed):
    rng = np.random.default_rng(seed)
    n, m = 8, 4
    train_x, test_x = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
    train_y, test_y = rng.integers(0, 3, n), rng.integers(0, 3, m)
    ours = knn_shapley(train_x, train_y, test_x, test_y, k=k, batch=3)
    np.testing.assert_allclose(ours, brute_force_shapley(train_x, train_y, test_x, test_y, k), atol=1e-12)


def test_knn_shapley_efficiency_and_batches():
    """Values add up to U(all) − U(∅) averaged over test points; batching changes nothing."""
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(40, 2)), rng.normal(size=(17, 2))
    train_y, test_y = rng.integers(0, 2, 40), rng.integers(0, 2, 17)
    v = knn_shapley(train_x, train_y, test_x, test_y, k=5)
    full = np.mean([knn_utility(list(range(40)), train_x, train_y, x, y, 5) for x, y in zip(test_x, test_y)])
    assert v.sum() == pytest.approx(full, abs=1e-12)
    np.testing.assert_allclose(v, knn_shapley(train_x, train_y, test_x, test_y, k=5, batch=4), atol=1e-15)


def test_knn_shapley_flipped_label_is_negative():
    """A point in a clean cluster with the wrong label gets the lowest value."""
    rng = np.random.default_rng(0)
    train_x = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    train_y = np.array([0] * 20 + [1] * 20)
    train_y[3] = 1
    test_x = np.concatenate([rng.normal(0, 0.1, (10, 2)), rng.normal(5, 0.1, (10, 2))])
    test_y = np.array([0] * 10 + [1] * 10)
    v = knn_shapley(train_x, train_y, test_x, test_y, k=5)
    assert v.argmin() == 3
    assert v[3] < 0.5 * np.delete(v, 3).min()


def test_knn_shapley_rejects_bad_input():
    with pytest.raises(ValueError):
        knn_shapley(np.zeros((0, 2)), np.zeros(0), np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError):
        knn_shapley(np.zeros((3, 2)), np.zeros(3), np.zeros((1, 2)), np.zeros(1), k=0)


def test_bm25_hand_computed():
    docs = [["a", "b", "b"], ["b", "c"], ["c", "c", "c", "d"]]
    bm = BM25(docs, k1=1.5, b=0.75)
    avgdl = 3.0
    n = 3

    def term(tf, dl, df):
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        return idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * dl / avgdl))

    # query "b c": doc0 has b twice, doc1 has b and c, doc2 has c three times
    expected = [term(2, 3, 2), term(1, 2, 2) + term(1, 2, 2), term(3, 4, 2)]
    np.testing.assert_allclose(bm.scores(["b", "c"]), expected, rtol=1e-12)
    # a repeated query term counts twice; an unknown term adds nothing
    np.testing.assert_allclose(bm.scores(["a", "a", "zzz"]), [2 * term(1, 3, 1), 0, 0], rtol=1e-12)


def test_bm25_prefers_rare_terms():
    docs = [["common", "rare"], ["common", "common"], ["common", "x"]]
    bm = BM25(docs)
    assert bm.idf("rare") > bm.idf("common") > 0
    assert bm.scores(["rare", "common"]).argmax() == 0
    with pytest.raises(ValueError):
        BM25([])


def test_code_terms():
    assert code_terms("self._sock.sendall(b'GET')") == ["self", "sock", "sendall", "b", "get"]
    assert code_terms("XMLParser2 parse_file") == ["xml", "parser", "2", "parse", "file"]


def test_docstring_examples():
    assert doctest.testmod(baselines).failed == 0
