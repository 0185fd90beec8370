"""TTT_MODE=doc_lora (per-document LoRA over short chunks, phased global SGD) and ATTN_DOC_ISOLATED: legality by
test (every target once with the split's bytes; a target depends only on its own document's earlier tokens and
on documents scored before it; an adapter never sees a chunk before scoring it)."""
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train_gpt_mlx as T
from conftest import generated_docs, tiny_env
from test_distributed import LAUNCH, _exact, _launch
from test_ttt import SMALL, small_model

DOC = dict(TTT_ENABLED="1", TTT_MODE="doc_lora", TTT_RANK="4", TTT_LR="0.01", TTT_DOC_CHUNK="16",
           TTT_DOC_BATCH="3", TTT_WEIGHT_DECAY="0.5")
L = 64


@pytest.fixture(scope="module")
def setup(data):
    model, env, tables = small_model(data)
    real = T.load_validation_tokens(data["data_path"], 4000, data["vocab_size"])
    return model, env, tables, documents(real[real != T.BOS_ID], LENGTHS)


LENGTHS = (130, 90, 75, 120, 50, 100, 45, 70, 110, 60, 30, 85)  # the sample's documents are longer than tests want


def documents(body: np.ndarray, lengths) -> np.ndarray:
    """A split of BOS-led documents of the given lengths (tokens from body), ending at a final BOS."""
    cuts = np.cumsum([0] + [n - 1 for n in lengths])
    return np.concatenate([np.concatenate([[T.BOS_ID], body[a:b]]) for a, b in zip(cuts, cuts[1:])]
                          + [[T.BOS_ID]]).astype(body.dtype)


def doc_eval(setup, toks, mixer=None, **over):
    """(mean NLL, bpb, per-target NLL) of a doc_lora evaluation; checks the model's weights come back."""
    model, env, tables, _ = setup
    hp = T.Hyperparameters.from_env({**env, **DOC, **{k: str(v) for k, v in over.items()}})
    before = {n: np.array(p) for n, p in tree_flatten(model.parameters())}
    doc = T.DocTTT(model, hp, L, None, toks, mixer is not None)
    try:
        out = T.evaluate_docs(doc, toks, tables, mixer)
    finally:
        doc.close()
    after = {n: np.array(p) for n, p in tree_flatten(model.parameters())}
    assert all(np.array_equal(before[n], after[n]) for n in before)
    return out


def alone(setup, toks):
    """Reference: each document scored by itself, one forward per document (documents here are <= L)."""
    model = setup[0]
    plan = T.DocPlan(toks)
    nll = np.full(toks.size - 1, np.nan, np.float32)
    for s, e in zip(plan.starts, plan.ends):
        assert e - s <= L
        x = mx.array(toks[None, s:e].astype(np.int32))
        y = mx.array(toks[None, s + 1:e + 1].astype(np.int32))
        nll[s:e] = np.array(model.token_nll(x, y))[0]
    return nll


def short_docs(toks, n_docs=8, max_len=60):
    """A split of n_docs documents of <= max_len tokens, for references that score each document in one window."""
    return documents(toks[toks != T.BOS_ID], [min(n, max_len) for n in LENGTHS[:n_docs]])


def test_plan_each_target_once_with_the_splits_bytes(setup):
    """The documents cover targets 1..N exactly once, their bytes add to the split's, the queue is longest first,
    and the queue's stream (what the mixer reads) has each target with its own previous token."""
    toks, tables = setup[3], setup[2]
    for cut in (toks, toks[5:], toks[:-7]):  # starts at BOS / mid-document; ends at a BOS or not
        plan = T.DocPlan(cut)
        n = cut.size - 1
        assert np.array_equal(np.sort(plan.where), np.arange(1, n + 1))
        per_doc = sum(int(T.target_bytes(cut[s:e], cut[s + 1:e + 1], tables).sum())
                      for s, e in zip(plan.starts, plan.ends))
        assert per_doc == int(T.target_bytes(cut[:-1], cut[1:], tables).sum())
        body = plan.lengths(plan.queue[int(cut[0] != T.BOS_ID):-1])
        assert (np.diff(body) <= 0).all() and plan.queue[-1] == plan.starts.size - 1
        assert np.array_equal(plan.stream[1:], cut[plan.where]) and plan.stream.size == cut.size


