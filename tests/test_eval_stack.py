"""Evaluation-side moonshot stack: sliding-window eval and the n-gram mixer wired into evaluate()."""
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt_mlx as T
from conftest import mixer_distribution, tiny_env


@pytest.fixture(scope="module")
def setup(data):
    hp = T.Hyperparameters.from_env(dict(VOCAB_SIZE=str(data["vocab_size"]), NUM_LAYERS="2", MODEL_DIM="32",
                                         NUM_HEADS="4", NUM_KV_HEADS="2"))
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    model.update(tree_unflatten([(n, mx.random.normal(p.shape) * 0.05) for n, p in tree_flatten(model.parameters())
                                 if n.endswith("proj.weight")]))
    fns = T.Compiled(model, T.Optimizers(model, hp))
    tables = T.build_byte_tables(T.load_tokenizer(data["tokenizer"]), data["vocab_size"])
    toks = T.load_validation_tokens(data["data_path"], 3001, data["vocab_size"])
    return model, fns, tables, toks, data["vocab_size"]


@pytest.mark.parametrize("n,L,S", [(1000, 64, 64), (1000, 64, 16), (1000, 64, 1), (999, 64, 63), (50, 64, 16),
                                   (64, 64, 7), (65, 64, 64), (130, 64, 48)])
def test_windows_score_every_target_once_in_order_with_most_context(n, L, S):
    starts, offs = T.eval_windows(n, L, S)
    scored = np.concatenate([np.arange(st + o + 1, min(st + L, n) + 1) for st, o in zip(starts, offs)])
    assert np.array_equal(scored, np.arange(1, n + 1))  # targets 1..n, each once, in order
    ctx = np.concatenate([np.arange(o, min(L, n - st)) for st, o in zip(starts, offs)])  # tokens before target
    first = np.minimum(np.arange(n), L - 1)
    assert np.all(ctx >= np.minimum(first, L - S))


def test_stride_equal_seq_len_is_the_standard_eval(setup):
    model, fns, tables, toks, V = setup
    a = T.evaluate(fns.token_nll, toks, 64, 8, tables)
    b = T.evaluate(fns.token_nll, toks, 64, 5, tables, stride=64)  # other batching: same up to BLAS rounding
    assert a[2].size == b[2].size == toks.size - 1
    assert a[0] == pytest.approx(b[0], rel=1e-7) and a[1] == pytest.approx(b[1], rel=1e-7)
    # independent check: plain non-overlapping sequences through the uncompiled model
    k = (toks.size - 1) // 64
    x = mx.array(toks[:k * 64].reshape(k, 64).astype(np.int32))
    y = mx.array(toks[1:k * 64 + 1].reshape(k, 64).astype(np.int32))
    np.testing.assert_allclose(a[2][:k * 64], np.array(model.token_nll(x, y)).reshape(-1), rtol=1e-5, atol=1e-5)
    nbytes = T.target_bytes(toks[:-1], toks[1:], tables).sum()
    assert a[1] == pytest.approx(a[2].astype(np.float64).sum() / np.log(2) / nbytes)


def test_sliding_eval_scores_each_target_with_its_window_context(setup):
    model, fns, tables, toks, V = setup
    loss, bpb, nll = T.evaluate(fns.token_nll, toks, 64, 7, tables, stride=16)
    assert nll.size == toks.size - 1
    starts, offs = T.eval_windows(toks.size - 1, 64, 16)
    for w in (0, 5, 40, starts.size - 1):  # recompute a few windows by hand
        st, o = int(starts[w]), int(offs[w])
        x = mx.array(toks[None, st:st + 64].astype(np.int32))
        y = mx.array(toks[None, st + 1:st + 65].astype(np.int32))
        direct = np.array(model.token_nll(x, y))[0, o:]
        np.testing.assert_allclose(nll[st + o:st + 64], direct, rtol=1e-5, atol=1e-5)
    std = T.evaluate(fns.token_nll, toks, 64, 7, tables)[2]
    assert np.allclose(nll[:64], std[:64], atol=1e-5) and not np.allclose(nll[64:], std[64:])  # longer contexts


def mixer(V, mode="entropy", order=3):
    return T.BackoffNgramMixer(V, order, 0.3, mode)


