"""Tests of the eval-time n-gram mixer at per-token resolution (each target scored with the counts of
every earlier target): legality (CHALLENGE.md C1-C4: normalized, causal, score-first, each target
once), equality with a plain-Python per-token dict reference at orders 1-6, the sort's two paths,
the split over ranks, the worker thread, the memory bound and its check before work."""
import math
import re
import threading
import tracemalloc

import mlx.core as mx
import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import adaptive_alpha_reference, mixer_distribution, tiny_env
from train_gpt_mlx import BackoffNgramMixer, mixer_stats


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


def zipf_stream(n, V, seed=0):
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, V + 1) ** 1.1
    return rng.choice(V, size=n, p=w / w.sum()).astype(np.uint16)


def reference_stats(toks, V, K):
    """Plain-Python Witten-Bell over a dict per exact context tuple, one token at a time: score target
    j with the counts of targets 1..j-1, then count it. (p_ngram, confidence, highest seen order) per
    target, index j."""
    toks = [int(t) for t in toks]
    rows = [dict() for _ in range(K + 1)]
    u = [0] * V
    U = 0
    p_out, conf_out, top_out = [math.nan], [math.nan], [0]
    for j in range(1, len(toks)):
        y = toks[j]
        p, conf, top = (u[y] + 1) / (U + V), U / (U + V), 0
        for m in range(1, min(K, j) + 1):
            row = rows[m].get(tuple(toks[j - m:j]))
            if row:
                C, Tn = sum(row.values()), len(row)
                p, conf, top = (row.get(y, 0) + Tn * p) / (C + Tn), C / (C + Tn), m
        p_out.append(p)
        conf_out.append(conf)
        top_out.append(top)
        for m in range(1, min(K, j) + 1):
            row = rows[m].setdefault(tuple(toks[j - m:j]), {})
            row[y] = row.get(y, 0) + 1
        u[y] += 1
        U += 1
    return np.array(p_out), np.array(conf_out), np.array(top_out)


