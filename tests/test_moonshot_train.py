"""Training-side moonshot stack: EngramLite, SkipGram hash bias, complementary training, EMA, QAT."""
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt_mlx as T
from conftest import tiny_env

FULL = dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=97, ENGRAM_DIM=16, SKIPGRAM_HASH_SIZE=89, SKIPGRAM_DIM=8)


def hp_of(**over):
    env = dict(VOCAB_SIZE="128", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2")
    env.update({k: str(v) for k, v in over.items()})
    return T.Hyperparameters.from_env(env)


def model_of(hp, seed=0):
    mx.random.seed(seed)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    # zero-initialised projections would make every feature trivially causal: randomise them
    model.update(tree_unflatten([(n, mx.random.normal(p.shape) * 0.1) for n, p in tree_flatten(model.parameters())
                                 if n.endswith("proj.weight")]))
    return model


@pytest.mark.parametrize("V", [1024, 4096, 8192, 65536])
@pytest.mark.parametrize("size", [1, 4096, 1000003, 2**20])
def test_hash_index_range(V, size):
    ids = mx.array(np.random.default_rng(V).integers(0, V, (4, 512)), mx.int32)
    ids = mx.concatenate([ids, mx.full((4, 1), V - 1, mx.int32)], axis=1)  # largest id included
    for order in (1, 2, 3):
        h = np.array(T.hash_ids([T.shift_right(ids, d) for d in range(order)], 7, size))
        assert h.min() >= 0 and h.max() < size
    if size >= 4096:  # heads really are different hash functions
        a, b = (np.array(T.hash_ids([ids, T.shift_right(ids, 1)], s, size)) for s in (0, 1))
        assert (a != b).mean() > 0.9


@pytest.mark.parametrize("over", [dict(ENGRAM_LITE_ENABLED=1), dict(ENGRAM_LITE_ENABLED=1, ENGRAM_MODE="input"),
                                  dict(SKIPGRAM_HASH_SIZE=64, SKIPGRAM_PATTERNS="-1,-3;-2,-6;-1,-2,-4"), FULL])
def test_features_are_causal(over):
    model = model_of(hp_of(**over))
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (2, 48)), mx.int32)
    base = np.array(model(ids))
    for k in (0, 17, 40):
        changed = np.array(model(mx.concatenate([ids[:, :k + 1], (ids[:, k + 1:] + 5) % 128], axis=1)))
        assert np.array_equal(base[:, :k + 1], changed[:, :k + 1])
        assert not np.allclose(base[:, k + 1:], changed[:, k + 1:])


def test_skipgram_offsets_read_the_right_tokens():
    """Pattern (-1,-3) at position t pairs input tokens t and t-2; the first 2 positions get no bias."""
    model = model_of(hp_of(SKIPGRAM_HASH_SIZE=1009, SKIPGRAM_PATTERNS="-1,-3"))
    ids = mx.array([[5, 9, 7, 3, 7, 9, 7, 3]], mx.int32)
    bias = np.array(model.skipgram(ids, mx.float32))[0]
    assert np.all(bias[:2] == 0) and np.abs(bias[2:]).min() > 0
    # t=3 pairs (x3, x1) = (3, 9) and t=7 pairs (x7, x5) = (3, 9): same pair, same bias;
    # t=2 pairs (7, 5) and t=4 pairs (7, 7): different pairs (the middle token is skipped)
    assert np.array_equal(bias[3], bias[7]) and not np.allclose(bias[2], bias[4])


@pytest.mark.parametrize("over", [FULL, dict(FULL, ENGRAM_MODE="input", ENGRAM_PROJ_OPTIMIZER="adam",
                                             SKIPGRAM_PROJ_OPTIMIZER="muon", TIE_EMBEDDINGS=0)])
def test_new_tensors_each_in_exactly_one_optimizer_group(over):
    hp = hp_of(**over)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    params = dict(tree_flatten(model.trainable_parameters()))
    assert set(opt.group) == set(params)
    owned = [set(sub) for sub in opt.split(params).values()]
    assert sum(len(o) for o in owned) == len(params) and set().union(*owned) == set(params)
    assert {n for n in params if ".tables." in n} == {n for n, g in opt.group.items() if g == "table"} != set()
    assert opt.group["engram.gates"] == "scalar"
    for piece in ("engram", "skipgram"):
        want = "muon" if getattr(hp, f"{piece}_proj_optimizer") == "muon" else "head"
        assert opt.group[f"{piece}.proj.weight"] == want


