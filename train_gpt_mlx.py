#!/usr/bin/env python3
"""Parameter Golf in MLX: train a small GPT on the challenge's FineWeb shards,
score it in exact bits-per-byte, and write a <=16,000,000-byte submission artifact.

Everything is driven by environment variables (see Hyperparameters). Sections, in
reading order: hyperparameters -> data -> model pieces -> model -> optimizers ->
quantization/artifact -> evaluation -> compiled functions -> main.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

ARTIFACT_CAP_BYTES = 16_000_000


# =============================================================================
# Hyperparameters
# =============================================================================
class ConfigError(ValueError):
    """A bad environment value; the message names the variable and what is allowed."""


def _env(name, default, kind=int, lo=None, hi=None, choices=None):
    return field(default=default, metadata=dict(env=name, kind=kind, lo=lo, hi=hi, choices=choices))


@dataclass(frozen=True)
class Hyperparameters:
    """Every knob, read once from the environment and validated once (from_env)."""
    # data / run
    data_path: str = _env("DATA_PATH", "./data/datasets/fineweb10B_sp1024", str)
    tokenizer_path: str = _env("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", str)
    run_id: str = _env("RUN_ID", "", str)
    out_dir: str = _env("OUT_DIR", "logs", str)
    seed: int = _env("SEED", 1337, int, 0, 2**31 - 1)
    # training length / batch
    iterations: int = _env("ITERATIONS", 20000, int, 0)
    train_batch_tokens: int = _env("TRAIN_BATCH_TOKENS", 524_288, int, 1)
    train_seq_len: int = _env("TRAIN_SEQ_LEN", 1024, int, 2)
    grad_accum_steps: int = _env("GRAD_ACCUM_STEPS", 8, int, 1)
    mlx_max_microbatch_tokens: int = _env("MLX_MAX_MICROBATCH_TOKENS", 8192, int, 1)
    warmup_steps: int = _env("WARMUP_STEPS", 20, int, 0)
    warmdown_iters: int = _env("WARMDOWN_ITERS", 1200, int, 0)
    max_wallclock_seconds: float = _env("MAX_WALLCLOCK_SECONDS", 600.0, float, 0.0)
    # evaluation / logging
    val_batch_size: int = _env("VAL_BATCH_SIZE", 524_288, int, 1)
    val_loss_every: int = _env("VAL_LOSS_EVERY", 0, int, 0)
    val_max_tokens: int = _env("VAL_MAX_TOKENS", 0, int, 0)
    train_log_every: int = _env("TRAIN_LOG_EVERY", 200, int, 1)
    eval_only: bool = _env("EVAL_ONLY", False, bool)
    load_artifact: str = _env("LOAD_ARTIFACT", "", str)
    # model
    vocab_size: int = _env("VOCAB_SIZE", 1024, int, 2, 65536)
    num_layers: int = _env("NUM_LAYERS", 9, int, 1, 128)
    model_dim: int = _env("MODEL_DIM", 512, int, 8, 16384)
    num_heads: int = _env("NUM_HEADS", 8, int, 1, 256)
    num_kv_heads: int = _env("NUM_KV_HEADS", 4, int, 1, 256)
    mlp_mult: int = _env("MLP_MULT", 2, int, 1, 16)
    tie_embeddings: bool = _env("TIE_EMBEDDINGS", True, bool)
    tied_embed_init_std: float = _env("TIED_EMBED_INIT_STD", 0.005, float, 0.0, 1.0)
    logit_softcap: float = _env("LOGIT_SOFTCAP", 30.0, float, 0.0)
    rope_base: float = _env("ROPE_BASE", 10000.0, float, 1.0)
    qk_gain_init: float = _env("QK_GAIN_INIT", 1.5, float, 0.0)
    compute_dtype: str = _env("COMPUTE_DTYPE", "auto", str, choices=("auto", "float32", "bfloat16", "float16"))
    # optimizers
    beta1: float = _env("BETA1", 0.9, float, 0.0, 0.999999)
    beta2: float = _env("BETA2", 0.95, float, 0.0, 0.999999)
    adam_eps: float = _env("ADAM_EPS", 1e-8, float, 0.0, 1.0)
    tied_embed_lr: float = _env("TIED_EMBED_LR", 0.05, float, 0.0)
    embed_lr: float = _env("EMBED_LR", 0.6, float, 0.0)
    head_lr: float = _env("HEAD_LR", 0.008, float, 0.0)
    matrix_lr: float = _env("MATRIX_LR", 0.04, float, 0.0)
    scalar_lr: float = _env("SCALAR_LR", 0.04, float, 0.0)
    muon_momentum: float = _env("MUON_MOMENTUM", 0.95, float, 0.0, 0.999999)
    muon_momentum_warmup_start: float = _env("MUON_MOMENTUM_WARMUP_START", 0.85, float, 0.0, 0.999999)
    muon_momentum_warmup_steps: int = _env("MUON_MOMENTUM_WARMUP_STEPS", 500, int, 0)
    muon_backend_steps: int = _env("MUON_BACKEND_STEPS", 5, int, 1, 20)
    muon_weight_decay: float = _env("MUON_WEIGHT_DECAY", 0.0, float, 0.0, 1.0)
    grad_clip_norm: float = _env("GRAD_CLIP_NORM", 0.0, float, 0.0)
    # artifact
    quant_bits: int = _env("QUANT_BITS", 6, int, choices=(6, 8))
    # moonshot stack, training side (every piece off by default)
    engram_lite_enabled: bool = _env("ENGRAM_LITE_ENABLED", False, bool)
    engram_mode: str = _env("ENGRAM_MODE", "logit", str, choices=("logit", "input"))
    engram_hash_size: int = _env("ENGRAM_HASH_SIZE", 4096, int, 1, 2**20)
    engram_dim: int = _env("ENGRAM_DIM", 128, int, 1, 4096)
    engram_heads: int = _env("ENGRAM_HEADS", 2, int, 1, 16)
    skipgram_hash_size: int = _env("SKIPGRAM_HASH_SIZE", 0, int, 0, 2**20)
    skipgram_dim: int = _env("SKIPGRAM_DIM", 32, int, 1, 4096)
    skipgram_patterns: str = _env("SKIPGRAM_PATTERNS", "-1,-3;-1,-5;-2,-4", str)
    engram_proj_optimizer: str = _env("ENGRAM_PROJ_OPTIMIZER", "muon", str, choices=("muon", "adam"))
    skipgram_proj_optimizer: str = _env("SKIPGRAM_PROJ_OPTIMIZER", "adam", str, choices=("muon", "adam"))
    complement_alpha: float = _env("COMPLEMENT_ALPHA", 0.0, float, 0.0, 1.0)
    complement_floor: float = _env("COMPLEMENT_FLOOR", 0.1, float, 0.0, 1.0)
    complement_max_tokens: int = _env("COMPLEMENT_MAX_TOKENS", 100_000_000, int, 1)
    ema_decay: float = _env("EMA_DECAY", 0.0, float, 0.0, 0.999999)
    ema_warmup: float = _env("EMA_WARMUP", 3.0, float, 0.0)
    qat_start_frac: float = _env("QAT_START_FRAC", 1.0, float, 0.0, 1.0)
    # moonshot stack, evaluation side
    eval_seq_len: int = _env("EVAL_SEQ_LEN", 0, int, 0)
    eval_stride: int = _env("EVAL_STRIDE", 0, int, 0)
    eval_batch_seqs: int = _env("EVAL_BATCH_SEQS", 0, int, 0)
    eval_token_nll_path: str = _env("EVAL_TOKEN_NLL_PATH", "", str)
    ngram_mixer_enabled: bool = _env("NGRAM_MIXER_ENABLED", False, bool)
    ngram_max_order: int = _env("NGRAM_MAX_ORDER", 2, int, 1, 16)
    ngram_alpha: float = _env("NGRAM_ALPHA", 0.3, float, 0.0, 0.99)
    ngram_alpha_mode: str = _env("NGRAM_ALPHA_MODE", "entropy", str, choices=("fixed", "entropy"))
    ngram_buckets: int = _env("NGRAM_BUCKETS", 16384, int, 1, 2**20)
    ngram_chunk: int = _env("NGRAM_CHUNK", 2048, int, 1)

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        """Parse and validate; raise one ConfigError listing every bad variable."""
        env = os.environ if env is None else env
        values, errors = {}, []
        for f in fields(cls):
            m = f.metadata
            raw = env.get(m["env"])
            if raw is None or raw.strip() == "":
                values[f.name] = f.default
                continue
            try:
                values[f.name] = _parse(raw.strip(), m)
            except ValueError as e:
                errors.append(f"{m['env']}={raw!r}: {e}")
        if errors:
            raise ConfigError("invalid environment:\n  " + "\n  ".join(errors))
        hp = cls(**values)
        hp._check_relations()
        return hp

    def _check_relations(self):
        errs = []
        if self.model_dim % self.num_heads:
            errs.append(f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}")
        elif (self.model_dim // self.num_heads) % 2:
            errs.append(f"MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} must be even (RoPE)")
        if self.num_heads % self.num_kv_heads:
            errs.append(f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        if self.train_batch_tokens % self.train_seq_len:
            errs.append(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of "
                        f"TRAIN_SEQ_LEN={self.train_seq_len}")
        try:
            parse_patterns(self.skipgram_patterns)
        except ValueError as e:
            errs.append(f"SKIPGRAM_PATTERNS={self.skipgram_patterns!r}: {e}")
        if self.eval_stride > (self.eval_seq_len or self.train_seq_len):
            errs.append(f"EVAL_STRIDE={self.eval_stride} must be <= EVAL_SEQ_LEN "
                        f"({self.eval_seq_len or self.train_seq_len})")
        if self.ngram_mixer_enabled and max(self.ngram_buckets, self.vocab_size) * self.vocab_size >= 2**31:
            errs.append(f"NGRAM_BUCKETS={self.ngram_buckets} x VOCAB_SIZE={self.vocab_size} must stay below 2^31")
        if 0 < self.ema_warmup <= 1:
            errs.append(f"EMA_WARMUP={self.ema_warmup} must be 0 (off) or > 1 (decay (1+t)/(W+t) must stay below 1)")
        if self.eval_only and not self.load_artifact:
            errs.append("EVAL_ONLY=1 needs LOAD_ARTIFACT=path/to/artifact")
        if errs:
            raise ConfigError("invalid environment:\n  " + "\n  ".join(errs))

    def dtype(self):
        if self.compute_dtype == "auto":  # bf16 matmul is ~30x slower than fp32 on CPU
            return mx.bfloat16 if _on_gpu() else mx.float32
        return getattr(mx, self.compute_dtype)


def parse_patterns(text: str) -> tuple:
    """'-1,-3;-2,-4' -> ((-1, -3), (-2, -4)); offsets are relative to the predicted token."""
    pats = tuple(tuple(int(o) for o in p.split(",")) for p in text.replace(" ", "").split(";") if p)
    if not pats or any(len(p) < 2 or not all(-64 <= o <= -1 for o in p) for p in pats):
        raise ValueError("expected ';'-separated patterns of >= 2 comma-separated offsets in [-64, -1]")
    return pats


def _parse(raw: str, m: dict):
    kind, lo, hi, choices = m["kind"], m["lo"], m["hi"], m["choices"]
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected 0/1 (or true/false)")
    if kind is str:
        v = raw
    else:
        try:
            v = kind(raw)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise ValueError("expected a finite number")
    if choices is not None and v not in choices:
        raise ValueError(f"allowed values: {', '.join(map(str, choices))}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"allowed range: [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    return v


# =============================================================================
# Data: challenge shards, the training token stream, the bits-per-byte table
# =============================================================================
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
DATA_HELP = ("Download the challenge data:  python data/cached_challenge_fineweb.py --variant sp1024 "
             "--train-shards 1\nor build shards offline:  python data/build_shards.py --docs docs.jsonl "
             "--tokenizer TOKENIZER.model --out DIR --val-docs N")


def load_data_shard(path) -> np.ndarray:
    """Read one challenge shard (1024-byte int32 header, then uint16 tokens), checking it exactly."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the 1024-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a challenge shard (magic {header[0]}, version {header[1]})")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) "
                         f"but the file has {size} bytes (truncated or corrupted)")
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)