def test_lr_zero_scores_each_document_alone(setup):
    """TTT_LR=0: B stays 0, so every target's score is the model on its own document's earlier tokens only."""
    toks = short_docs(setup[3])
    _, bpb, nll = doc_eval(setup, toks, TTT_LR=0)
    np.testing.assert_allclose(nll, alone(setup, toks), rtol=1e-4, atol=1e-5)
    _, _, adapted = doc_eval(setup, toks, TTT_LR=0.05)  # and a learning rate adapts after each document's first chunk
    assert not np.allclose(adapted, nll, rtol=1e-4, atol=1e-5)
    plan = T.DocPlan(toks)
    first = np.concatenate([np.arange(s, min(e, s + 16)) for s, e in zip(plan.starts, plan.ends)])
    first_batch = np.concatenate([np.arange(plan.starts[k], plan.ends[k]) for k in plan.queue[:3]])
    both = np.intersect1d(first, first_batch)  # the first batch's first chunks: A fresh, B = 0
    np.testing.assert_allclose(adapted[both], nll[both], rtol=1e-4, atol=1e-5)


def test_every_target_scored_exactly_once(setup, monkeypatch):
    toks = setup[3]
    seen = np.zeros(toks.size - 1, np.int64)
    real = T.doc_chunk

    def counting(*a):
        out = real(*a)
        np.add.at(seen, out[3][out[2]], 1)
        return out
    monkeypatch.setattr(T, "doc_chunk", counting)
    loss, bpb, nll = doc_eval(setup, toks, TTT_PHASES=2, TTT_PREFIX_DOCS=4, TTT_PHASE_CHUNK=256)
    assert (seen == 1).all() and np.isfinite(nll).all() and nll.size == toks.size - 1


@pytest.mark.parametrize("phases", [0, 2])
def test_causal_by_document_and_queue(setup, phases):
    """Change one token inside a document D (mid-chunk, after adapting): D's earlier targets, and every document
    of every earlier batch, stay bit-identical; D's changed target does not. So a score reads only its own
    document's earlier tokens and documents scored before it, and no adapter saw a chunk before scoring it."""
    toks, V = setup[3], setup[0].cfg.vocab_size
    kw = dict(TTT_LR=0.05, TTT_PHASES=phases, TTT_PREFIX_DOCS=4, TTT_PHASE_CHUNK=128, TTT_PHASE_LR=0.05)
    nll = doc_eval(setup, toks, **kw)[2]
    plan = T.DocPlan(toks)
    for b in (1, 2):  # a document of the second batch, and of the third (after the phase when phases = 2)
        k = plan.queue[3 * b]
        s, e = plan.starts[k], plan.ends[k]
        assert e - s > 40
        p = s + 37  # token p: input of target p + 1, itself target p (index p - 1); chunk 2 (targets 33..48)
        toks2 = toks.copy()
        toks2[p] = (toks2[p] + 5) % V or 2
        assert toks2[p] != T.BOS_ID and toks[p] != T.BOS_ID
        nll2 = doc_eval(setup, toks2, **kw)[2]
        earlier = np.concatenate([np.arange(plan.starts[j], plan.ends[j]) for j in plan.queue[:3 * b]])
        assert np.array_equal(nll[earlier], nll2[earlier])
        assert np.array_equal(nll[s:p - 1], nll2[s:p - 1]) and nll[p - 1] != nll2[p - 1]


def test_time_budget_stops_adapting_not_scoring(setup):
    toks = short_docs(setup[3])
    spent = doc_eval(setup, toks, TTT_LR=0.05, TTT_TIME_BUDGET=1e-9)[2]
    np.testing.assert_allclose(spent, alone(setup, toks), rtol=1e-4, atol=1e-5)


