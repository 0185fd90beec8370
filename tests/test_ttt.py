"""Score-first test-time training (TTT) at evaluation: legality by test (causal, each target once, the
first-pass score), TTT_LR=0 is plain evaluation, adaptation never reaches the artifact."""
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt_mlx as T
from conftest import tiny_env

SMALL = dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2")


def small_model(data):
    """The 2 x 32 model with its zero-initialised projections drawn at random (so adapting it has gradients), its
    environment and the byte tables (also test_ttt_doc's)."""
    env = dict(SMALL, VOCAB_SIZE=str(data["vocab_size"]))
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(T.Hyperparameters.from_env(env)))
    model.update(tree_unflatten([(n, mx.random.normal(p.shape) * 0.05) for n, p in tree_flatten(model.parameters())
                                 if n.endswith("proj.weight")]))
    tables = T.build_byte_tables(T.load_tokenizer(data["tokenizer"]), data["vocab_size"])
    return model, env, tables


@pytest.fixture(scope="module")
def setup(data):
    model, env, tables = small_model(data)
    toks = T.load_validation_tokens(data["data_path"], 1401, data["vocab_size"])
    return model, env, tables, toks


def trainer(setup, stride, prime=True, **over):
    model, env, _, _ = setup
    hp = T.Hyperparameters.from_env(dict(env, TTT_ENABLED="1", **{k: str(v) for k, v in over.items()}))
    tt = T.TestTimeTrainer(model, hp, 64, stride or 64)
    fns = T.Compiled(model, T.Optimizers(model, hp), ttt=tt)
    if prime:
        tt.prime(fns.ttt_step)
    else:
        tt.compiled = fns.ttt_step
    return tt, fns


def ttt_eval(setup, toks, stride=16, mixer=None, prime=True, **over):
    """Per-target NLL of an evaluation with TTT; checks that the model's weights come back unchanged."""
    model, _, tables, _ = setup
    before = {n: np.array(p) for n, p in tree_flatten(model.parameters())}  # values, not references
    tt, fns = trainer(setup, stride, prime, **over)
    try:
        nll = T.evaluate(fns.token_stats if mixer else fns.token_nll, toks, 64, 8, tables, stride=stride,
                         mixer=mixer, ttt=tt)[2]
    finally:
        tt.close()
    after = {n: np.array(p) for n, p in tree_flatten(model.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[n], after[n]) for n in before)
    return nll


def plain_eval(setup, toks, stride=16, mixer=None, batch=8):
    model, env, tables, _ = setup
    fns = T.Compiled(model, T.Optimizers(model, T.Hyperparameters.from_env(env)))
    return T.evaluate(fns.token_stats if mixer else fns.token_nll, toks, 64, batch, tables, stride=stride,
                      mixer=mixer)[2]


def mixer(V, mode="entropy"):
    return T.BackoffNgramMixer(V, 3, 0.3, mode)