def reference_probs(toks, lp, H, V, K, alpha, mode):
    """The mixed probability of every target from the reference statistics."""
    p, conf, _ = reference_stats(toks, V, K)
    lp, H = np.array(lp, np.float64), np.array(H, np.float64)
    a = alpha * conf[1:] * (np.minimum(1.0, H / math.log(V)) if mode == "entropy" else 1.0)
    return (1 - a) * np.exp(lp) + a * p[1:]


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("V,mode", [(16, "entropy"), (16, "fixed"), (1024, "entropy")])
def test_matches_per_token_dict_reference(K, V, mode):
    """Statistics within 1e-9 of the per-token dict reference on random streams; mixed NLLs to float32."""
    n = 1500
    toks = repetitive_stream(n, V, seed=11 + K)
    p, conf, top = mixer_stats(toks, V, K)
    rp, rconf, rtop = reference_stats(toks, V, K)
    np.testing.assert_allclose(p[1:], rp[1:], rtol=0, atol=1e-9)
    np.testing.assert_allclose(conf[1:], rconf[1:], rtol=0, atol=1e-9)
    assert np.array_equal(top[1:], rtop[1:])
    lp, H = cheap_outputs(toks, seed=K)
    got = np.exp(-np.array(BackoffNgramMixer(V, K, 0.6, mode).nll(toks, 1, lp, H), np.float64))
    np.testing.assert_allclose(got, reference_probs(toks, lp, H, V, K, 0.6, mode), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
def test_matches_per_token_dict_reference_on_sample(data, K):
    """Same on the sample's validation tokens (real FineWeb text when ../shared is present), through
    several nll calls of uneven length as evaluate() makes them."""
    V = data["vocab_size"]
    toks = T.load_validation_tokens(data["data_path"], 0, V)[:20001]
    p, conf, top = mixer_stats(toks, V, K)
    rp, rconf, rtop = reference_stats(toks, V, K)
    np.testing.assert_allclose(p[1:], rp[1:], rtol=0, atol=1e-9)
    np.testing.assert_allclose(conf[1:], rconf[1:], rtol=0, atol=1e-9)
    assert np.array_equal(top[1:], rtop[1:])
    lp, H = cheap_outputs(toks, seed=K)
    m = BackoffNgramMixer(V, K, 0.5, "entropy")
    cuts = [1, 4000, 4100, 12345, toks.size]
    got = np.concatenate([np.array(m.nll(toks, a, lp[a - 1:b - 1], H[a - 1:b - 1]), np.float64)
                          for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_allclose(np.exp(-got), reference_probs(toks, lp, H, V, K, 0.5, "entropy"), rtol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 4, 6])
@pytest.mark.parametrize("mode", ["fixed", "entropy"])
def test_normalized_over_all_candidates(K, mode):
    """The mixed row at random positions sums to 1 within 1e-9 over all V candidates, every entry is
    positive, and the mixer's NLL is the row's entry at the real target."""
    V, n = 64, 700
    toks = repetitive_stream(n, V)
    P, lp, H = model_outputs(toks, V)
    out = np.array(BackoffNgramMixer(V, K, 0.4, mode).nll(toks, 1, lp, H))
    rng = np.random.default_rng(2)
    for j in sorted(set(rng.choice(np.arange(1, n), size=8, replace=False).tolist()) | {1, 2, K, K + 1}):
        pm = np.array(P[j - 1], np.float64)
        d = mixer_distribution(BackoffNgramMixer(V, K, 0.4, mode), toks, j, pm / pm.sum())
        assert abs(d.sum() - 1.0) < 1e-9
        assert d.min() > 0
        assert math.isclose(math.exp(-out[j - 1]), d[int(toks[j])], rel_tol=2e-6), j


def test_normalized_at_full_vocabulary():
    """The same at V=1024, a few late positions, where the orders have real history."""
    V, n, K = 1024, 1200, 4
    toks = repetitive_stream(n, V, seed=3)
    pm = np.full(V, 1.0 / V)
    mix = BackoffNgramMixer(V, K, 0.9, "fixed")
    for j in (n - 1, n - 200):
        d = mixer_distribution(mix, toks, j, pm)
        assert abs(d.sum() - 1.0) < 1e-9 and d.min() > 0


def test_causal():
    """Changing token k leaves every NLL of a target <= k bit-identical (and changes later ones)."""
    V, n, k = 64, 900, 450
    a = repetitive_stream(n, V)
    _, lp, H = model_outputs(a, V)
    ref = np.array(BackoffNgramMixer(V, 4, 0.5, "entropy").nll(a, 1, lp, H))
    for pos in (k, 2, n - 1):
        b = a.copy()
        b[pos] = (b[pos] + 1) % V
        out = np.array(BackoffNgramMixer(V, 4, 0.5, "entropy").nll(b, 1, lp, H))  # same model outputs
        assert np.array_equal(ref[:pos - 1], out[:pos - 1])  # targets 1..pos-1
        assert not np.array_equal(ref[pos - 1:], out[pos - 1:])
    b = a.copy()
    b[k + 1:] = np.random.default_rng(9).integers(0, V, size=n - k - 1)
    out = np.array(BackoffNgramMixer(V, 4, 0.5, "entropy").nll(b, 1, lp, H))
    assert np.array_equal(ref[:k], out[:k])


def test_each_target_once_in_order():
    """nll() takes targets exactly once, continuing where the last call ended (C4)."""
    V, n = 32, 300
    toks = repetitive_stream(n, V)
    _, lp, H = model_outputs(toks, V)
    m = BackoffNgramMixer(V, 3, 0.3)
    m.nll(toks, 1, lp[:100], H[:100])
    for bad in (1, 50, 102):  # again, back, or skipping one
        with pytest.raises(RuntimeError, match="continue in order"):
            m.nll(toks, bad, lp[100:110], H[100:110])
    m.nll(toks, 101, lp[100:], H[100:])
    with pytest.raises(RuntimeError, match="prepared for"):
        m.stats(toks[:-1])  # another split than the one its statistics were computed for


def test_score_first_and_learns_repeats_within_a_document():
    """A span repeated 50 tokens later is already cheap the second time (per-token resolution: no chunk
    hides it), and the first target is the model alone."""
    V = 512
    rng = np.random.default_rng(3)
    span = rng.integers(0, V, size=50)
    toks = np.concatenate([rng.integers(0, V, size=20), span, span]).astype(np.int32)
    n = len(toks)
    lp, H = mx.full((n - 1,), -math.log(V)), mx.full((n - 1,), math.log(V))
    out = np.array(BackoffNgramMixer(V, 4, 0.9, "fixed").nll(mx.array(toks), 1, lp, H))
    assert out[0] == np.float32(math.log(V))  # nothing seen yet: the model alone
    assert out[:69].mean() > math.log(V) - 0.1
    assert out[75:].mean() < 0.35 * math.log(V)


def test_alpha_zero_is_model():
    V, n = 128, 1000
    toks = repetitive_stream(n, V)
    _, lp, H = model_outputs(toks, V)
    for mode in ("fixed", "entropy"):
        m = BackoffNgramMixer(V, 4, 0.0, mode)
        assert np.array_equal(np.array(m.nll(toks, 1, lp, H)), np.array(-lp))


def test_short_history_skips_orders():
    """Target j uses orders <= j only: at j=1, K=6 equals K=1; at j=2, K=6 equals K=2."""
    toks = repetitive_stream(400, 16, seed=4)
    stats = [mixer_stats(toks, 16, K) for K in (1, 2, 6)]
    assert stats[0][0][1] == stats[2][0][1] and stats[0][1][1] == stats[2][1][1]
    assert stats[1][0][2] == stats[2][0][2] and stats[1][1][2] == stats[2][1][2]


def test_group_sort_paths_agree():
    """The packed uint64 sort and the stable-argsort fallback (forced by a key bound past 64 bits)
    give the same order and group starts; equal keys keep ascending ends."""
    rng = np.random.default_rng(0)
    n = 5000
    key = rng.integers(0, 300, size=n).astype(np.int64)
    ends = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int32)
    packed = T.group_sort(key.copy(), ends, 300, 10 * n)
    fallback = T.group_sort(key.copy(), ends, 2**62, 10 * n)
    assert np.array_equal(packed[0], fallback[0]) and np.array_equal(packed[1], fallback[1])
    want = ends[np.lexsort((ends, key))]
    assert np.array_equal(packed[0], want)
    assert packed[1].sum() == np.unique(key).size


def test_fallback_sort_gives_the_same_statistics(monkeypatch):
    """Every level through the stable-argsort path (as a large vocabulary can force): same numbers."""
    toks = zipf_stream(20000, 300)
    want = mixer_stats(toks, 300, 5)
    real = T.group_sort
    monkeypatch.setattr(T, "group_sort", lambda key, ends, bound, n: real(key, ends, 2**62, n))
    got = mixer_stats(toks, 300, 5)
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])


