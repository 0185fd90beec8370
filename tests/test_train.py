"""Foundation tests: config, data, BPB bytes, model/optimizer wiring, artifact, end-to-end runs."""
import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train_gpt_mlx as T
from conftest import SAMPLE, ctrl_c_after, load_script, tiny_env


def tiny_hp(**over):
    env = dict(VOCAB_SIZE="128", NUM_LAYERS="3", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2")
    env.update({k: str(v) for k, v in over.items()})
    return T.Hyperparameters.from_env(env)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("var,val,needle", [
    ("ITERATIONS", "abc", "expected an integer"),
    ("ITERATIONS", "-5", "allowed range"),
    ("MATRIX_LR", "nan", "finite"),
    ("COMPUTE_DTYPE", "fp8", "allowed values"),
    ("QUANT_BITS", "4", "allowed values"),
    ("TIE_EMBEDDINGS", "maybe", "0/1"),
    ("NUM_HEADS", "3", "must divide MODEL_DIM"),
    ("NUM_KV_HEADS", "3", "must divide NUM_HEADS"),
    ("TRAIN_BATCH_TOKENS", "1000", "multiple of TRAIN_SEQ_LEN"),
    ("EVAL_ONLY", "1", "LOAD_ARTIFACT"),
])
def test_bad_env_values_are_rejected_with_the_variable_named(var, val, needle):
    with pytest.raises(T.ConfigError) as e:
        T.Hyperparameters.from_env({var: val})
    assert var in str(e.value) and needle in str(e.value)


def test_defaults_match_the_public_baseline():
    """The public MLX baseline's values, read from its Hyperparameters class."""
    hp = T.Hyperparameters.from_env({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (9, 512, 8, 4, 2)
    assert (hp.train_batch_tokens, hp.train_seq_len, hp.logit_softcap, hp.iterations) == (524288, 1024, 30.0, 20000)
    assert (hp.grad_accum_steps, hp.mlx_max_microbatch_tokens, hp.warmup_steps, hp.warmdown_iters) == (8, 8192, 20, 1200)
    assert (hp.matrix_lr, hp.scalar_lr, hp.tied_embed_lr, hp.qk_gain_init, hp.rope_base) == (0.04, 0.04, 0.05, 1.5, 1e4)
    assert (hp.muon_momentum, hp.muon_momentum_warmup_start, hp.muon_momentum_warmup_steps) == (0.95, 0.85, 500)
    assert (hp.beta1, hp.beta2, hp.adam_eps, hp.max_wallclock_seconds) == (0.9, 0.95, 1e-8, 600.0)


def test_where_defaults_differ_from_the_baseline_on_purpose():
    hp = T.Hyperparameters.from_env({})
    assert hp.quant_bits == 6  # the baseline writes int8 + zlib; int6 + zstd is the records' format
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    assert hp.dtype() == (mx.bfloat16 if on_gpu else mx.float32)  # bf16 matmul is ~30x slower on CPU


def test_main_reports_config_error_before_any_work(capsys, tmp_path):
    assert T.main({"MODEL_DIM": "oops", "OUT_DIR": str(tmp_path)}) == 2
    assert "MODEL_DIM" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_data_says_how_to_get_it(data, tmp_path):
    env = tiny_env(data, tmp_path, DATA_PATH=str(tmp_path / "nowhere"))
    assert T.main(env) == 1
    assert "cached_challenge_fineweb.py" in (tmp_path / "tiny.txt").read_text()


# ---------------------------------------------------------------------------- data
def test_shard_roundtrip_and_truncation(tmp_path):
    bs = load_script("data/build_shards.py")
    toks = np.random.default_rng(0).integers(0, 1024, 5000).astype(np.uint16)
    bs.write_shard(tmp_path / "a.bin", toks)
    assert np.array_equal(T.load_data_shard(tmp_path / "a.bin"), toks)
    raw = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "b.bin").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        T.load_data_shard(tmp_path / "b.bin")
    (tmp_path / "c.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(ValueError, match="not a challenge shard"):
        T.load_data_shard(tmp_path / "c.bin")


def test_token_stream_is_sequential_and_wraps(tmp_path):
    bs = load_script("data/build_shards.py")
    bs.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 10, dtype=np.uint16))
    bs.write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10, 15, dtype=np.uint16))
    s = T.TokenStream(T.shard_files(str(tmp_path), "train"), 1024)
    assert s.take(12).tolist() == list(range(12))
    assert s.take(6).tolist() == [12, 13, 14, 0, 1, 2]
    x, y = s.next_batch(4, 2)
    assert x.tolist() == [[3, 4], [5, 6]] and y.tolist() == [[4, 5], [6, 7]]


