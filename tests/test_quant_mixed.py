"""Mixed-precision artifact (issue 8 part B): bits per tensor group, GPTQ-lite, zstd/lzma/auto codec."""
import json
import re
import struct
from dataclasses import asdict

import mlx.core as mx
import numpy as np
import pytest
import zstandard
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt_mlx as T
from conftest import tiny_env

FULL = dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=97, ENGRAM_DIM=16, SKIPGRAM_HASH_SIZE=89, SKIPGRAM_DIM=8)
MIXED = dict(QUANT_BITS_ATTN=6, QUANT_BITS_MLP=5, QUANT_BITS_EMBED=16, QUANT_BITS=8)


def hp_of(**over):
    env = dict(VOCAB_SIZE="128", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2")
    env.update({k: str(v) for k, v in over.items()})
    return T.Hyperparameters.from_env(env)


def random_flat(hp, seed=0):
    """Every parameter of the model, filled with heavy-tailed random values (no zero-initialised matrices)."""
    rng = np.random.default_rng(seed)
    flat = T.flat_numpy(T.GPT(T.ModelConfig.from_hparams(hp)))
    return {n: (rng.standard_t(4, w.shape) * 0.05).astype(np.float32) for n, w in flat.items()}


def old_format_bytes(flat, cfg, meta):
    """The artifact as written before this change, spelled out independently: uniform per-row int6 at the
    max-abs clip, JSON header, zstd-22 with checksum behind b'PGMLXv1\\0'."""
    arrays = []
    for name in sorted(flat):
        w = flat[name]
        if w.ndim == 2 and not any(p in name for p in T.CONTROL_PATTERNS):
            s = np.maximum(np.abs(w).max(axis=1) / 31, 2.0 ** -24).astype(np.float16)
            q = np.clip(np.round(w / s.astype(np.float32)[:, None]), -31, 31).astype(np.int8)
            arrays += [(name, "q", q), (name, "scale", s)]
        else:
            arrays.append((name, "raw", w))
    table, off = [], 0
    for name, role, a in arrays:
        table.append(dict(name=name, role=role, dtype=a.dtype.name, shape=list(a.shape), offset=off, nbytes=a.nbytes))
        off += a.nbytes
    config = {k: v for k, v in asdict(cfg).items() if k not in T.RECORD_BASE_FIELDS}  # the pre-record-base header
    header = dict(format="parameter-golf-mlx", version=1, quant_bits=6, config=config, meta=meta,
                  tensors=table, blob_bytes=off)
    hj = json.dumps(header).encode()
    payload = struct.pack("<I", len(hj)) + hj + b"".join(a.tobytes() for _, _, a in arrays)
    return b"PGMLXv1\0" + zstandard.ZstdCompressor(level=22, write_checksum=True).compress(payload)


def write(tmp_path, flat, cfg, hp, name="a.ptz"):
    """What the driver calls, with the plan and knobs of `hp`."""
    path = str(tmp_path / name)
    T.write_artifact(path, flat, cfg, T.quant_plan(hp), dict(step=1), hp.gptq_lite, hp.compressor)
    return path


def test_default_knobs_write_todays_bytes(tmp_path):
    hp = hp_of(**FULL, TIE_EMBEDDINGS=0)
    cfg = T.ModelConfig.from_hparams(hp)
    flat = random_flat(hp)
    assert T.quant_plan(hp) == 6 and not hp.gptq_lite and hp.compressor == "zstd"
    got = open(write(tmp_path, flat, cfg, hp), "rb").read()
    assert got == old_format_bytes(flat, cfg, dict(step=1))
    # the same groups spelled explicitly at QUANT_BITS are still the uniform format
    assert T.quant_plan(hp_of(QUANT_BITS_ATTN=6, QUANT_BITS_MLP=6, QUANT_BITS_EMBED=6)) == 6


def test_every_quantized_tensor_has_the_documented_group():
    hp = hp_of(**FULL, **MIXED, TIE_EMBEDDINGS=0)
    plan = T.quant_plan(hp)
    assert plan == dict(attn=6, mlp=5, embed=16, other=8)
    got = {n: T.tensor_bits(n, plan) for n, w in random_flat(hp).items() if T.is_quantized(n, w.shape)}
    want = {"tok_emb.weight": 16, "lm_head.weight": 16, "engram.tables.0": 16, "engram.tables.1": 16,
            "skipgram.tables.0": 16, "skipgram.tables.1": 16, "skipgram.tables.2": 16,
            "engram.proj.weight": 8, "skipgram.proj.weight": 8}
    for i in range(2):
        want.update({f"blocks.{i}.attn.{m}.weight": 6 for m in ("c_q", "c_k", "c_v", "proj")})
        want.update({f"blocks.{i}.mlp.{m}.weight": 5 for m in ("fc", "proj")})
    assert got == want


def test_mixed_artifact_holds_each_group_at_its_bits(tmp_path):
    hp = hp_of(**FULL, **MIXED)
    cfg = T.ModelConfig.from_hparams(hp)
    flat = random_flat(hp)
    _, back, header = T.read_artifact(write(tmp_path, flat, cfg, hp))
    assert header["quant_bits"] == dict(attn=6, mlp=5, embed=16, other=8) and "gptq_lite" not in header
    for n, w in flat.items():
        b = T.tensor_bits(n, T.quant_plan(hp)) if T.is_quantized(n, w.shape) else 32
        want = {32: w, 16: w.astype(np.float16).astype(np.float32)}.get(b)
        if want is None:
            q, s = T.quantize_rows(w, b)
            assert np.abs(q).max() == 2 ** (b - 1) - 1
            want = T.dequantize_rows(q, s)
        np.testing.assert_array_equal(back[n], want, err_msg=n)
    uniform = T.write_artifact(str(tmp_path / "u.ptz"), flat, cfg, 6)
    assert T.write_artifact(str(tmp_path / "m5.ptz"), flat, cfg, T.quant_plan(hp_of(QUANT_BITS_MLP=5))) < uniform


def test_fp16_group_refuses_weights_beyond_float16():
    flat = {"tok_emb.weight": np.full((4, 8), 1e5, np.float32)}
    with pytest.raises(T.ArtifactError, match="float16 range"):
        T.pack_state(flat, dict(attn=6, mlp=6, embed=16, other=6))


def test_fake_quant_matches_the_artifact_at_5_and_16_bits():
    w = mx.random.normal((48, 80)) * mx.linspace(1e-4, 2.0, 48)[:, None]
    for bits in (5, 16):
        packed = {role: a for _, role, a in T.pack_state({"m": np.array(w)}, bits)}
        deq = packed["raw"].astype(np.float32) if bits == 16 else T.dequantize_rows(packed["q"], packed["scale"])
        assert np.array_equal(np.array(T.fake_quant(w, bits)), deq)
        g = mx.grad(lambda a: mx.sum(T.fake_quant(a, bits) * 3.0))(w)
        assert np.all(np.array(g) == 3.0)


def test_qat_graph_sees_exactly_the_mixed_artifact_weights(tmp_path):
    """QAT uses the artifact's per-tensor bits with the max-abs clip, so with GPTQ_LITE=0 the QAT loss at W
    equals the plain loss of the model loaded back from W's artifact."""
    hp = hp_of(**FULL, **MIXED)
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    model.update(tree_unflatten([(n, mx.random.normal(p.shape) * 0.1) for n, p in tree_flatten(model.parameters())
                                 if n.endswith("proj.weight")]))
    x, y = (mx.array(np.random.default_rng(i).integers(0, 128, (2, 32)), mx.int32) for i in (4, 5))
    opt = T.Optimizers(model, hp)
    plain, qat = T.Compiled(model, opt), T.Compiled(model, opt, qat_bits=T.quant_plan(hp))
    l_plain, l_qat = float(plain.grads(x, y)[0]), float(qat.grads(x, y)[0])
    uniform6 = float(T.Compiled(model, opt, qat_bits=6).grads(x, y)[0])
    assert l_plain != l_qat and l_qat != uniform6
    _, flat, _ = T.read_artifact(write(tmp_path, T.flat_numpy(model), model.cfg, hp))
    T.load_flat_into(model, flat)
    assert float(plain.grads(x, y)[0]) == pytest.approx(l_qat, rel=1e-6)


def test_gptq_lite_clips_outliers_and_never_loses_to_max_abs():
    rng = np.random.default_rng(0)
    heavy = (rng.standard_t(2, (64, 512)) * 0.02).astype(np.float32)  # outliers: a tighter clip wins
    q, s, pct = T.gptq_lite_rows(heavy, 6)
    mse = lambda q, s: float(np.square(T.dequantize_rows(q, s) - heavy).mean())  # noqa: E731
    assert pct < 1.0 and np.abs(q).max() == 31
    assert mse(q, s) < mse(*T.quantize_rows(heavy, 6))
    on_grid = T.dequantize_rows(*T.quantize_rows(heavy, 6))  # max-abs reproduces it exactly: keep 1.0
    q2, s2, pct2 = T.gptq_lite_rows(on_grid, 6)
    assert pct2 == 1.0 and np.array_equal(T.dequantize_rows(q2, s2), on_grid)


def test_gptq_lite_artifact_roundtrip(tmp_path):
    hp = hp_of(**FULL, GPTQ_LITE=1, QUANT_BITS_MLP=5)
    cfg = T.ModelConfig.from_hparams(hp)
    flat = random_flat(hp)
    _, back, header = T.read_artifact(write(tmp_path, flat, cfg, hp))
    assert header["gptq_lite"] == list(T.GPTQ_LITE_PCTS)
    for n, w in flat.items():
        if T.is_quantized(n, w.shape):
            q, s, _ = T.gptq_lite_rows(w, T.tensor_bits(n, T.quant_plan(hp)))
            np.testing.assert_array_equal(back[n], T.dequantize_rows(q, s))


@pytest.mark.parametrize("codec", ["zstd", "lzma", "brotli", "auto"])
def test_codecs_roundtrip_and_say_which_they_used(tmp_path, codec):
    hp = hp_of(COMPRESSOR=codec)
    cfg = T.ModelConfig.from_hparams(hp)
    flat = random_flat(hp)
    path = write(tmp_path, flat, cfg, hp)
    raw = open(path, "rb").read()
    sizes = {c: T.write_artifact(str(tmp_path / c), flat, cfg, 6, dict(step=1), codec=c)
             for c in ("zstd", "lzma", "brotli")}
    chosen = min(sizes, key=sizes.get) if codec == "auto" else codec
    magic = {"zstd": T.ARTIFACT_MAGIC, "lzma": b"PGMLXv1L", "brotli": b"PGMLXv1B"}[chosen]
    assert raw[:8] == magic and len(raw) == sizes[chosen]
    _, back, header = T.read_artifact(path)
    _, ref, _ = T.read_artifact(str(tmp_path / "zstd"))
    assert header["codec"] == chosen and all(np.array_equal(back[n], ref[n]) for n in ref)


@pytest.mark.parametrize("codec", ["zstd", "lzma", "brotli"])
def test_both_codecs_reject_damaged_files(tmp_path, codec):
    hp = hp_of()
    cfg = T.ModelConfig.from_hparams(hp)
    T.write_artifact(str(tmp_path / "g"), random_flat(hp), cfg, 6, codec=codec)
    raw = (tmp_path / "g").read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    cases = {"trunc": (raw[:-7], "truncated or corrupted"), "flip": (bytes(flipped), "corrupted"),
             "trailing": (raw + b"\0junk", "corrupted" if codec == "brotli" else "unexpected bytes"),
             "magic": (b"PGMLXv1Z" + raw[8:], "bad magic")}
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(T.ArtifactError, match=needle):
            T.read_artifact(str(tmp_path / name))
    header = dict(format="parameter-golf-mlx", version=1, quant_bits=6, config={}, meta={})
    T.write_container(str(tmp_path / "nan"), T.ARTIFACT_MAGIC, header,
                      [("x", "raw", np.array([1.0, np.nan], np.float32))], 22, codec)
    with pytest.raises(T.ArtifactError, match="non-finite"):
        T.read_artifact(str(tmp_path / "nan"))


def test_bad_values_name_the_variable():
    for var, bad in (("QUANT_BITS_MLP", "9"), ("QUANT_BITS_EMBED", "4"), ("COMPRESSOR", "xz"),
                     ("GPTQ_LITE", "maybe"), ("QUANT_METHOD", "awq"), ("QUANT_CLIP", "pct"), ("SDCLIP_K_MLP", "0"),
                     ("LQER_TOP_K", "-1")):
        with pytest.raises(T.ConfigError, match=var):
            hp_of(**{var: bad})


def test_tiny_run_with_mixed_bits_gptq_lite_auto_codec_and_qat(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=8, QAT_START_FRAC=0.5, QUANT_BITS_MLP=5, QUANT_BITS_EMBED=8,
                   GPTQ_LITE=1, COMPRESSOR="auto")
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    assert "qat:on step:4 (bits {'attn': 6, 'mlp': 5, 'embed': 8, 'other': 6}" in log
    codec = re.search(r"^artifact: .* codec:(zstd|lzma|brotli)$", log, re.M)[1]
    pre = float(re.search(r"^step:8/8 val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    post = float(re.search(rf"^final_int6_{codec}_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    assert abs(post - pre) < 0.05
    _, _, header = T.read_artifact(str(tmp_path / "tiny_model.int6.ptz"))
    assert header["codec"] == codec and header["quant_bits"]["mlp"] == 5 and "gptq_lite" in header