class FakeGroup:
    """A rank of two, run as a thread (all_sum_ints is replaced by a sum through a barrier)."""

    def __init__(self, rank):
        self._rank = rank

    def size(self):
        return 2

    def rank(self):
        return self._rank


def test_ranks_split_the_counting_and_match_one_process(monkeypatch):
    """With 2 ranks each sorts the n-grams of the tokens it owns (about half of every level) and the
    joined statistics are bit-identical to one process's."""
    V, K = 256, 4
    toks = zipf_stream(30000, V, seed=1)
    want = mixer_stats(toks, V, K)
    barrier, slots, sorted_n = threading.Barrier(2), [None, None], [0, 0]

    def fake_sum(a, group):
        if group is None:
            return a
        slots[group.rank()] = a
        barrier.wait()
        out = slots[0] + slots[1]
        barrier.wait()
        return out

    real = T.group_sort

    def counting_sort(key, ends, bound, n):
        sorted_n[owner[int(ends[0])] if ends.size else 0] += ends.size
        return real(key, ends, bound, n)

    owner = T.token_owners(toks, V, 2)[toks]
    monkeypatch.setattr(T, "all_sum_ints", fake_sum)
    monkeypatch.setattr(T, "group_sort", counting_sort)
    got = [None, None]

    def rank(r):
        got[r] = mixer_stats(toks, V, K, FakeGroup(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in (0, 1):
        assert np.array_equal(got[r][0], want[0]) and np.array_equal(got[r][1], want[1])
    share = sorted_n[0] / sum(sorted_n)
    assert 0.4 < share < 0.6, share


def test_background_worker_equals_foreground():
    V, K = 128, 4
    toks = zipf_stream(20000, V, seed=2)
    lp, H = cheap_outputs(toks)
    fg = BackoffNgramMixer(V, K, 0.5, "entropy")
    bg = BackoffNgramMixer(V, K, 0.5, "entropy")
    bg.prepare(toks, background=True)
    assert np.array_equal(np.array(fg.nll(toks, 1, lp, H)), np.array(bg.nll(toks, 1, lp, H)))


def test_peak_memory_within_the_bound():
    """tracemalloc's peak of the statistics stays within peak_nbytes (the number the cap is checked
    against) on Zipf streams at orders 4 and 6, V = 1024 and 8192, and through the fallback sort."""
    n = 1_000_000
    for K, V, bound_bits in ((4, 1024, None), (6, 1024, None), (4, 1024, 2**62), (4, 8192, None)):
        toks = zipf_stream(n, V)
        real = T.group_sort
        T.group_sort = real if bound_bits is None else (lambda key, ends, b, m: real(key, ends, bound_bits, m))
        try:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            mixer_stats(toks, V, K)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            T.group_sort = real
        assert peak <= BackoffNgramMixer.peak_nbytes(n), (K, V, bound_bits, peak / n)


def test_memory_cap_checked_before_work(monkeypatch):
    """Below the statistics' peak the mixer refuses before any counting, naming the variable."""
    toks = repetitive_stream(100_000, 64)
    need = BackoffNgramMixer.peak_nbytes(toks.size)
    monkeypatch.setattr(T, "mixer_stats", lambda *a, **k: pytest.fail("counted before checking the cap"))
    with pytest.raises(MemoryError, match="NGRAM_MAX_MEMORY_MB"):
        BackoffNgramMixer(64, 4, 0.3, max_memory_mb=need / 2**20 * 0.99).prepare(toks)


def test_a_run_whose_mixer_cannot_fit_is_refused_before_work(data, tmp_path):
    """Training and EVAL_ONLY: the split's statistics above NGRAM_MAX_MEMORY_MB are refused before the first
    step (exit 2, naming the variable and the MiB needed), not with a MemoryError after the whole training."""
    need_mib = math.ceil(BackoffNgramMixer.peak_nbytes(8192) / 2**20)
    capped = dict(NGRAM_MIXER_ENABLED=1, NGRAM_MAX_MEMORY_MB=need_mib - 1, VAL_MAX_TOKENS=8192)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="train", ITERATIONS=3, **capped)) == 2
    log = (tmp_path / "train.txt").read_text()
    assert f"error: NGRAM_MAX_MEMORY_MB={need_mib - 1}: the n-gram mixer needs {need_mib} MiB" in log
    assert "step:" not in log and not list(tmp_path.glob("train_*"))
    assert T.main(tiny_env(data, tmp_path, RUN_ID="art", ITERATIONS=2)) == 0
    art = tmp_path / "art_model.int6.ptz"
    assert T.main(tiny_env(data, tmp_path, RUN_ID="ev", EVAL_ONLY=1, LOAD_ARTIFACT=art, **capped)) == 2
    log = (tmp_path / "ev.txt").read_text()
    assert f"needs {need_mib} MiB" in log and "eval_only" not in log