def shard_files(data_path: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise FileNotFoundError(f"no {split} shards matching {data_path}/fineweb_{split}_*.bin\n{DATA_HELP}")
    return files


def load_validation_tokens(data_path: str, max_tokens: int, vocab_size: int) -> np.ndarray:
    toks = np.concatenate([load_data_shard(f) for f in shard_files(data_path, "val")])
    if max_tokens:
        toks = toks[:max_tokens]
    if toks.size < 2:
        raise ValueError(f"validation split in {data_path} has {toks.size} tokens; need at least 2")
    if int(toks.max()) >= vocab_size:
        raise ValueError(f"validation token id {int(toks.max())} >= VOCAB_SIZE={vocab_size}")
    return toks


class TokenStream:
    """Sequential tokens over the sorted train shards, wrapping around; one shard in memory."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.file_idx, self.pos = -1, 0
        self.tokens = np.zeros(0, np.uint16)

    def _next_file(self):
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
        if self.tokens.size and int(self.tokens.max()) >= self.vocab_size:
            raise ValueError(f"{self.files[self.file_idx]}: token id >= VOCAB_SIZE={self.vocab_size}")

    def take(self, n: int) -> np.ndarray:
        parts, empty_files = [], 0
        while n > 0:
            if self.pos >= self.tokens.size:
                self._next_file()
                empty_files = empty_files + 1 if self.tokens.size == 0 else 0
                if empty_files > len(self.files):
                    raise ValueError(f"all train shards are empty\n{DATA_HELP}")
                continue
            k = min(n, self.tokens.size - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

    def next_batch(self, batch_tokens: int, seq_len: int):
        """Inputs/targets [batch_tokens/seq_len, seq_len] from one contiguous span (+1 token)."""
        chunk = self.take(batch_tokens + 1).astype(np.int32)
        return chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)


def build_byte_tables(sp, vocab_size: int):
    """Per-id byte counts for val_bpb, as the challenge defines them (CHALLENGE.md)."""
    n = sp.vocab_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} pieces but VOCAB_SIZE={vocab_size}")
    base = np.zeros(vocab_size, np.int64)
    space = np.zeros(vocab_size, bool)
    boundary = np.ones(vocab_size, bool)  # ids beyond the tokenizer: 0 bytes, boundary
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def target_bytes(prev: np.ndarray, tgt: np.ndarray, tables) -> np.ndarray:
    base, space, boundary = tables
    return base[tgt] + (space[tgt] & ~boundary[prev])


def load_tokenizer(path: str):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (TOKENIZER_PATH)\n{DATA_HELP}")
    return spm.SentencePieceProcessor(model_file=path)


# =============================================================================
# Model pieces
# =============================================================================
def rms_norm(x):
    return mx.fast.rms_norm(x, None, 1e-6)


class Linear(nn.Module):
    """fp32 master weight; the matmul runs in the activations' dtype."""

    def __init__(self, din: int, dout: int, zero_init: bool = False):
        super().__init__()
        s = 1.0 / math.sqrt(din)
        self.weight = mx.zeros((dout, din)) if zero_init else mx.random.uniform(-s, s, (dout, din))

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class Attention(nn.Module):
    """Grouped-query attention: RMS-normed q/k, RoPE, a learned per-head query gain."""

    def __init__(self, dim, heads, kv_heads, rope_base, qk_gain):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.rope_base = heads, kv_heads, dim // heads, rope_base
        self.c_q = Linear(dim, dim)
        self.c_k = Linear(dim, kv_heads * self.hd)
        self.c_v = Linear(dim, kv_heads * self.hd)
        self.proj = Linear(dim, dim, zero_init=True)
        self.q_gain = mx.full((heads,), qk_gain)

    def __call__(self, x):
        B, T, D = x.shape
        q = self.c_q(x).reshape(B, T, self.heads, self.hd).transpose(0, 2, 1, 3)
        k = self.c_k(x).reshape(B, T, self.kv_heads, self.hd).transpose(0, 2, 1, 3)
        v = self.c_v(x).reshape(B, T, self.kv_heads, self.hd).transpose(0, 2, 1, 3)
        q = mx.fast.rope(rms_norm(q), self.hd, traditional=False, base=self.rope_base, scale=1.0, offset=0)
        k = mx.fast.rope(rms_norm(k), self.hd, traditional=False, base=self.rope_base, scale=1.0, offset=0)
        q = q * self.q_gain.astype(q.dtype)[:, None, None]
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.hd ** -0.5, mask="causal")
        return self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.fc = Linear(dim, dim * mult)
        self.proj = Linear(dim * mult, dim, zero_init=True)

    def __call__(self, x):
        h = nn.relu(self.fc(x))
        return self.proj(h * h)  # relu^2