def test_phases_adapt_the_model_and_restore_it(setup):
    toks = setup[3]
    off = doc_eval(setup, toks, TTT_LR=0)[2]
    on = doc_eval(setup, toks, TTT_LR=0, TTT_PHASES=1, TTT_PREFIX_DOCS=3, TTT_PHASE_CHUNK=128, TTT_PHASE_LR=0.05)[2]
    plan = T.DocPlan(toks)
    first = np.concatenate([np.arange(plan.starts[j], plan.ends[j]) for j in plan.queue[:3]])
    later = np.setdiff1d(np.arange(toks.size - 1), first)
    assert np.array_equal(on[first], off[first]) and not np.allclose(on[later], off[later])


def test_doc_isolated_attention_sees_only_its_document(setup):
    """ATTN_DOC_ISOLATED=1: a packed row of documents gives each document the scores it gets alone."""
    model, env, _, toks = setup
    toks = short_docs(toks, n_docs=3, max_len=40)
    ref = alone(setup, toks)
    x = mx.array(toks[None, :-1].astype(np.int32))
    y = mx.array(toks[None, 1:].astype(np.int32))
    iso = T.GPT(T.ModelConfig.from_hparams(T.Hyperparameters.from_env(dict(env, ATTN_DOC_ISOLATED="1"))))
    iso.update(model.parameters())
    np.testing.assert_allclose(np.array(iso.token_nll(x, y))[0], ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.array(model.token_nll(x, y))[0], ref, rtol=1e-4, atol=1e-5)  # off: it reads across


def test_settings_are_checked():
    with pytest.raises(T.ConfigError, match="TTT_PHASES"):
        T.Hyperparameters.from_env(dict(TTT_PHASES="2"))
    with pytest.raises(T.ConfigError, match="TTT_DOC_CHUNK"):
        T.Hyperparameters.from_env(dict(TTT_MODE="doc_lora", TTT_DOC_CHUNK="0"))