def test_env_vars():
    hp = T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_MAX_MEMORY_MB="123"))
    assert hp.ngram_max_memory_mb == 123
    with pytest.raises(T.ConfigError, match="NGRAM_BUCKETS.*retired"):
        T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_BUCKETS="16384"))
    with pytest.raises(T.ConfigError, match="NGRAM_CHUNK.*one at a time"):
        T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_CHUNK="2048"))
    with pytest.raises(T.ConfigError, match="NGRAM_MAX_MEMORY_MB"):
        T.Hyperparameters.from_env(dict(NGRAM_MAX_MEMORY_MB="0"))


# ---- NGRAM_ALPHA_MODE=adaptive: the posterior-mean alpha per bucket, learned from the targets already scored
def adaptive(V, K=4, **kw):
    return BackoffNgramMixer(V, K, 0.7, "adaptive", **kw)


def bits(nll) -> float:
    """Total bits of a run of per-target NLLs (nats)."""
    return float(np.sum(np.asarray(nll, np.float64))) / math.log(2)


def test_adaptive_rows_sum_to_one_and_match_the_plain_reference():
    """At random positions the full mixed row over all V candidates sums to 1 within 1e-9, every entry is
    positive, and the mixer's NLL is the row's entry at the target; the row's weight comes from a plain
    one-target-at-a-time posterior (conftest) over the earlier targets, through uneven calls."""
    V, n, K = 32, 900, 3
    toks = repetitive_stream(n, V, seed=5)
    P, lp, H = model_outputs(toks, V, seed=4)
    m = adaptive(V, K, conf_bins=2, entropy_bins=2)
    cuts = [1, 2, 300, 301, 777, n]
    out = np.concatenate([np.array(m.nll(toks, a, lp[a - 1:b - 1], H[a - 1:b - 1])) for a, b in zip(cuts, cuts[1:])])
    for j in (1, 2, 3, 150, 301, 302, 600, n - 1):
        pm = np.array(P[j - 1], np.float64)
        d = mixer_distribution(adaptive(V, K, conf_bins=2, entropy_bins=2), toks, j, pm / pm.sum(), lp, H)
        assert abs(d.sum() - 1.0) < 1e-9 and d.min() > 0
        assert math.isclose(math.exp(-out[j - 1]), d[int(toks[j])], rel_tol=2e-5), j


