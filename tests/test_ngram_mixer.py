"""Legality tests of the eval-time n-gram mixer (CHALLENGE.md C1-C4): normalized, causal,
score-first, chunk-independent bookkeeping, hash range, alpha = 0 is a no-op."""
import math
import mlx.core as mx
import numpy as np
import pytest

from train_gpt_mlx import BackoffNgramMixer


def model_outputs(tokens, V, seed=1):
    """Random model distributions per target j=1..n-1: full probs, lp of the target, entropy."""
    rng = np.random.default_rng(seed)
    logits = mx.array(rng.normal(0, 2.0, size=(len(tokens) - 1, V)).astype(np.float32))
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    P = mx.exp(logp)
    lp = mx.take_along_axis(logp, mx.array(tokens[1:].astype(np.int32))[:, None], axis=-1)[:, 0]
    H = -(P * mx.log(mx.maximum(P, 1e-30))).sum(-1)  # same formula as distribution()
    return P, lp, H


def repetitive_stream(n, V, seed=0):
    """Random tokens with copied spans, so higher orders have real (and colliding) history."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, size=n)
    for _ in range(n // 40):
        a, b, L = rng.integers(0, n - 30), rng.integers(0, n - 30), 25
        t[b:b + L] = t[a:a + L].copy()
    t[:3] = V - 1  # the largest id, as a context
    return t.astype(np.uint16)


@pytest.mark.parametrize("V", [64, 1024])
@pytest.mark.parametrize("mode", ["fixed", "entropy"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_normalized_and_consistent(V, mode, K):
    n, chunk = 1200, 100
    toks = repetitive_stream(n, V)
    P, lp, H = model_outputs(toks, V)
    mix = BackoffNgramMixer(V, K, 16, 0.4, mode, chunk=chunk)
    rng = np.random.default_rng(2)
    checked = set(rng.choice(np.arange(1, n), size=20, replace=False).tolist()) | {1, 2, 3, 4}
    for s in range(1, n, chunk):  # one call per chunk: distribution() sees the pre-chunk state
        e = min(s + chunk, n)
        dists = {j: mix.distribution(toks, j, P[j - 1]) for j in checked if s <= j < e}
        out = mix.nll(toks, s, lp[s - 1:e - 1], H[s - 1:e - 1])
        for j, d in dists.items():
            assert abs(d.sum().item() - 1.0) < 1e-5
            assert d.min().item() > 0
            p_t = d[int(toks[j])].item()
            assert math.isclose(math.exp(-out[j - s].item()), p_t, rel_tol=2e-5), (j, p_t)
    assert mix.U == n - 1


def test_causal():
    V, n, k = 64, 900, 450
    a = repetitive_stream(n, V)
    b = a.copy()
    b[k + 1:] = np.random.default_rng(9).integers(0, V, size=n - k - 1)
    P, lp, H = model_outputs(a, V)
    outs = []
    for t in (a, b):
        m = BackoffNgramMixer(V, 4, 16, 0.5, "entropy", chunk=64)
        outs.append(np.array(m.nll(t, 1, lp, H)))  # same model outputs: only the cache differs
    assert np.array_equal(outs[0][:k], outs[1][:k])  # targets 1..k (indices 0..k-1)
    assert not np.array_equal(outs[0][k:], outs[1][k:])


def test_score_first_and_learns_repeats():
    V, half, chunk = 512, 3000, 256
    rng = np.random.default_rng(3)
    first = rng.integers(0, V, size=half)
    toks = np.concatenate([first, first]).astype(np.int32)
    n = len(toks)
    lp, H = mx.full((n - 1,), -math.log(V)), mx.full((n - 1,), math.log(V))
    m = BackoffNgramMixer(V, 4, 4096, 0.9, "fixed", chunk=chunk)
    out = np.array(m.nll(mx.array(toks), 1, lp, H))
    fresh = BackoffNgramMixer(V, 4, 4096, 0.9, "fixed", chunk=chunk)
    assert np.array_equal(out[:chunk], np.array(fresh.nll(toks, 1, lp[:chunk], H[:chunk])))
    assert np.array_equal(out[0], -lp[0])  # nothing seen yet: the model alone
    assert out[:half - 1].mean() > math.log(V) - 0.05
    assert out[half:].mean() < 0.5 * math.log(V)


def test_update_independent_of_chunk():
    V, n = 64, 2000
    toks = repetitive_stream(n, V, seed=5)
    _, lp, H = model_outputs(toks, V)
    ms = [BackoffNgramMixer(V, 3, 32, 0.3, chunk=c) for c in (1, 257)]
    for m in ms:
        m.nll(toks, 1, lp[:700], H[:700])
        m.nll(toks, 701, lp[700:], H[700:])
    with pytest.raises(AssertionError):
        ms[0].nll(toks, 5, lp[:3], H[:3])
    for k in range(3):
        c = np.array(ms[0].counts[k])
        assert np.array_equal(c, np.array(ms[1].counts[k]))
        assert np.array_equal(np.array(ms[0].C[k]), np.array(ms[1].C[k]))
        assert np.array_equal(np.array(ms[0].T[k]), np.array(ms[1].T[k]))
        assert np.array_equal(c.sum(1), np.array(ms[0].C[k]))
        assert np.array_equal((c > 0).sum(1), np.array(ms[1].T[k]))
        assert c.sum() == n - 1 - k  # targets with >= k+1 tokens of history
    assert np.array_equal(np.array(ms[0].u), np.bincount(toks[1:], minlength=V))


@pytest.mark.parametrize("V", [1024, 8192, 65536])
@pytest.mark.parametrize("B", [1, 1000, 2**20])
def test_hash_range(V, B):
    m = BackoffNgramMixer.__new__(BackoffNgramMixer)  # no tables needed to test the hash
    m.K, m.B, m.V = 5, B, V
    rng = np.random.default_rng(V + B)
    toks = rng.integers(0, V, size=4000)
    toks[:50] = V - 1
    toks[100:150] = 0
    rows = m._rows(toks, 0, len(toks))
    assert np.array_equal(np.array(rows[0]), np.concatenate([[0], toks[:-1]]))  # padded left
    for r in rows[1:]:
        r = np.array(r)
        assert r.min() >= 0 and r.max() < B
        if B == 2**20:
            assert len(np.unique(r[200:])) > 3700  # random contexts spread over the buckets


def test_alpha_zero_is_model():
    V, n = 128, 1000
    toks = repetitive_stream(n, V)
    _, lp, H = model_outputs(toks, V)
    for mode in ("fixed", "entropy"):
        m = BackoffNgramMixer(V, 4, 64, 0.0, mode, chunk=128)
        assert np.array_equal(np.array(m.nll(toks, 1, lp, H)), np.array(-lp))


@pytest.mark.parametrize("chunk", [1, 7])
def test_matches_plain_python_reference(chunk):
    """Independent per-token loop over dict counts (rows from the same hash) gives the same NLLs,
    including a_eff and the history mask (chunk=1 scores with a cache holding colliding rows)."""
    V, K, B, alpha, n = 16, 3, 4, 0.6, 300
    toks = repetitive_stream(n, V, seed=11)
    _, lp, H = model_outputs(toks, V)
    m = BackoffNgramMixer(V, K, B, alpha, "entropy", chunk=chunk)
    got = np.array(m.nll(toks, 1, lp, H))
    rows = [np.array(r) for r in m._rows(toks, 0, n)]
    cnt, u, ref = [{} for _ in range(K)], np.zeros(V), []
    lp_np, H_np = np.array(lp, dtype=np.float64), np.array(H, dtype=np.float64)
    for s in range(1, n, chunk):
        js = range(s, min(s + chunk, n))
        for j in js:
            y, p, conf = toks[j], (u[toks[j]] + 1) / (u.sum() + V), u.sum() / (u.sum() + V)
            for k in range(K):
                row = cnt[k].get(rows[k][j], {}) if j > k else {}
                C, T = sum(row.values()), len(row)
                if C:
                    p, conf = (row.get(y, 0) + T * p) / (C + T), C / (C + T)
            a = alpha * min(1.0, H_np[j - 1] / math.log(V)) * conf
            ref.append(-math.log((1 - a) * math.exp(lp_np[j - 1]) + a * p))
        for j in js:  # score first, then add
            for k in range(K):
                if j > k:
                    row = cnt[k].setdefault(rows[k][j], {})
                    row[toks[j]] = row.get(toks[j], 0) + 1
            u[toks[j]] += 1
    np.testing.assert_allclose(got, np.array(ref), rtol=2e-5, atol=2e-5)


def test_short_history_skips_orders():
    """Target j uses orders <= j only: with a full cache, K=3 at j=1 equals K=1 (rows of the
    zero-padded contexts are ignored even where collisions filled them)."""
    V, n = 16, 400
    toks = repetitive_stream(n, V, seed=4)
    P, lp, H = model_outputs(toks, V)
    ms = [BackoffNgramMixer(V, K, 2, 0.5, "fixed", chunk=64) for K in (1, 2, 3)]
    for m in ms:
        m.nll(toks, 1, lp, H)
    d = [np.array(m.distribution(toks, 1, P[0])) for m in ms]
    assert np.array_equal(d[0], d[2]) and abs(d[0].sum() - 1) < 1e-5
    assert np.array_equal(np.array(ms[1].distribution(toks, 2, P[1])),
                          np.array(ms[2].distribution(toks, 2, P[1])))
