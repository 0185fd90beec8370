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


def test_ema_follows_its_recursion():
    hp = hp_of(EMA_DECAY=0.8)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    fns = T.Compiled(model, opt)
    x = np.random.default_rng(0).integers(0, 128, (2, 32)).astype(np.int32)
    name = "blocks.0.attn.c_q.weight"
    expect = np.array(dict(tree_flatten(model.parameters()))[name])
    for _ in range(3):
        T.train_step(fns, x, x, 2, 1.0, 0.9)
        expect = 0.8 * expect + 0.2 * np.array(dict(tree_flatten(model.parameters()))[name])
    np.testing.assert_allclose(np.array(opt.ema[name]), expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expect, np.array(dict(tree_flatten(model.parameters()))[name]))


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
