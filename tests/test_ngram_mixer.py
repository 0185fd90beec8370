"""Tests of the eval-time n-gram mixer over exact contexts: legality (CHALLENGE.md C1-C4:
normalized, causal, score-first, each target once), equality with a plain-Python exact-dict
reference at orders 1-6, chunk-independent bookkeeping, the memory cap, the key index."""
import math
import mlx.core as mx
import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import mixer_distribution
from train_gpt_mlx import BackoffNgramMixer, ExactKeyIndex


def model_outputs(tokens, V, seed=1):
    """Random model distributions per target j=1..n-1: full probs, lp of the target, entropy."""
    rng = np.random.default_rng(seed)
    logits = mx.array(rng.normal(0, 2.0, size=(len(tokens) - 1, V)).astype(np.float32))
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    P = mx.exp(logp)
    lp = mx.take_along_axis(logp, mx.array(np.asarray(tokens[1:]).astype(np.int32))[:, None], axis=-1)[:, 0]
    H = -(P * mx.log(mx.maximum(P, 1e-30))).sum(-1)  # same formula as mixer_distribution()
    return P, lp, H


def cheap_outputs(tokens, seed=1):
    """lp and H only (for long streams): a model that is right some of the time."""
    rng = np.random.default_rng(seed)
    n = len(tokens) - 1
    lp = np.log(rng.uniform(0.001, 0.9, size=n)).astype(np.float32)
    return mx.array(lp), mx.array(rng.uniform(0.5, 6.0, size=n).astype(np.float32))


def repetitive_stream(n, V, seed=0):
    """Random tokens with copied spans, so higher orders have real history."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, size=n)
    for _ in range(n // 40):
        a, b, L = rng.integers(0, n - 30), rng.integers(0, n - 30), 25
        t[b:b + L] = t[a:a + L].copy()
    t[:3] = V - 1  # the largest id, as a context
    return t.astype(np.uint16)


def chunk_starts(cuts, chunk):
    """Where the mixer's chunks begin when nll() is called on targets [cuts[i], cuts[i+1])."""
    return sorted({s for a, b in zip(cuts, cuts[1:]) for s in range(a, b, chunk)} | {cuts[-1]})


def reference_probs(toks, lp, H, V, K, alpha, mode, chunk, frozen_at=None, cuts=None):
    """Plain-Python mixer over a dict per exact context tuple, one token at a time: the mixed
    probability of every target. From target frozen_at on, only pairs already present count."""
    toks = [int(t) for t in toks]
    lp, H = np.array(lp, np.float64), np.array(H, np.float64)
    rows, u, U, out = [dict() for _ in range(K + 1)], [0] * V, 0, []
    starts = chunk_starts(cuts or [1, len(toks)], chunk)
    for s, e in zip(starts, starts[1:]):
        js = range(s, e)
        for j in js:
            y = toks[j]
            p, conf = (u[y] + 1) / (U + V), U / (U + V)
            for m in range(1, min(K, j) + 1):
                row = rows[m].get(tuple(toks[j - m:j]))
                if row:
                    C, Tn = sum(row.values()), len(row)
                    p, conf = (row.get(y, 0) + Tn * p) / (C + Tn), C / (C + Tn)
            a = alpha * conf * (min(1.0, H[j - 1] / math.log(V)) if mode == "entropy" else 1.0)
            out.append((1 - a) * math.exp(lp[j - 1]) + a * p)
        for j in js:  # score first, then add
            y = toks[j]
            for m in range(1, min(K, j) + 1):
                ctx = tuple(toks[j - m:j])
                if frozen_at is not None and s >= frozen_at and y not in rows[m].get(ctx, {}):
                    continue
                row = rows[m].setdefault(ctx, {})
                row[y] = row.get(y, 0) + 1
            u[y] += 1
            U += 1
    return np.array(out)