@pytest.mark.skipif(not (SAMPLE / "docs_200.jsonl").exists(), reason="needs ../shared/fineweb_sample")
def test_byte_table_matches_normalized_text_on_the_sample():
    sp = T.load_tokenizer(str(SAMPLE / "fineweb_1024_bpe.model"))
    tables = T.build_byte_tables(sp, 1024)
    docs = [json.loads(line)["text"] for line in open(SAMPLE / "docs_200.jsonl")]
    checked = 0
    for text in docs:
        ids = sp.encode(text)
        if sp.unk_id() in ids:
            continue
        t = np.array([sp.bos_id()] + ids)
        assert T.target_bytes(t[:-1], t[1:], tables).sum() == len(sp.normalize(text).replace("\u2581", " ").encode())
        checked += 1
    assert checked >= 20
    stream = np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs[:50]])
    assert stream.size - 1 == 138_273
    assert T.target_bytes(stream[:-1], stream[1:], tables).sum() == 348_216


def test_bpb_formula_and_tail_tokens_are_scored(data):
    """evaluate() scores every target once (the short tail too) and bpb = nats/ln2/bytes."""
    sp = T.load_tokenizer(data["tokenizer"])
    tables = T.build_byte_tables(sp, data["vocab_size"])
    toks = T.load_validation_tokens(data["data_path"], 1000, data["vocab_size"])
    const = lambda x, y: mx.full(x.shape, 2.0)  # noqa: E731  (a model with NLL 2 nats everywhere)
    loss, bpb, nll = T.evaluate(const, toks, 64, 4, tables)
    assert nll.size == 999 and loss == pytest.approx(2.0)
    nbytes = T.target_bytes(toks[:-1], toks[1:], tables).sum()
    assert bpb == pytest.approx(999 * 2.0 / np.log(2) / nbytes)


# ---------------------------------------------------------------------------- model / optimizer
@pytest.mark.parametrize("tie", [1, 0])
def test_every_parameter_in_exactly_one_optimizer_group(tie):
    hp = tiny_hp(TIE_EMBEDDINGS=tie)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    params = dict(tree_flatten(model.trainable_parameters()))
    assert set(opt.group) == set(params)
    owned = [set(sub) for sub in opt.split(params).values()]
    assert sum(len(o) for o in owned) == len(params) and set().union(*owned) == set(params)
    assert all(isinstance(opt.opts[g], T.Muon if g == "muon" else T.optim.Adam) for g in opt.opts)
    muon = {n for n, g in opt.group.items() if g == "muon"}
    assert len(muon) == 6 * hp.num_layers  # c_q, c_k, c_v, attn.proj, fc, mlp.proj per block
    assert opt.group["tok_emb.weight"] == "embed"
    assert all(opt.group[n] == "scalar" for n in params if "resid_mix" in n or "skip_weights" in n or "q_gain" in n)
    assert ("lm_head.weight" in params) == (not tie)


def test_model_is_causal():
    hp = tiny_hp()
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    for n, p in tree_flatten(model.parameters()):  # zero-init projections would hide attention
        if n.endswith("proj.weight"):
            model.update(T.tree_unflatten([(n, mx.random.normal(p.shape) * 0.1)]))
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (2, 32)), mx.int32)
    ids2 = mx.concatenate([ids[:, :20], (ids[:, 20:] + 1) % 128], axis=1)
    a, b = np.array(model(ids)), np.array(model(ids2))
    assert np.array_equal(a[:, :20], b[:, :20]) and not np.allclose(a[:, 20:], b[:, 20:])