def test_adaptive_causal_under_a_token_change_at_or_after_the_target():
    """Changing token k leaves every NLL of a target before k bit-identical (the model's outputs held)."""
    V, n = 64, 1500
    a = repetitive_stream(n, V)
    _, lp, H = model_outputs(a, V)
    ref = np.array(adaptive(V).nll(a, 1, lp, H))
    for pos in (700, 2, n - 1):
        b = a.copy()
        b[pos] = (b[pos] + 1) % V
        out = np.array(adaptive(V).nll(b, 1, lp, H))
        assert np.array_equal(ref[:pos - 1], out[:pos - 1])
        assert not np.array_equal(ref[pos - 1:], out[pos - 1:])


def test_adaptive_weight_reads_only_earlier_targets():
    """Changing the model's probability of target k leaves the weight a of every target <= k bit-identical
    (target k's own weight too) and every NLL before k; later weights do move (they learn from it)."""
    V, n, k = 64, 400, 200  # short: the posterior is not yet sure of one alpha
    toks = repetitive_stream(n, V, seed=2)
    _, lp, H = model_outputs(toks, V)
    p, conf, top = mixer_stats(toks, V, 4)

    def run(lp):
        lp = np.array(lp, np.float64)
        a = adaptive(V).adaptive.weights(lp, p[1:], conf[1:], top[1:], np.array(H, np.float64))
        return a, adaptive(V).nll(toks, 1, mx.array(lp), H)

    a_ref, nll_ref = run(lp)
    lp2 = np.array(lp)
    lp2[k - 1] = math.log(0.999)  # the model now gives target k almost all its mass
    a_new, nll_new = run(lp2)
    assert np.array_equal(a_ref[:k], a_new[:k])
    assert np.array_equal(np.array(nll_ref)[:k - 1], np.array(nll_new)[:k - 1])
    assert not np.array_equal(a_ref[k:], a_new[k:])