def decode(m):
    """Per order: {context tuple (t[j-m], ..., t[j-1]): (C, T, {next: count})} from the tables."""
    names, out = {0: ()}, []
    for k in range(m.K):
        ctx, pair = m.ctx[k], m.pair[k]
        live = ctx.keys != ExactKeyIndex.EMPTY
        keys, ids = ctx.keys[live].astype(np.int64), ctx.ids[live]
        names = {int(i): (int(key % m.V),) + names[int(key // m.V)] for key, i in zip(keys, ids)}
        table = {names[i]: (int(ctx.cols[0][i]), int(ctx.cols[1][i]), {}) for i in names}
        live = pair.keys != ExactKeyIndex.EMPTY
        for key, i in zip(pair.keys[live].astype(np.int64), pair.ids[live]):
            table[names[int(key // m.V)]][2][int(key % m.V)] = int(pair.cols[0][i])
        out.append(table)
    return out


@pytest.mark.parametrize("V", [64, 1024])
@pytest.mark.parametrize("mode", ["fixed", "entropy"])
@pytest.mark.parametrize("K", [1, 2, 4, 6])
def test_normalized_and_consistent(V, mode, K):
    n, chunk = 1200, 100
    toks = repetitive_stream(n, V)
    P, lp, H = model_outputs(toks, V)
    mix = BackoffNgramMixer(V, K, 0.4, mode, chunk=chunk)
    rng = np.random.default_rng(2)
    checked = set(rng.choice(np.arange(1, n), size=20, replace=False).tolist()) | {1, 2, 3, 4, 5, 6}
    for s in range(1, n, chunk):  # one call per chunk: mixer_distribution() sees the pre-chunk state
        e = min(s + chunk, n)
        dists = {j: mixer_distribution(mix, toks, j, P[j - 1]) for j in checked if s <= j < e}
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
        m = BackoffNgramMixer(V, 4, 0.5, "entropy", chunk=64)
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
    m = BackoffNgramMixer(V, 4, 0.9, "fixed", chunk=chunk)
    out = np.array(m.nll(mx.array(toks), 1, lp, H))
    fresh = BackoffNgramMixer(V, 4, 0.9, "fixed", chunk=chunk)
    assert np.array_equal(out[:chunk], np.array(fresh.nll(toks, 1, lp[:chunk], H[:chunk])))
    assert np.array_equal(out[0], -lp[0])  # nothing seen yet: the model alone
    assert out[:half - 1].mean() > math.log(V) - 0.05
    assert out[half:].mean() < 0.2 * math.log(V)  # exact contexts: the repeat is nearly free


def test_update_independent_of_chunk():
    """The tables hold exactly the counts of every (context, next) event, whatever the chunking:
    C = sum of counts, T = distinct next tokens, one event per target with >= m tokens of history."""
    V, n, K = 64, 2000, 4
    toks = repetitive_stream(n, V, seed=5)
    _, lp, H = model_outputs(toks, V)
    ms = [BackoffNgramMixer(V, K, 0.3, chunk=c) for c in (1, 257)]
    for m in ms:
        m.nll(toks, 1, lp[:700], H[:700])
        m.nll(toks, 701, lp[700:], H[700:])
    with pytest.raises(RuntimeError, match="continue in order"):
        ms[0].nll(toks, 5, lp[:3], H[:3])
    tabs = [decode(m) for m in ms]
    assert tabs[0] == tabs[1]
    for k, table in enumerate(tabs[0]):
        m = k + 1
        want = {}
        for j in range(m, n):
            row = want.setdefault(tuple(int(t) for t in toks[j - m:j]), {})
            row[int(toks[j])] = row.get(int(toks[j]), 0) + 1
        assert {c: r for c, (_, _, r) in table.items()} == want
        assert all(C == sum(r.values()) and Tn == len(r) for C, Tn, r in table.values())
    assert np.array_equal(ms[0].u, np.bincount(toks[1:], minlength=V))


def test_alpha_zero_is_model():
    V, n = 128, 1000
    toks = repetitive_stream(n, V)
    _, lp, H = model_outputs(toks, V)
    for mode in ("fixed", "entropy"):
        m = BackoffNgramMixer(V, 4, 0.0, mode, chunk=128)
        assert np.array_equal(np.array(m.nll(toks, 1, lp, H)), np.array(-lp))


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("V,chunk,mode", [(16, 1, "entropy"), (16, 7, "fixed"), (1024, 64, "entropy")])
def test_matches_exact_dict_reference(K, V, chunk, mode):
    """Same per-target probability (1e-6) as the per-token dict reference on random streams."""
    n = 1500
    toks = repetitive_stream(n, V, seed=11 + K)
    lp, H = cheap_outputs(toks, seed=K)
    m = BackoffNgramMixer(V, K, 0.6, mode, chunk=chunk)
    got = np.exp(-np.array(m.nll(toks, 1, lp, H), np.float64))
    np.testing.assert_allclose(got, reference_probs(toks, lp, H, V, K, 0.6, mode, chunk), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
def test_matches_exact_dict_reference_on_sample(data, K):
    """Same on the sample's validation tokens (real FineWeb text when ../shared is present),
    through several nll calls of uneven length as evaluate() makes them."""
    V = data["vocab_size"]
    toks = T.load_validation_tokens(data["data_path"], 0, V)[:20001]
    lp, H = cheap_outputs(toks, seed=K)
    m = BackoffNgramMixer(V, K, 0.5, "entropy", chunk=2048)
    cuts = [1, 4000, 4100, 12345, toks.size]
    got = np.concatenate([np.array(m.nll(toks, a, lp[a - 1:b - 1], H[a - 1:b - 1]), np.float64)
                          for a, b in zip(cuts, cuts[1:])])
    ref = reference_probs(toks, lp, H, V, K, 0.5, "entropy", 2048, cuts=cuts)
    np.testing.assert_allclose(np.exp(-got), ref, rtol=1e-6, atol=1e-6)


def test_short_history_skips_orders():
    """Target j uses orders <= j only: at j=1, K=6 equals K=1; at j=2, K=6 equals K=2."""
    V, n = 16, 400
    toks = repetitive_stream(n, V, seed=4)
    P, lp, H = model_outputs(toks, V)
    ms = [BackoffNgramMixer(V, K, 0.5, "fixed", chunk=64) for K in (1, 2, 6)]
    for m in ms:
        m.nll(toks, 1, lp, H)
    d = [np.array(mixer_distribution(m, toks, 1, P[0])) for m in ms]
    assert np.array_equal(d[0], d[2]) and abs(d[0].sum() - 1) < 1e-5
    assert np.array_equal(np.array(mixer_distribution(ms[1], toks, 2, P[1])),
                          np.array(mixer_distribution(ms[2], toks, 2, P[1])))


def test_memory_cap_stops_new_keys_and_keeps_scoring():
    """At the cap the tables stop taking new keys (never exceeding it), events of pairs already
    present still count, the distribution stays normalized, and it equals the reference that
    freezes at the same target."""
    V, K, n, chunk = 256, 4, 60000, 2048
    toks = repetitive_stream(n, V, seed=8)
    lp, H = cheap_outputs(toks)
    cap_mb = 1.0
    m = BackoffNgramMixer(V, K, 0.5, "fixed", chunk=chunk, max_memory_mb=cap_mb)
    got = []
    for a in range(1, n, 5000):
        b = min(a + 5000, n)
        got.append(np.array(m.nll(toks, a, lp[a - 1:b - 1], H[a - 1:b - 1]), np.float64))
        assert m.nbytes <= cap_mb * 2**20
    assert m.frozen_at is not None and 1 < m.frozen_at < n - chunk
    sizes = [(t.n, t.nbytes) for t in m.ctx + m.pair]
    cuts = list(range(1, n, 5000)) + [n]
    ref = reference_probs(toks, lp, H, V, K, 0.5, "fixed", chunk, frozen_at=m.frozen_at, cuts=cuts)
    np.testing.assert_allclose(np.exp(-np.concatenate(got)), ref, rtol=1e-6, atol=1e-6)
    P, lp2, H2 = model_outputs(toks[:3], V)
    d = np.array(mixer_distribution(m, toks, n - 1, P[0]), np.float64)
    assert abs(d.sum() - 1) < 1e-5
    for table in decode(m):
        assert all(C == sum(r.values()) and Tn == len(r) for C, Tn, r in table.values())
    m.nll(np.concatenate([toks, toks[:3000]]), n, *cheap_outputs(np.concatenate([toks[-1:], toks[:3000]])))
    assert [(t.n, t.nbytes) for t in m.ctx + m.pair] == sizes  # frozen for good


def test_memory_cap_checked_before_work():
    with pytest.raises(ValueError, match="max_memory_mb"):
        BackoffNgramMixer(1024, 6, 0.3, max_memory_mb=0.1)  # below the empty tables
    V, K, n = 1024, 5, 30000
    toks = np.random.default_rng(0).integers(0, V, size=n).astype(np.uint16)  # every context new
    m = BackoffNgramMixer(V, K, 0.3)
    m.nll(toks, 1, *cheap_outputs(toks))
    assert m.frozen_at is None and m.nbytes <= BackoffNgramMixer.worst_case_nbytes(n, K, V)


def test_cost_and_memory_grow_with_distinct_pairs_only():
    """A repeated text adds no keys; memory per stored key stays bounded (load <= 1/2)."""
    V, K = 1024, 4
    rng = np.random.default_rng(1)
    base = rng.integers(0, V, size=8001).astype(np.uint16)
    toks = np.tile(base, 3)  # after the second copy starts, every context and pair recurs
    lp, H = cheap_outputs(toks)
    m = BackoffNgramMixer(V, K, 0.3)
    m.nll(toks, 1, lp[:8010], H[:8010])
    sizes = [t.n for t in m.ctx + m.pair]
    m.nll(toks, 8011, lp[8010:], H[8010:])
    assert [t.n for t in m.ctx + m.pair] == sizes
    for t in m.ctx + m.pair:
        assert t.nbytes <= max(ExactKeyIndex.bytes_at(t.n, t.cols.shape[0]), ExactKeyIndex.bytes_at(0, 2))


def test_exact_key_index():
    """find after add, absent keys, growth with rehash, keys that share a slot; ids are dense."""
    rng = np.random.default_rng(0)
    idx = ExactKeyIndex(1, log2=10)
    seen = np.zeros(0, np.uint64)
    for _ in range(6):
        keys = rng.integers(0, 2**62, size=3000, dtype=np.int64).astype(np.uint64)
        keys[:500] = np.arange(500, dtype=np.uint64) << np.uint64(54)  # identical low bits
        keys = np.setdiff1d(keys, seen)
        rep = np.concatenate([keys, keys[::3]])  # repeats get the same id
        ids = idx.add(rep)
        assert np.array_equal(ids[keys.size:], ids[:keys.size][::3])
        seen = np.concatenate([seen, keys])
        assert np.array_equal(np.sort(idx.find(seen)), np.arange(seen.size))
        assert 2 * idx.n <= idx.keys.size
    assert np.all(idx.find(np.array([1, 2, 3], np.uint64) + np.uint64(2**62)) == -1)


def test_env_vars():
    hp = T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_MAX_MEMORY_MB="123"))
    assert hp.ngram_max_memory_mb == 123
    with pytest.raises(T.ConfigError, match="NGRAM_BUCKETS.*retired"):
        T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_BUCKETS="16384"))
    with pytest.raises(T.ConfigError, match="NGRAM_MAX_MEMORY_MB"):
        T.Hyperparameters.from_env(dict(NGRAM_MAX_MEMORY_MB="0"))