def test_compiled_step_equals_uncompiled_step():
    hp = tiny_hp(GRAD_CLIP_NORM=1.0, MUON_WEIGHT_DECAY=0.01)
    rng = np.random.default_rng(1)
    x, y = (rng.integers(0, 128, (4, 32)).astype(np.int32) for _ in range(2))
    losses = []
    for compiled in (True, False):
        mx.random.seed(0)
        model = T.GPT(T.ModelConfig.from_hparams(hp))
        fns = T.Compiled(model, T.Optimizers(model, hp), compile_fns=compiled)
        losses.append([float(T.train_step(fns, x, y, micro, 1.0, 0.9)) for micro in (4, 2, 1)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert losses[0][2] < losses[0][0]


def test_microbatching_gives_the_same_update():
    hp = tiny_hp()
    rng = np.random.default_rng(2)
    x, y = (rng.integers(0, 128, (4, 32)).astype(np.int32) for _ in range(2))
    out = []
    for micro in (4, 1):
        mx.random.seed(0)
        model = T.GPT(T.ModelConfig.from_hparams(hp))
        fns = T.Compiled(model, T.Optimizers(model, hp))
        T.train_step(fns, x, y, micro, 1.0, 0.9)
        out.append(np.array(model.blocks[0].attn.c_q.weight))
    np.testing.assert_allclose(out[0], out[1], atol=2e-5)


def test_lr_warmdown_by_steps_and_by_wallclock():
    hp = tiny_hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert T.lr_multiplier(50, 0, hp) == 1.0
    assert T.lr_multiplier(90, 0, hp) == pytest.approx(0.5)
    hp = tiny_hp(ITERATIONS=10**6, WARMDOWN_ITERS=10, MAX_WALLCLOCK_SECONDS=100)
    # 100 ms/step: warmdown spans the last 1 s of the 100 s budget
    assert T.lr_multiplier(500, 50_000, hp) == 1.0
    assert T.lr_multiplier(995, 99_500, hp) == pytest.approx(0.5)
    assert T.lr_multiplier(1000, 100_000, hp) == 0.0


# ---------------------------------------------------------------------------- artifact
def test_quantize_rows_error_is_at_most_half_a_step():
    w = np.random.default_rng(0).normal(size=(64, 96)).astype(np.float32)
    for bits in (6, 8):
        q, s = T.quantize_rows(w, bits)
        assert np.abs(q).max() <= 2 ** (bits - 1) - 1
        err = np.abs(T.dequantize_rows(q, s) - w)
        assert np.all(err <= s.astype(np.float32)[:, None] / 2 + 1e-6)


def test_artifact_roundtrip(tmp_path):
    hp = tiny_hp(TIE_EMBEDDINGS=0)
    cfg = T.ModelConfig.from_hparams(hp)
    model = T.GPT(cfg)
    flat = T.flat_numpy(model)
    path = str(tmp_path / "m.ptz")
    n = T.write_artifact(path, flat, cfg, 6)
    assert n == (tmp_path / "m.ptz").stat().st_size
    cfg2, flat2, header = T.read_artifact(path)
    assert cfg2 == cfg and set(flat2) == set(flat)
    for name, w in flat.items():
        if T.is_quantized(name, w.shape):
            np.testing.assert_array_equal(flat2[name], T.dequantize_rows(*T.quantize_rows(w, 6)))
        else:
            np.testing.assert_array_equal(flat2[name], w)
    model2 = T.GPT(cfg2)
    T.load_flat_into(model2, flat2)


def test_artifact_is_json_plus_raw_arrays_and_never_unpickled(tmp_path):
    """The payload is exactly u32 length + JSON header + the raw arrays it lists; the script imports
    no pickle, and a pickle stream where the JSON should be is rejected, never executed."""
    import ast
    import pickle
    import struct
    import zstandard
    src = open(T.__file__).read()
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(src)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in getattr(node, "names", [])} | {node.module for node in ast.walk(ast.parse(src))
                                                        if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib"}
    cfg = T.ModelConfig.from_hparams(tiny_hp())
    path = tmp_path / "m.ptz"
    T.write_artifact(str(path), T.flat_numpy(T.GPT(cfg)), cfg, 6)
    payload = zstandard.ZstdDecompressor().decompress(path.read_bytes()[8:])
    (hlen,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + hlen])
    assert len(payload) == 4 + hlen + header["blob_bytes"] == 4 + hlen + sum(t["nbytes"] for t in header["tensors"])
    evil = pickle.dumps({"format": "parameter-golf-mlx"})
    bad = T.ARTIFACT_MAGIC + zstandard.ZstdCompressor().compress(struct.pack("<I", len(evil)) + evil)
    (tmp_path / "evil.ptz").write_bytes(bad)
    with pytest.raises(T.ArtifactError, match="malformed"):
        T.read_artifact(str(tmp_path / "evil.ptz"))


def test_corrupted_artifacts_are_rejected_clearly(tmp_path):
    hp = tiny_hp()
    cfg = T.ModelConfig.from_hparams(hp)
    good = tmp_path / "good.ptz"
    T.write_artifact(str(good), T.flat_numpy(T.GPT(cfg)), cfg, 6)
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    cases = {"trunc": (raw[: len(raw) // 2], "truncated or corrupted"), "flip": (bytes(flipped), "corrupted"),
             "foreign": (b"PK\x03\x04" + raw[4:], "bad magic"), "empty": (b"", "bad magic")}
    for name, (content, needle) in cases.items():
        p = tmp_path / f"{name}.ptz"
        p.write_bytes(content)
        with pytest.raises(T.ArtifactError, match=needle):
            T.read_artifact(str(p))
    other = T.GPT(T.ModelConfig.from_hparams(tiny_hp(NUM_LAYERS=2)))
    _, flat, _ = T.read_artifact(str(good))
    with pytest.raises(T.ArtifactError, match="do not match"):
        T.load_flat_into(other, flat)


# ---------------------------------------------------------------------------- end to end
def _lines(path, prefix):
    return [line for line in open(path).read().splitlines() if line.startswith(prefix)]


def _train_losses(log):
    return [float(m.group(1)) for m in re.finditer(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]


def test_tiny_run_trains_and_writes_log_artifact_and_roundtrip(data, tmp_path):
    env = tiny_env(data, tmp_path)
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    losses = _train_losses(log)
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < losses[0] - 0.3
    assert re.search(r"^step:20/20 train_loss:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms tok_s:\d+", log, re.M)
    assert re.search(r"^step:20/20 val_loss:[\d.]+ val_bpb:[\d.]+", log, re.M)
    art = tmp_path / "tiny_model.int6.ptz"
    assert art.exists()
    sizes = re.search(r"code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)", log)
    assert int(sizes[2]) == art.stat().st_size and int(sizes[3]) == int(sizes[1]) + int(sizes[2])
    rt = re.search(r"^final_int6_zstd_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    assert rt and float(rt[2]) < 4.0
    # the artifact alone reproduces that score
    # shape and eval length come from the artifact, whatever the environment says
    env2 = tiny_env(data, tmp_path, EVAL_ONLY=1, LOAD_ARTIFACT=str(art), RUN_ID="evalonly", NUM_LAYERS=5,
                    TRAIN_SEQ_LEN=128)
    assert T.main(env2) == 0
    ev = re.search(r"^eval_only_exact val_loss:([\d.]+) val_bpb:([\d.]+)", (tmp_path / "evalonly.txt").read_text(), re.M)
    assert float(ev[2]) == pytest.approx(float(rt[2]), abs=1e-6)


def test_same_seed_same_losses_other_seed_differs(data, tmp_path):
    runs = {}
    for rid, seed in (("a", 7), ("b", 7), ("c", 8)):
        env = tiny_env(data, tmp_path, RUN_ID=rid, SEED=seed, ITERATIONS=3, VAL_MAX_TOKENS=512, WARMUP_STEPS=0)
        assert T.main(env) == 0
        runs[rid] = _train_losses((tmp_path / f"{rid}.txt").read_text())
    np.testing.assert_allclose(runs["a"], runs["b"], rtol=1e-6)
    assert runs["a"] != runs["c"]


def test_ctrl_c_during_training_still_writes_a_scored_artifact(data, tmp_path, monkeypatch):
    ctrl_c_after(monkeypatch, T, 1 + 3)  # the warmup step, then 3 training steps: the 4th completes
    assert T.main(tiny_env(data, tmp_path, VAL_MAX_TOKENS=512)) == 130  # interrupted is not a success
    log = (tmp_path / "tiny.txt").read_text()
    assert "interrupted (Ctrl-C) at step 4" in log and "checkpoint: step:4 " in log and re.search(r"^step:4/20 val_loss:", log, re.M)
    assert (tmp_path / "tiny_model.int6.ptz").exists() and "final_int6_zstd_roundtrip_exact" in log