_HASH_MULT = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)


def hash_ids(cols: list, seed: int, size: int) -> mx.array:
    """Hash aligned int token arrays into [0, size). uint32 multiply/xor-shift wraps mod 2^32
    by definition, so no V or size can overflow it."""
    h = mx.full(cols[0].shape, (seed * 0x61C88647 + 0x7F4A7C15) & 0xFFFFFFFF, dtype=mx.uint32)
    for i, c in enumerate(cols):
        h = (h ^ c.astype(mx.uint32)) * mx.array(_HASH_MULT[i % len(_HASH_MULT)], mx.uint32)
        h = h ^ (h >> 13)
    return (h % size).astype(mx.int32)


def shift_right(ids, d: int):
    """ids[:, t - d] at position t (0 where t < d): a token d places back, never ahead."""
    return ids if d == 0 else mx.concatenate([mx.zeros_like(ids[:, :d]), ids[:, :-d]], axis=1)


def history_mask(T: int, d: int, dtype):
    """[T, 1]: 1 where position t has d tokens of history inside the window."""
    return (mx.arange(T) >= d).astype(dtype)[:, None]


class EngramLite(nn.Module):
    """Gated multi-head hashed bigram (t-1, t) and trigram (t-2, t-1, t) features of the
    input tokens. Each order averages `heads` independent hashes into its table, so one
    head's collision is outvoted; a per-order gate starts suppressed (sigmoid(-2) ~ 0.12)."""

    def __init__(self, hash_size, dim, heads, out_dim):
        super().__init__()
        self.size, self.heads = hash_size, heads
        self.tables = [mx.random.normal((hash_size, dim)) * 0.02 for _ in (2, 3)]
        self.gates = mx.full((2,), -2.0)
        self.proj = Linear(dim, out_dim, zero_init=True)

    def __call__(self, ids, dtype):
        T, out = ids.shape[1], 0.0
        for k, order in enumerate((2, 3)):
            cols = [shift_right(ids, order - 1 - j) for j in range(order)]
            e = sum(self.tables[k][hash_ids(cols, 16 * k + h, self.size)] for h in range(self.heads))
            out = out + mx.sigmoid(self.gates[k]) / self.heads * e * history_mask(T, order - 1, e.dtype)
        return self.proj(out.astype(dtype))


class SkipGramHash(nn.Module):
    """Hashed non-adjacent token pairs as an additive logit bias. Offsets count back from the
    predicted token: at position t (predicting t+1), -1 is input token t, -3 is input t-2.
    Narrow tables (one per pattern) share one zero-initialised projection to the vocabulary."""

    def __init__(self, hash_size, dim, patterns, vocab):
        super().__init__()
        self.size, self.patterns = hash_size, patterns
        self.tables = [mx.random.normal((hash_size, dim)) * 0.02 for _ in patterns]
        self.proj = Linear(dim, vocab, zero_init=True)

    def __call__(self, ids, dtype):
        T, out = ids.shape[1], 0.0
        for k, pat in enumerate(self.patterns):
            back = [-o - 1 for o in pat]
            e = self.tables[k][hash_ids([shift_right(ids, d) for d in back], 101 + k, self.size)]
            out = out + e * history_mask(T, max(back), e.dtype)
        return self.proj(out.astype(dtype))