@pytest.mark.parametrize("mode,stride,chunk", [("lora", 16, 256), ("full", 0, 512), ("full", 16, 128)])
def test_lr_zero_is_plain_evaluation_exactly(setup, mode, stride, chunk):
    toks = setup[3]
    a = ttt_eval(setup, toks, stride, TTT_MODE=mode, TTT_LR=0, TTT_CHUNK=chunk, TTT_EPOCHS=2)
    b = plain_eval(setup, toks, stride)
    assert a.size == toks.size - 1 and np.array_equal(a, b)
    c = ttt_eval(setup, toks, stride, TTT_MODE=mode, TTT_LR=0.03, TTT_CHUNK=chunk)  # and LR > 0 does adapt
    first = 64 + (chunk // (stride or 64) - 1) * (stride or 64)  # targets of the first chunk: scored unadapted
    assert np.array_equal(c[:first], b[:first]) and not np.array_equal(c[first:], b[first:])


@pytest.mark.parametrize("mode,with_mixer", [("lora", None), ("full", None), ("lora", "entropy"), ("lora", "adaptive")])
def test_causal_each_target_once_first_pass(setup, mode, with_mixer):
    """Changing the token at p leaves the NLL of every target before p bit-identical, TTT on (C1, C3): its
    prediction, and every adaptation made before it was scored, saw only earlier tokens."""
    toks, V = setup[3], setup[0].cfg.vocab_size
    kw = dict(TTT_MODE=mode, TTT_LR=0.03, TTT_CHUNK=256, TTT_EPOCHS=2)
    nll = ttt_eval(setup, toks, mixer=mixer(V, with_mixer) if with_mixer else None, **kw)
    assert nll.size == toks.size - 1 and np.isfinite(nll).all()
    for p in (306, 1000):  # 2 past the first chunk (targets 1..304), and after several chunks were trained on
        toks2 = toks.copy()
        toks2[p] = (toks2[p] + 5) % V
        nll2 = ttt_eval(setup, toks2, mixer=mixer(V, with_mixer) if with_mixer else None, **kw)
        assert np.array_equal(nll[:p - 1], nll2[:p - 1]) and nll[p - 1] != nll2[p - 1]  # nll[j]: target j + 1


def test_trains_after_each_chunk_is_scored_never_the_last(setup):
    """evaluate() calls train(lo, hi) exactly when targets 1..hi are all scored (the mixer has seen them),
    over contiguous chunks, and never for the last chunk."""
    toks, events = setup[3], []

    class Spy:  # a mixer that only records how far scoring has got, and a trainer that only records calls
        per_chunk = 16

        def nll(self, tokens, start, lp, H):
            events.append(("scored", start + lp.shape[0] - 1))
            return -lp

        def train(self, tokens, lo, hi, chunk, n_chunks):
            events.append(("train", lo, hi, chunk, n_chunks))
    fns = T.Compiled(setup[0], T.Optimizers(setup[0], T.Hyperparameters.from_env(setup[1])))
    T.evaluate(fns.token_nll, toks, 64, 8, setup[2], stride=16, mixer=Spy(), ttt=Spy())
    trains = [(i, e) for i, e in enumerate(events) if e[0] == "train"]
    n_windows = T.eval_windows(toks.size - 1, 64, 16)[0].size
    assert len(trains) == -(-n_windows // 16) - 1 and events[-1] == ("scored", toks.size - 1)
    for k, (i, (_, lo, hi, chunk, n_chunks)) in enumerate(trains):
        assert events[i - 1] == ("scored", hi) and lo == (trains[k - 1][1][2] if k else 0)
        assert chunk == k and n_chunks == len(trains) + 1
    assert trains[0][1][2] == 64 + 15 * 16  # the first chunk: one full window, then 15 strides


def test_train_reads_no_token_past_hi(setup):
    toks = setup[3][:1001]
    other = toks.copy()
    other[701:] = (other[701:] + 3) % setup[0].cfg.vocab_size

    def adapted(tokens):
        tt, _ = trainer(setup, 16, TTT_LR=0.03, TTT_CHUNK=256)
        tt.train(tokens, 300, 700, 0, 3)
        tt.close()
        return tt.params
    a, b = adapted(toks), adapted(other)
    assert all(mx.array_equal(a[n], b[n]).item() for n in a)
    other[700] += 1
    assert not all(mx.array_equal(a[n], v).item() for n, v in adapted(other).items())


def test_priming_leaves_no_trace(setup):
    """The compiled step is primed on synthetic tokens, then everything is reset: same scores as unprimed."""
    toks = setup[3][:1201]
    a = ttt_eval(setup, toks, TTT_LR=0.03, TTT_CHUNK=256)
    b = ttt_eval(setup, toks, prime=False, TTT_LR=0.03, TTT_CHUNK=256)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode,lr", [("lora", 0.03), ("full", 0.1)])
def test_ttt_learns_a_repeated_half(setup, mode, lr):
    half = setup[3][:1001]
    rep = np.concatenate([half, half[1:]])  # the second half repeats the first
    plain = plain_eval(setup, rep)
    ttt = ttt_eval(setup, rep, TTT_MODE=mode, TTT_LR=lr, TTT_CHUNK=256, TTT_EPOCHS=2)
    gain_first, gain_second = plain[:1000].mean() - ttt[:1000].mean(), plain[1000:].mean() - ttt[1000:].mean()
    assert gain_second > 0.1 and gain_second > 2 * gain_first


def test_doc_reset_trains_only_the_current_document(setup):
    toks = setup[3][:1001].copy()
    toks[toks == 1] = 5
    toks[600] = 1  # a document starts at 600

    def adapted(reset, ranges):
        tt, _ = trainer(setup, 16, TTT_LR=0.03, TTT_CHUNK=256, TTT_RESET=reset)
        for c, (lo, hi) in ranges:
            tt.train(toks, lo, hi, c, 4)
        tt.close()
        return dict(tt.params)
    doc = adapted("doc", [(0, (0, 500)), (1, (500, 900))])  # the BOS in the second range resets
    fresh = adapted("doc", [(1, (600, 900))])
    never = adapted("never", [(0, (0, 500)), (1, (500, 900))])
    assert all(mx.array_equal(doc[n], fresh[n]).item() for n in doc)
    assert not all(mx.array_equal(doc[n], never[n]).item() for n in doc)


def test_targets_select_the_named_matrices(setup):
    names = lambda **kw: trainer(setup, 16, prime=False, **kw)[0].names  # noqa: E731
    assert names(TTT_TARGETS="q,v") == ["blocks.0.attn.c_q.weight", "blocks.0.attn.c_v.weight",
                                        "blocks.1.attn.c_q.weight", "blocks.1.attn.c_v.weight"]
    assert names(TTT_TARGETS="head") == ["tok_emb.weight"]  # tied: the shared table is the output matrix
    assert len(names()) == 2 * 6 + 1  # lora 'all': every block matrix and the head
    assert names(TTT_MODE="full") == sorted(dict(tree_flatten(setup[0].trainable_parameters())))
    with pytest.raises(T.ConfigError, match="TTT_TARGETS"):
        T.Hyperparameters.from_env(dict(TTT_TARGETS="q,ffn"))
    with pytest.raises(T.ConfigError, match="TTT_MODE"):
        T.Hyperparameters.from_env(dict(TTT_MODE="qlora"))


def test_artifact_untouched_and_eval_only_matches_the_final_line(data, tmp_path):
    """TTT during a run's final evaluations changes the reported number, not the artifact (EMA on: TTT adapts
    the EMA weights swapped in, which must come back before the artifact is written); EVAL_ONLY of that artifact
    with the same TTT gives the run's final number, and its NLL dump re-sums to it."""
    ttt = dict(TTT_ENABLED=1, TTT_CHUNK=192, TTT_LR=0.02, EVAL_STRIDE=32, NGRAM_MIXER_ENABLED=1)
    logs = {}
    for name, extra in (("on", ttt), ("off", dict(EVAL_STRIDE=32, NGRAM_MIXER_ENABLED=1))):
        extra = dict(extra, EMA_DECAY=0.9)
        (tmp_path / name).mkdir()
        assert T.main(tiny_env(data, tmp_path / name, ITERATIONS=3, VAL_MAX_TOKENS=800, **extra)) == 0
        logs[name] = (tmp_path / name / "tiny.txt").read_text()
    art = tmp_path / "on" / "tiny_model.int6.ptz"
    assert art.read_bytes() == (tmp_path / "off" / "tiny_model.int6.ptz").read_bytes()
    final = {k: re.search(r"final_int6_zstd_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", v)[1]
             for k, v in logs.items()}
    assert final["on"] != final["off"] and "ttt:enabled=True,mode=lora" in logs["on"] and "ttt:off" in logs["off"]
    dump = tmp_path / "nll.f32"
    env = tiny_env(data, tmp_path, EVAL_ONLY=1, LOAD_ARTIFACT=str(art), RUN_ID="ev", VAL_MAX_TOKENS=800,
                   EVAL_TOKEN_NLL_PATH=str(dump), **ttt)
    assert T.main(env) == 0
    got = re.search(r"eval_only_exact val_loss:[\d.]+ val_bpb:([\d.]+)", (tmp_path / "ev.txt").read_text())[1]
    assert got == final["on"]
    nll = np.fromfile(dump, "<f4")
    toks = T.load_validation_tokens(data["data_path"], 800, data["vocab_size"])
    tables = T.build_byte_tables(T.load_tokenizer(data["tokenizer"]), data["vocab_size"])
    assert nll.size == toks.size - 1
    bpb = nll.astype(np.float64).sum() / np.log(2) / T.target_bytes(toks[:-1], toks[1:], tables).sum()
    assert float(got) == pytest.approx(bpb, abs=1e-7)