def test_adaptive_independent_of_how_calls_cut_the_stream():
    """One call or many uneven ones (TTT chunks, a batch size): bit-identical NLLs."""
    V = 128
    toks = zipf_stream(30000, V, seed=3)
    lp, H = cheap_outputs(toks, seed=3)
    whole = np.array(adaptive(V, 5).nll(toks, 1, lp, H))
    m = adaptive(V, 5)
    cuts = [1, 2, 3, 1000, 1001, 4097, 20000, toks.size]
    parts = np.concatenate([np.array(m.nll(toks, a, lp[a - 1:b - 1], H[a - 1:b - 1])) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(whole, parts)


def test_adaptive_each_target_once_in_order():
    V, n = 32, 300
    toks = repetitive_stream(n, V)
    _, lp, H = model_outputs(toks, V)
    m = adaptive(V, 3)
    m.nll(toks, 1, lp[:100], H[:100])
    for bad in (1, 50, 102):
        with pytest.raises(RuntimeError, match="continue in order"):
            m.nll(toks, bad, lp[100:110], H[100:110])
    m.nll(toks, 101, lp[100:], H[100:])


def true_model_source(n, V, seed=0):
    """Tokens drawn from a sharp distribution that changes at every position, and the model that knows
    it: the model is the true distribution, so no cache can help (it only knows the past's marginals)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, size=(n, V))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    P = np.exp(logp)
    toks = (P.cumsum(1) < rng.uniform(size=(n, 1))).sum(1).clip(0, V - 1).astype(np.int32)
    H = -(P * logp).sum(1)
    return toks, mx.array(logp[np.arange(1, n), toks[1:]].astype(np.float32)), mx.array(H[1:].astype(np.float32))


def test_adaptive_is_the_model_when_the_model_is_the_truth():
    """Model = true distribution: the adaptive mixer is within 1e-4 bits per target (so per byte: a token
    is >= 1 byte) of the model alone at the default settings, on 250k targets (the bound: 18 buckets x 1 bit);
    fixed alpha = 0.7 (the old default) loses more than 0.05 bits per target."""
    V, n = 32, 250_001
    toks, lp, H = true_model_source(n, V)
    model = bits(-np.array(lp))
    hp = T.Hyperparameters.from_env({})
    mix = BackoffNgramMixer(V, hp.ngram_max_order, hp.ngram_alpha, hp.ngram_alpha_mode, grid=hp.ngram_alpha_grid,
                            prior_zero=hp.ngram_prior_zero, conf_bins=hp.ngram_conf_bins,
                            entropy_bins=hp.ngram_entropy_bins)
    got = bits(mix.nll(toks, 1, lp, H))
    fixed = bits(BackoffNgramMixer(V, 5, 0.7, "fixed").nll(toks, 1, lp, H))
    assert (got - model) / (n - 1) < 1e-4, (got - model) / (n - 1)
    assert (fixed - model) / (n - 1) > 0.05, (fixed - model) / (n - 1)


def test_adaptive_beats_every_fixed_alpha_of_its_grid_on_repeated_spans():
    """A weak model on a source with repeated spans, where the cache helps a lot: the adaptive mixer's total
    loss is no worse than the best fixed alpha of its grid plus the bound (ln(1/prior) per bucket used)."""
    V, n, K = 256, 60_000, 4
    toks = repetitive_stream(n, V, seed=7)
    lp, H = cheap_outputs(toks, seed=7)
    m = adaptive(V, K)
    got = bits(m.nll(toks, 1, lp, H))
    grid = T.parse_alpha_grid(T.NGRAM_ALPHA_GRID)
    fixed = {al: bits(BackoffNgramMixer(V, K, al, "fixed").nll(toks, 1, lp, H)) for al in grid}
    best = min(fixed.values())
    used = int((m.adaptive.loglik != m.adaptive.log_prior).any(axis=0).sum())
    bound = used * math.log((len(grid) - 1) / (1 - m.adaptive.prior_zero)) / math.log(2)
    assert got <= best + bound, (got, best, bound)
    assert got < fixed[0.0] - 0.2 * (n - 1)  # and far better than the model alone


def test_statistics_counted_once_per_run(data, tmp_path, monkeypatch):
    """A run's pre-quant and round-trip final evaluations both mix in the cache, but count the split once;
    the round trip's mixed score is what a fresh count gives (EVAL_ONLY of the artifact: same number)."""
    from conftest import tiny_env
    calls = []
    real = T.mixer_stats
    monkeypatch.setattr(T, "mixer_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    env = tiny_env(data, tmp_path, NGRAM_MIXER_ENABLED=1, EVAL_MODE="sliding", EVAL_STRIDE=32, ITERATIONS=6,
                   VAL_MAX_TOKENS=3000)
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    assert len(calls) == 1
    assert log.count("ngram_mixer: per-token statistics for") == 1
    assert log.count("counted once per run") == 1
    run_bpb = re.search(r"roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log)[1]
    art = next(tmp_path.glob("*.ptz"))
    assert T.main(dict(env, EVAL_ONLY="1", LOAD_ARTIFACT=str(art), RUN_ID="again")) == 0
    assert len(calls) == 2  # a new run counts afresh
    assert re.search(r"eval_only_exact val_loss:\S+ val_bpb:(\S+)", (tmp_path / "again.txt").read_text())[1] == run_bpb


def test_adaptive_env_vars():
    hp = T.Hyperparameters.from_env({})
    assert hp.ngram_alpha_mode == "adaptive" and not hp.ngram_mixer_enabled
    hp = T.Hyperparameters.from_env(dict(NGRAM_ALPHA_GRID="0, 0.5,1", NGRAM_PRIOR_ZERO="0.9", NGRAM_ENTROPY_BINS="3"))
    assert T.parse_alpha_grid(hp.ngram_alpha_grid) == (0.0, 0.5, 1.0)
    for bad in ("0.1,0.5", "0,0.5,0.4", "0,2", "0", "0,a"):
        with pytest.raises(T.ConfigError, match="NGRAM_ALPHA_GRID"):
            T.Hyperparameters.from_env(dict(NGRAM_ALPHA_GRID=bad))
    with pytest.raises(T.ConfigError, match="NGRAM_PRIOR_ZERO"):
        T.Hyperparameters.from_env(dict(NGRAM_PRIOR_ZERO="1"))
    with pytest.raises(T.ConfigError, match="NGRAM_ENTROPY_BINS"):
        T.Hyperparameters.from_env(dict(NGRAM_ENTROPY_BINS="0"))