@pytest.mark.parametrize("stride", [0, 16])
@pytest.mark.parametrize("mode", ["fixed", "entropy"])
def test_mixer_eval_exactly_once_causal_and_normalized(setup, stride, mode):
    model, fns, tables, toks, V = setup
    fn = fns.token_stats if mode == "entropy" else fns.token_nll
    _, _, nll = T.evaluate(fn, toks, 64, 6, tables, stride=stride, mixer=mixer(V, mode))
    assert nll.size == toks.size - 1 and np.all(np.isfinite(nll))
    k = 1500  # change every token after k: targets <= k are bit-identical
    toks2 = toks.copy()
    toks2[k + 1:] = (toks2[k + 1:] + 7) % V
    _, _, nll2 = T.evaluate(fn, toks2, 64, 6, tables, stride=stride, mixer=mixer(V, mode))
    assert np.array_equal(nll[:k], nll2[:k]) and not np.array_equal(nll[k:], nll2[k:])
    # normalization of the full mixed distribution at positions of this eval (model's own p)
    m = mixer(V, mode)
    half = 1200
    _, _, part = T.evaluate(fn, toks[:half + 1], 64, 6, tables, stride=stride, mixer=m)
    for j in (half + 1, half + 2):
        ctx = toks[max(0, j - 64):j].astype(np.int32)
        p = mx.softmax(model(mx.array(ctx[None]))[0, -1], axis=-1)
        dist = np.array(mixer_distribution(m, toks, j, p), np.float64)
        assert abs(dist.sum() - 1.0) < 1e-5 and dist.min() > 0


def test_mixer_helps_on_repeated_text_and_off_equals_plain(setup):
    model, fns, tables, toks, V = setup
    half = toks[:1001]
    rep = np.concatenate([half, half[1:]])  # the second half repeats the first
    plain = T.evaluate(fns.token_stats, rep, 64, 6, tables, stride=32)[2]
    mixed = T.evaluate(fns.token_stats, rep, 64, 6, tables, stride=32, mixer=mixer(V, order=4))[2]
    assert mixed[1000:].mean() < plain[1000:].mean() - 1.0
    off = T.evaluate(fns.token_nll, rep, 64, 6, tables, stride=32)[2]
    zero = T.evaluate(fns.token_stats, rep, 64, 6, tables, stride=32, mixer=T.BackoffNgramMixer(V, 3, 0.0))[2]
    assert np.array_equal(off, plain) and np.array_equal(off, zero)


def test_eval_only_with_sliding_mixer_writes_per_token_nll(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=4, VAL_MAX_TOKENS=1500)
    assert T.main(env) == 0
    art = str(tmp_path / "tiny_model.int6.ptz")
    out = tmp_path / "nll.f32"
    env = tiny_env(data, tmp_path, EVAL_ONLY=1, LOAD_ARTIFACT=art, RUN_ID="ev", VAL_MAX_TOKENS=1500, EVAL_STRIDE=16,
                   EVAL_SEQ_LEN=96, EVAL_BATCH_SEQS=8, NGRAM_MIXER_ENABLED=1, NGRAM_MAX_MEMORY_MB=64, NGRAM_MAX_ORDER=4,
                   NGRAM_ALPHA_MODE="entropy",
                   EVAL_TOKEN_NLL_PATH=str(out))
    assert T.main(env) == 0
    log = (tmp_path / "ev.txt").read_text()
    assert "final_eval: seq_len:96 stride:16 batch_seqs:8 mixer:order4/entropy" in log
    nll = np.fromfile(out, "<f4")
    assert nll.size == 1499
    toks = T.load_validation_tokens(data["data_path"], 1500, data["vocab_size"])
    tables = T.build_byte_tables(T.load_tokenizer(data["tokenizer"]), data["vocab_size"])
    bpb = nll.astype(np.float64).sum() / np.log(2) / T.target_bytes(toks[:-1], toks[1:], tables).sum()
    assert float(re.search(r"eval_only_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log)[1]) == pytest.approx(bpb, abs=1e-7)


def test_eval_env_validation():
    with pytest.raises(T.ConfigError, match="EVAL_STRIDE"):
        T.Hyperparameters.from_env(dict(EVAL_STRIDE="2048"))
    with pytest.raises(T.ConfigError, match="NGRAM_ALPHA_MODE"):
        T.Hyperparameters.from_env(dict(NGRAM_ALPHA_MODE="magic"))
    with pytest.raises(T.ConfigError, match="NGRAM_BUCKETS"):
        T.Hyperparameters.from_env(dict(NGRAM_MIXER_ENABLED="1", NGRAM_BUCKETS=str(2**20)))  # retired