def doc_split(data, ds, n_docs=32):
    """A dataset folder: the sample's train shards, and a validation split of n_docs short documents."""
    ds.mkdir(parents=True)
    for src in Path(data["data_path"]).glob("fineweb_train_*.bin"):
        (ds / src.name).symlink_to(src)
    sp = T.load_tokenizer(data["tokenizer"])  # whole texts, encoded: the script checks the shards' tokenizer
    texts = [" ".join(t.split()[:4 + (13 * i) % 45]) for i, t in enumerate(generated_docs(n_docs))]
    val = np.concatenate([[T.BOS_ID] + sp.encode(t) for t in texts] + [[T.BOS_ID]]).astype(np.uint16)
    header = np.zeros(256, "<i4")
    header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, val.size)
    (ds / "fineweb_val_000000.bin").write_bytes(header.tobytes() + val.astype("<u2").tobytes())
    return val


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this python")
def test_two_ranks_split_the_batches_and_total_like_one_process(data, tmp_path):
    """EVAL_ONLY with doc_lora on 2 ranks (mlx.launch): the ranks score alternate batches, every rank ends with
    every score, and the total is one process's: bit-identical with fresh A per batch (each batch's arithmetic is
    the same on any rank), within float tolerance with phases (their gradients are all-reduced)."""
    ds = tmp_path / "ds"
    val = doc_split(data, ds)
    assert T.main(tiny_env(data, tmp_path, DATA_PATH=ds, ITERATIONS=3, VAL_MAX_TOKENS=0)) == 0
    art = tmp_path / "tiny_model.int6.ptz"
    base = dict(EVAL_ONLY=1, LOAD_ARTIFACT=art, DATA_PATH=ds, VAL_MAX_TOKENS=0, TTT_ENABLED=1, TTT_MODE="doc_lora",
                TTT_RANK=4, TTT_LR=0.01, TTT_DOC_CHUNK=16, TTT_DOC_BATCH=4, TTT_WARM_A=0, NGRAM_MIXER_ENABLED=1)
    runs = {}
    for name, ranks, extra in (("1", 1, {}), ("2", 2, {}), ("1p", 1, dict(TTT_PHASES=2, TTT_PREFIX_DOCS=16)),
                               ("2p", 2, dict(TTT_PHASES=2, TTT_PREFIX_DOCS=16))):
        out = tmp_path / f"e{name}"
        out.mkdir()
        env = tiny_env(data, out, **base, **extra, TTT_PHASE_CHUNK=128, TTT_BATCH_SEQS=2,
                       EVAL_TOKEN_NLL_PATH=out / "nll.f32")
        _launch(out, env, ranks)
        log = (out / "tiny.txt").read_text()
        assert f"world_size:{ranks} " in log and "ttt_doc_lora: 32 documents, 8 batches of 4" in log
        runs[name] = np.fromfile(out / "nll.f32", "<f4"), _exact(log, "eval_only_exact")
        if extra:
            assert log.count("ttt_phase ") == 2
    assert runs["1"][0].size == val.size - 1 and np.isfinite(runs["1"][0]).all()
    assert np.array_equal(runs["1"][0], runs["2"][0]) and runs["1"][1] == runs["2"][1]
    assert not np.allclose(runs["1p"][0], runs["1"][0])
    np.testing.assert_allclose(runs["2p"][0], runs["1p"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs["2p"][1], runs["1p"][1], rtol=1e-5)


def test_doc_isolated_run_stores_it_in_the_artifact(data, tmp_path):
    """A run with ATTN_DOC_ISOLATED=1 trains and evaluates with the mask, and its artifact's header says so (an
    EVAL_ONLY of it takes the model's shape from there)."""
    assert T.main(tiny_env(data, tmp_path, ITERATIONS=2, ATTN_DOC_ISOLATED=1, VAL_MAX_TOKENS=1000)) == 0
    cfg, _, _ = T.read_artifact(str(tmp_path / "tiny_model.int6.ptz"))
    assert cfg.attn_doc_isolated and "ATTN_DOC_ISOLATED=True" in (tmp_path / "tiny.txt").read_text()


def test_progress_is_logged_every_30_seconds(setup, monkeypatch):
    """A clock that moves 31 s per reading: every round logs documents, phase and ETA."""
    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 31.0
            return cls.now
    monkeypatch.setattr(T, "time", Clock)
    model, env, tables, toks = setup
    hp = T.Hyperparameters.from_env({**env, **DOC, "TTT_PHASES": "1", "TTT_PREFIX_DOCS": "3",
                                     "TTT_PHASE_CHUNK": "128"})
    lines = []
    doc = T.DocTTT(model, hp, L, None, toks, False)
    try:
        T.evaluate_docs(doc, toks, tables, log=lines.append)
    finally:
        doc.close()
    progress = [x for x in lines if x.startswith("eval_progress:")]
    assert len(progress) == 4 and progress[0].startswith("eval_progress: documents 3/12 phase 1/1 eta:")
    assert progress[-1].startswith("eval_progress: documents 12/12 phase 1/1 eta:0s")
    assert sum(x.startswith("ttt_phase 1: global SGD on 3 documents") for x in lines) == 1


def test_memory_estimate_counts_the_document_batch_and_the_phases():
    base = dict(SMALL, VOCAB_SIZE="1024", **DOC)
    need = {}
    for name, over in (("b3", {}), ("b6", dict(TTT_DOC_BATCH="6")), ("ph", dict(TTT_PHASES="2"))):
        hp = T.Hyperparameters.from_env({**base, **over})
        need[name] = T.memory_needs(hp, T.ModelConfig.from_hparams(hp), 1024, 5000)["eval"][
            "TTT_DOC_BATCH/TTT_RANK/TTT_PHASES (per-document TTT)"]
    assert need["b6"] == 2 * need["b3"] and need["ph"] > need["b3"]