class Block(nn.Module):
    """Pre-norm block with learned output scales and a learned mix with the embedding x0."""

    def __init__(self, dim, heads, kv_heads, mlp_mult, rope_base, qk_gain):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, rope_base, qk_gain)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = mx.ones((dim,))
        self.mlp_scale = mx.ones((dim,))
        self.resid_mix = mx.stack([mx.ones((dim,)), mx.zeros((dim,))])

    def __call__(self, x, x0):
        mix = self.resid_mix.astype(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.astype(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.astype(x.dtype) * self.mlp(rms_norm(x))


# =============================================================================
# Model
# =============================================================================
@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild the network; stored in the artifact header."""
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    engram_lite_enabled: bool = False
    engram_mode: str = "logit"
    engram_hash_size: int = 4096
    engram_dim: int = 128
    engram_heads: int = 2
    skipgram_hash_size: int = 0
    skipgram_dim: int = 32
    skipgram_patterns: str = "-1,-3;-1,-5;-2,-4"

    @classmethod
    def from_hparams(cls, hp: Hyperparameters) -> "ModelConfig":
        return cls(**{f.name: getattr(hp, f.name) for f in fields(cls)})


class GPT(nn.Module):
    """Baseline GPT: tied embeddings, U-Net skips across the block stack, tanh softcap."""

    def __init__(self, cfg: ModelConfig, dtype=mx.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        d = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.tok_emb.weight = mx.random.normal((cfg.vocab_size, d)) * cfg.tied_embed_init_std
        self.blocks = [Block(d, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.rope_base, cfg.qk_gain_init)
                       for _ in range(cfg.num_layers)]
        self.n_enc = cfg.num_layers // 2
        n_skip = min(self.n_enc, cfg.num_layers - self.n_enc)
        if n_skip:
            self.skip_weights = mx.ones((n_skip, d))
        if not cfg.tie_embeddings:
            self.lm_head = Linear(d, cfg.vocab_size, zero_init=True)
        if cfg.engram_lite_enabled:
            out = d if cfg.engram_mode == "input" else cfg.vocab_size
            self.engram = EngramLite(cfg.engram_hash_size, cfg.engram_dim, cfg.engram_heads, out)
        if cfg.skipgram_hash_size:
            self.skipgram = SkipGramHash(cfg.skipgram_hash_size, cfg.skipgram_dim,
                                         parse_patterns(cfg.skipgram_patterns), cfg.vocab_size)

    def __call__(self, ids):
        """Logits [B, T, V] in float32, softcapped."""
        cfg = self.cfg
        e = self.tok_emb(ids).astype(self.dtype)
        if cfg.engram_lite_enabled and cfg.engram_mode == "input":
            e = e + self.engram(ids, self.dtype)
        x = rms_norm(e)
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            if i >= self.n_enc and skips:  # decoder half: add encoder outputs in reverse order
                x = x + self.skip_weights[i - self.n_enc].astype(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.n_enc:
                skips.append(x)
        x = rms_norm(x)
        w = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = x @ w.astype(x.dtype).T
        if cfg.engram_lite_enabled and cfg.engram_mode == "logit":
            logits = logits + self.engram(ids, self.dtype)
        if cfg.skipgram_hash_size:
            logits = logits + self.skipgram(ids, self.dtype)
        logits = logits.astype(mx.float32)
        c = cfg.logit_softcap
        return c * mx.tanh(logits / c) if c > 0 else logits

    def token_nll(self, ids, targets):
        """Per-target negative log-likelihood in nats, [B, T] float32."""
        logits = self(ids)
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def token_stats(self, ids, targets):
        """(NLL, entropy of the model's distribution), both [B, T] float32 nats."""
        logits = self(ids)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        logp = logits - lse
        ent = -mx.sum(mx.exp(logp) * logp, axis=-1)
        return -mx.take_along_axis(logp, targets[..., None], -1)[..., 0], ent


# =============================================================================
# Optimizers: Muon for the blocks' matrices, Adam for everything else
# =============================================================================
def param_group(name: str, p: mx.array, proj_optimizer: dict | None = None) -> str:
    """Which optimizer owns a parameter: 'muon', or Adam's 'embed', 'table', 'head', 'scalar'.
    proj_optimizer maps the hashed features' projections to 'muon' or 'adam' (by measurement:
    the bench_ablation table in README.md)."""
    if name == "tok_emb.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if ".tables." in name:  # hashed n-gram embeddings
        return "table"
    if name in ("engram.proj.weight", "skipgram.proj.weight"):
        return "muon" if (proj_optimizer or {}).get(name.split(".")[0], "muon") == "muon" else "head"
    if p.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight"):
        return "muon"
    return "scalar"


def newton_schulz(g, steps: int):
    """Approximately orthogonalise g (quintic Newton-Schulz iteration, as in Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (mx.sqrt(mx.sum(g * g)) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.T if tall else x


class Optimizers:
    """Muon + Adam as pure array math, so the whole update lives inside the compiled step.

    `state` holds every buffer; the compiled step takes it as input and output, so it is
    mutated in place (never rebound) to keep the compiled graph's references valid.
    """

    def __init__(self, model: GPT, hp: Hyperparameters):
        self.hp = hp
        params = dict(tree_flatten(model.trainable_parameters()))
        proj = dict(engram=hp.engram_proj_optimizer, skipgram=hp.skipgram_proj_optimizer)
        self.group = {n: param_group(n, p, proj) for n, p in params.items()}
        self.lr = {"muon": hp.matrix_lr, "scalar": hp.scalar_lr, "head": hp.head_lr, "table": hp.tied_embed_lr,
                   "embed": hp.tied_embed_lr if model.cfg.tie_embeddings else hp.embed_lr}
        self.state = {"t": None, "m": {}, "v": {}, "buf": {}, "ema": {}}
        self.reset(params)

    def reset(self, params: dict):
        st = self.state
        st["t"] = mx.array(0.0)
        for n, p in params.items():
            if self.hp.ema_decay > 0:  # EMA of weights, updated inside the compiled step
                st["ema"][n] = p
            if self.group[n] == "muon":
                st["buf"][n] = mx.zeros_like(p)
            else:
                st["m"][n], st["v"][n] = mx.zeros_like(p), mx.zeros_like(p)

    def apply(self, params: dict, grads: dict, lr_mul, momentum) -> dict:
        hp, st = self.hp, self.state
        if hp.grad_clip_norm > 0:
            norm = mx.sqrt(sum(mx.sum(g * g) for g in grads.values()))
            k = mx.minimum(1.0, hp.grad_clip_norm / (norm + 1e-6))
            grads = {n: g * k for n, g in grads.items()}
        t = st["t"] + 1
        st["t"] = t
        c1, c2 = 1 - hp.beta1 ** t, 1 - hp.beta2 ** t
        d = ema_decay_at(t, hp)
        out = {}
        for n, p in params.items():
            g, lr = grads[n], self.lr[self.group[n]] * lr_mul
            if self.group[n] == "muon":
                buf = momentum * st["buf"][n] + g
                st["buf"][n] = buf
                o = newton_schulz((g + momentum * buf).astype(mx.bfloat16 if _on_gpu() else mx.float32),
                                  hp.muon_backend_steps).astype(mx.float32)
                scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                out[n] = p * (1 - lr * hp.muon_weight_decay) - (lr * scale) * o
            else:
                m = hp.beta1 * st["m"][n] + (1 - hp.beta1) * g
                v = hp.beta2 * st["v"][n] + (1 - hp.beta2) * (g * g)
                st["m"][n], st["v"][n] = m, v
                out[n] = p - lr * (m / c1) / (mx.sqrt(v / c2) + hp.adam_eps)
            if hp.ema_decay > 0:
                st["ema"][n] = d * st["ema"][n] + (1 - d) * out[n]
        return out


def ema_decay_at(t, hp: Hyperparameters):
    """EMA decay for the update after optimizer step t (1 on the first; an mx scalar inside the
    compiled step, so no Python step is baked into the graph): min(EMA_DECAY, (1+t)/(W+t)).
    A constant d leaves d^t of the weight on the untrained initialisation (0.997^100 = 74%), so a
    short run would save mostly its starting point; with the warm-up that weight is
    prod (1+s)/(W+s) (0.2% after 50 steps at W = 3) and the EMA spans about the last t/(W-1)
    steps until it reaches EMA_DECAY (t ~ 670 for 0.997 at W = 3; W = 3 measured best of 3, 10,
    30 at every cell of bench_ablation's grid). EMA_WARMUP=0: the records' constant d."""
    if hp.ema_warmup <= 0:
        return hp.ema_decay
    return mx.minimum(hp.ema_decay, (1 + t) / (hp.ema_warmup + t))


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def lr_multiplier(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """Linear warmdown to 0 over the last WARMDOWN_ITERS steps, whichever limit ends the run
    first: the step count, or the wall clock (the step time so far sets the warmdown length)."""
    if hp.warmdown_iters <= 0:
        return 1.0
    mul = min(1.0, max(hp.iterations - step, 0) / hp.warmdown_iters)
    if hp.max_wallclock_seconds > 0 and step > 0:
        warmdown_ms = hp.warmdown_iters * elapsed_ms / step
        remaining_ms = max(hp.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
        mul = min(mul, remaining_ms / max(warmdown_ms, 1e-9))
    return mul


def muon_momentum_at(step: int, hp: Hyperparameters) -> float:
    if hp.muon_momentum_warmup_steps <= 0:
        return hp.muon_momentum
    f = min(step / hp.muon_momentum_warmup_steps, 1.0)
    return (1 - f) * hp.muon_momentum_warmup_start + f * hp.muon_momentum


# =============================================================================
# Complementary training: a bigram model of the training data sets per-token loss weights
# =============================================================================
def bigram_table(files: list[str], vocab: int, max_tokens: int) -> np.ndarray:
    """P(next | prev) with Laplace smoothing, flat [V*V] float32, from train shards only."""
    counts, seen = np.zeros(vocab * vocab, np.int64), 0
    for f in files:
        toks = load_data_shard(f)[: max_tokens - seen]
        for lo in range(0, max(toks.size - 1, 0), 1 << 24):  # bounded temporaries
            chunk = toks[lo:lo + (1 << 24) + 1].astype(np.int64)
            counts += np.bincount(chunk[:-1] * vocab + chunk[1:], minlength=vocab * vocab)
        seen += toks.size
        if seen >= max_tokens:
            break
    counts = counts.reshape(vocab, vocab) + 1.0
    return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32).reshape(-1)


def complement_weights(x, y, table, alpha: float, floor: float, vocab: int):
    """clip(1 - alpha * P_bigram(y | x), floor, 1), renormalised to mean 1 over the (micro)batch
    the compiled loss sees."""
    w = mx.clip(1.0 - alpha * mx.take(table, x * vocab + y), floor, 1.0)
    return w / mx.mean(w)


# =============================================================================
# Quantization and the artifact (no pickle: a JSON header plus raw little-endian arrays)
# =============================================================================
ARTIFACT_MAGIC = b"PGMLXv1\0"
CONTROL_PATTERNS = ("resid_mix", "skip_weights", "attn_scale", "mlp_scale", "q_gain")
_NP_DTYPES = {"int8": np.int8, "float16": np.float16, "float32": np.float32}


class ArtifactError(ValueError):
    """The file is not a readable artifact of this script (truncated, corrupted, foreign)."""


def is_quantized(name: str, shape) -> bool:
    return len(shape) == 2 and not any(p in name for p in CONTROL_PATTERNS)


def quantize_rows(w: np.ndarray, bits: int):
    """Symmetric per-row quantization: int values in [-qmax, qmax], one fp16 scale per row."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1)
    scale = np.maximum(amax / qmax, 2.0 ** -24).astype(np.float16)
    q = np.clip(np.round(w / scale.astype(np.float32)[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def fake_quant(w: mx.array, bits: int) -> mx.array:
    """QAT: forward = exactly dequantize_rows(quantize_rows(w)); gradient = identity (STE)."""
    qmax = 2 ** (bits - 1) - 1
    amax = mx.max(mx.abs(w), axis=1, keepdims=True)
    scale = mx.maximum(amax / qmax, 2.0 ** -24).astype(mx.float16).astype(mx.float32)
    deq = mx.clip(mx.round(w / scale), -qmax, qmax) * scale
    return mx.stop_gradient(deq) + (w - mx.stop_gradient(w))


def pack_state(flat: dict, bits: int):
    """name -> float32 array  ==>  (tensor table, raw blob)."""
    table, chunks, off = [], [], 0

    def add(name, role, arr):
        nonlocal off
        arr = np.ascontiguousarray(arr)
        table.append(dict(name=name, role=role, dtype=str(arr.dtype), shape=list(arr.shape),
                          offset=off, nbytes=arr.nbytes))
        chunks.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        off += arr.nbytes

    for name in sorted(flat):
        w = np.asarray(flat[name], dtype=np.float32)
        if is_quantized(name, w.shape):
            q, s = quantize_rows(w, bits)
            add(name, "q", q)
            add(name, "scale", s)
        else:
            add(name, "raw", w)
    return table, b"".join(chunks)


def write_artifact(path: str, flat: dict, cfg: ModelConfig, bits: int, meta: dict | None = None) -> int:
    """Quantize, compress (zstd 22, with checksum) and write atomically. Returns file bytes."""
    import zstandard
    table, blob = pack_state(flat, bits)
    header = json.dumps(dict(format="parameter-golf-mlx", version=1, quant_bits=bits, config=asdict(cfg),
                             tensors=table, blob_bytes=len(blob), meta=meta or {})).encode()
    payload = struct.pack("<I", len(header)) + header + blob
    data = ARTIFACT_MAGIC + zstandard.ZstdCompressor(level=22, write_checksum=True).compress(payload)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def read_artifact(path: str):
    """Returns (ModelConfig, {name: float32 array}, header). Never runs code from the file."""
    import zstandard
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(ARTIFACT_MAGIC):
        raise ArtifactError(f"{path}: not a parameter-golf-mlx artifact (bad magic bytes)")
    try:
        payload = zstandard.ZstdDecompressor().decompress(data[len(ARTIFACT_MAGIC):])
    except zstandard.ZstdError as e:
        raise ArtifactError(f"{path}: compressed payload is truncated or corrupted ({e})") from None
    try:
        (hlen,) = struct.unpack_from("<I", payload, 0)
        header = json.loads(payload[4:4 + hlen].decode())
        blob = memoryview(payload)[4 + hlen:]
        if header.get("format") != "parameter-golf-mlx" or header.get("version") != 1:
            raise ArtifactError(f"{path}: unknown format/version {header.get('format')}/{header.get('version')}")
        if len(blob) != header["blob_bytes"]:
            raise ArtifactError(f"{path}: blob has {len(blob)} bytes, header says {header['blob_bytes']}")
        cfg = ModelConfig(**header["config"])
        arrays = {}
        for t in header["tensors"]:
            dt = np.dtype(_NP_DTYPES[t["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in t["shape"])
            off, nb = int(t["offset"]), int(t["nbytes"])
            if nb != int(np.prod(shape)) * dt.itemsize or off < 0 or off + nb > len(blob):
                raise ArtifactError(f"{path}: tensor {t['name']} has inconsistent size/offset")
            arrays[(t["name"], t["role"])] = np.frombuffer(blob[off:off + nb], dtype=dt).reshape(shape)
        flat = {}
        for (name, role), a in arrays.items():
            if role == "raw":
                flat[name] = a.astype(np.float32)
            elif role == "q":
                flat[name] = dequantize_rows(a, arrays[(name, "scale")])
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: malformed artifact header ({type(e).__name__}: {e})") from None
    return cfg, flat, header


def load_flat_into(model: GPT, flat: dict):
    """Load name->array into the model, insisting on the exact same names and shapes."""
    want = dict(tree_flatten(model.parameters()))
    if set(want) != set(flat):
        raise ArtifactError(f"artifact tensors do not match the model: missing {sorted(set(want) - set(flat))[:5]}, "
                            f"unexpected {sorted(set(flat) - set(want))[:5]}")
    for n, a in flat.items():
        if tuple(want[n].shape) != tuple(a.shape):
            raise ArtifactError(f"artifact tensor {n} has shape {a.shape}, model wants {want[n].shape}")
    model.update(tree_unflatten([(n, mx.array(a)) for n, a in flat.items()]))


# =============================================================================
# Evaluation: exact val_bpb over the validation split, streamed in batches
# =============================================================================
def eval_windows(n_tgt: int, seq_len: int, stride: int):
    """Sliding windows over targets 1..n_tgt: (window starts, first scored offset in each).

    A window starting at w reads tokens[w:w+L] and predicts targets w+1..w+L. Every target is
    scored exactly once, by the first window that reaches it, so all but the first L targets get
    at least L - stride tokens of context; the last window is aligned to end at the final target
    so the tail is scored once too. stride == L is the standard non-overlapping evaluation."""
    L = seq_len
    if n_tgt <= L:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    starts = np.arange(0, n_tgt - L + 1, stride, dtype=np.int64)
    if starts[-1] + L < n_tgt:
        starts = np.append(starts, n_tgt - L)
    covered = np.concatenate([[0], starts[:-1] + L])  # targets already scored before each window
    return starts, covered - starts


def evaluate(fn, tokens: np.ndarray, seq_len: int, batch_seqs: int, tables, stride: int = 0,
             mixer=None, log=None, label="val"):
    """Score every target of `tokens` exactly once, in order, through the compiled model `fn`
    (returning per-position NLL, or (NLL, entropy) for the entropy-weighted mixer) in batches of
    [batch_seqs, seq_len] windows (one compiled shape), optionally mixed with the n-gram cache.
    Returns (val_loss, val_bpb, per-target NLL in nats, float32)."""
    n_tgt, L = tokens.size - 1, seq_len
    starts, offsets = eval_windows(n_tgt, L, stride or L)
    batch_seqs = min(batch_seqs, starts.size)
    nll_out, done = np.empty(n_tgt, np.float32), 0
    t0 = last_print = time.perf_counter()
    n_batches = -(-starts.size // batch_seqs)
    pos = np.arange(L)
    for bi in range(n_batches):
        st = starts[bi * batch_seqs:(bi + 1) * batch_seqs]
        off = offsets[bi * batch_seqs:(bi + 1) * batch_seqs]
        idx = np.minimum(st[:, None] + pos, n_tgt - 1)  # only a split shorter than L is clipped
        keep = (pos >= off[:, None]) & (st[:, None] + pos < n_tgt)
        x = np.zeros((batch_seqs, L), np.int32)
        y = np.zeros((batch_seqs, L), np.int32)
        x[:st.size], y[:st.size] = tokens[idx], tokens[idx + 1]
        out = fn(mx.array(x), mx.array(y))
        nll, ent = out if isinstance(out, tuple) else (out, None)
        flat = mx.array(np.flatnonzero(keep).astype(np.int32))  # scored positions, in target order
        nll = mx.take(nll.reshape(-1), flat)
        if mixer is not None:
            ent = mx.take(ent.reshape(-1), flat) if ent is not None else mx.zeros_like(nll)
            nll = mixer.nll(tokens, done + 1, -nll, ent)
        nll = np.array(nll)
        nll_out[done:done + nll.size] = nll
        done += nll.size
        if log and time.perf_counter() - last_print > 30 and bi + 1 < n_batches:
            last_print = time.perf_counter()
            el = last_print - t0
            log(f"{label}_progress: {bi + 1}/{n_batches} batches eta:{el / (bi + 1) * (n_batches - bi - 1):.0f}s")
    assert done == n_tgt, (done, n_tgt)
    return summarize_nll(nll_out, tokens, tables)


def summarize_nll(nll: np.ndarray, tokens: np.ndarray, tables):
    """(mean NLL in nats, bits per byte, nll) over exactly the targets tokens[1:len(nll)+1]."""
    n = nll.size
    total_bytes = int(target_bytes(tokens[:n], tokens[1:n + 1], tables).sum())
    total_nll = float(nll.astype(np.float64).sum())
    return total_nll / n, total_nll / math.log(2) / max(total_bytes, 1), nll


class BackoffNgramMixer:
    """Interpolated Witten-Bell backoff n-gram cache, mixed into the model's distribution.

    Legal by construction: a count row is chosen by the context alone (never the target), so every
    order's distribution sums to 1 and so does the mix (C2); the weight depends only on H and the
    context's counts (C1); each chunk is scored before its events enter the cache (C3), once (C4).
    Memory is fixed at construction; work per token does not depend on how many tokens were seen."""

    def __init__(self, vocab_size: int, max_order: int, buckets: int, alpha: float,
                 alpha_mode: str = "fixed", chunk: int = 2048):
        assert alpha_mode in ("fixed", "entropy") and 0.0 <= alpha < 1.0 and max_order >= 1
        self.V, self.K, self.B, self.alpha, self.mode, self.chunk = (
            vocab_size, max_order, buckets, alpha, alpha_mode, chunk)
        rows = [vocab_size] + [buckets] * (max_order - 1)  # order 1 is exact: row = previous token
        assert max(rows) * vocab_size < 2**31, "sort keys row*V+v must fit int32"
        self.counts = [mx.zeros((r, vocab_size), mx.int32) for r in rows]  # c_k[row, v]
        self.C = [mx.zeros((r,), mx.int32) for r in rows]  # row totals, kept so scoring never reads a row
        self.T = [mx.zeros((r,), mx.int32) for r in rows]  # distinct v per row (Witten-Bell mass)
        self.u, self.U = mx.zeros((vocab_size,), mx.int32), 0  # unigram counts of scored targets
        self.next = None  # the target the next nll call must start at
        mx.eval(self.counts, self.C, self.T, self.u)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.counts + self.C + self.T) + self.u.nbytes

    @staticmethod
    def _window(tokens, a: int, b: int) -> mx.array:
        """tokens[a:b] as int32, zero-padded on the left where a < 0 (those orders are masked)."""
        pad, a = max(0, -a), max(a, 0)
        w = tokens[a:b]
        w = w.astype(mx.int32) if isinstance(w, mx.array) else mx.array(np.asarray(w, dtype=np.int32))
        return mx.concatenate([mx.zeros((pad,), mx.int32), w]) if pad else w

    def _rows(self, tokens, s: int, e: int) -> list:
        """Count row of each order for targets s..e-1, from the k context tokens alone (never the
        target): order 1 is the previous token itself, orders >= 2 hash_ids of the context."""
        K, n = self.K, e - s
        w = self._window(tokens, s - K, e)  # w[K + (j - s) - i] == tokens[j - i]
        ctx = [w[K - i:K - i + n] for i in range(1, K + 1)]
        return [ctx[0]] + [hash_ids(ctx[:k], 200 + k, self.B) for k in range(2, K + 1)]

    def _mix(self, gathered, u_t, H):
        """p_ngram and a_eff from per-order (c, C, T) gathers; shared by scoring and distribution().

        a_eff = a * C/(C+T) at the highest order with history (U/(U+V) with unigrams only): a
        context never seen does not dilute the model. It reads only counts of the context, not the
        target, so it is legal."""
        p = (u_t.astype(mx.float32) + 1.0) / float(self.U + self.V)
        conf = mx.array(self.U / (self.U + self.V), mx.float32)
        for c, C, T in gathered:
            c, C, T = (x.astype(mx.float32) for x in (c, C, T))
            seen, d = C > 0, mx.maximum(C + T, 1.0)
            p = mx.where(seen, (c + T * p) / d, p)
            conf = mx.where(seen, C / d, conf)
        a = self.alpha
        if self.mode == "entropy":
            a = a * mx.minimum(1.0, H.astype(mx.float32) / math.log(self.V))
        return p, a * conf

    def nll(self, tokens, start: int, lp: mx.array, H: mx.array) -> mx.array:
        """Mixed NLL (nats) float32 [M] of targets start..start+M-1, given the model's log-prob of
        each target (lp) and entropy (H). Calls must continue exactly where the last one ended."""
        assert self.next is None or start == self.next, f"expected start {self.next}, got {start}"
        assert start >= 1 and lp.shape == H.shape and lp.ndim == 1
        M, out = lp.shape[0], []
        for s in range(start, start + M, self.chunk):
            e = min(s + self.chunk, start + M)
            out.append(self._chunk(tokens, s, e, lp[s - start:e - start], H[s - start:e - start]))
        self.next = start + M
        return mx.concatenate(out) if out else mx.zeros((0,), mx.float32)

    def _chunk(self, tokens, s: int, e: int, lp, H) -> mx.array:
        """Score targets s..e-1 with the cache as it stands, then add their events (score first)."""
        y, rows, jpos = self._window(tokens, s, e), self._rows(tokens, s, e), mx.arange(s, e)
        cb = [self.counts[k][rows[k], y] for k in range(self.K)]  # counts before this chunk
        g = [(cb[k], mx.where(jpos > k, self.C[k][rows[k]], 0), self.T[k][rows[k]])
             for k in range(self.K)]  # j < k+1: too little history, C := 0 skips the order
        p, a = self._mix(g, self.u[y], H)
        lp = lp.astype(mx.float32)
        mixed = -mx.logaddexp(mx.log1p(-a) + lp, mx.log(a) + mx.log(p))
        out = mx.where(a > 0, mixed, -lp)  # alpha = 0 (or no history yet) is exactly -lp
        mx.eval(out, cb)  # scores are fixed now; also leaves the tables free for in-place scatter
        for k in range(self.K):
            lo = max(0, k + 1 - s)
            if lo >= e - s:
                continue
            r, v, c0 = rows[k][lo:], y[lo:], cb[k][lo:]
            self.counts[k] = self.counts[k].at[r, v].add(1)
            self.C[k] = self.C[k].at[r].add(1)
            # (row, v) becomes distinct once: at its first occurrence in the chunk, if unseen before.
            key = r * self.V + v
            order = mx.argsort(key)
            key = key[order]
            first = mx.concatenate([mx.array([True]), key[1:] != key[:-1]])
            self.T[k] = self.T[k].at[r[order]].add((first & (c0[order] == 0)).astype(mx.int32))
        self.u, self.U = self.u.at[y].add(1), self.U + (e - s)
        mx.eval(self.counts, self.C, self.T, self.u)
        return out

    def distribution(self, tokens, j: int, p_model: mx.array) -> mx.array:
        """Full mixed distribution [V] for target j from the current cache state (for tests)."""
        rows = [r[0] for r in self._rows(tokens, j, j + 1)]
        g = [(self.counts[k][rows[k]], self.C[k][rows[k]] if j > k else mx.array(0),
              self.T[k][rows[k]]) for k in range(self.K)]
        p_model = p_model.astype(mx.float32)
        H = -(p_model * mx.log(mx.maximum(p_model, 1e-30))).sum()
        p, a = self._mix(g, self.u, H)
        return (1.0 - a) * p_model + a * p


# =============================================================================
# Compiled functions: one builder for all of them
# =============================================================================
class Compiled:
    """Every compiled function, built in one place so a change of mode (QAT switched on,
    a feature enabled, weights restored) can never leave a stale graph behind: the caller
    builds a new Compiled instead of mutating a flag a traced graph has baked in."""

    def __init__(self, model: GPT, opt: Optimizers, compile_fns: bool = True, qat_bits: int = 0,
                 complement: mx.array | None = None):
        c = mx.compile if compile_fns else (lambda f, **kw: f)
        hp, state, vocab = opt.hp, [model.state, opt.state], model.cfg.vocab_size

        def train_loss(params, x, y):
            if qat_bits:  # forward through the artifact's quantizer, straight-through gradient
                params = tree_unflatten([(n, fake_quant(p, qat_bits) if is_quantized(n, p.shape) else p)
                                         for n, p in tree_flatten(params)])
            model.update(params)
            nll = model.token_nll(x, y)
            if complement is None:
                return nll.mean()
            w = complement_weights(x, y, complement, hp.complement_alpha, hp.complement_floor, vocab)
            return mx.mean(mx.stop_gradient(w) * nll)

        value_and_grad = mx.value_and_grad(train_loss)

        def loss_and_grad(x, y):
            params = model.trainable_parameters()
            loss, grads = value_and_grad(params, x, y)
            model.update(params)  # back to the real (unquantized) weights
            return loss, grads

        def apply(grads, lr_mul, momentum):
            params = dict(tree_flatten(model.trainable_parameters()))
            new = opt.apply(params, dict(tree_flatten(grads)), lr_mul, momentum)
            model.update(tree_unflatten(list(new.items())))

        def step(x, y, lr_mul, momentum):  # forward + backward + update, one microbatch
            loss, grads = loss_and_grad(x, y)
            apply(grads, lr_mul, momentum)
            return loss

        def update(grads, lr_mul, momentum):
            apply(grads, lr_mul, momentum)
            return mx.array(0.0)

        self.step = c(step, inputs=state, outputs=state)
        self.grads = c(loss_and_grad, inputs=state, outputs=state)
        self.update = c(update, inputs=state, outputs=state)
        self.token_nll = c(model.token_nll, inputs=state)
        self.token_stats = c(model.token_stats, inputs=state)


def train_step(fns: Compiled, x: np.ndarray, y: np.ndarray, micro_seqs: int, lr_mul: float, momentum: float):
    """One optimizer step over a batch, split into microbatches of at most micro_seqs rows to
    bound memory. Returns the mean loss as an (unevaluated) mx scalar."""
    lr, mom = mx.array(lr_mul), mx.array(momentum)
    n = x.shape[0]
    if n <= micro_seqs:
        return fns.step(mx.array(x), mx.array(y), lr, mom)
    acc, loss = None, mx.array(0.0)
    for lo in range(0, n, micro_seqs):
        w = min(micro_seqs, n - lo) / n
        l, g = fns.grads(mx.array(x[lo:lo + micro_seqs]), mx.array(y[lo:lo + micro_seqs]))
        g = tree_map(lambda a: a * w, g)
        acc = g if acc is None else tree_map(mx.add, acc, g)
        loss = loss + l * w
        mx.eval(acc, loss)
    fns.update(acc, lr, mom)
    return loss


# =============================================================================
# Main
# =============================================================================
class Logger:
    def __init__(self, path: str | None):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, msg: str):
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def count_params(model) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def flat_numpy(model) -> dict:
    return {n: np.array(p.astype(mx.float32)) for n, p in tree_flatten(model.parameters())}


def eval_batch_seqs(hp: Hyperparameters, seq_len: int) -> int:
    return max(1, hp.val_batch_size // hp.grad_accum_steps // seq_len)


def main(env=None) -> int:
    try:
        hp = Hyperparameters.from_env(env)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_id = hp.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    os.makedirs(hp.out_dir, exist_ok=True)
    log = Logger(os.path.join(hp.out_dir, f"{run_id}.txt"))
    code_bytes = os.path.getsize(os.path.abspath(__file__))
    try:
        return run(hp, run_id, log, code_bytes)
    except (FileNotFoundError, ArtifactError, ValueError) as e:
        log(f"error: {e}")
        return 1


def run(hp: Hyperparameters, run_id: str, log: Logger, code_bytes: int) -> int:
    dtype = hp.dtype()
    log(f"run_id:{run_id} mlx:{mx.__version__} device:{mx.default_device()} compute_dtype:{dtype}")
    log("hparams: " + " ".join(f"{f.metadata['env']}={getattr(hp, f.name)}" for f in fields(hp)))
    mx.random.seed(hp.seed)
    np.random.seed(hp.seed)
    sp = load_tokenizer(hp.tokenizer_path)

    trained_seq = hp.train_seq_len
    if hp.eval_only:
        cfg, flat, header = read_artifact(hp.load_artifact)
        trained_seq = int(header["meta"].get("train_seq_len", trained_seq))  # eval as it was trained
        model = GPT(cfg, dtype)
        load_flat_into(model, flat)
    else:
        cfg = ModelConfig.from_hparams(hp)
        model = GPT(cfg, dtype)
    tables = build_byte_tables(sp, cfg.vocab_size)
    val_tokens = load_validation_tokens(hp.data_path, hp.val_max_tokens, cfg.vocab_size)
    log(f"val_tokens:{val_tokens.size} params:{count_params(model)} " + " ".join(
        f"params_{k}:{count_params(getattr(model, k))}" for k in ("engram", "skipgram") if k in model))
    opt = Optimizers(model, hp)
    complement = None
    if hp.complement_alpha > 0 and not hp.eval_only:
        t0 = time.perf_counter()
        complement = mx.array(bigram_table(shard_files(hp.data_path, "train"), cfg.vocab_size,
                                           hp.complement_max_tokens))
        log(f"complement: bigram table from <= {hp.complement_max_tokens} train tokens in "
            f"{time.perf_counter() - t0:.1f}s (alpha:{hp.complement_alpha} floor:{hp.complement_floor})")

    # The only place compiled functions are built: one complete set per training mode, so
    # switching QAT on swaps whole graph sets instead of touching a flag a graph has baked in.
    graphs = {qat: Compiled(model, opt, qat_bits=hp.quant_bits if qat else 0, complement=complement)
              for qat in ((False, True) if hp.qat_start_frac < 1.0 and not hp.eval_only else (False,))}
    fns, qat_on = graphs[False], False
    seq = hp.train_seq_len
    bseqs = eval_batch_seqs(hp, seq)
    eval_seq = hp.eval_seq_len or trained_seq
    log(f"final_eval: seq_len:{eval_seq} stride:{hp.eval_stride or eval_seq} "
        f"batch_seqs:{hp.eval_batch_seqs or eval_batch_seqs(hp, eval_seq)} mixer:" + (
            f"order{hp.ngram_max_order}/{hp.ngram_alpha_mode}/alpha{hp.ngram_alpha}/buckets{hp.ngram_buckets}"
            if hp.ngram_mixer_enabled else "off"))

    def run_eval(label, final=True):
        """Evaluate the weights that would be saved (the EMA when it is on). Final evaluations use
        the configured sliding window and n-gram mixer; periodic ones the cheap standard eval."""
        t0, raw = time.perf_counter(), None
        if opt.state["ema"] and label == "val":
            raw = model.trainable_parameters()
            model.update(tree_unflatten(list(opt.state["ema"].items())))
        mixer, fn, kw = None, fns.token_nll, dict(seq_len=seq, batch_seqs=bseqs)
        if final:
            kw = dict(seq_len=eval_seq, stride=hp.eval_stride,
                      batch_seqs=hp.eval_batch_seqs or eval_batch_seqs(hp, eval_seq))
            if hp.ngram_mixer_enabled:
                mixer = BackoffNgramMixer(cfg.vocab_size, hp.ngram_max_order, hp.ngram_buckets, hp.ngram_alpha,
                                          hp.ngram_alpha_mode, hp.ngram_chunk)
                fn = fns.token_stats if hp.ngram_alpha_mode == "entropy" else fn
        loss, bpb, nll = evaluate(fn, val_tokens, tables=tables, mixer=mixer, log=log, label=label, **kw)
        if raw is not None:
            model.update(raw)
        if hp.eval_token_nll_path and label != "val":
            tmp = f"{hp.eval_token_nll_path}.tmp{os.getpid()}"
            nll.astype("<f4").tofile(tmp)
            os.replace(tmp, hp.eval_token_nll_path)
            log(f"per-token NLL (float32 nats, {nll.size} targets in order) written to {hp.eval_token_nll_path}")
        return loss, bpb, (time.perf_counter() - t0) * 1000

    if hp.eval_only:
        loss, bpb, ms = run_eval("eval")
        log(f"eval_only val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
        log(f"eval_only_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        return 0

    stream_files = shard_files(hp.data_path, "train")
    micro_seqs = max(1, min(hp.train_batch_tokens // hp.grad_accum_steps, hp.mlx_max_microbatch_tokens) // seq)
    log(f"train_shards:{len(stream_files)} batch_tokens:{hp.train_batch_tokens} seq_len:{seq} "
        f"microbatch_seqs:{micro_seqs} iterations:{hp.iterations} max_wallclock:{hp.max_wallclock_seconds}s")

    # Warmup primes the compiled graphs; weights, optimizer state and data order are then
    # restored so the measured run starts from the true initialisation.
    if hp.warmup_steps and hp.iterations:
        init_params = dict(tree_flatten(model.parameters()))
        stream = TokenStream(stream_files, cfg.vocab_size)
        t0 = time.perf_counter()
        for i in range(hp.warmup_steps):
            g = graphs[0 < i == hp.warmup_steps - 1 and len(graphs) == 2]  # last one primes the QAT graphs
            mx.eval(train_step(g, *stream.next_batch(hp.train_batch_tokens, seq), micro_seqs, 1.0,
                               muon_momentum_at(0, hp)))
        model.update(tree_unflatten(list(init_params.items())))
        opt.reset(dict(tree_flatten(model.trainable_parameters())))
        n_windows = -(-(val_tokens.size - 1) // seq)  # the batch shape evaluate() uses for periodic evals
        mx.eval(fns.token_nll(*[mx.zeros((min(bseqs, n_windows), seq), mx.int32)] * 2))
        log(f"warmup:{hp.warmup_steps} steps {time.perf_counter() - t0:.1f}s (compile; state restored)")
    stream = TokenStream(stream_files, cfg.vocab_size)

    train_ms, step, stop_at = 0.0, 0, None
    max_ms = hp.max_wallclock_seconds * 1000.0
    interrupted = False
    t_last = time.perf_counter()
    while True:
        last = step == hp.iterations or (stop_at is not None and step >= stop_at) or interrupted
        if last or (hp.val_loss_every and step and step % hp.val_loss_every == 0):
            train_ms += (time.perf_counter() - t_last) * 1000
            try:
                loss, bpb, _ = run_eval("val", final=last)
                log(f"step:{step}/{hp.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            except KeyboardInterrupt:
                log("evaluation interrupted: skipped; training stops and the artifact is still written")
                last = interrupted = True
            t_last = time.perf_counter()
        if last:
            break
        progress = max(step / max(hp.iterations, 1), train_ms / max_ms if max_ms > 0 else 0.0)
        if not qat_on and hp.qat_start_frac < 1.0 and progress >= hp.qat_start_frac:
            fns, qat_on = graphs[True], True
            log(f"qat:on step:{step} (int{hp.quant_bits} fake quantization, straight-through)")
        try:
            x, y = stream.next_batch(hp.train_batch_tokens, seq)
            loss = train_step(fns, x, y, micro_seqs, lr_multiplier(step, train_ms, hp), muon_momentum_at(step, hp))
            mx.eval(loss)
        except KeyboardInterrupt:
            log(f"interrupted at step {step}: evaluating and writing the artifact (Ctrl-C again to abort)")
            interrupted = True
            continue
        step += 1
        now = time.perf_counter()
        train_ms += (now - t_last) * 1000
        t_last = now
        if max_ms > 0 and train_ms >= max_ms and stop_at is None:
            stop_at = step
        if step <= 10 or step % hp.train_log_every == 0 or step == hp.iterations or stop_at == step:
            avg = train_ms / step
            left = hp.iterations - step
            if max_ms > 0:
                left = min(left, max(max_ms - train_ms, 0) / avg)
            log(f"step:{step}/{hp.iterations} train_loss:{float(loss):.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{avg:.2f}ms tok_s:{hp.train_batch_tokens / (avg / 1000):.0f} eta:{left * avg / 1000:.0f}s")
    if stop_at is not None and stop_at < hp.iterations:
        log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{hp.iterations}")
    log(f"peak_memory:{mx.get_peak_memory() / 2**20:.0f}MiB")
    if opt.state["ema"]:
        model.update(tree_unflatten(list(opt.state["ema"].items())))
        log(f"ema: saving the EMA weights (decay {hp.ema_decay})")

    # Artifact: quantize + compress, then prove it by reloading and evaluating it again.
    path = os.path.join(hp.out_dir, f"{run_id}_model.int{hp.quant_bits}.ptz")
    log(f"writing artifact {path} (int{hp.quant_bits} + zstd-22)...")
    model_bytes = write_artifact(path, flat_numpy(model), cfg, hp.quant_bits,
                                 dict(run_id=run_id, step=step, train_seq_len=seq))
    total = code_bytes + model_bytes
    log(f"artifact: code_bytes:{code_bytes} model_bytes:{model_bytes} total_bytes:{total} "
        f"cap:{ARTIFACT_CAP_BYTES} {'OK' if total <= ARTIFACT_CAP_BYTES else 'OVER'}")
    if total > ARTIFACT_CAP_BYTES:
        log(f"WARNING: artifact is OVER the {ARTIFACT_CAP_BYTES}-byte cap by {total - ARTIFACT_CAP_BYTES} bytes: "
            "this cannot be submitted; shrink the model (NUM_LAYERS, MODEL_DIM, MLP_MULT)")
    _, flat, _ = read_artifact(path)
    load_flat_into(model, flat)
    loss, bpb, ms = run_eval("roundtrip")
    tag = f"final_int{hp.quant_bits}_zstd_roundtrip"
    log(f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