def test_flags_off_is_exactly_the_baseline():
    """Size knobs of disabled pieces change nothing: same parameters, same losses."""
    x = np.random.default_rng(3).integers(0, 128, (2, 32)).astype(np.int32)
    runs = []
    for over in ({}, dict(ENGRAM_HASH_SIZE=99, ENGRAM_DIM=7, SKIPGRAM_DIM=5, SKIPGRAM_PATTERNS="-1,-2",
                          COMPLEMENT_FLOOR=0.5, QAT_START_FRAC=1, ENGRAM_PROJ_OPTIMIZER="adam",
                          ENGRAM_MODE="input")):
        hp = hp_of(**over)
        mx.random.seed(0)
        model = T.GPT(T.ModelConfig.from_hparams(hp))
        fns = T.Compiled(model, T.Optimizers(model, hp))
        losses = [float(T.train_step(fns, x, x, 2, 1.0, 0.9)) for _ in range(3)]
        runs.append((sorted(T.flat_numpy(model)), losses, T.flat_numpy(model)))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(np.array_equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][0])


def test_fake_quant_matches_the_artifact_quantizer_exactly_with_identity_gradient():
    w = mx.random.normal((48, 80)) * mx.linspace(1e-4, 2.0, 48)[:, None]
    for bits in (6, 8):
        deq = T.dequantize_rows(*T.quantize_rows(np.array(w), bits))
        assert np.array_equal(np.array(T.fake_quant(w, bits)), deq)
        g = mx.grad(lambda a: mx.sum(T.fake_quant(a, bits) * 3.0))(w)
        assert np.all(np.array(g) == 3.0)


def test_qat_graph_sees_exactly_the_artifact_weights(tmp_path):
    """The QAT-compiled loss at weights W equals the plain loss of the model loaded from the artifact of W."""
    hp = hp_of(**FULL)
    model = model_of(hp)
    x, y = (mx.array(np.random.default_rng(i).integers(0, 128, (2, 32)), mx.int32) for i in (4, 5))
    opt = T.Optimizers(model, hp)
    plain, qat = T.Compiled(model, opt), T.Compiled(model, opt, qat_bits=6)
    l_plain, l_qat = float(plain.grads(x, y)[0]), float(qat.grads(x, y)[0])
    assert l_plain != l_qat
    path = str(tmp_path / "a.ptz")
    T.write_artifact(path, T.flat_numpy(model), model.cfg, 6)
    _, flat, _ = T.read_artifact(path)
    T.load_flat_into(model, flat)
    assert float(plain.grads(x, y)[0]) == pytest.approx(l_qat, rel=1e-6)


@pytest.mark.parametrize("warmup", [0, 10])
def test_ema_follows_its_recursion(warmup):
    """The compiled step's EMA is d_t*ema + (1-d_t)*w with d_t = ema_decay_at(t): the constant
    decay when EMA_WARMUP=0, min(d, (1+t)/(W+t)) otherwise (here 2/11, 3/12, 4/13 < 0.8)."""
    hp = hp_of(EMA_DECAY=0.8, EMA_WARMUP=warmup)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    fns = T.Compiled(model, opt)
    x = np.random.default_rng(0).integers(0, 128, (2, 32)).astype(np.int32)
    name = "blocks.0.attn.c_q.weight"
    expect = np.array(dict(tree_flatten(model.parameters()))[name])
    for t in (1, 2, 3):
        T.train_step(fns, x, x, 2, 1.0, 0.9)
        d = 0.8 if not warmup else (1 + t) / (warmup + t)
        expect = d * expect + (1 - d) * np.array(dict(tree_flatten(model.parameters()))[name])
    np.testing.assert_allclose(np.array(opt.ema[name]), expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expect, np.array(dict(tree_flatten(model.parameters()))[name]))


def init_weight_after(steps, **over):
    """Weight the EMA keeps on the parameters it started from after `steps` updates, measured
    through Optimizers.reset/apply: EMA starts at all-ones weights, every update then sees zeros
    (lr 0, zero gradients keep them zero), so every EMA entry equals the weight left on the start."""
    hp = hp_of(**over)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    names = dict(tree_flatten(model.trainable_parameters()))
    opt.reset({n: mx.ones_like(p) for n, p in names.items()})
    zeros = {n: mx.zeros_like(p) for n, p in names.items()}
    for _ in range(steps):
        out = opt.apply(zeros, zeros, mx.array(0.0), mx.array(0.9))
        mx.eval(out, opt.state)
    w = np.concatenate([np.array(e).ravel() for e in opt.ema.values()])
    assert np.allclose(w, w[0])
    return float(w[0])


def test_ema_warmup_forgets_the_initial_weights():
    """Issue #11: a constant 0.997 keeps 0.997^50 = 86% of the untrained start after 50 steps;
    the default warm-up keeps < 1%, and the decay still reaches EMA_DECAY on long runs."""
    assert init_weight_after(50, EMA_DECAY=0.997) < 0.01
    assert init_weight_after(50, EMA_DECAY=0.997, EMA_WARMUP=0) == pytest.approx(0.997 ** 50, rel=1e-4)
    hp = hp_of(EMA_DECAY=0.997)
    assert float(T.ema_decay_at(mx.array(1.0), hp)) == pytest.approx(2 / (1 + hp.ema_warmup))
    assert float(T.ema_decay_at(mx.array(10_000.0), hp)) == pytest.approx(0.997)


@pytest.mark.parametrize("bad", ["1", "0.5", "-1"])
def test_ema_warmup_validation(bad):
    with pytest.raises(T.ConfigError, match="EMA_WARMUP"):
        hp_of(EMA_WARMUP=bad)


def test_ema_is_not_worse_than_the_raw_weights_on_a_short_run(data, tmp_path):
    """At 30 steps the warmed-up EMA of decay 0.997 scores no worse than the raw weights it
    shadows (after the int6 round trip); the constant 0.997 of the records is far worse."""
    hp = T.Hyperparameters.from_env(dict(VOCAB_SIZE=str(data["vocab_size"]), NUM_LAYERS="2", MODEL_DIM="64",
                                         NUM_HEADS="4", NUM_KV_HEADS="2", EMA_DECAY="0.997", ITERATIONS="30",
                                         WARMDOWN_ITERS="10", TRAIN_SEQ_LEN="64"))
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    fns = T.Compiled(model, opt)
    start = dict(tree_flatten(model.trainable_parameters()))
    stream = T.TokenStream(T.shard_files(data["data_path"], "train"), hp.vocab_size)
    for step in range(hp.iterations):
        x, y = stream.next_batch(1024, hp.train_seq_len)
        mx.eval(T.train_step(fns, x, y, 16, T.lr_multiplier(step, 0.0, hp), 0.9))
    raw = dict(tree_flatten(model.trainable_parameters()))
    const = {n: 0.997 ** 30 * start[n] + (1 - 0.997 ** 30) * raw[n] for n in raw}  # generous to the constant
    tables = T.build_byte_tables(T.load_tokenizer(data["tokenizer"]), hp.vocab_size)
    val = T.load_validation_tokens(data["data_path"], 8192, hp.vocab_size)

    def bpb(weights, tmp=str(tmp_path / "a.ptz")):
        model.update(tree_unflatten(list(weights.items())))
        T.write_artifact(tmp, T.flat_numpy(model), model.cfg, 6)
        T.load_flat_into(model, T.read_artifact(tmp)[1])
        return T.evaluate(fns.token_nll, val, 64, 64, tables)[1]

    b_raw, b_ema, b_const = bpb(raw), bpb(dict(opt.ema)), bpb(const)
    assert b_ema <= b_raw + 0.005, (b_ema, b_raw)
    assert b_const > b_raw + 0.05, (b_const, b_raw)


def test_bigram_table_and_complement_weights(tmp_path):
    from conftest import load_script
    bs = load_script("data/build_shards.py")
    toks = np.array([1, 2, 1, 2, 1, 3, 0], np.uint16)
    bs.write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    P = T.bigram_table([str(tmp_path / "fineweb_train_000000.bin")], 4, 10**6)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-6)
    assert P[1, 2] == pytest.approx((2 + 1) / (3 + 4)) and P[3, 0] == pytest.approx(2 / 5)
    assert T.bigram_table([str(tmp_path / "fineweb_train_000000.bin")], 4, 3)[1, 3] == 0.2  # cap
    x, y = mx.array([[1, 1, 3]]), mx.array([[2, 3, 0]])
    w = np.array(T.complement_weights(x, y, mx.array(P), 1.0, 0.1))
    assert w.mean() == pytest.approx(1.0) and w[0, 0] < w[0, 1]  # the predictable bigram counts less
    w0 = np.array(T.complement_weights(x, y, mx.array(P), 0.0, 0.1))
    assert np.all(w0 == 1.0)


def test_full_stack_tiny_run_end_to_end(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=12, COMPLEMENT_ALPHA=0.5, EMA_DECAY=0.9, QAT_START_FRAC=0.5,
                   **{k: v for k, v in FULL.items()})
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    assert "qat:on step:6" in log and "complement: bigram table" in log and "ema: saving" in log
    assert re.search(r"params_engram:\d+ params_skipgram:\d+", log)
    pre = float(re.search(r"^step:12/12 val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    post = float(re.search(r"^final_int6_zstd_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    assert abs(post - pre) < 0.05
    cfg, flat, _ = T.read_artifact(str(tmp_path / "tiny_model.int6.ptz"))
    assert cfg.engram_lite_enabled and cfg.skipgram_hash_size == 89
    assert not any("complement" in n for n in flat)
