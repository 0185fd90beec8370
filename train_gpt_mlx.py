#!/usr/bin/env python3
"""Parameter Golf in MLX: train a small GPT on the challenge's FineWeb shards, score it in exact
bits-per-byte, and write a <=16,000,000-byte submission artifact. Driven by environment variables."""
from __future__ import annotations

import ast
import base64
import ctypes
import difflib
import errno
import fcntl
import glob
import io
import json
import lzma
import math
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import tokenize
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

ARTIFACT_CAP_BYTES = 16_000_000


# ======== Hyperparameters ============================================================================================
class ConfigError(ValueError):
    """A bad environment value; the message names the variable and what is allowed."""


def _env(default, lo=None, hi=None, choices=None):
    """A variable of the environment: its name is the field's in upper case (iterations: ITERATIONS), its type
    the field's (_parse)."""
    return field(default=default, metadata=dict(env=True, lo=lo, hi=hi, choices=choices))


def env_name(f) -> str:
    return f.name.upper()


NGRAM_ALPHA_GRID = "0,0.02,0.05,0.1,0.25,0.4,0.55,0.7,0.85,1"  # the old fixed grid, plus small values and 0, 1


@dataclass(frozen=True)
class Hyperparameters:
    """Every knob, read once from the environment and validated once (from_env)."""
    # data / run
    data_path: str = _env("./data/datasets/fineweb10B_sp1024")
    tokenizer_path: str = _env("./data/tokenizers/fineweb_1024_bpe.model")
    run_id: str = _env("")
    out_dir: str = _env("logs")
    seed: int = _env(1337, 0, 2**31 - 1)
    strict_env: bool = _env(False)
    checkpoint_every: int = _env(0, 0)
    resume_from: str = _env("")
    resume_override: bool = _env(False)
    # training length / batch
    iterations: int = _env(20000, 0, 10**7)
    train_batch_tokens: int = _env(524_288, 1, 2**26)
    train_seq_len: int = _env(1024, 2)
    grad_accum_steps: int = _env(8, 1)
    mlx_max_microbatch_tokens: int = _env(8192, 1)
    warmup_steps: int = _env(20, 0)
    warmdown_iters: int = _env(1200, 0)
    warmdown_frac: float = _env(0.0, 0.0, 1.0)
    min_lr: float = _env(0.0, 0.0, 1.0)
    max_wallclock_seconds: float = _env(600.0, 0.0)
    # evaluation / logging
    val_batch_size: int = _env(524_288, 1)
    val_loss_every: int = _env(0, 0)
    val_max_tokens: int = _env(0, 0)
    train_log_every: int = _env(200, 1)
    eval_only: bool = _env(False)
    load_artifact: str = _env("")
    # model
    vocab_size: int = _env(1024, 2, 65536)
    num_layers: int = _env(9, 1, 128)
    model_dim: int = _env(512, 8, 16384)
    num_heads: int = _env(8, 1, 256)
    num_kv_heads: int = _env(4, 1, 256)
    mlp_mult: int = _env(2, 1, 16)
    tie_embeddings: bool = _env(True)
    tied_embed_init_std: float = _env(0.005, 0.0, 1.0)
    logit_softcap: float = _env(30.0, 0.0)
    rope_base: float = _env(10000.0, 1.0)
    qk_gain_init: float = _env(1.5, 0.0)
    compute_dtype: str = _env("auto", choices=("auto", "float32", "bfloat16", "float16"))
    # optimizers
    beta1: float = _env(0.9, 0.0, 0.999999)
    beta2: float = _env(0.95, 0.0, 0.999999)
    adam_eps: float = _env(1e-8, 0.0, 1.0)
    tied_embed_lr: float = _env(0.05, 0.0)
    embed_lr: float = _env(0.6, 0.0)
    head_lr: float = _env(0.008, 0.0)
    matrix_lr: float = _env(0.04, 0.0)
    scalar_lr: float = _env(0.04, 0.0)
    muon_momentum: float = _env(0.95, 0.0, 0.999999)
    muon_momentum_warmup_start: float = _env(0.85, 0.0, 0.999999)
    muon_momentum_warmup_steps: int = _env(500, 0)
    muon_backend_steps: int = _env(5, 1, 20)
    muon_weight_decay: float = _env(0.0, 0.0, 1.0)
    muon_row_normalize: bool = _env(False)
    muon_ns_coeffs: str = _env("quintic", choices=("quintic", "polar_express"))
    embed_wd: float = _env(0.0, 0.0, 1.0)
    adam_wd: float = _env(0.0, 0.0, 1.0)
    grad_clip_norm: float = _env(0.0, 0.0)
    # artifact
    quant_bits: int = _env(6, choices=(6, 8))
    # moonshot stack, training side (every piece off by default)
    engram_lite_enabled: bool = _env(False)
    engram_mode: str = _env("logit", choices=("logit", "input"))
    engram_hash_size: int = _env(4096, 1, 2**20)
    engram_dim: int = _env(128, 1, 4096)
    engram_heads: int = _env(2, 1, 16)
    skipgram_hash_size: int = _env(0, 0, 2**20)
    skipgram_dim: int = _env(32, 1, 4096)
    skipgram_patterns: str = _env("-1,-3;-1,-5;-2,-4")
    engram_proj_optimizer: str = _env("muon", choices=("muon", "adam"))
    skipgram_proj_optimizer: str = _env("adam", choices=("muon", "adam"))
    complement_alpha: float = _env(0.0, 0.0, 1.0)
    complement_floor: float = _env(0.1, 0.0, 1.0)
    complement_max_tokens: int = _env(100_000_000, 1)
    ema_decay: float = _env(0.0, 0.0, 0.999999)
    ema_warmup: float = _env(3.0, 0.0)
    qat_start_frac: float = _env(1.0, 0.0, 1.0)
    # moonshot stack, evaluation side
    eval_mode: str = _env("auto", choices=("auto", "standard", "sliding"))
    eval_seq_len: int = _env(0, 0)
    eval_stride: int = _env(0, 0)
    eval_batch_seqs: int = _env(0, 0)
    eval_token_nll_path: str = _env("")
    ngram_mixer_enabled: bool = _env(False)
    ngram_max_order: int = _env(5, 1, 16)  # defaults: tests/bench_ngram.py --part bpb
    ngram_alpha: float = _env(0.7, 0.0, 0.99)  # fixed and entropy modes only
    ngram_alpha_mode: str = _env("adaptive", choices=("adaptive", "fixed", "entropy"))
    ngram_alpha_grid: str = _env(NGRAM_ALPHA_GRID)  # adaptive: the α values the posterior mixes (0 included)
    ngram_prior_zero: float = _env(0.5, 0.01, 0.99)  # adaptive: the prior's mass on α = 0 (the model alone)
    ngram_conf_bins: int = _env(3, 1, 16)  # adaptive buckets: highest seen order x cache confidence bin
    ngram_entropy_bins: int = _env(1, 1, 16)  # ... x bin of the model's entropy / ln V (defaults: bench_ngram.py)
    ngram_max_memory_mb: int = _env(4096, 1)
    # data-parallel runs (mlx.launch) and the challenge's submission folder
    dist_backend: str = _env("any", choices=("any", "ring", "nccl", "jaccl", "mpi"))
    submission_dir: str = _env("")
    submission_author: str = _env("")
    submission_github_id: str = _env("")
    submission_name: str = _env("")
    submission_blurb: str = _env("")
    submission_unofficial_data: bool = _env(False)
    # record base (issue 8): the sp1024 records' model pieces, each off by default; RECIPE bundles them
    recipe: str = _env("baseline", choices=("baseline", "sp1024_record", "sp8192_record"))
    smear_gate: bool = _env(False)
    smear_mode: str = _env("channel", choices=("channel", "input"))
    bigram_hash_size: int = _env(0, 0, 2**20)
    bigram_dim: int = _env(128, 1, 4096)
    xsa_last_n: int = _env(0, 0, 256)
    rope_dims: int = _env(0, 0, 4096)
    ln_scale: bool = _env(False)
    leaky_relu_slope: float = _env(0.0, 0.0, 1.0)
    parallel_start_layer: int = _env(0, 0, 127)
    recur_layers: str = _env("")
    recur_untied_mlp: bool = _env(False)
    recur_start_frac: float = _env(0.0, 0.0, 1.0)
    attn_doc_isolated: bool = _env(False)
    # the sp8192 records' model pieces (issue 23; RECORDS_SP8192.md sections 3-5), each off by default
    skip_gates: bool = _env(False)
    recur_passes: int = _env(1, 1, 16)
    parallel_form: str = _env("sp1024", choices=("sp1024", "sp8192"))
    attn_gate: bool = _env(False)
    attn_gate_scale: float = _env(0.5, 0.0, 100.0)
    # mixed-precision artifact: bits per tensor group (0 = QUANT_BITS; 16 = fp16), clip search, codec
    quant_bits_attn: int = _env(0, choices=(0, 5, 6, 7, 8, 16))
    quant_bits_mlp: int = _env(0, choices=(0, 5, 6, 7, 8, 16))
    quant_bits_embed: int = _env(0, choices=(0, 5, 6, 7, 8, 16))
    gptq_lite: bool = _env(False)
    compressor: str = _env("zstd", choices=("auto", "zstd", "lzma", "brotli"))
    # full-Hessian GPTQ, SDClip and LQER (issue 22; README "Artifact size and quantization")
    quant_method: str = _env("rtn", choices=("rtn", "gptq_lite", "gptq"))
    quant_clip: str = _env("maxabs", choices=("maxabs", "sdclip"))
    sdclip_k_attn: float = _env(13.0, 0.1, 1000.0)
    sdclip_k_mlp: float = _env(11.5, 0.1, 1000.0)
    sdclip_k_embed: float = _env(14.0, 0.1, 1000.0)
    gptq_calibration_tokens: int = _env(1_572_864, 0)
    gptq_reserve_seconds: float = _env(8.0, 0.0)
    lqer_top_k: int = _env(0, 0, 1024)
    lqer_rank: int = _env(4, 1, 64)
    # test-time training at evaluation (score a chunk, then train on it; README "Test-time training")
    ttt_enabled: bool = _env(False)
    ttt_mode: str = _env("lora", choices=("lora", "full", "doc_lora"))
    ttt_rank: int = _env(8, 1, 1024)
    ttt_targets: str = _env("all")
    ttt_lr: float = _env(0.01, 0.0)
    ttt_epochs: int = _env(1, 1, 64)
    ttt_chunk: int = _env(2048, 1)
    ttt_batch_seqs: int = _env(8, 1)
    ttt_grad_clip: float = _env(1.0, 0.0)
    ttt_reset: str = _env("never", choices=("never", "doc"))
    # TTT_MODE=doc_lora (#1530 form): per-document adapters over short chunks, phased global SGD (TTT_RANK, TTT_LR)
    ttt_alpha: float = _env(0.0, 0.0)  # adapter output scale alpha/rank; 0: alpha = rank (scale 1)
    ttt_doc_chunk: int = _env(48, 1)
    ttt_doc_batch: int = _env(64, 1)
    ttt_weight_decay: float = _env(0.5, 0.0)
    ttt_warm_a: bool = _env(True)
    ttt_phases: int = _env(0, 0, 64)
    ttt_prefix_docs: int = _env(2500, 1)
    ttt_phase_lr: float = _env(0.001, 0.0)
    ttt_phase_chunk: int = _env(32768, 1)
    ttt_time_budget: float = _env(0.0, 0.0)  # seconds of adapting (0: no limit); scoring always finishes
    # not variables: what unknown_env_notes found in the environment, and the variables RECIPE set (for the log
    # and error messages), those derived from NUM_LAYERS among them
    env_notes: tuple = field(default=(), compare=False)
    from_recipe: tuple = field(default=(), compare=False)
    derived: tuple = field(default=(), compare=False)
    # not a variable: how RESUME_FROM's checkpoint settings differ from the environment, for the log
    resume_notes: tuple = field(default=(), compare=False)

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        """Parse and validate; raise one ConfigError listing every bad variable. An empty value
        is an error (not the default): `ITERATIONS=` is more likely a broken script than a wish."""
        env = dict(os.environ if env is None else env)
        env.update({name: env[alias] for alias, name in ENV_ALIASES.items() if alias in env and name not in env})
        explicit = {f.name for f in env_fields() if env_name(f) in env}
        recipe = recipe_values(env)
        env = {**recipe, **env}  # explicit values win
        values = {}
        errors = [f"{k}={env[k]!r}: {why}" for k, why in ENV_RETIRED.items() if k in env]
        for f in env_fields():
            raw = env.get(env_name(f))
            try:
                values[f.name] = f.default if raw is None else _parse(raw.strip(), f)
            except ValueError as e:
                errors.append(f"{env_name(f)}={raw!r}: {e}")
        if errors:
            raise ConfigError("invalid environment:\n  " + "\n  ".join(blame_recipe(errors, recipe)))
        for name in ("data_path", "tokenizer_path"):  # unset (or RECIPE's): the repository's data/, from anywhere
            if name not in explicit:
                values[name] = find_upward(values[name])
        derived = tuple(sorted(set(recipe) & set(RECIPE_DEPTH_RULES)))
        hp = cls(**values, env_notes=tuple(unknown_env_notes(env)), from_recipe=tuple(sorted(recipe)), derived=derived)
        if hp.resume_from and not hp.eval_only:
            hp = hp.resumed(explicit)
        hp.check_relations()
        if hp.strict_env and hp.env_notes:
            raise ConfigError("STRICT_ENV=1 and the environment has variables this script does not read:\n  "
                              + "\n  ".join(hp.env_notes))
        return hp

    def resumed(self, explicit: set) -> "Hyperparameters":
        """RESUME_FROM continues the checkpoint's run: every setting that changes the result comes from the
        checkpoint. A result-changing variable the environment sets to another value is refused (shape ones
        always, the others unless RESUME_OVERRIDE=1); every difference is logged (resume_notes)."""
        meta = checkpoint_header(self.resume_from)["meta"]
        saved = meta["hparams"]
        fixed = set(MODEL_FIELDS) | set(RESUME_MUST_MATCH)
        values = {}
        notes = []
        refused = []
        for f in env_fields():
            if f.name not in saved or f.name in RESUME_FREE or f.name.startswith("submission_"):
                continue
            mine = getattr(self, f.name)
            theirs = saved[f.name]
            var = env_name(f)
            if mine == theirs:
                continue
            if f.name not in explicit:
                values[f.name] = theirs
                notes.append(f"{var}={theirs} from the checkpoint (the environment's would be {mine})")
            elif f.name in fixed:
                refused.append(f"{var}={mine} but the checkpoint was trained with {theirs}; shape-changing "
                               "variables must match it: unset it")
            elif self.resume_override:
                notes.append(f"{var}={mine} overrides the checkpoint's {theirs} (RESUME_OVERRIDE=1)")
            else:
                refused.append(f"{var}={mine} but the checkpoint was trained with {theirs}: unset it, or set "
                               "RESUME_OVERRIDE=1 to train on with it")
        if meta.get("step", 0) > values.get("iterations", self.iterations):
            refused.append(f"the checkpoint is at step {meta['step']}, past ITERATIONS={self.iterations}")
        if refused:
            raise ConfigError(f"RESUME_FROM={self.resume_from}:\n  " + "\n  ".join(refused))
        return replace(self, **values, resume_notes=tuple(notes))

    @property
    def quant_method_resolved(self) -> str:
        """QUANT_METHOD, with the older GPTQ_LITE=1 meaning gptq_lite."""
        return "gptq_lite" if self.gptq_lite and self.quant_method == "rtn" else self.quant_method

    @property
    def eval_stride_resolved(self) -> int:
        """EVAL_MODE=sliding without EVAL_STRIDE means the records' stride 64; 0 = standard."""
        return 64 if self.eval_mode == "sliding" and not self.eval_stride else self.eval_stride

    def check_relations(self):
        hd = self.model_dim // self.num_heads
        eval_len = self.eval_seq_len or self.train_seq_len
        try:
            pat_err = parse_patterns(self.skipgram_patterns) and None  # only whether it raises matters here
        except ValueError as e:
            pat_err = f"SKIPGRAM_PATTERNS={self.skipgram_patterns!r}: {e}"
        errs = [msg for bad, msg in (
            (self.model_dim % self.num_heads, f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}"),
            (not self.model_dim % self.num_heads and hd % 2, f"MODEL_DIM/NUM_HEADS={hd} must be even (RoPE)"),
            (self.num_heads % self.num_kv_heads,
             f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}"),
            (not self.eval_only and self.train_batch_tokens % self.train_seq_len,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}"),
            (pat_err, pat_err),
            (self.eval_stride_resolved > eval_len, f"EVAL_STRIDE={self.eval_stride_resolved} must be <= the eval "
             f"window (EVAL_SEQ_LEN, else the training length: {eval_len})"),
            (self.eval_mode == "standard" and self.eval_stride not in (0, eval_len),
             f"EVAL_MODE=standard scores non-overlapping windows: unset EVAL_STRIDE={self.eval_stride}"),
            (self.checkpoint_every and self.eval_only,
             "CHECKPOINT_EVERY needs a training run (EVAL_ONLY=1 trains nothing)"),
            (not set(self.ttt_targets.split(",")) <= set(TTT_TARGET_KEYS) | {"all"},
             f"TTT_TARGETS={self.ttt_targets!r}: allowed: all, or some of {','.join(TTT_TARGET_KEYS)}"),
            (self.ttt_mode != "doc_lora" and self.ttt_phases,
             f"TTT_PHASES={self.ttt_phases} needs TTT_MODE=doc_lora (its phases interrupt the document queue)"),
            (0 < self.ema_warmup <= 1,
             f"EMA_WARMUP={self.ema_warmup} must be 0 (off) or > 1 (decay (1+t)/(W+t) must stay below 1)"),
            (self.eval_only and not self.load_artifact, "EVAL_ONLY=1 needs LOAD_ARTIFACT=path/to/artifact"),
            (alpha_grid_error(self.ngram_alpha_grid), alpha_grid_error(self.ngram_alpha_grid)),
            (self.quant_method_resolved == "gptq_lite" and self.quant_clip == "sdclip",
             "QUANT_CLIP=sdclip fixes the clip GPTQ-lite would search: use it with QUANT_METHOD=rtn or gptq"),
            (self.gptq_lite and self.quant_method == "gptq",
             "GPTQ_LITE=1 means QUANT_METHOD=gptq_lite: unset one of GPTQ_LITE=1 and QUANT_METHOD=gptq"),
            (self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_id),
             f"RUN_ID={self.run_id!r} must be a plain name: letters, digits, '.', '_', '-' "
             "(it names files in OUT_DIR)"),
            (self.submission_dir and (self.eval_only or self.val_max_tokens or not (
                self.submission_author and self.submission_github_id and self.submission_name
                and self.submission_blurb)),
             "SUBMISSION_DIR needs a training run scored on the whole validation split (no EVAL_ONLY, "
             "VAL_MAX_TOKENS=0) and SUBMISSION_AUTHOR, SUBMISSION_GITHUB_ID, SUBMISSION_NAME, SUBMISSION_BLURB"),
            (self.submission_dir and self.resume_override,
             "RESUME_OVERRIDE=1 cannot write a seed (SUBMISSION_DIR): a seed's command must reproduce it, and one "
             "trained with settings changed part way cannot be; resume without it, or drop SUBMISSION_DIR"),
            (self.submission_dir and Path(self.submission_dir).parent.name not in TRACKS,
             f"SUBMISSION_DIR={self.submission_dir} must be records/<track>/<date>_<name> with <track> one of "
             f"{', '.join(TRACKS)}")) if bad]
        errs += self.record_base_errors()
        if errs:
            raise ConfigError("invalid environment:\n  " + "\n  ".join(blame_recipe(errs, self.from_recipe)))

    def record_base_errors(self) -> list:
        L = self.num_layers
        hd = self.model_dim // self.num_heads
        try:
            span = recur_span(self.recur_layers, L)
            recur_err = None
        except ValueError as e:
            span = None
            recur_err = f"RECUR_LAYERS={self.recur_layers!r}: {e}"
        n = virtual_depth(L, span, self.recur_passes)
        return [msg for bad, msg in (
            (self.recipe != "baseline" and L < 2,
             f"RECIPE={self.recipe} needs NUM_LAYERS >= 2 (its recurrence repeats the two hinge layers)"),
            (self.rope_dims % 2 or self.rope_dims > hd,
             f"ROPE_DIMS={self.rope_dims} must be even and <= the head dim {hd} (0 = all)"),
            (recur_err, recur_err),
            (self.xsa_last_n > n, f"XSA_LAST_N={self.xsa_last_n} must be <= the {n} (virtual) layers"),
            (self.parallel_start_layer >= L,
             f"PARALLEL_START_LAYER={self.parallel_start_layer} must be < NUM_LAYERS={L} (0 = off)"),
            # RECUR_LAYERS=off (say, under a recipe) turns these off with it; unset, they are a mistake
            (self.recur_untied_mlp and not self.recur_layers, "RECUR_UNTIED_MLP=1 needs RECUR_LAYERS=a,b"),
            (self.recur_start_frac and not self.recur_layers, "RECUR_START_FRAC > 0 needs RECUR_LAYERS=a,b"),
            (self.recur_passes > 1 and not self.recur_layers,
             f"RECUR_PASSES={self.recur_passes} needs RECUR_LAYERS=a,b"),
            (self.recur_passes > 1 and self.recur_untied_mlp, f"RECUR_PASSES={self.recur_passes} shares the MLPs "
             "across passes (the sp8192 records' loop): RECUR_UNTIED_MLP=1 needs RECUR_PASSES=1"),
            (self.smear_mode != "channel" and not self.smear_gate,
             f"SMEAR_MODE={self.smear_mode} needs SMEAR_GATE=1 (it picks the SmearGate's form)"),
            ((self.attn_gate or self.smear_gate and self.smear_mode == "input") and self.model_dim < GATE_WINDOW,
             f"ATTN_GATE=1 and SMEAR_MODE=input read the first {GATE_WINDOW} channels: MODEL_DIM="
             f"{self.model_dim} must be >= {GATE_WINDOW}")) if bad]

    def dtype(self):
        if self.compute_dtype == "auto":  # bf16 matmul is ~30x slower than fp32 on CPU
            return mx.bfloat16 if _on_gpu() else mx.float32
        return getattr(mx, self.compute_dtype)


RECIPES = {  # RECIPE=name sets these defaults; any variable set explicitly wins. Sources: README's recipe table.
    # Its depth-dependent values (RECUR_LAYERS, PARALLEL_START_LAYER, XSA_LAST_N) come from recipe_values().
    "baseline": {},
    # sp8192: RECORDS_SP8192.md section 14 (#1855). Quantization names are issue 22's, the optimizer's issue 23's
    # (MUON_ROW_NORMALIZE ...): a name this script does not read yet is only noted (unknown_env_notes).
    "sp8192_record": dict(
        DATA_PATH="./data/datasets/fineweb10B_sp8192", TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model",
        VOCAB_SIZE="8192", NUM_LAYERS="11", MODEL_DIM="512", NUM_HEADS="8", NUM_KV_HEADS="4", MLP_MULT="4",
        TIE_EMBEDDINGS="1", TIED_EMBED_INIT_STD="0.005", LOGIT_SOFTCAP="30", ROPE_DIMS="16", ROPE_BASE="10000",
        LN_SCALE="1", LEAKY_RELU_SLOPE="0.5", QK_GAIN_INIT="5.0", SKIP_GATES="1", RECUR_PASSES="2",
        RECUR_START_FRAC="0.35", PARALLEL_FORM="sp8192", ATTN_GATE="1", ATTN_GATE_SCALE="0.5", SMEAR_GATE="1",
        SMEAR_MODE="input", TRAIN_SEQ_LEN="2048", TRAIN_BATCH_TOKENS="786432",
        MATRIX_LR="0.026", TIED_EMBED_LR="0.03", SCALAR_LR="0.02", BETA1="0.9", BETA2="0.99", ADAM_EPS="1e-8",
        MUON_MOMENTUM="0.97", MUON_MOMENTUM_WARMUP_START="0.92", MUON_MOMENTUM_WARMUP_STEPS="1500",
        MUON_BACKEND_STEPS="5", MUON_NS_COEFFS="polar_express", MUON_ROW_NORMALIZE="1", MUON_WEIGHT_DECAY="0.095",
        EMBED_WD="0.085", ADAM_WD="0.02", GRAD_CLIP_NORM="0.3", EMA_DECAY="0.9965", EMA_WARMUP="0",
        WARMDOWN_FRAC="0.85", MIN_LR="0.10",
        QUANT_METHOD="gptq", QUANT_CLIP="sdclip", SDCLIP_K_ATTN="13.0", SDCLIP_K_MLP="12.0", SDCLIP_K_EMBED="14.0",
        QUANT_BITS_ATTN="6", QUANT_BITS_MLP="6", QUANT_BITS_EMBED="7", LQER_TOP_K="3", LQER_RANK="4",
        COMPRESSOR="brotli",
    ),
    "sp1024_record": dict(
        NUM_LAYERS="11", MLP_MULT="3", SMEAR_GATE="1", BIGRAM_HASH_SIZE="2816", BIGRAM_DIM="112",
        ROPE_DIMS="16", LN_SCALE="1", LEAKY_RELU_SLOPE="0.5", RECUR_START_FRAC="0.5",
        MATRIX_LR="0.03", TIED_EMBED_LR="0.035", SCALAR_LR="0.025", GRAD_CLIP_NORM="0.3", MUON_MOMENTUM="0.99",
        MUON_MOMENTUM_WARMUP_START="0.92", MUON_MOMENTUM_WARMUP_STEPS="1500", MUON_WEIGHT_DECAY="0.04",
        EMA_DECAY="0.997", WARMDOWN_FRAC="0.56", ENGRAM_LITE_ENABLED="1", ENGRAM_HASH_SIZE="2048", ENGRAM_DIM="64",
        QUANT_BITS_ATTN="6", QUANT_BITS_MLP="6", QUANT_BITS_EMBED="7", QUANT_METHOD="gptq", QUANT_CLIP="sdclip",
        COMPRESSOR="brotli", MLX_MAX_MICROBATCH_TOKENS="4096",
    ),
}
# The recipe's depth-dependent values, derived from NUM_LAYERS unless set (11 layers: 4,5 / 6 / 13).
RECIPE_DEPTH_RULES = ("RECUR_LAYERS", "PARALLEL_START_LAYER", "XSA_LAST_N")


def recipe_values(env: dict) -> dict:
    """The variables RECIPE sets that the environment does not. Its depth-dependent ones follow NUM_LAYERS
    (depth_layout), XSA on every virtual layer. Values that cannot be parsed are left to the normal checks."""
    name = env.get("RECIPE", "baseline").strip()
    values = {k: v for k, v in RECIPES.get(name, {}).items() if k not in env}
    if name == "baseline":
        return values

    def get(k: str, default: str) -> str:
        return env.get(k, values.get(k, default)).strip()

    try:
        layers = int(get("NUM_LAYERS", "9"))
        passes = int(get("RECUR_PASSES", "1"))
    except ValueError:
        return values
    if layers < 2:  # recurrence needs two hinge layers; the normal checks name the variable
        return values
    span, par = depth_layout(name, layers)
    if "RECUR_LAYERS" not in env:
        values["RECUR_LAYERS"] = f"{span[0]},{span[1]}"
    if "PARALLEL_START_LAYER" not in env:
        values["PARALLEL_START_LAYER"] = str(par)
    if "XSA_LAST_N" not in env:
        try:
            span = recur_span(get("RECUR_LAYERS", ""), layers)
        except ValueError:  # a bad RECUR_LAYERS is reported by its own check
            span = None
        values["XSA_LAST_N"] = str(virtual_depth(layers, span, passes))
    return values


def depth_layout(recipe: str, layers: int) -> tuple:
    """((a, b) the looped span, the first parallel layer) at this depth. sp1024: the U-Net hinge layers
    (L/2 - 1, L/2), lanes on the last ~45% (9 layers: 3,4 / 5). sp8192: the span 3..5 and lanes from 8 of 11,
    scaled (round(3L/11), two more), the span kept before the lanes (3 layers: 1,1 / 2; 2 layers: 0,0 / 1)."""
    if recipe == "sp1024_record":
        return (layers // 2 - 1, layers // 2), max(1, layers - round(0.45 * layers))
    par = max(1, min(layers - 1, round(8 * layers / 11)))
    a = min(round(3 * layers / 11), par - 1)
    return (a, min(a + 2, par - 1)), par


def blame_recipe(errors: list, recipe) -> list:
    """Say which bad values came from RECIPE rather than from the user, so they know what to override."""
    out = []
    for msg in errors:
        names = [k for k in recipe if re.search(rf"\b{k}\b", msg)]
        if names:
            msg += f" ({', '.join(names)} set by RECIPE; set {'them' if len(names) > 1 else 'it'} to override)"
        out.append(msg)
    return out


ENV_ALIASES = {"TRAIN_MAX_SEQ_LEN": "TRAIN_SEQ_LEN"}  # the public baseline reads both
ENV_RETIRED = {"NGRAM_BUCKETS": "retired: the n-gram mixer keys exact contexts; bound its memory with "
                                "NGRAM_MAX_MEMORY_MB",
               "NGRAM_CHUNK": "retired: the n-gram mixer now scores targets one at a time (each with the counts "
                              "of every earlier target); there is no chunk to set"}
ENV_NOTES = {  # variables other scripts read that this one does not need
    "MLX_EAGER_EVAL": "not needed: every microbatch is evaluated eagerly already (as MLX_EAGER_EVAL=1)",
    "LOGIT_CHUNK_TOKENS": "not needed: logits are computed per microbatch; bound memory with "
                          "MLX_MAX_MICROBATCH_TOKENS",
}
ENV_FAMILIES = ("ENGRAM_", "NGRAM_", "EVAL_", "SKIPGRAM_", "COMPLEMENT_", "QAT_", "EMA_", "MUON_", "TRAIN_",
                "VAL_", "WARMDOWN_", "CHECKPOINT_", "TIED_", "QUANT_", "TTT_", "DIST_", "SUBMISSION_",
                "RECIPE", "SMEAR", "BIGRAM_", "XSA_", "ROPE_", "LN_", "LEAKY_", "PARALLEL_", "RECUR_", "GPTQ_",
                "SDCLIP_", "LQER_", "SKIP_", "ATTN_")


def env_fields() -> list:
    return [f for f in fields(Hyperparameters) if f.metadata.get("env")]


ENV_NAMES = {f.name: env_name(f) for f in env_fields()}


def find_upward(rel: str) -> str:
    """A relative default path as found from the working folder or the nearest folder above it that has it,
    so the script also runs from inside records/<track>/<folder>/ (the challenge runs it there)."""
    if os.path.isabs(rel) or os.path.exists(rel):
        return rel
    for folder in Path.cwd().parents:
        if (folder / rel).exists():
            return str(folder / rel)
    return rel


def unknown_env_notes(env) -> list[str]:
    """One line per variable that looks like ours but is not read (typo, case, another script's name),
    naming the closest known one: silence would leave a knob the user believes on, off."""
    known = {env_name(f) for f in env_fields()} | set(ENV_ALIASES) | set(ENV_RETIRED)
    notes = []
    for name in sorted(set(env) - known):
        up = name.upper()
        close = difflib.get_close_matches(up, known, n=1, cutoff=0.6 if up.startswith(ENV_FAMILIES) else 0.85)
        if name in ENV_NOTES:
            notes.append(f"{name}: {ENV_NOTES[name]}")
        elif up in known:
            notes.append(f"{name} is not read: did you mean {up}? (names are upper case)")
        elif close:
            notes.append(f"{name} is not read: did you mean {close[0]}?")
        elif up.startswith(ENV_FAMILIES):
            notes.append(f"{name} is not read by this script (see the README's variable tables)")
    return notes


def parse_patterns(text: str) -> tuple:
    """'-1,-3;-2,-4' -> ((-1, -3), (-2, -4)); offsets are relative to the predicted token."""
    pats = tuple(tuple(int(o) for o in p.split(",")) for p in text.replace(" ", "").split(";") if p)
    if not pats or any(len(p) < 2 or not all(-64 <= o <= -1 for o in p) for p in pats):
        raise ValueError("expected ';'-separated patterns of >= 2 comma-separated offsets in [-64, -1]")
    return pats


def parse_alpha_grid(text: str) -> tuple:
    """'0,0.1,0.7' -> (0.0, 0.1, 0.7): the adaptive mixer's α values (NGRAM_ALPHA_GRID)."""
    return tuple(float(v) for v in text.replace(" ", "").split(",") if v)


def alpha_grid_error(text: str):
    """Why NGRAM_ALPHA_GRID is unusable, or None: the values must be ascending, in [0, 1], and start at 0
    (α = 0 is the model alone: the prior's NGRAM_PRIOR_ZERO mass, the guarantee against the model)."""
    try:
        grid = parse_alpha_grid(text)
    except ValueError:
        grid = ()
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] > 1.0 or any(b <= a for a, b in zip(grid, grid[1:])):
        return (f"NGRAM_ALPHA_GRID={text!r} must be >= 2 ascending comma-separated values in [0, 1], "
                "the first 0")
    return None


def recur_span(text: str, num_layers: int):
    """'a,b' -> (a, b): physical layers a..b run 1 + RECUR_PASSES times (depth recurrence); '' or 'off' -> None."""
    if text in ("", "off"):
        return None
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError("expected two layer indices 'a,b'") from None
    if not 0 <= a <= b < num_layers:
        raise ValueError(f"expected 0 <= a <= b < NUM_LAYERS={num_layers}")
    return a, b


def virtual_depth(num_layers: int, span, passes: int = 1) -> int:
    """Layers a forward pass runs: recur_span's layers a..b run 1 + passes times."""
    return num_layers + (passes * (span[1] - span[0] + 1) if span else 0)


def _parse(raw: str, f):
    kind = {"str": str, "int": int, "float": float, "bool": bool}[f.type]  # annotations are strings (__future__)
    lo, hi, choices = (f.metadata[k] for k in ("lo", "hi", "choices"))
    if not raw:
        raise ValueError(f"empty value; unset {env_name(f)} to use the default ({f.default!r})")
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError("expected 0/1 (or true/false)")
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        v = raw if kind is str else kind(raw)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(v):
        raise ValueError("expected a finite number")
    if choices is not None and v not in choices:
        raise ValueError(f"allowed values: {', '.join(map(str, choices))}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"allowed range: [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    return v


# ======== Data: challenge shards, the training token stream, the bits-per-byte table =================================
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 1024
DATA_HELP = ("Download the challenge data:  python data/cached_challenge_fineweb.py --variant sp1024 "
             "--train-shards 1\nor build shards offline:  python data/build_shards.py --docs docs.jsonl "
             "--tokenizer TOKENIZER.model --out DIR --val-docs N")


def shard_header(path) -> int:
    """Check one challenge shard's header (1024-byte int32 header, then uint16 tokens) against its exact file
    size without reading the tokens; return its token count."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the 1024-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a challenge shard (magic {header[0]}, version {header[1]})")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) "
                         f"but the file has {size} bytes (truncated or corrupted)")
    return n


def load_data_shard(path, max_tokens: int = -1) -> np.ndarray:
    """A shard's tokens (the first max_tokens of them when >= 0), its header checked first."""
    n = shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n if max_tokens < 0 else min(n, max_tokens), offset=SHARD_HEADER_BYTES)


def shard_files(data_path: str, split: str) -> list[str]:
    """DATA_PATH is one folder, taken literally: `data*` must not read two folders, nor `data[1]` none."""
    files = sorted(glob.glob(os.path.join(glob.escape(data_path), f"fineweb_{split}_*.bin")))
    if not files:
        raise FileNotFoundError(f"DATA_PATH={data_path}: no {split} shards (fineweb_{split}_*.bin) in this folder"
                                f"\n{DATA_HELP}")
    return files


def check_train_shards(files: list[str]) -> list:
    """[name, tokens] of each train shard, every header read before the first step (the stream reaches a bad
    one only hours in). A checkpoint keeps them: the stream's state is only a position, which other or shorter
    shards would continue on other data without a word."""
    facts = []
    for path in files:
        n = shard_header(path)
        if n == 0:
            raise ValueError(f"{path}: an empty train shard (0 tokens); remove it or rebuild the shards\n{DATA_HELP}")
        facts.append([os.path.basename(path), n])
    return facts


def load_validation_tokens(data_path: str, max_tokens: int, vocab_size: int) -> np.ndarray:
    toks = np.concatenate([load_data_shard(f) for f in shard_files(data_path, "val")])[:max_tokens or None]
    if toks.size < 2:
        raise ValueError(f"validation split in {data_path} has {toks.size} tokens; need at least 2")
    if int(toks.max()) >= vocab_size:
        raise ValueError(f"validation token id {int(toks.max())} >= VOCAB_SIZE={vocab_size}")
    return toks


class TokenStream:
    """Sequential tokens over the sorted train shards, wrapping around (and saying so); one shard in
    memory. (file_idx, pos, epoch) is its whole state, so a checkpoint resumes it exactly. No shard is empty
    (check_train_shards refuses one before the stream starts)."""

    def __init__(self, files: list[str], vocab_size: int, log=None):
        self.files = files
        self.vocab_size = vocab_size
        self.log = log
        self.file_idx = -1
        self.pos = 0
        self.epoch = 0
        self.tokens = np.zeros(0, np.uint16)

    def _load(self, file_idx: int, pos: int = 0):
        self.file_idx = file_idx
        self.pos = pos
        self.tokens = load_data_shard(self.files[file_idx])
        if self.tokens.size and int(self.tokens.max()) >= self.vocab_size:
            raise ValueError(f"{self.files[file_idx]}: token id >= VOCAB_SIZE={self.vocab_size}")

    def _next_file(self):
        if self.file_idx + 1 == len(self.files):
            self.epoch += 1
            if self.log:
                self.log(f"WARNING: train stream wrapped around: pass {self.epoch + 1} over the "
                         f"{len(self.files)} train shard(s) repeats data already trained on")
        self._load((self.file_idx + 1) % len(self.files))

    def state(self) -> dict:
        return dict(file_idx=self.file_idx, pos=self.pos, epoch=self.epoch)

    def restore(self, st: dict):
        if st["file_idx"] >= len(self.files):
            raise ValueError(f"checkpoint's train stream is at shard {st['file_idx']}, but only "
                             f"{len(self.files)} train shard(s) are in DATA_PATH")
        if st["file_idx"] >= 0:
            self._load(st["file_idx"], st["pos"])
        self.epoch = st["epoch"]

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.size:
                self._next_file()
                continue
            k = min(n, self.tokens.size - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            n -= k
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
        piece = sp.id_to_piece(i)  # a byte piece (<0x..>) counts 1 byte, never a space
        is_byte = sp.is_byte(i)
        boundary[i] = False
        space[i] = not is_byte and piece.startswith("\u2581")
        base[i] = 1 if is_byte else len(piece.removeprefix("\u2581").encode("utf-8"))
    return base, space, boundary


TOKENIZER_CHECK_TOKENS = 2**17  # read from the first validation shard
TOKENIZER_CHECK_DOCS = 32  # whole documents without <unk> among them, decoded and re-encoded


def check_tokenizer(sp, data_path: str, tokenizer_path: str) -> str:
    """A tokenizer that did not make the shards still yields a val_bpb, a wrong one (the byte counts are its
    pieces'). Decode whole validation documents and re-encode them: the shards' own tokenizer gives the same ids
    back. Documents holding <unk> are skipped (it does not round-trip); 90% must match. Returns the log line."""
    tokens = load_data_shard(shard_files(data_path, "val")[0], TOKENIZER_CHECK_TOKENS)
    starts = np.flatnonzero(tokens == BOS_ID)
    docs = [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]  # whole documents only
    docs = [d.tolist() for d in docs if d.size and (d != sp.unk_id()).all()][:TOKENIZER_CHECK_DOCS]
    if not docs:
        return "tokenizer_check: skipped (no whole validation document without <unk> in the first shard's start)"
    n = sp.vocab_size()
    same = sum(max(d) < n and sp.encode(sp.decode(d)) == d for d in docs)
    if same < 0.9 * len(docs):
        raise SetupError(f"TOKENIZER_PATH={tokenizer_path} did not make the shards in DATA_PATH={data_path}: only "
                         f"{same} of {len(docs)} validation documents re-encode to their own ids. Use the tokenizer "
                         "the shards were built with (or rebuild the shards with this one: data/build_shards.py)")
    return f"tokenizer_check: {same}/{len(docs)} validation documents re-encode to the same ids"


def target_bytes(prev: np.ndarray, tgt: np.ndarray, tables) -> np.ndarray:
    base, space, boundary = tables
    return base[tgt] + (space[tgt] & ~boundary[prev])


def load_tokenizer(path: str):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (TOKENIZER_PATH)\n{DATA_HELP}")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({e})") from None


# ======== Model pieces ===============================================================================================
def rms_norm(x):
    return mx.fast.rms_norm(x, None, 1e-6)


class HessianCapture:
    """GPTQ calibration: while `on`, every Linear (and the tied head, via `add`) sums XᵀX of its inputs in float32
    under its weight's name, so any Linear is covered and a looped layer sums over every pass. Only eager
    (uncompiled) forwards see it: compiled graphs were traced with it off."""
    on = False
    names = {}  # id(module) -> weight name
    sums = {}  # weight name -> mx.array [din, din]

    @classmethod
    def start(cls, model):
        cls.names = {id(m): f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, Linear)}
        cls.sums = {}
        cls.on = True

    @classmethod
    def add(cls, name: str, x):
        x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = x2.T @ x2
        cls.sums[name] = cls.sums[name] + h if name in cls.sums else h

    @classmethod
    def stop(cls) -> dict:
        cls.on = False
        out = cls.sums
        cls.sums = {}
        cls.names = {}
        return out


class Linear(nn.Module):
    """fp32 master weight; the matmul runs in the activations' dtype."""

    def __init__(self, din: int, dout: int, zero_init: bool = False):
        super().__init__()
        s = 1.0 / math.sqrt(din)
        self.weight = mx.zeros((dout, din)) if zero_init else mx.random.uniform(-s, s, (dout, din))

    def __call__(self, x):
        if HessianCapture.on and id(self) in HessianCapture.names:
            HessianCapture.add(HessianCapture.names[id(self)], x)
        return x @ self.weight.astype(x.dtype).T


class Attention(nn.Module):
    """Grouped-query attention: RMS-normed q/k, RoPE (on the first rope_dims of each head: partial
    RoPE leaves the rest position-free), a learned per-head query gain, optional XSA."""

    def __init__(self, dim, heads, kv_heads, rope_base, qk_gain, rope_dims=0, gate_scale=0.0):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.hd = dim // heads
        self.rope_base = rope_base
        self.rope_dims = rope_dims or self.hd
        self.c_q = Linear(dim, dim)
        self.c_k = Linear(dim, kv_heads * self.hd)
        self.c_v = Linear(dim, kv_heads * self.hd)
        self.proj = Linear(dim, dim, zero_init=True)
        self.q_gain = mx.full((heads,), qk_gain)
        if gate_scale:  # ATTN_GATE: zero-init, so every head starts at half its output (sigmoid(0))
            self.gate_w = mx.zeros((heads, GATE_WINDOW))
            self.gate_scale = gate_scale

    def __call__(self, x, xsa=False, mask="causal", ad=None):
        """mask: "causal", or doc_mask()'s boolean array; ad: per-document adapters (TTT_MODE=doc_lora)."""
        B, T, D = x.shape
        q, k, v = (lin(x) if ad is None else lin(x) + ad(slot, x)
                   for lin, slot in ((self.c_q, "q"), (self.c_k, "k"), (self.c_v, "v")))
        q, k, v = (t.reshape(B, T, h, self.hd).transpose(0, 2, 1, 3)
                   for t, h in ((q, self.heads), (k, self.kv_heads), (v, self.kv_heads)))
        q, k = (mx.fast.rope(rms_norm(t), self.rope_dims, traditional=False, base=self.rope_base, scale=1.0, offset=0)
                for t in (q, k))
        q = q * self.q_gain.astype(q.dtype)[:, None, None]
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.hd ** -0.5, mask=mask)
        if xsa:
            y = exclusive(y, v)
        if "gate_w" in self:
            y = y * attn_gate(x, self.gate_w, self.gate_scale)
        out = self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, D))
        return out if ad is None else out + ad("o", x)


GATE_WINDOW = 12  # the sp8192 records' small gates read the first 12 channels of their input


def attn_gate(x, w, scale: float):
    """The sparse attention-output gate (#1787/#1855): head h's output at t times sigmoid(scale w_h . x_t[:12]),
    x the attention's (normed) input; a per-head, per-token gate for 12 weights a head. [B, H, T, 1]."""
    g = mx.sigmoid(scale * (x[..., :GATE_WINDOW] @ w.astype(x.dtype).T))
    return g.transpose(0, 2, 1)[..., None]


def exclusive(y, v):
    """XSA: remove from each head's output y [B,H,T,D] its component along the position's own value v
    [B,Hkv,T,D] (broadcast over each GQA group), so attention must carry context, not the token itself."""
    B, H, T, D = y.shape
    vn = (v * mx.rsqrt(mx.sum(v * v, axis=-1, keepdims=True) + 1e-12))[:, :, None]
    y = y.reshape(B, v.shape[1], H // v.shape[1], T, D)
    return (y - mx.sum(y * vn, axis=-1, keepdims=True) * vn).reshape(B, H, T, D)


class MLP(nn.Module):
    """relu(u)^2, or leaky_relu(u, slope)^2 when slope > 0 (#549: keeps a gradient for u < 0)."""

    def __init__(self, dim, mult, slope=0.0):
        super().__init__()
        self.fc = Linear(dim, dim * mult)
        self.proj = Linear(dim * mult, dim, zero_init=True)
        self.slope = slope

    def __call__(self, x):
        h = nn.leaky_relu(self.fc(x), self.slope) if self.slope else nn.relu(self.fc(x))
        return self.proj(h * h)


_HASH_MULT = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646D)  # all odd: invertible mod 2^32


def hash_ids(cols: list, seed: int, size: int) -> mx.array:
    """Hash aligned int token arrays into [0, size); uint32 arithmetic wraps, so nothing can overflow."""
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
    """Gated hashed bigram/trigram features; `heads` hashes per order outvote one collision, gates start at
    sigmoid(-2). With orders=(2,), one head and an input projection it is the records' BigramHash."""

    def __init__(self, hash_size, dim, heads, out_dim, orders=(2, 3)):
        super().__init__()
        self.size = hash_size
        self.heads = heads
        self.orders = orders
        self.tables = [mx.random.normal((hash_size, dim)) * 0.02 for _ in orders]
        self.gates = mx.full((len(orders),), -2.0)
        self.proj = Linear(dim, out_dim, zero_init=True)

    def __call__(self, ids, dtype):
        T = ids.shape[1]
        out = 0.0
        for k, order in enumerate(self.orders):
            cols = [shift_right(ids, order - 1 - j) for j in range(order)]
            e = sum(self.tables[k][hash_ids(cols, 16 * k + h, self.size)] for h in range(self.heads))
            out = out + mx.sigmoid(self.gates[k]) / self.heads * e * history_mask(T, order - 1, e.dtype)
        return self.proj(out.astype(dtype))


class SkipGramHash(nn.Module):
    """Hashed non-adjacent token pairs as an additive logit bias; offsets count back from the predicted
    token (-1 is input token t). One narrow table per pattern, one shared zero-initialised projection."""

    def __init__(self, hash_size, dim, patterns, vocab):
        super().__init__()
        self.size = hash_size
        self.patterns = patterns
        self.tables = [mx.random.normal((hash_size, dim)) * 0.02 for _ in patterns]
        self.proj = Linear(dim, vocab, zero_init=True)

    def __call__(self, ids, dtype):
        T = ids.shape[1]
        out = 0.0
        for k, pat in enumerate(self.patterns):
            back = [-o - 1 for o in pat]
            e = self.tables[k][hash_ids([shift_right(ids, d) for d in back], 101 + k, self.size)]
            out = out + e * history_mask(T, max(back), e.dtype)
        return self.proj(out.astype(dtype))


BOS_ID = 1  # every document starts with BOS (CHALLENGE.md)


def smear(x, ids, w):
    """SmearGate (#162 form): x_t + g (x_{t-1} - x_t), g = sigmoid(w) per channel, with g = 0 where
    token t is BOS so no document reads the one before it (the leaky form flattered scores)."""
    g = mx.sigmoid(w).astype(x.dtype) * (ids != BOS_ID)[..., None].astype(x.dtype)
    return x + g * (mx.concatenate([mx.zeros_like(x[:, :1]), x[:, :-1]], axis=1) - x)


def doc_mask(ids):
    """[B, 1, T, T] boolean for ATTN_DOC_ISOLATED: position i sees j iff j <= i and no BOS lies in (j, i], i.e.
    both are in the same document of the row (segment id = count of BOS so far; #1530's varlen attention)."""
    seg = mx.cumsum((ids == BOS_ID).astype(mx.int32), axis=1)
    T = ids.shape[1]
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


class Adapters:
    """Per-document low-rank adapters a forward adds (TTT_MODE=doc_lora): row b of the batch is one document
    with its own A [r, in] and B [out, r]; delta = scale * x A^T B^T. Names: "<virtual layer>.<slot>", "head"."""

    def __init__(self, params: dict, scale: float, layer=None):
        self.params = params
        self.scale = scale
        self.at = layer

    def layer(self, i: int) -> "Adapters":
        return Adapters(self.params, self.scale, i)

    def __call__(self, slot: str, x):
        name = slot if self.at is None else f"{self.at}.{slot}"
        a = self.params[name + ".a"].astype(x.dtype)
        b = self.params[name + ".b"].astype(x.dtype)
        return (x @ a.swapaxes(1, 2)) @ b.swapaxes(1, 2) * self.scale


def smear_input(e, ids, w, lam):
    """SmearGate, the sp8192 records' form (#1667, BOS mask #1851): e_t + lam sigmoid(w . e_t[:12]) e_{t-1} on the
    raw embedding, the gate input-dependent (one scalar per token); 0 where token t is BOS."""
    g = mx.sigmoid(e[..., :GATE_WINDOW] @ w.astype(e.dtype).T) * (ids != BOS_ID)[..., None].astype(e.dtype)
    prev = mx.concatenate([mx.zeros_like(e[:, :1]), e[:, :-1]], axis=1)
    return e + lam.astype(e.dtype) * g * prev


class Block(nn.Module):
    """Pre-norm block, learned output scales and mix with x0. Parallel residuals (#1204): attention reads
    lane 0, the MLP lane 1, each writes both through learned weights (lane_r: keep, lane_p: write); parallel
    "sp8192" is the records' later form (two_lanes)."""

    def __init__(self, dim, heads, kv_heads, mlp_mult, rope_base, qk_gain, rope_dims=0, slope=0.0, parallel="",
                 gate_scale=0.0):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, rope_base, qk_gain, rope_dims, gate_scale)
        self.mlp = MLP(dim, mlp_mult, slope)
        self.attn_scale = mx.ones((dim,))
        self.mlp_scale = mx.ones((dim,))
        self.resid_mix = mx.stack([mx.ones((dim,)), mx.zeros((dim,))])
        self.form = parallel
        if parallel:  # r: 1.1 in the sp8192 form (#1530), sqrt(1.1) in #1204's
            self.lane_r = mx.full((2,), 1.1 if parallel == "sp8192" else math.sqrt(1.1))
            self.lane_p = mx.ones((2, 2))

    def __call__(self, lanes, x0, s=1.0, mlp=None, xsa=False, mask="causal", ad=None):
        """lanes: [x], or the parallel region's [lane0, lane1]; s: the LN-scale factor; mask, ad: Attention's."""
        mix = self.resid_mix.astype(x0.dtype)
        mlp = self.mlp if mlp is None else mlp
        if len(lanes) == 1:
            x = mix[0] * lanes[0] + mix[1] * x0
            x = x + self.attn_scale.astype(x.dtype) * self.attn(rms_norm(x) * s, xsa, mask, ad)
            return [x + self.mlp_scale.astype(x.dtype) * feed(mlp, rms_norm(x) * s, ad)]
        if self.form == "sp8192":
            return self.two_lanes(lanes, x0, s, mlp, xsa, mask, ad)
        r = self.lane_r.astype(x0.dtype)
        p = self.lane_p.astype(x0.dtype)
        a = self.attn_scale.astype(x0.dtype) * self.attn(rms_norm(mix[0] * lanes[0] + mix[1] * x0) * s, xsa, mask, ad)
        lanes = [r[0] * h + p[0, k] * a for k, h in enumerate(lanes)]
        m = self.mlp_scale.astype(x0.dtype) * feed(mlp, rms_norm(mix[0] * lanes[1] + mix[1] * x0) * s, ad)
        return [r[1] * h + p[1, k] * m for k, h in enumerate(lanes)]

    def two_lanes(self, lanes, x0, s, mlp, xsa, mask, ad):
        """The sp8192 form (#1530-#1855): attention reads lane 0 (mixed with x0), the MLP reads lane 1 as it came
        in (no resid_mix); both write both lanes at once: lane_k <- r_k lane_k + p_0k a + p_1k m."""
        mix = self.resid_mix.astype(x0.dtype)
        r = self.lane_r.astype(x0.dtype)
        p = self.lane_p.astype(x0.dtype)
        a = self.attn_scale.astype(x0.dtype) * self.attn(rms_norm(mix[0] * lanes[0] + mix[1] * x0) * s, xsa, mask, ad)
        m = self.mlp_scale.astype(x0.dtype) * feed(mlp, rms_norm(lanes[1]) * s, ad)
        return [r[k] * h + p[0, k] * a + p[1, k] * m for k, h in enumerate(lanes)]


def feed(mlp, n, ad):
    """The MLP, plus the per-document adapter from its input n (TTT_MODE=doc_lora's "MLP" slot, as #1530)."""
    return mlp(n) if ad is None else mlp(n) + ad("mlp", n)


# ======== Model ======================================================================================================
RECORD_BASE_FIELDS = ("smear_gate", "bigram_hash_size", "bigram_dim", "xsa_last_n", "rope_dims", "ln_scale",
                      "leaky_relu_slope", "parallel_start_layer", "recur_layers", "recur_untied_mlp",
                      "attn_doc_isolated", "smear_mode", "skip_gates", "recur_passes", "parallel_form", "attn_gate", "attn_gate_scale")
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings",
                "tied_embed_init_std", "logit_softcap", "rope_base", "qk_gain_init", "engram_lite_enabled",
                "engram_mode", "engram_hash_size", "engram_dim", "engram_heads", "skipgram_hash_size", "skipgram_dim",
                "skipgram_patterns") + RECORD_BASE_FIELDS


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild the network; stored in the artifact header. Fields: MODEL_FIELDS, typed as
    in Hyperparameters, the one source of defaults (from_hparams)."""
    __annotations__ = {n: Hyperparameters.__dataclass_fields__[n].type for n in MODEL_FIELDS}

    @classmethod
    def from_hparams(cls, hp: Hyperparameters) -> "ModelConfig":
        return cls(**{f.name: getattr(hp, f.name) for f in fields(cls)})


class GPT(nn.Module):
    """Baseline GPT: tied embeddings, U-Net skips across the block stack, tanh softcap."""

    def __init__(self, cfg: ModelConfig, dtype=mx.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.tok_emb.weight = mx.random.normal((cfg.vocab_size, d)) * cfg.tied_embed_init_std
        par = cfg.parallel_start_layer or cfg.num_layers
        gate = cfg.attn_gate_scale if cfg.attn_gate else 0.0
        self.blocks = [Block(d, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.rope_base, cfg.qk_gain_init,
                             cfg.rope_dims, cfg.leaky_relu_slope, cfg.parallel_form if i >= par else "", gate)
                       for i in range(cfg.num_layers)]
        self.span = recur_span(cfg.recur_layers, cfg.num_layers)
        if self.span and cfg.recur_untied_mlp:  # the second pass's own MLPs (attention stays shared)
            n = self.span[1] - self.span[0] + 1
            self.recur_mlps = [MLP(d, cfg.mlp_mult, cfg.leaky_relu_slope) for _ in range(n)]
        self.recur_on = True  # False: the plain order (RECUR_START_FRAC; each Compiled sets it for its graphs)
        n_virtual = len(self.virtual_layers())
        self.n_parallel = cfg.num_layers - par
        if n_virtual // 2:  # one row per U-Net skip, sized for the longer (recurrent) order
            self.skip_weights = mx.ones((n_virtual // 2, d))
        if n_virtual // 2 and cfg.skip_gates:  # sigmoid(0): the skip and the stream start mixed half and half
            self.skip_gates = mx.zeros((n_virtual // 2, d))
        if not cfg.tie_embeddings:
            self.lm_head = Linear(d, cfg.vocab_size, zero_init=True)
        if cfg.engram_lite_enabled:
            out = d if cfg.engram_mode == "input" else cfg.vocab_size
            self.engram = EngramLite(cfg.engram_hash_size, cfg.engram_dim, cfg.engram_heads, out)
        if cfg.skipgram_hash_size:
            self.skipgram = SkipGramHash(cfg.skipgram_hash_size, cfg.skipgram_dim,
                                         parse_patterns(cfg.skipgram_patterns), cfg.vocab_size)
        if cfg.bigram_hash_size:  # the records' BigramHash: EngramLite with order 2 only, 1 head
            self.bigram = EngramLite(cfg.bigram_hash_size, cfg.bigram_dim, 1, d, orders=(2,))
        if cfg.smear_gate and cfg.smear_mode == "input":  # lambda = 0: identity at init
            self.smear_gate_w = mx.zeros((1, GATE_WINDOW))
            self.smear_lambda = mx.zeros((1,))
        elif cfg.smear_gate:
            self.smear_gate = mx.zeros((d,))

    def virtual_layers(self) -> list:
        """(block, keyword arguments) per virtual layer, in order: layers a..b of RECUR_LAYERS run 1 + RECUR_PASSES
        times, [0..a-1] + [a..b] x (1 + passes) + [b+1..L-1] (#1204: one extra pass, the second pass with its own MLP
        copies when untied; the sp8192 records: two, all shared). LN scale and XSA go by virtual index."""
        cfg = self.cfg
        L = self.cfg.num_layers
        a, b = self.span if self.span and self.recur_on else (L, L - 1)
        order = list(range(a)) + list(range(a, b + 1)) * (1 + cfg.recur_passes) + list(range(b + 1, L))
        untied = "recur_mlps" in self and self.recur_on
        return [(self.blocks[j], dict(s=(i + 1) ** -0.5 if cfg.ln_scale else 1.0, xsa=i >= len(order) - cfg.xsa_last_n,
                                      mlp=self.recur_mlps[i - b - 1] if untied and b < i <= 2 * b - a + 1
                                      else None)) for i, j in enumerate(order)]

    def untie_copies(self) -> dict:
        """The second pass's MLPs as copies of the first's, for the delayed switch-on (#1204 copies at activation)."""
        a, b = self.span
        return {f"recur_mlps.{k}.{n}": p for k in range(b - a + 1)
                for n, p in tree_flatten(self.blocks[a + k].mlp.parameters())}

    def __call__(self, ids, ad=None):
        """Logits [B, T, V] in float32, softcapped; ad: per-document adapters (TTT_MODE=doc_lora)."""
        cfg = self.cfg
        mask = doc_mask(ids) if cfg.attn_doc_isolated else "causal"
        e = self.tok_emb(ids).astype(self.dtype)
        if cfg.engram_lite_enabled and cfg.engram_mode == "input":
            e = e + self.engram(ids, self.dtype)
        if cfg.bigram_hash_size:
            e = e + self.bigram(ids, self.dtype)
        if cfg.smear_gate and cfg.smear_mode == "input":
            x = rms_norm(smear_input(e, ids, self.smear_gate_w, self.smear_lambda))
        else:
            x = smear(rms_norm(e), ids, self.smear_gate) if cfg.smear_gate else rms_norm(e)
        x0 = x
        skips = []
        lanes = [x]
        layers = self.virtual_layers()
        n_enc = len(layers) // 2
        par_from = len(layers) - self.n_parallel
        for i, (block, kw) in enumerate(layers):
            lanes = lanes * 2 if i == par_from else lanes  # both lanes start as x
            if i >= n_enc and skips:  # decoder half: add encoder outputs in reverse order
                lanes = self.add_skip(lanes, skips.pop(), i - n_enc)
            lanes = block(lanes, x0, **kw, mask=mask, ad=None if ad is None else ad.layer(i))
            if i < n_enc:
                skips.append(lanes[0] if len(lanes) == 1 else (lanes[0] + lanes[1]) * 0.5)
        x = rms_norm(lanes[0] if len(lanes) == 1 else (lanes[0] + lanes[1]) * 0.5)
        if HessianCapture.on:  # the head's input: GPTQ of the tied embedding (#1394) or of lm_head
            HessianCapture.add("tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight", x)
        w = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = x @ w.astype(x.dtype).T
        if ad is not None:
            logits = logits + ad("head", x)
        if cfg.engram_lite_enabled and cfg.engram_mode == "logit":
            logits = logits + self.engram(ids, self.dtype)
        if cfg.skipgram_hash_size:
            logits = logits + self.skipgram(ids, self.dtype)
        logits = logits.astype(mx.float32)
        c = cfg.logit_softcap
        return c * mx.tanh(logits / c) if c > 0 else logits

    def add_skip(self, lanes: list, skip, k: int) -> list:
        """Decoder position k's U-Net skip, w_k skip: added, or with SKIP_GATES the records' lerp
        sigmoid(g_k) h + (1 - sigmoid(g_k)) w_k skip; into every lane (#1204), or lane 0 only (PARALLEL_FORM=sp8192)."""
        skip = self.skip_weights[k].astype(skip.dtype) * skip
        n = 1 if self.cfg.parallel_form == "sp8192" else len(lanes)
        if "skip_gates" not in self:
            return [h + skip for h in lanes[:n]] + lanes[n:]
        g = mx.sigmoid(self.skip_gates[k]).astype(skip.dtype)
        return [g * h + (1 - g) * skip for h in lanes[:n]] + lanes[n:]

    def token_nll(self, ids, targets, ad=None):
        """Per-target negative log-likelihood in nats, [B, T] float32."""
        logits = self(ids, ad)
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def token_stats(self, ids, targets, ad=None):
        """(NLL, entropy of the model's distribution), both [B, T] float32 nats."""
        logits = self(ids, ad)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ent = -mx.sum(mx.exp(logp) * logp, axis=-1)
        return -mx.take_along_axis(logp, targets[..., None], -1)[..., 0], ent


# ======== Optimizers: Muon for the blocks' matrices, Adam for everything else ========================================
def param_group(name: str, p: mx.array, proj_optimizer: dict | None = None) -> str:
    """'muon', or Adam's 'embed'/'table'/'head'/'scalar'; proj_optimizer: hashed projections' 'muon'|'adam'."""
    if name == "tok_emb.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if ".tables." in name:  # hashed n-gram embeddings
        return "table"
    if name in ("engram.proj.weight", "skipgram.proj.weight", "bigram.proj.weight"):
        return "muon" if (proj_optimizer or {}).get(name.split(".")[0], "muon") == "muon" else "head"
    if p.ndim == 2 and name.startswith(("blocks.", "recur_mlps.")) and name.endswith(".weight"):
        return "muon"
    return "scalar"


QUINTIC_NS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, as the sp8192 records use it): one (a, b, c) per iteration, each the optimal
# odd quintic for the singular values the previous ones leave, so 5 steps get closer to orthogonal than fixed ones.
POLAR_EXPRESS_NS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> list:
    """The (a, b, c) of each of `steps` iterations. Polar Express has five tuples: fewer steps use the first
    ones, more steps repeat the last (the tuple tuned for singular values already near 1)."""
    if kind == "quintic":
        return [QUINTIC_NS] * steps
    return [POLAR_EXPRESS_NS[min(i, len(POLAR_EXPRESS_NS) - 1)] for i in range(steps)]


def newton_schulz(g, steps: int, kind: str = "quintic"):
    """Approximately orthogonalise g (quintic Newton-Schulz iteration, as in Muon)."""
    tall = g.shape[0] > g.shape[1]  # iterate on the wide side: x @ x.T is then the smaller Gram matrix
    x = (g.T if tall else g) / (mx.sqrt(mx.sum(g * g)) + 1e-7)
    for a, b, c in ns_coefficients(kind, steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.T if tall else x


def normalize_rows(u):
    """MuonEq-R: every row (one output unit, norm over the inputs) scaled to unit L2 norm, in float32, so no
    unit's update dominates the Newton-Schulz input; a zero row stays zero."""
    norm = mx.sqrt(mx.sum(u * u, axis=1, keepdims=True))
    return u / mx.maximum(norm, 1e-7)


class Muon(optim.Optimizer):
    """Muon: Nesterov momentum orthogonalised by Newton-Schulz; momentum (a state entry) and decoupled
    weight decay compile into the step like the learning rate."""

    def __init__(self, learning_rate: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_normalize: bool = False, ns_coeffs: str = "quintic"):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self._maybe_schedule("momentum", momentum)
        self.backend_steps = backend_steps
        self.weight_decay = weight_decay
        self.row_normalize = row_normalize
        self.ns_coeffs = ns_coeffs

    def init_single(self, parameter: mx.array, state: dict):
        state["buf"] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        lr = self.learning_rate
        mom = self.state["momentum"]
        state["buf"] = buf = mom * state["buf"] + gradient
        update = gradient + mom * buf
        if self.row_normalize:
            update = normalize_rows(update.astype(mx.float32))
        ortho = newton_schulz(update.astype(mx.bfloat16 if _on_gpu() else mx.float32), self.backend_steps,
                              self.ns_coeffs).astype(mx.float32)
        scale = math.sqrt(max(1.0, parameter.shape[0] / parameter.shape[1]))
        return parameter * (1 - lr * self.weight_decay) - (lr * scale) * ortho


class Optimizers:
    """Muon, one bias-corrected Adam per other group, the gradient clip and the EMA, all compiled into the
    step. `state` is mutated in place, never rebound, so compiled graphs keep valid references."""

    def __init__(self, model: GPT, hp: Hyperparameters):
        self.hp = hp
        params = dict(tree_flatten(model.trainable_parameters()))
        proj = dict(engram=hp.engram_proj_optimizer, skipgram=hp.skipgram_proj_optimizer)
        self.group = {n: param_group(n, p, proj) for n, p in params.items()}
        self.base_lr = {"muon": hp.matrix_lr, "scalar": hp.scalar_lr, "head": hp.head_lr, "table": hp.tied_embed_lr,
                        "embed": hp.tied_embed_lr if model.cfg.tie_embeddings else hp.embed_lr}
        self.opts = {g: self.make(g) for g in sorted(set(self.group.values()))}
        self.ema: dict = {}
        self.reset(params)

    def make(self, g: str) -> optim.Optimizer:
        """Group g's optimizer. An Adam group with a weight decay (EMBED_WD: the embedding; ADAM_WD: the others)
        is AdamW: p <- p (1 - lr_t wd), then the Adam step; without one, plain Adam (the same arithmetic)."""
        hp = self.hp
        if g == "muon":
            return Muon(self.base_lr[g], hp.muon_momentum, hp.muon_backend_steps, hp.muon_weight_decay,
                        hp.muon_row_normalize, hp.muon_ns_coeffs)
        wd = hp.embed_wd if g == "embed" else hp.adam_wd
        if wd > 0:
            return optim.AdamW(self.base_lr[g], [hp.beta1, hp.beta2], hp.adam_eps, wd, bias_correction=True)
        return optim.Adam(self.base_lr[g], [hp.beta1, hp.beta2], hp.adam_eps, bias_correction=True)

    @property
    def state(self) -> list:
        return [o.state for o in self.opts.values()] + [self.ema]

    def split(self, tree: dict) -> dict:
        return {g: {n: v for n, v in tree.items() if self.group[n] == g} for g in self.opts}

    def reset(self, params: dict):
        """Fresh optimizer state (and EMA = params), in place."""
        for g, sub in self.split(params).items():
            self.opts[g].state.update({"step": mx.array(0, mx.uint64)}, **{n: {} for n in sub})
            self.opts[g].init(sub)
        self.ema.clear()
        if self.hp.ema_decay > 0:
            self.ema.update(params)

    def apply(self, params: dict, grads: dict, lr_mul, momentum) -> dict:
        """New parameters from flat {name: array} params and grads (inside the compiled step)."""
        if self.hp.grad_clip_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, self.hp.grad_clip_norm)
        out = {}
        gp = self.split(params)
        gg = self.split(grads)
        for g, o in self.opts.items():
            o.state["learning_rate"] = self.base_lr[g] * lr_mul
            if g == "muon":
                o.state["momentum"] = momentum
            out.update(o.apply_gradients(gg[g], gp[g]))
        if self.ema:  # t = the number of updates so far, this one included
            d = ema_decay_at(next(iter(self.opts.values())).step.astype(mx.float32), self.hp)
            for n, p in out.items():
                self.ema[n] = d * self.ema[n] + (1 - d) * p
        return out

    def slots(self) -> dict:
        """Every state array as '/'-joined path -> (container, key): checkpoints read and refill it in place."""
        return tree_slots(dict(opt=self.state[:-1], ema=self.ema))

    def load_arrays(self, flat: dict):
        """Refill every state array from a checkpoint, insisting on exactly the same paths."""
        slots = self.slots()
        if set(slots) != set(flat):
            diff = sorted(set(slots) ^ set(flat))[:4]
            raise ValueError(f"checkpoint state does not match this run's optimizer state (differs at {diff})")
        for path, (box, k) in slots.items():
            box[k] = mx.array(flat[path])


def tree_slots(tree, prefix: str = "") -> dict:
    out = {}
    for k in (list(tree) if isinstance(tree, dict) else range(len(tree))):
        path = f"{prefix}/{k}" if prefix else str(k)
        out.update(tree_slots(tree[k], path) if isinstance(tree[k], (dict, list, tuple)) else {path: (tree, k)})
    return out


def ema_decay_at(t, hp: Hyperparameters):
    """min(EMA_DECAY, (1+t)/(W+t)) after step t (an mx scalar in the compiled step): a constant d would leave
    d^t of the weight on the initialisation, mostly the start in a short run. EMA_WARMUP=0: constant d."""
    return hp.ema_decay if hp.ema_warmup <= 0 else mx.minimum(hp.ema_decay, (1 + t) / (hp.ema_warmup + t))


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def warmdown_steps(hp: Hyperparameters) -> float:
    """WARMDOWN_ITERS, but never more than the last half of the run: with the default 1,200 a 100-step smoke
    test would start at 8% of its LR and decay from step 1. Runs of >= 2 x WARMDOWN_ITERS are unchanged."""
    return min(hp.warmdown_iters, hp.iterations / 2)


def train_budget_ms(hp: Hyperparameters) -> float:
    """Training's share of MAX_WALLCLOCK_SECONDS (0 = no cap): less GPTQ_RESERVE_SECONDS when QUANT_METHOD=gptq,
    whose calibration reads training data and so must end inside the cap (RECORDS.md §7: #1060, #1394, #1868)."""
    cap_ms = hp.max_wallclock_seconds * 1000.0
    if cap_ms > 0 and hp.quant_method_resolved == "gptq":
        return max(cap_ms - hp.gptq_reserve_seconds * 1000.0, 1.0)
    return cap_ms


def lr_multiplier(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """The warmdown's multiplier, never below MIN_LR (the sp8192 records' floor: their last steps still learn)."""
    mul = warmdown_multiplier(step, elapsed_ms, hp)
    return max(mul, hp.min_lr) if hp.min_lr > 0 else mul


def warmdown_multiplier(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """Linear warmdown to 0 at ITERATIONS or the wall-clock cap: over WARMDOWN_FRAC of the run, else the
    last warmdown_steps() steps, timed at most half the budget (else a slow machine starts decayed)."""
    cap_ms = train_budget_ms(hp)
    if hp.warmdown_frac > 0:
        progress = max(step / max(hp.iterations, 1), elapsed_ms / cap_ms if cap_ms > 0 else 0.0)
        return min(1.0, max(1.0 - progress, 0.0) / hp.warmdown_frac)
    steps = warmdown_steps(hp)
    if steps <= 0:
        return 1.0
    mul = min(1.0, max(hp.iterations - step, 0) / steps)
    if cap_ms > 0 and step > 0:
        warmdown_ms = min(steps * elapsed_ms / step, 0.5 * cap_ms)
        mul = min(mul, max(cap_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))
    return mul


def describe_warmdown(hp: Hyperparameters) -> str:
    """The schedule the run will use, for the startup log, with the reason when WARMDOWN_ITERS was shortened."""
    floor = f", the multiplier never below {hp.min_lr:g} (MIN_LR)" if hp.min_lr > 0 else ""
    if hp.warmdown_frac > 0:
        return f"last {hp.warmdown_frac:g} of the run (WARMDOWN_FRAC){floor}"
    steps = warmdown_steps(hp)
    text = f"last {steps:g} steps"
    if steps < hp.warmdown_iters:
        text += (f" (WARMDOWN_ITERS={hp.warmdown_iters} is more than half of ITERATIONS={hp.iterations}: "
                 "shortened to the last half, so the run trains at its peak LR first)")
    if hp.max_wallclock_seconds > 0:
        text += f", or their time if the {hp.max_wallclock_seconds:g}s cap comes first (at most half of it)"
    return text + floor


def muon_momentum_at(step: int, hp: Hyperparameters) -> float:
    f = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - f) * hp.muon_momentum_warmup_start + f * hp.muon_momentum


# ======== Complementary training: a bigram model of the training data sets per-token loss weights ====================
def bigram_table(files: list[str], vocab: int, max_tokens: int) -> np.ndarray:
    """P(next | prev) with Laplace smoothing, [V, V] float32, from train shards only."""
    counts = np.zeros(vocab * vocab, np.int64)
    seen = 0
    for f in files:
        toks = load_data_shard(f)[: max_tokens - seen]
        for lo in range(0, max(toks.size - 1, 0), 1 << 24):  # bounded temporaries
            chunk = toks[lo:lo + (1 << 24) + 1].astype(np.int64)
            counts += np.bincount(chunk[:-1] * vocab + chunk[1:], minlength=vocab * vocab)
        seen += toks.size
        if seen >= max_tokens:
            break
    counts = counts.reshape(vocab, vocab) + 1.0
    return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)


def complement_weights(x, y, table, alpha: float, floor: float):
    """clip(1 - alpha * P_bigram(y | x), floor, 1), mean 1 over the (micro)batch; indexed [x, y], as a flat
    x * V + y overflows int32 past V = 46,340."""
    w = mx.clip(1.0 - alpha * table[x, y], floor, 1.0)
    return w / mx.mean(w)


# ======== Quantization, the artifact and checkpoints (no pickle: a JSON header plus raw arrays) ======================
ARTIFACT_MAGIC = b"PGMLXv1\0"
GPTQ_LITE_PCTS = (1.0, 0.99999, 0.9999, 0.9995, 0.999)  # 1.0 first: a tie keeps the plain max-abs clip
CONTROL_PATTERNS = ("resid_mix", "skip_weights", "attn_scale", "mlp_scale", "q_gain", "lane_")
CHECKPOINT_MAGIC = b"PGMLXck1"
_NP_DTYPES = {n: np.dtype(n) for n in ("int8", "float16", "float32", "int32", "int64", "uint32", "uint64")}
RECORD_BASE_OFF = {n: Hyperparameters.__dataclass_fields__[n].default for n in RECORD_BASE_FIELDS}  # headers omit these


class ArtifactError(ValueError):
    """The file is not a readable artifact of this script (truncated, corrupted, foreign)."""


def is_quantized(name: str, shape) -> bool:
    return len(shape) == 2 and not any(p in name for p in CONTROL_PATTERNS)


def quant_plan(hp: Hyperparameters):
    """Bits per tensor group; a plain int when all are QUANT_BITS (the default file stays byte-identical)."""
    plan = {g: getattr(hp, f"quant_bits_{g}") or hp.quant_bits for g in ("attn", "mlp", "embed")}
    return hp.quant_bits if set(plan.values()) == {hp.quant_bits} else dict(plan, other=hp.quant_bits)


def tensor_group(name: str) -> str:
    """attn: blocks' c_q/c_k/c_v/proj; mlp: their fc/proj and the untied recurrence MLPs'; embed: tok_emb, lm_head
    and the hashed `.tables.` (embeddings too; int8 in the records); other: hashed features' projections."""
    return ("attn" if ".attn." in name else "mlp" if ".mlp" in name or name.startswith("recur_mlps.") else
            "embed" if name in ("tok_emb.weight", "lm_head.weight") or ".tables." in name else "other")


def is_gate(name: str) -> bool:
    """A small gate matrix (its name says `gate`): int8 per row at the max-abs clip, never GPTQ'd (records §5)."""
    return "gate" in name


def tensor_bits(name: str, plan) -> int:
    """The group's bits (tensor_group; other: QUANT_BITS; 16 = fp16); gates 8."""
    if is_gate(name):
        return 8
    return plan if isinstance(plan, int) else plan[tensor_group(name)]


def quantize_rows(w: np.ndarray, bits: int, clip: np.ndarray | None = None):
    """Symmetric per-row quantization: ints in [-qmax, qmax], one fp16 scale per row; clip defaults to max |w|."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1) if clip is None else clip
    scale = np.maximum(amax / qmax, 2.0 ** -24).astype(np.float16)
    if not (np.isfinite(w).all() and np.isfinite(scale).all()):
        raise ArtifactError("cannot quantize non-finite weights (or a row beyond float16 scale range)")
    q = np.clip(np.round(w / scale.astype(np.float32)[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def gptq_lite_rows(w: np.ndarray, bits: int):
    """GPTQ-lite (#414): clip each row at its own |w| quantile, one percentile per matrix, the least-MSE one:
    clipping a few outliers buys a finer grid for all other weights. Needs no data. -> (q, scale, pct)"""
    tries = [(*quantize_rows(w, bits, clip.astype(np.float32)), pct)
             for pct, clip in zip(GPTQ_LITE_PCTS, np.quantile(np.abs(w), GPTQ_LITE_PCTS, axis=1))]
    return min(tries, key=lambda t: float(np.square(dequantize_rows(t[0], t[1]) - w).mean()))  # a tie: the first


def sdclip(w: np.ndarray, k: float) -> np.ndarray:
    """SDClip (#1394): each row's clip is k standard deviations of the row, so scale = k*std(row)/qmax. Larger k:
    a coarser grid, fewer distinct codes, fewer compressed bits (about b - log2 k + const per weight)."""
    return (k * w.astype(np.float64).std(axis=1)).astype(np.float32)


def weighted_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, H: np.ndarray) -> float:
    """tr(E H Eᵀ), E = w - dequantized: the summed squared output error over the calibration inputs (H = ΣXᵀX)."""
    e = w - dequantize_rows(q, scale)
    return float(np.sum((e @ H) * e))


def gptq_order(H: np.ndarray, damp: float):
    """GPTQ's preparation: dead inputs (H_jj = 0) get H_jj = 1, damping adds damp*mean(diag H), columns go by
    descending diag(H). -> (permutation, damped H in that order, float64, dead mask)"""
    H = H.astype(np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    perm = np.argsort(-np.diag(H), kind="stable")
    return perm, H[np.ix_(perm, perm)], dead


def upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with H⁻¹ = UᵀU, float32: Cholesky of H, the inverse from that factor, Cholesky again, on
    MLX's CPU stream (~1.3 n³ flops; numpy's inv + cholesky take ~3 n³, and ~3x longer here). MLX does not raise
    when H is not positive definite, so one random probe checks L Lᵀ = H (Cholesky is backward stable: a good
    factor's residual is ~n·eps·‖H‖, a failed one's ~‖H‖) -> LinAlgError."""
    H = H.astype(np.float32)
    L = mx.linalg.cholesky(mx.array(H), stream=mx.cpu)
    U = np.array(mx.linalg.cholesky(mx.linalg.cholesky_inv(L, stream=mx.cpu), upper=True, stream=mx.cpu))
    L = np.array(L)
    v = np.random.default_rng(0).standard_normal(H.shape[0]).astype(np.float32)
    residual = np.linalg.norm(L @ (L.T @ v) - H @ v)
    if not (np.isfinite(U).all() and residual <= 1e-3 * np.linalg.norm(H) * np.linalg.norm(v)):
        raise np.linalg.LinAlgError("the damped Hessian is not positive definite")
    return U


def gptq_rows(w: np.ndarray, bits: int, H: np.ndarray, scale: np.ndarray, block: int = 128,
              damp: float = 0.01) -> np.ndarray:
    """Full-Hessian GPTQ (Frantar et al.; RECORDS.md §7) at fixed per-row scales: quantize one column at a time and
    push its error (w - q*s)/U_jj onto the columns not yet quantized, U the upper Cholesky factor of H⁻¹; within a
    128-column block the push is immediate, to later blocks one matmul per block. -> q int8"""
    qmax = 2 ** (bits - 1) - 1
    perm, Hp, dead = gptq_order(H, damp)
    W = w.astype(np.float32).copy()
    W[:, dead] = 0.0
    W = W[:, perm]
    U = upper_cholesky_of_inverse(Hp)
    s = scale.astype(np.float32)
    n = W.shape[1]
    Q = np.zeros(W.shape, np.int8)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2]
        E1 = np.zeros_like(W1)
        for j in range(i2 - i1):
            q = np.clip(np.round(W1[:, j] / s), -qmax, qmax)
            Q[:, i1 + j] = q
            E1[:, j] = (W1[:, j] - q * s) / U[i1 + j, i1 + j]
            W1[:, j + 1:] -= np.outer(E1[:, j], U[i1 + j, i1 + j + 1:i2])
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, np.argsort(perm)]


LQER_A_LEVELS = (-2, 1)  # int2, one fp16 scale |A|max/1.5 per matrix (#1797)
LQER_B_LEVELS = (-8, 7)  # int4, one fp16 scale max|group|/7.5 per group of 64 values of B, flattened
LQER_GROUP = 64


def lqer_factors(E: np.ndarray, rank: int):
    """LQER (#1797): E ≈ A·B by truncated SVD, A = U_r diag(S_r) [rows, r], B = V_rᵀ [r, cols], stored small.
    -> (qa int8 [rows, r], sa fp16 [1], qb int8 [groups, 64], sb fp16 [groups])"""
    U, S, Vt = np.linalg.svd(E.astype(np.float64), full_matrices=False)
    r = min(rank, S.size)
    A = (U[:, :r] * S[:r]).astype(np.float32)
    b = Vt[:r].astype(np.float32).reshape(-1)
    sa = np.array([max(np.abs(A).max() / 1.5, 2.0 ** -24)], np.float16)
    qa = np.clip(np.round(A / sa.astype(np.float32)), *LQER_A_LEVELS).astype(np.int8)
    groups = np.concatenate([b, np.zeros(-b.size % LQER_GROUP, np.float32)]).reshape(-1, LQER_GROUP)
    sb = np.maximum(np.abs(groups).max(axis=1) / 7.5, 2.0 ** -24).astype(np.float16)
    qb = np.clip(np.round(groups / sb.astype(np.float32)[:, None]), *LQER_B_LEVELS).astype(np.int8)
    return qa, sa, qb, sb


def lqer_correction(qa, sa, qb, sb, cols: int) -> np.ndarray:
    """Â·B̂ [rows, cols], added to the dequantized matrix."""
    r = qa.shape[1]
    A = qa.astype(np.float32) * np.float32(sa.astype(np.float32)[0])
    B = (qb.astype(np.float32) * sb.astype(np.float32)[:, None]).reshape(-1)[:r * cols].reshape(r, cols)
    return A @ B


@dataclass
class QuantSpec:
    """How each matrix becomes ints beyond its bits: the method (rtn, gptq_lite, gptq), the clip rule (maxabs,
    sdclip with k per group), GPTQ's calibration Hessians (weight name -> ΣXᵀX), LQER's top-k and rank."""
    method: str = "rtn"
    clip: str = "maxabs"
    k: dict = field(default_factory=dict)
    hessians: dict = field(default_factory=dict)
    lqer_top_k: int = 0
    lqer_rank: int = 4

    @classmethod
    def from_hparams(cls, hp: Hyperparameters, hessians: dict | None = None) -> "QuantSpec":
        k = {g: getattr(hp, f"sdclip_k_{g}") for g in ("attn", "mlp", "embed")}
        return cls(hp.quant_method_resolved, hp.quant_clip, dict(k, other=hp.sdclip_k_mlp), hessians or {},
                   hp.lqer_top_k, hp.lqer_rank)

    def header(self) -> dict | None:
        """What the artifact header says about it; None for rtn/gptq_lite at the max-abs clip (older headers)."""
        if self.method != "gptq" and self.clip == "maxabs" and not self.lqer_top_k:
            return None
        out = dict(method=self.method, clip=self.clip, gptq_hessians=len(self.hessians))
        if self.clip == "sdclip":
            out["sdclip_k"] = self.k
        if self.lqer_top_k:
            out["lqer"] = dict(top_k=self.lqer_top_k, rank=self.lqer_rank)
        return out


def quantize_matrix(name: str, w: np.ndarray, bits: int, spec: QuantSpec):
    """One matrix -> (q, scale) by spec. GPTQ starts from the clip's scales (GPTQ-lite's at maxabs) and keeps
    whichever of its result and the plain rounding has the smaller output error on the calibration data, so it
    is never worse than them; a matrix without a Hessian (a lookup table) gets the plain rounding."""
    if is_gate(name):
        return quantize_rows(w, bits)
    if spec.clip == "sdclip":
        q, scale = quantize_rows(w, bits, sdclip(w, spec.k[tensor_group(name)]))
    elif spec.method in ("gptq_lite", "gptq"):
        q, scale = gptq_lite_rows(w, bits)[:2]
    else:
        q, scale = quantize_rows(w, bits)
    H = spec.hessians.get(name) if spec.method == "gptq" else None
    if H is None:
        return q, scale
    H = np.asarray(H, np.float32)
    try:
        q2 = gptq_rows(w, bits, H, scale)
    except np.linalg.LinAlgError:  # H not positive definite even after damping: keep the plain rounding
        return q, scale
    return (q2, scale) if weighted_error(w, q2, scale, H) <= weighted_error(w, q, scale, H) else (q, scale)


def lqer_arrays(flat: dict, packed: list, spec: QuantSpec) -> list:
    """The LQER factors of the top-k quantized matrices by ‖W - Ŵ‖_F (gates excluded)."""
    q = {n: a for n, role, a in packed if role == "q" and not is_gate(n)}
    scales = {n: a for n, role, a in packed if role == "scale"}
    errs = {n: flat[n] - dequantize_rows(q[n], scales[n]) for n in q}
    top = sorted(errs, key=lambda n: -float(np.linalg.norm(errs[n])))[:spec.lqer_top_k]
    out = []
    for n in sorted(top):
        qa, sa, qb, sb = lqer_factors(errs[n], spec.lqer_rank)
        out += [(n, "lqer_a", qa), (n, "lqer_a_scale", sa), (n, "lqer_b", qb), (n, "lqer_b_scale", sb)]
    return out


def fake_quant(w: mx.array, bits: int) -> mx.array:
    """QAT: forward = exactly dequantize_rows(quantize_rows(w)) (or the fp16 cast); gradient = identity."""
    if bits == 16:
        return mx.stop_gradient(w.astype(mx.float16).astype(mx.float32)) + (w - mx.stop_gradient(w))
    qmax = 2 ** (bits - 1) - 1
    amax = mx.max(mx.abs(w), axis=1, keepdims=True)
    scale = mx.maximum(amax / qmax, 2.0 ** -24).astype(mx.float16).astype(mx.float32)
    deq = mx.clip(mx.round(w / scale), -qmax, qmax) * scale
    return mx.stop_gradient(deq) + (w - mx.stop_gradient(w))


def pack_state(flat: dict, bits, gptq_lite: bool = False, spec: QuantSpec | None = None) -> list:
    """name -> float32 array  ==>  [(name, role, array)]: 2-D weights per row at tensor_bits (16: fp16), by spec
    (default: GPTQ-lite when gptq_lite, else plain rounding at the max-abs clip); LQER factors last."""
    spec = spec or QuantSpec(method="gptq_lite" if gptq_lite else "rtn")
    out = []
    for name in sorted(flat):
        w = np.asarray(flat[name], dtype=np.float32)
        if not np.isfinite(w).all():
            raise ArtifactError(f"weight {name} is non-finite (NaN/inf): training diverged (lower MATRIX_LR, "
                                "SCALAR_LR, TIED_EMBED_LR)")
        b = tensor_bits(name, bits) if is_quantized(name, w.shape) else 0
        if b == 16 and np.abs(w).max() > 65504:
            raise ArtifactError(f"weight {name} exceeds the float16 range: it cannot be kept as fp16")
        if b in (0, 16):
            out.append((name, "raw", w.astype(np.float16) if b else w))
        else:
            q, scale = quantize_matrix(name, w, b, spec)
            out += [(name, "q", q), (name, "scale", scale)]
    if spec.lqer_top_k:
        out += lqer_arrays({n: np.asarray(a, np.float32) for n, a in flat.items()}, out, spec)
    return out


# Compressed bits per value of a b-bit per-row quantized Gaussian matrix (GPTQ-lite, lzma; zstd-22 is within
# 2%), measured on 1536 x 512 rows: the stand-in tests/bench_artifact_size.py uses for trained weights.
COMPRESSED_BITS = {5: 4.47, 6: 5.47, 7: 6.46, 8: 7.46, 16: 16.0}
# SDClip: compressed bits per value above the entropy of a Gaussian row's codes (sdclip_entropy), the most over
# 1536 x 512 Gaussian rows at int5-8 and k 8-20, per codec (auto: its smallest); Student-t(5) and uniform rows
# compress below the Gaussian entropy (README "Artifact size and quantization").
SDCLIP_OVERHEAD_BITS = {"zstd": 0.11, "lzma": 0.20, "brotli": 0.08, "auto": 0.08}
# How far over the cap an SDClip estimate may be before a recipe is refused: the real artifacts at the full
# shapes were 4% (zstd) to 10% (brotli) under it; the sp8192 records' shape estimates 3.3% over with brotli.
SDCLIP_ESTIMATE_SLACK = 0.05


def sdclip_entropy(bits: int, k: float) -> float:
    """Entropy (bits per value) of the codes of a Gaussian row under SDClip: a grid step of k/qmax standard
    deviations, everything beyond ±qmax steps clipped onto the end codes."""
    qmax = 2 ** (bits - 1) - 1
    step = k / qmax
    edges = np.array([math.erf((i + 0.5) * step / math.sqrt(2)) for i in range(-qmax, qmax)]) * 0.5 + 0.5
    p = np.diff(np.concatenate([[0.0], edges, [1.0]]))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def estimate_model_bytes(model, plan, spec: QuantSpec | None = None, codec: str = "zstd") -> int:
    """The artifact's model bytes before training, from the shapes alone (nothing is evaluated): at the max-abs
    clip within ~3% of bench_artifact_size's Gaussian stand-ins, which are pessimistic for trained weights; under
    SDClip the Gaussian codes' entropy plus the codec's SDCLIP_OVERHEAD_BITS; LQER factors at a byte a value."""
    sd = spec is not None and spec.clip == "sdclip"
    bits = 0.0
    sizes = []
    for name, p in tree_flatten(model.parameters()):
        if not is_quantized(name, p.shape):
            bits += 32 * p.size
            continue
        b = tensor_bits(name, plan)
        if b == 16:
            bits += 16 * p.size
            continue
        if sd and not is_gate(name):
            per = sdclip_entropy(b, spec.k[tensor_group(name)]) + SDCLIP_OVERHEAD_BITS[codec]
        else:
            per = COMPRESSED_BITS[b]
        bits += p.size * per + 16 * p.shape[0]
        sizes.append(p.shape)
    if spec is not None and spec.lqer_top_k:  # the largest matrices stand in for the worst-quantized ones
        for rows, cols in sorted(sizes, key=lambda s: -s[0] * s[1])[:spec.lqer_top_k]:
            r = min(spec.lqer_rank, rows, cols)
            bits += 8 * r * (rows + cols) + 16 * (1 + math.ceil(r * cols / LQER_GROUP))
    return int(bits / 8)


def atomic_write(path: str, data: bytes):
    """Write to a temp file beside `path`, then rename: a reader never sees half a file, the old
    file stays until the new one is complete, and no temp file survives a failure."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def byte_shuffle(data: bytes) -> bytes:
    """All even bytes, then all odd ones (a trailing odd byte stays last): the high and low bytes of fp16 values
    and of neighbouring int8 codes land in separate runs, which brotli models better (#1089)."""
    a = np.frombuffer(data, np.uint8)
    m = a.size - a.size % 2
    return a[0:m:2].tobytes() + a[1:m:2].tobytes() + a[m:].tobytes()


def byte_unshuffle(data: bytes) -> bytes:
    a = np.frombuffer(data, np.uint8)
    m = a.size - a.size % 2
    out = np.empty_like(a)
    out[0:m:2] = a[:m // 2]
    out[1:m:2] = a[m // 2:m]
    out[m:] = a[m:]
    return out.tobytes()


def compress_all(payload: bytes, magic: bytes, level: int, codec: str) -> list:
    """The payload under codec (auto: every codec), each file behind its magic: zstd magic, xz ...L, brotli
    (2-byte shuffle, quality 11, window 2^24) ...B followed by the payload's CRC-32."""
    import zstandard
    files = []
    if codec in ("zstd", "auto"):
        files.append(magic + zstandard.ZstdCompressor(level=level, write_checksum=True).compress(payload))
    if codec in ("lzma", "auto"):
        files.append(magic[:7] + b"L" + lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    if codec in ("brotli", "auto"):
        import brotli
        crc = struct.pack("<I", zlib.crc32(payload))  # brotli has no checksum of its own
        files.append(magic[:7] + b"B" + crc + brotli.compress(byte_shuffle(payload), quality=11, lgwin=24))
    return files


def write_container(path: str, magic: bytes, header: dict, arrays: list, level: int, codec: str = "zstd") -> int:
    """magic + zstd|xz|brotli(u32 header length, JSON header, raw LE arrays) -> bytes; auto: the smallest."""
    table = []
    chunks = []
    off = 0
    for name, role, arr in arrays:
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        table.append(dict(name=name, role=role, dtype=str(arr.dtype.name), shape=list(arr.shape),
                          offset=off, nbytes=arr.nbytes))
        chunks.append(arr.tobytes())
        off += arr.nbytes
    hjson = json.dumps(dict(header, tensors=table, blob_bytes=off)).encode()
    payload = struct.pack("<I", len(hjson)) + hjson + b"".join(chunks)
    data = min(compress_all(payload, magic, level, codec), key=len)
    atomic_write(path, data)
    return len(data)


def decompress_payload(path: str, body: bytes, codec: str) -> bytes:
    """The payload behind the magic; ArtifactError unless the stream is intact, complete and alone."""
    import zstandard
    if codec == "brotli":
        import brotli
        dec = brotli.Decompressor()
        try:
            out = byte_unshuffle(dec.process(body[4:]))
        except brotli.error as e:
            raise ArtifactError(f"{path}: compressed payload is truncated or corrupted ({e})") from None
        if not dec.is_finished():
            raise ArtifactError(f"{path}: compressed payload is truncated or corrupted (stream incomplete)")
        if body[:4] != struct.pack("<I", zlib.crc32(out)):
            raise ArtifactError(f"{path}: compressed payload is corrupted (CRC-32 mismatch)")
        return out
    dec = zstandard.ZstdDecompressor().decompressobj() if codec == "zstd" else lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        payload = dec.decompress(body)
    except (zstandard.ZstdError, lzma.LZMAError) as e:
        raise ArtifactError(f"{path}: compressed payload is truncated or corrupted ({e})") from None
    if not dec.eof:
        raise ArtifactError(f"{path}: compressed payload is truncated or corrupted (frame incomplete)")
    if dec.unused_data:
        raise ArtifactError(f"{path}: {len(dec.unused_data)} unexpected bytes after the compressed payload")
    return payload


def read_container(path: str, magic: bytes, what: str):
    """(header, {(name, role): array}); raises ArtifactError for anything but an intact file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    codecs = {magic: "zstd", magic[:7] + b"L": "lzma", magic[:7] + b"B": "brotli"}
    codec = codecs.get(data[:len(magic)])
    if codec is None:
        raise ArtifactError(f"{path}: not a parameter-golf-mlx {what} (bad magic bytes)")
    payload = decompress_payload(path, data[len(magic):], codec)
    try:
        (hlen,) = struct.unpack_from("<I", payload, 0)
        header = json.loads(payload[4:4 + hlen].decode())
        blob = memoryview(payload)[4 + hlen:]
        if header.get("format") != "parameter-golf-mlx" or header.get("version") != 1:
            raise ArtifactError(f"{path}: unknown format/version {header.get('format')}/{header.get('version')}")
        header["codec"] = codec
        if len(blob) != header["blob_bytes"]:
            raise ArtifactError(f"{path}: blob has {len(blob)} bytes, header says {header['blob_bytes']}")
        arrays = {}
        for t in header["tensors"]:
            dt = np.dtype(_NP_DTYPES[t["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in t["shape"])
            off = int(t["offset"])
            nb = int(t["nbytes"])
            if nb != int(np.prod(shape)) * dt.itemsize or off < 0 or off + nb > len(blob):
                raise ArtifactError(f"{path}: tensor {t['name']} has inconsistent size/offset")
            a = np.frombuffer(blob[off:off + nb], dtype=dt).reshape(shape)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ArtifactError(f"{path}: tensor {t['name']} holds non-finite values (NaN/inf)")
            arrays[(t["name"], t["role"])] = a
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: malformed {what} header ({type(e).__name__}: {e})") from None
    return header, arrays


def collect_hessians(model: GPT, stream: TokenStream, n_tokens: int, seq_len: int, batch_tokens: int) -> dict:
    """GPTQ's calibration: H = ΣXᵀX (float32) of every Linear's inputs and the head's (final-norm outputs) over
    n_tokens tokens of `stream`, forwarded eagerly in batches of batch_tokens. -> {weight name: numpy [din, din]}"""
    n_seqs = n_tokens // seq_len
    per = max(1, batch_tokens // seq_len)
    HessianCapture.start(model)
    try:
        done = 0
        while done < n_seqs:
            b = min(per, n_seqs - done)
            x = stream.take(b * seq_len).astype(np.int32).reshape(b, seq_len)
            model(mx.array(x))  # the logits are not needed: evaluating the sums runs the forward
            mx.eval(list(HessianCapture.sums.values()))
            done += b
    finally:
        sums = HessianCapture.stop()
    return {n: np.array(h) for n, h in sums.items()}


def write_artifact(path: str, flat: dict, cfg: ModelConfig, bits, meta: dict | None = None,
                   gptq_lite: bool = False, codec: str = "zstd", spec: QuantSpec | None = None,
                   timings: dict | None = None) -> int:
    """Quantize (bits: int or quant_plan; spec: how, else GPTQ-lite or plain rounding), compress (codec; zstd level
    22), write atomically -> bytes; timings (if given) gets quantize_s and compress_s. Record-base fields at their
    off values stay out of the header, so baseline artifacts stay byte-identical with older ones."""
    spec = spec or QuantSpec(method="gptq_lite" if gptq_lite else "rtn")
    config = {k: v for k, v in asdict(cfg).items() if k not in RECORD_BASE_OFF or RECORD_BASE_OFF[k] != v}
    header = dict(format="parameter-golf-mlx", version=1, quant_bits=bits, config=config, meta=meta or {})
    if spec.method == "gptq_lite":
        header["gptq_lite"] = list(GPTQ_LITE_PCTS)
    if spec.header():
        header["quant"] = spec.header()
    t0 = time.perf_counter()
    arrays = pack_state(flat, bits, spec=spec)
    t1 = time.perf_counter()
    n = write_container(path, ARTIFACT_MAGIC, header, arrays, 22, codec)
    if timings is not None:
        timings.update(quantize_s=t1 - t0, compress_s=time.perf_counter() - t1)
    return n


def read_artifact(path: str):
    """Returns (ModelConfig, {name: float32 array}, header). Never runs code from the file."""
    header, arrays = read_container(path, ARTIFACT_MAGIC, "artifact")
    try:
        cfg = ModelConfig(**{**RECORD_BASE_OFF, **header["config"]})
        flat = {name: a.astype(np.float32) if role == "raw" else dequantize_rows(a, arrays[(name, "scale")])
                for (name, role), a in arrays.items() if role in ("raw", "q")}
        for (name, role), qa in arrays.items():
            if role == "lqer_a":
                flat[name] = flat[name] + lqer_correction(qa, arrays[(name, "lqer_a_scale")], arrays[(name, "lqer_b")],
                                                          arrays[(name, "lqer_b_scale")], flat[name].shape[1])
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed artifact header ({type(e).__name__}: {e})") from None
    return cfg, flat, header


def flat_numpy(model) -> dict:
    return {n: np.array(p.astype(mx.float32)) for n, p in tree_flatten(model.parameters())}


RESUME_FREE = ("run_id", "out_dir", "resume_from", "resume_override", "checkpoint_every", "val_loss_every",
               "train_log_every", "strict_env", "data_path", "tokenizer_path", "eval_token_nll_path", "dist_backend")
RESUME_MUST_MATCH = ("engram_proj_optimizer", "skipgram_proj_optimizer", "train_seq_len", "quant_bits",
                     "quant_bits_attn", "quant_bits_mlp", "quant_bits_embed", "qat_start_frac", "recur_start_frac")


def write_checkpoint(path: str, model: GPT, opt: Optimizers, meta: dict) -> int:
    """The whole training state: float32 weights, optimizer state and EMA, plus `meta` (step, train
    time, data position, QAT state, hyperparameters). zstd level 3: it is written often."""
    arrays = [(n, "param", a) for n, a in flat_numpy(model).items()]
    arrays += [(n, "state", np.array(box[k])) for n, (box, k) in opt.slots().items()]
    header = dict(format="parameter-golf-mlx", version=1, kind="checkpoint", config=asdict(model.cfg), meta=meta)
    return write_container(path, CHECKPOINT_MAGIC, header, arrays, level=3)


def checkpoint_header(path: str) -> dict:
    """A checkpoint's JSON header alone (its settings, step), without decompressing the arrays."""
    import zstandard
    try:
        with open(path, "rb") as f:
            if f.read(len(CHECKPOINT_MAGIC)) != CHECKPOINT_MAGIC:
                raise ConfigError(f"RESUME_FROM={path} is not a checkpoint of this script (bad magic bytes)")
            reader = zstandard.ZstdDecompressor().stream_reader(f)
            (hlen,) = struct.unpack("<I", reader.read(4))
            header = json.loads(reader.read(hlen).decode())
    except OSError as e:
        raise ConfigError(f"RESUME_FROM={path} is not a readable file ({e.strerror or e})") from None
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"RESUME_FROM={path}: not an intact checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or "hparams" not in header.get("meta", {}):
        raise ConfigError(f"RESUME_FROM={path}: its header holds no settings (not a checkpoint of this script)")
    return header


def read_checkpoint(path: str, hp: Hyperparameters):
    """(meta, params, optimizer state), refusing a checkpoint whose EMA state this run cannot continue."""
    header, arrays = read_container(path, CHECKPOINT_MAGIC, "checkpoint")
    saved = header["meta"]["hparams"]  # its shape and RESUME_MUST_MATCH already match (Hyperparameters.resumed)
    if (saved["ema_decay"] > 0) != (hp.ema_decay > 0):
        raise ConfigError(f"RESUME_FROM={path}: EMA_DECAY must be {'> 0' if saved['ema_decay'] > 0 else '0'} "
                          "as in the checkpoint (the EMA is part of the saved state)")
    params, state = ({n: a for (n, role), a in arrays.items() if role == want} for want in ("param", "state"))
    return header["meta"], params, state


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


# ======== Evaluation: exact val_bpb over the validation split, streamed in batches ===================================
def eval_windows(n_tgt: int, seq_len: int, stride: int):
    """(window starts, first scored offset in each) over targets 1..n_tgt: each target scored once, by the
    first window reaching it; the last window ends at the final target. stride == L: standard eval."""
    L = seq_len
    if not 1 <= stride <= L:
        raise ValueError(f"eval stride {stride} must be in [1, window length {L}] (EVAL_STRIDE)")
    if n_tgt <= L:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    starts = np.arange(0, n_tgt - L + 1, stride, dtype=np.int64)
    if starts[-1] + L < n_tgt:
        starts = np.append(starts, n_tgt - L)
    covered = np.concatenate([[0], starts[:-1] + L])  # targets already scored before each window
    return starts, covered - starts


def evaluate(fn, tokens: np.ndarray, seq_len: int, batch_seqs: int, tables, stride: int = 0,
             mixer=None, log=None, label="val", group=None, ttt: "TestTimeTrainer | None" = None):
    """Score every target once, in order, through `fn` (NLL, or (NLL, entropy)) in one compiled batch shape,
    optionally mixed with the n-gram cache; with `ttt`, each scored chunk is then trained on (C3). A `group`
    splits each chunk's batches (no TTT: one chunk) and gathers them in order, so the mixer and TTT see one
    process's stream. Returns (val_loss, val_bpb, per-target NLL in nats, float32)."""
    n_tgt = tokens.size - 1
    L = seq_len
    starts, offsets = eval_windows(n_tgt, L, stride or L)
    per_chunk = ttt.per_chunk if ttt else starts.size
    batch_seqs = min(batch_seqs, starts.size, per_chunk)
    chunks = [[(lo, min(lo + batch_seqs, c + per_chunk, starts.size)) for lo in range(c, min(c + per_chunk,
               starts.size), batch_seqs)] for c in range(0, starts.size, per_chunk)]
    W = 1 if group is None else group.size()
    mine = [[ch[i] for i in np.array_split(np.arange(len(ch)), W)[group.rank() if W > 1 else 0]] for ch in chunks]
    scores = model_scores(fn, tokens, starts, offsets, L, batch_seqs, [b for m in mine for b in m], log, label)
    nll_out = np.empty(n_tgt, np.float32)
    done = 0
    for c, (ch, m) in enumerate(zip(chunks, mine)):
        batches = (next(scores) for _ in m)  # lazy: scored after the last train()
        a = ch[0][0]
        b = ch[-1][1]
        if W > 1:
            batches = gathered_scores(batches, starts[a:b], offsets[a:b], n_tgt, L, batch_seqs, group,
                                      mixer is not None)
        for nll, ent in batches:
            if mixer is not None:
                nll = mixer.nll(tokens, done + 1, -nll, ent if ent is not None else mx.zeros_like(nll))
            nll = np.array(nll)
            nll_out[done:done + nll.size] = nll
            done += nll.size
        if ttt and c + 1 < len(chunks):  # chunk scored and recorded: now train on it
            ttt.train(tokens, int(starts[a] + offsets[a]), done, c, len(chunks))
    if done != n_tgt:  # a bug, never a number to report
        raise RuntimeError(f"evaluation scored {done} of {n_tgt} targets")
    return summarize_nll(nll_out, tokens, tables)


def model_scores(fn, tokens, starts, offsets, L: int, batch_seqs: int, bounds, log, label):
    """Lazily yield the model's (NLL, entropy or None) at the scored positions of each batch, in order."""
    n_tgt = tokens.size - 1
    pos = np.arange(L)
    t0 = last_print = time.perf_counter()
    for i, (lo, hi) in enumerate(bounds):
        st = starts[lo:hi]
        off = offsets[lo:hi]
        idx = np.minimum(st[:, None] + pos, n_tgt - 1)  # only a split shorter than L is clipped
        keep = (pos >= off[:, None]) & (st[:, None] + pos < n_tgt)
        x, y = np.zeros((2, batch_seqs, L), np.int32)
        x[:st.size] = tokens[idx]
        y[:st.size] = tokens[idx + 1]
        out = fn(mx.array(x), mx.array(y))
        nll, ent = out if isinstance(out, tuple) else (out, None)
        flat = mx.array(np.flatnonzero(keep).astype(np.int32))  # scored positions, in target order
        yield mx.take(nll.reshape(-1), flat), None if ent is None else mx.take(ent.reshape(-1), flat)
        if log and time.perf_counter() - last_print > 30 and i + 1 < len(bounds):
            last_print = time.perf_counter()
            n = len(bounds)
            log(f"{label}_progress: {i + 1}/{n} batches eta:{(last_print - t0) / (i + 1) * (n - i - 1):.0f}s")


def gathered_scores(mine, starts, offsets, n_tgt: int, L: int, batch_seqs: int, group, need_ent: bool):
    """Data parallelism: `mine` scores this rank's share of the batches (batch_seqs-wide from starts[0], e.g.
    one TTT chunk's); one all_gather rebuilds all, in order."""
    share = np.array_split(np.add.reduceat(np.minimum(L, n_tgt - starts) - offsets,  # scored targets per batch
                                           np.arange(0, starts.size, batch_seqs)), group.size())
    rows = []
    width = max(int(c.sum()) for c in share)
    for nll, ent in mine:
        rows.append(mx.stack([nll, mx.zeros_like(nll) if ent is None else ent])[:1 + need_ent])
        mx.eval(rows[-1])
    mine = mx.concatenate(rows, axis=1) if rows else mx.zeros((1 + need_ent, 0))
    allr = mx.distributed.all_gather(mx.pad(mine, [(0, 0), (0, width - mine.shape[1])])[None], group=group)
    for r, c in enumerate(share):
        for lo, n in zip(np.cumsum(c) - c, c):
            yield allr[r, 0, lo:lo + n], allr[r, 1, lo:lo + n] if need_ent else None


def summarize_nll(nll: np.ndarray, tokens: np.ndarray, tables):
    """(mean NLL in nats, bits per byte, nll) over exactly the targets tokens[1:len(nll)+1]."""
    n = nll.size
    total_nll = float(nll.astype(np.float64).sum())
    total_bytes = int(target_bytes(tokens[:n], tokens[1:n + 1], tables).sum())
    return total_nll / n, total_nll / math.log(2) / max(total_bytes, 1), nll


TTT_TARGET_KEYS = {"q": r"\.attn\.c_q\.", "k": r"\.attn\.c_k\.", "v": r"\.attn\.c_v\.", "o": r"\.attn\.proj\.",
                   "up": r"(\.mlp\.|^recur_mlps\.\d+\.)fc\.", "down": r"(\.mlp\.|^recur_mlps\.\d+\.)proj\.",
                   "head": r"^lm_head\.weight$"}  # regexes over parameter names; up/down: RECUR_UNTIED_MLP's too


class TestTimeTrainer:
    """Score-first test-time training (C3): train() runs only on a chunk already scored and recorded. 'full':
    SGD momentum 0.9 (#461); 'lora': rank-r W + B A, Adam, B = 0. close() restores the weights."""

    def __init__(self, model: GPT, hp: Hyperparameters, seq_len: int, stride: int, group=None):
        self.model = model
        self.hp = hp
        self.L = seq_len
        self.group = group
        self.per_chunk = max(1, hp.ttt_chunk // stride)  # windows scored between two training rounds
        self.rows = min(hp.ttt_batch_seqs, -(-(seq_len + (self.per_chunk - 1) * stride) // seq_len))
        self.base = dict(tree_flatten(model.trainable_parameters()))
        keys = hp.ttt_targets.split(",")  # all: every parameter (full), every block matrix and the head (lora)
        pat = [TTT_TARGET_KEYS[k] if k != "head" or "lm_head.weight" in self.base else r"^tok_emb\.weight$"
               for k in (TTT_TARGET_KEYS if "all" in keys else keys)]  # head: the shared table when tied
        self.names = sorted(n for n in self.base if any(re.search(p, n) for p in pat)
                            or "all" in keys and hp.ttt_mode == "full")
        self.init = {n: self.base[n] for n in self.names}
        if hp.ttt_mode == "lora":
            shapes = [(n, *self.base[n].shape) for n in self.names]
            self.init = dict([(n + ".a", mx.random.uniform(-1, 1, (hp.ttt_rank, din), key=mx.random.key(hp.seed + i))
                               / math.sqrt(din)) for i, (n, _, din) in enumerate(shapes)]
                             + [(n + ".b", mx.zeros((dout, hp.ttt_rank))) for n, dout, _ in shapes])
        self.opt = optim.SGD(hp.ttt_lr, momentum=0.9) if hp.ttt_mode == "full" else optim.Adam(
            hp.ttt_lr, [hp.beta1, hp.beta2], hp.adam_eps, bias_correction=True)
        self.params = dict(self.init)
        self.state = [self.params, self.opt.state, self.base]  # the compiled step's inputs and outputs

    def weights(self, p: dict) -> dict:
        return p if self.hp.ttt_mode == "full" else {n: self.base[n] + p[n + ".b"] @ p[n + ".a"] for n in self.names}

    def step(self, x, y, mask, lr):
        """One optimizer step on already-scored tokens; mask marks the targets that count."""
        loss, grads = self.grad(x, y, mask, mx.maximum(mask.sum(), 1.0))
        self.update(grads, lr)
        return loss

    def dp_step(self, grad, update, x, y, mask, lr):
        """step() over W ranks: each takes 1/W of the rows (padded with masked ones), the gradients of the
        step's loss, all-reduced, then the same clip and update everywhere."""
        W = self.group.size()
        r = self.group.rank()
        k = -(-x.shape[0] // W)
        x, y, m = (mx.pad(a, [(0, k * W - a.shape[0]), (0, 0)])[r * k:(r + 1) * k] for a in (x, y, mask))
        loss, grads = grad(x, y, m, mx.maximum(mask.sum(), 1.0) / W)  # averaged below: W x the 1/W share
        update(dict(zip(grads, nn.average_gradients(list(grads.values()), self.group))), lr)  # keys hold dots
        return loss

    def grad(self, x, y, mask, denom):
        def loss_fn(p):
            self.model.update(tree_unflatten(list(self.weights(p).items())))
            return (self.model.token_nll(x, y) * mask).sum() / denom
        return mx.value_and_grad(loss_fn)(self.params)

    def update(self, grads, lr):
        clip = self.hp.ttt_grad_clip
        self.opt.state["learning_rate"] = lr
        self.params.update(self.opt.apply_gradients(optim.clip_grad_norm(grads, clip)[0] if clip else grads,
                                                    self.params))
        self.model.update(tree_unflatten(list(self.weights(self.params).items())))
        return mx.array(0.0)

    def reset(self):
        self.params.update(self.init)
        self.fresh_optimizer()
        self.model.update(tree_unflatten(list(self.weights(self.params).items())))
        mx.eval(self.state)

    def fresh_optimizer(self):
        """Zeroed optimizer state (in place: the compiled step holds these dicts)."""
        self.opt.state.update({"step": mx.array(0, mx.uint64)}, **{n: {} for n in self.params})
        self.opt.init(self.params)

    def prime(self, compiled):  # trace on synthetic tokens, never validation ones, then undo
        self.compiled = compiled
        ids = mx.array(np.arange(self.rows * self.L, dtype=np.int32).reshape(self.rows, -1) % self.model.cfg.vocab_size)
        mx.eval(compiled(ids, ids, mx.ones(ids.shape), mx.array(0.0)), self.state)
        self.reset()

    def train(self, tokens: np.ndarray, lo: int, hi: int, chunk: int, n_chunks: int):
        """TTT_EPOCHS passes over targets lo+1..hi in rows of the eval window, LR cosine over the chunks.
        TTT_RESET=doc: a BOS among them resets, and only the tokens from the last BOS on are trained."""
        bos = np.flatnonzero(tokens[lo + 1:hi + 1] == BOS_ID) if self.hp.ttt_reset == "doc" else ()
        if len(bos):
            self.reset()
            lo += int(bos[-1]) + 1
        n = hi - lo
        shape = (-1, self.rows, self.L)
        buf = np.zeros(-(-n // (self.rows * self.L)) * self.rows * self.L + 1, np.int32)
        buf[:n + 1] = tokens[lo:hi + 1]
        mask = (np.arange(buf.size - 1) < n).astype(np.float32).reshape(shape)
        lr = mx.array(self.hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * chunk / max(n_chunks - 1, 1))))
        for _ in range(self.hp.ttt_epochs):
            for x, y, m in zip(buf[:-1].reshape(shape), buf[1:].reshape(shape), mask):
                mx.eval(self.compiled(mx.array(x), mx.array(y), mx.array(m), lr), self.state)

    def close(self):
        self.model.update(tree_unflatten(list(self.base.items())))


class DocPlan:
    """TTT_MODE=doc_lora's documents and queue. The split is cut at every BOS (a leading fragment before the
    first BOS is a document too): document k holds targets starts[k]+1..ends[k], its last target the next BOS.
    Queue: longest first (stable), except a leading fragment (first) and the split's last document (last), so
    the documents concatenated in queue order are a token stream (`stream`) whose targets are exactly theirs:
    the n-gram mixer reads that stream, in the order the documents are scored. stream target i is split
    target `where[i]`."""

    def __init__(self, tokens: np.ndarray):
        n_tgt = tokens.size - 1
        bos = np.flatnonzero(tokens[:n_tgt] == BOS_ID)
        self.starts = np.union1d([0], bos).astype(np.int64)
        self.ends = np.append(self.starts[1:], n_tgt)
        body = np.arange(self.starts.size - 1)
        if tokens[0] != BOS_ID:  # a leading fragment: kept first
            body = body[1:]
        body = body[np.argsort(-(self.ends[body] - self.starts[body]), kind="stable")]
        head = [0] if tokens[0] != BOS_ID and self.starts.size > 1 else []
        self.queue = np.concatenate([head, body, [self.starts.size - 1]]).astype(np.int64)
        parts = [tokens[self.starts[k]:self.ends[k]] for k in self.queue]
        self.stream = np.concatenate(parts + [tokens[n_tgt:]])
        self.where = np.concatenate([np.arange(self.starts[k] + 1, self.ends[k] + 1) for k in self.queue])
        if not (np.array_equal(self.stream[1:], tokens[self.where])
                and np.array_equal(self.stream[:-1], tokens[self.where - 1])):
            raise RuntimeError("the queue's stream does not hold the split's targets")  # a bug, never a number

    def lengths(self, docs) -> np.ndarray:
        return self.ends[docs] - self.starts[docs]

    def tokens_of(self, tokens: np.ndarray, docs) -> np.ndarray:
        """The documents' tokens, concatenated in queue order (phased SGD trains on them)."""
        return np.concatenate([tokens[self.starts[k]:self.ends[k]] for k in docs] + [tokens[self.ends[docs[-1]]:][:1]])


class DocLoRA:
    """Per-document LoRA TTT (TTT_MODE=doc_lora, #1530 form; RECORDS_SP8192 §10): one rank-r adapter per row
    (document) of a batch on q, k, v, the attention output and the MLP output of every virtual layer and on the
    head; B = 0 and fresh AdamW state per batch, A warm across batches (TTT_WARM_A). step() scores a chunk and
    then adapts on it in one graph: the NLL it returns is the forward before the update."""

    def __init__(self, model: GPT, hp: Hyperparameters, rows: int, need_ent: bool):
        cfg = model.cfg
        d = cfg.model_dim
        kv = cfg.num_kv_heads * (d // cfg.num_heads)
        r = hp.ttt_rank
        self.model = model
        self.need_ent = need_ent
        self.scale = (hp.ttt_alpha or r) / r
        sizes = dict(q=(d, d), k=(d, kv), v=(d, kv), o=(d, d), mlp=(d, d))
        slots = [(f"{i}.{n}", *io) for i in range(len(model.virtual_layers())) for n, io in sizes.items()]
        slots.append(("head", d, cfg.vocab_size))
        keys = mx.random.split(mx.random.key(hp.seed), len(slots))
        self.a0 = {n + ".a": mx.random.uniform(-1, 1, (rows, r, din), key=keys[i]) / math.sqrt(din)
                   for i, (n, din, _) in enumerate(slots)}
        self.b0 = {n + ".b": mx.zeros((rows, dout, r)) for n, _, dout in slots}
        self.warm_a = hp.ttt_warm_a
        self.opt = optim.AdamW(hp.ttt_lr, [0.0, 0.99], 1e-10, hp.ttt_weight_decay, bias_correction=True)
        self.params = {**self.a0, **self.b0}
        self.opt.init(self.params)
        self.state = [self.params, self.opt.state]

    def forward(self, p, x, y):
        ad = Adapters(p, self.scale)
        if self.need_ent:
            return self.model.token_stats(x, y, ad)
        return self.model.token_nll(x, y, ad), None

    def score(self, x, y):
        nll, ent = self.forward(self.params, x, y)
        return nll, mx.zeros_like(nll) if ent is None else ent

    def step(self, x, y, mask):
        """Score x -> y, then one AdamW step on the sum over rows of the mean NLL over the row's mask."""
        def loss_fn(p):
            nll, ent = self.forward(p, x, y)
            loss = ((nll * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)).sum()
            return loss, nll, mx.zeros_like(nll) if ent is None else ent
        (_, nll, ent), grads = mx.value_and_grad(loss_fn)(self.params)
        self.params.update(self.opt.apply_gradients(grads, self.params))
        return nll, ent

    def reset(self, fresh_a: bool = False):
        """A new batch: B = 0, fresh AdamW state; A back to its draw only when fresh_a or TTT_WARM_A=0."""
        self.params.update(self.b0)
        if fresh_a or not self.warm_a:
            self.params.update(self.a0)
        self.opt.state.update({"step": mx.array(0, mx.uint64)}, **{n: {} for n in self.params})
        self.opt.init(self.params)
        mx.eval(self.state)


def doc_chunk(tokens: np.ndarray, plan: DocPlan, docs: np.ndarray, c: int, C: int, L: int, rows: int):
    """Chunk c (targets c*C..hi-1) of each document of a batch as rows: the window of at most L inputs ending at
    the chunk's end, left-aligned, zero past it, width rounded up to a multiple of C (few compiled shapes).
    Returns x, y [rows, W], the scored positions, each position's split target index, and which documents have
    a later chunk (only those train on this one)."""
    n = docs.size
    P = np.zeros(rows, np.int64)
    s = np.zeros(rows, np.int64)
    P[:n] = plan.lengths(docs)
    s[:n] = plan.starts[docs]
    hi = np.minimum((c + 1) * C, P)
    w0 = np.maximum(0, hi - L)
    W = min(L, -(-int(hi.max()) // C) * C)
    pos = w0[:, None] + np.arange(W)  # document-relative input positions
    valid = pos < hi[:, None]
    at = s[:, None] + pos  # input at doc position j predicts split target at + 1, nll index at
    x = np.where(valid, tokens[np.where(valid, at, 0)], 0).astype(np.int32)
    y = np.where(valid, tokens[np.where(valid, at + 1, 0)], 0).astype(np.int32)
    return x, y, valid & (pos >= c * C), at, hi < P


class DocTTT:
    """TTT_MODE=doc_lora's evaluation state: the plan, the adapters, the global trainer of the phases (TTT_PHASES,
    all parameters, SGD momentum 0.9: today's 'full' trainer over the scored documents) and their compiled
    functions. close() restores the weights the phases changed."""

    def __init__(self, model: GPT, hp: Hyperparameters, seq_len: int, opt, tokens: np.ndarray, need_ent: bool,
                 group=None):
        self.hp = hp
        self.L = seq_len
        self.plan = DocPlan(tokens)
        self.rows = min(hp.ttt_doc_batch, self.plan.queue.size)
        self.lora = DocLoRA(model, hp, self.rows, need_ent)
        self.glob = None
        if hp.ttt_phases:
            ghp = replace(hp, ttt_mode="full", ttt_lr=hp.ttt_phase_lr, ttt_epochs=1, ttt_reset="never",
                          ttt_targets="all", ttt_chunk=hp.ttt_phase_chunk)
            self.glob = TestTimeTrainer(model, ghp, seq_len, seq_len, group)
        self.fns = Compiled(model, opt or Optimizers(model, hp), ttt=self.glob, doc=self.lora)
        if self.glob:
            self.glob.prime(self.fns.ttt_step)
        self.t0 = time.perf_counter()

    def adapting(self) -> bool:
        """False once TTT_TIME_BUDGET seconds of the evaluation are spent: scoring goes on, adapting stops."""
        return not self.hp.ttt_time_budget or time.perf_counter() - self.t0 < self.hp.ttt_time_budget

    def score_batch(self, tokens: np.ndarray, docs: np.ndarray, nll_out: np.ndarray, ent_out: np.ndarray):
        """Score one batch of documents chunk by chunk into nll_out/ent_out (split order), adapting after each."""
        self.lora.reset()
        C = self.hp.ttt_doc_chunk
        for c in range(-(-int(self.plan.lengths(docs).max()) // C)):
            x, y, scored, at, later = doc_chunk(tokens, self.plan, docs, c, C, self.L, self.rows)
            train = scored & later[:, None]
            if train.any() and self.adapting():
                nll, ent = self.fns.doc_step(mx.array(x), mx.array(y), mx.array(train.astype(np.float32)))
            else:
                nll, ent = self.fns.doc_score(mx.array(x), mx.array(y))
            nll_out[at[scored]] = np.array(nll)[scored]
            ent_out[at[scored]] = np.array(ent)[scored]

    def phase(self, tokens: np.ndarray, docs: np.ndarray, log, k: int):
        """Global SGD (one epoch, cosine LR over TTT_PHASE_CHUNK-token chunks, the last not trained) on the
        scored documents `docs`, concatenated in queue order; then the adapters start afresh."""
        cat = self.plan.tokens_of(tokens, docs)
        n = cat.size - 1
        C = self.hp.ttt_phase_chunk
        n_chunks = -(-n // C)
        t0 = time.perf_counter()
        self.glob.fresh_optimizer()
        for c in range(n_chunks - 1):
            self.glob.train(cat, c * C, min((c + 1) * C, n), c, n_chunks)
        self.lora.reset(fresh_a=True)
        if log:
            log(f"ttt_phase {k}: global SGD on {docs.size} documents ({n} targets, {n_chunks - 1} of {n_chunks} "
                f"chunks trained) in {time.perf_counter() - t0:.1f}s")

    def close(self):
        if self.glob:
            self.glob.close()


def phase_bounds(hp: Hyperparameters) -> list:
    """Scored-document counts at which the phases run: floor(P (k+1) / K), P = TTT_PREFIX_DOCS (§10)."""
    K = hp.ttt_phases
    return [hp.ttt_prefix_docs * (k + 1) // K for k in range(K)]


def evaluate_docs(doc: DocTTT, tokens: np.ndarray, tables, mixer=None, log=None, label="eval", group=None):
    """TTT_MODE=doc_lora: score the documents batch by batch in queue order (W ranks: round t scores batches
    tW..tW+W-1, one per rank), the phases between rounds once enough documents are scored; then every rank
    holds every score (all_sum), the mixer reads them in queue order. Returns evaluate()'s triple."""
    plan = doc.plan
    n_tgt = tokens.size - 1
    nll = np.zeros(n_tgt, np.float32)
    ent = np.zeros(n_tgt, np.float32)
    W = 1 if group is None else group.size()
    rank = 0 if group is None else group.rank()
    batches = [plan.queue[i:i + doc.rows] for i in range(0, plan.queue.size, doc.rows)]
    bounds = phase_bounds(doc.hp)
    k = 0
    t0 = last_print = time.perf_counter()
    for r0 in range(0, len(batches), W):
        if r0 + rank < len(batches):
            doc.score_batch(tokens, batches[r0 + rank], nll, ent)
        done = min(plan.queue.size, (r0 + W) * doc.rows)  # documents scored, in queue order, on all ranks
        due = k < len(bounds) and done >= bounds[k] and done < plan.queue.size
        while k < len(bounds) and done >= bounds[k]:
            k += 1
        if due and ranks_all(group, doc.adapting()):
            doc.phase(tokens, plan.queue[:done], log, k)
        if log and time.perf_counter() - last_print > 30:
            last_print = time.perf_counter()
            frac = plan.lengths(plan.queue[:done]).sum() / n_tgt
            log(f"{label}_progress: documents {done}/{plan.queue.size} phase {k}/{len(bounds)} "
                f"eta:{(last_print - t0) * (1 - frac) / max(frac, 1e-9):.0f}s")
    if W > 1:  # each target was scored on one rank, zero elsewhere: the sum is every score, exactly
        both = mx.distributed.all_sum(mx.array(np.stack([nll, ent])), group=group)
        nll, ent = np.array(both)
    if mixer is not None:
        idx = plan.where - 1
        mixed = np.empty(n_tgt, np.float32)
        for lo in range(0, n_tgt, 1 << 20):
            part = idx[lo:lo + (1 << 20)]
            mixed[lo:lo + part.size] = np.array(mixer.nll(plan.stream, lo + 1, mx.array(-nll[part]),
                                                          mx.array(ent[part])))
        nll[idx] = mixed
    return summarize_nll(nll, tokens, tables)


def ranks_all(group, ok: bool) -> bool:
    """Whether `ok` holds on every rank (one all_sum), so that all ranks take the same collective path."""
    if group is None or group.size() == 1:
        return ok
    return int(mx.distributed.all_sum(mx.array(int(not ok)), group=group).item()) == 0


# ======== The n-gram mixer: per-token Witten-Bell counts by sorting, mixed into the model ============================
# Target j is scored with the counts of every earlier target i < j (score first, per token). Each count is
# "how many earlier positions end the same exact n-gram": one sort of the n-gram ids with the position as
# tie-break, then each position's rank in its group. The (context, next) pair of order m at target j is the
# (m+1)-gram ending at j, and the context is the m-gram ending at j-1, so one sort per n-gram length serves
# both. n-gram ids are exact and dense (built length by length, extending backwards from the same end), so
# there are no hash collisions and no tables. The statistics read only the tokens: they are computed once
# for the split (in a worker thread while the model scores) and the per-batch mix is a gather.
MIXER_BLOCK = 1 << 18  # elements per step of the elementwise passes: bounds their temporaries
MIXER_BYTES_PER_TOKEN = 60  # mixer_stats() peaks at ~55 B/token (tracemalloc; test_peak_memory_within_the_bound)
MIXER_BYTES_PER_BLOCK_ELEMENT = 128  # the block temporaries (a dozen float64 arrays at most)
ADAPTIVE_FIXED_POINT = 2.0**28  # units per nat of the adaptive sums: 2^28 x 80 nats x 2^28 targets < 2^63


def token_owners(tokens: np.ndarray, V: int, world: int) -> np.ndarray:
    """Rank that counts each n-gram, by its last token: the tokens cut into `world` runs of about equal
    frequency, so each rank sorts about 1/world of the positions at every length (a token never splits)."""
    counts = np.bincount(tokens, minlength=V).astype(np.float64)
    mid = np.cumsum(counts) - counts / 2
    return np.minimum(world - 1, (mid * world / max(1, tokens.size)).astype(np.int64))


def group_sort(key: np.ndarray, ends: np.ndarray, key_bound: int, n_pos: int):
    """(ends sorted by (key, end) as int32, flag at each group's first element). Equal keys must come in
    ascending end order. Keys of 16 bits: a stable radix argsort; keys that fit in 64 bits with the end: one
    packed uint64 sort; else a stable argsort (all the same order). Temporaries go block by block; key is
    packed in place (consumed)."""
    pbits = max(1, (n_pos - 1).bit_length())
    n = key.size
    order = np.empty(n, np.int32)
    first = np.ones(n, bool)
    if key_bound <= 2**16:
        key = key.astype(np.uint16)
    elif max(1, key_bound - 1).bit_length() + pbits <= 64:
        packed = key.view(np.uint64)
        packed <<= np.uint64(pbits)
        for lo in range(0, n, MIXER_BLOCK):
            packed[lo:lo + MIXER_BLOCK] |= ends[lo:lo + MIXER_BLOCK].astype(np.uint64)
        packed.sort()
        for lo in range(0, n, MIXER_BLOCK):
            order[lo:lo + MIXER_BLOCK] = packed[lo:lo + MIXER_BLOCK] & np.uint64((1 << pbits) - 1)
        packed >>= np.uint64(pbits)
        np.not_equal(packed[1:], packed[:-1], out=first[1:])
        return order, first
    idx = np.argsort(key, kind="stable")
    for lo in range(0, n, MIXER_BLOCK):
        at = idx[lo:lo + MIXER_BLOCK + 1]
        order[lo:lo + MIXER_BLOCK] = ends[at[:MIXER_BLOCK]]
        np.not_equal(key[at[1:]], key[at[:-1]], out=first[lo + 1:lo + at.size])
    return order, first


def group_starts(first: np.ndarray) -> np.ndarray:
    """Index of each sorted element's group start."""
    idx = np.arange(first.size, dtype=np.int32)
    idx[~first] = 0
    np.maximum.accumulate(idx, out=idx)
    return idx


def ngram_level(tokens, L: int, prev, owned: np.ndarray, V: int):
    """Length-L n-grams ending at each owned end e >= L-1: (ends sorted by (n-gram, end), group-start flags,
    dense ids in that order, R: how many earlier ends hold the same n-gram, int32 [N+1], R[N] = 1)."""
    N = tokens.size
    if prev is None:
        ends = owned
        key = tokens[ends].astype(np.int64)
        bound = V
    else:
        keep = prev[0] >= L - 1
        ends = prev[0][keep]
        key = prev[2][keep].astype(np.int64)  # the (L-1)-gram ending at e, extended back by t[e-L+1]
        del keep
        key *= V
        key += tokens[ends - (L - 1)]
        bound = (int(prev[2][-1]) + 1 if prev[2].size else 1) * V
    order, first = group_sort(key, ends, bound, N)
    del key, ends
    ids = np.cumsum(first, dtype=np.int32)
    ids -= 1
    rank = np.arange(order.size, dtype=np.int32)
    rank -= group_starts(first)
    R = np.zeros(N + 1, np.int32)
    R[order] = rank
    R[N] = 1  # a sentinel: "the pair after the last position" is never a first occurrence
    return order, first, ids, R


def continuation_counts(prev_order, prev_first, R_next, N: int) -> np.ndarray:
    """T at each context end e: distinct next tokens seen after earlier occurrences of the m-gram ending
    at e, i.e. how many earlier ends of its group start an (m+1)-gram for the first time (R_next == 0)."""
    fresh = (R_next == 0)[prev_order + 1]  # gathered from a byte array: fewer cache misses than from R
    before = np.cumsum(fresh, dtype=np.int32)
    before -= fresh  # exclusive: the element's own pair is not earlier than itself
    at_start = before[group_starts(prev_first)]
    before -= at_start
    del at_start
    T = np.zeros(N, np.int32)
    T[prev_order] = before
    return T


def unigram_estimate(tokens, R1, V: int) -> tuple:
    """(p, confidence) of order 0 per target j (index j; 0 unused): p = (u + 1) / (U + V) with u the count
    of t[j] among targets 1..j-1 (R1 counts position 0 too) and U = j - 1; confidence U / (U + V)."""
    N = tokens.size
    U = np.arange(-1, N - 1, dtype=np.float64)
    u = R1[:N].astype(np.float64)
    u -= tokens == tokens[0]
    u += 1.0
    p = u / (U + V)
    return p, U / (U + V)


def mix_order(p, conf, top, m: int, R_ctx, R_pair, T):
    """Interpolate order m into p and conf at targets j >= m: p = (c + T p) / (C + T) where the context was
    seen (C > 0), conf = C / (C + T), top = m (the highest seen order); C, c, T read at the context end j-1
    and the pair end j."""
    N = p.size
    for lo in range(max(m, 1), N, MIXER_BLOCK):
        hi = min(lo + MIXER_BLOCK, N)
        C = R_ctx[lo - 1:hi - 1].astype(np.float64)
        Tn = T[lo - 1:hi - 1].astype(np.float64)
        seen = C > 0
        d = np.maximum(C + Tn, 1.0)
        p[lo:hi] = np.where(seen, (R_pair[lo:hi] + Tn * p[lo:hi]) / d, p[lo:hi])
        conf[lo:hi] = np.where(seen, C / d, conf[lo:hi])
        top[lo:hi][seen] = m


def mixer_stats(tokens: np.ndarray, V: int, K: int, group=None) -> tuple:
    """(p_ngram, confidence) float64 [N] and the highest order whose context was seen (uint8 [N], 0: none)
    for every target j (index j) from tokens[:j+1] alone: the interpolated Witten-Bell estimate of orders
    0..K over the counts of targets 1..j-1 (the order and confidence read only tokens[:j]). With a `group`,
    each rank sorts the n-grams whose last token it owns and one all_sum per array joins the counts
    (integers: the result is bit-identical to one process)."""
    tokens = np.ascontiguousarray(tokens)
    N = tokens.size
    owned = np.arange(N, dtype=np.int32)
    if group is not None and group.size() > 1:
        owned = owned[token_owners(tokens, V, group.size())[tokens] == group.rank()]
    level = ngram_level(tokens, 1, None, owned, V)
    del owned
    R1 = all_sum_ints(level[3], group)
    p, conf = unigram_estimate(tokens, R1, V)
    top = np.zeros(N, np.uint8)
    prev = (level[0], level[1], level[2], R1)
    for L in range(2, K + 2):
        level = ngram_level(tokens, L, prev, prev[0], V)
        R = all_sum_ints(level[3], group)
        ctx_order = prev[0]
        ctx_first = prev[1]
        R_ctx = prev[3]
        prev = None  # the (L-1)-gram ids are no longer needed
        T = all_sum_ints(continuation_counts(ctx_order, ctx_first, R, N), group)
        del ctx_order, ctx_first
        mix_order(p, conf, top, L - 1, R_ctx, R, T)
        del T, R_ctx
        prev = (level[0], level[1], level[2], R)
    return p, conf, top


def all_sum_ints(a: np.ndarray, group) -> np.ndarray:
    """Sum an int32 array over the ranks (each rank holds its own ends' counts, zeros elsewhere)."""
    if group is None or group.size() == 1:
        return a
    out = mx.distributed.all_sum(mx.array(a), group=group)
    return np.array(out, np.int32)


class BackoffNgramMixer:
    """Interpolated Witten-Bell backoff n-gram cache over exact contexts, at per-token resolution, mixed into
    the model: NLL = -log((1 - a) p_model + a p_ngram), a = alpha * C/(C+T) at the highest seen order
    (U/(U+V) for unigrams only); times min(1, H/log V) in entropy mode; in adaptive mode alpha is the
    posterior mean over a grid (AdaptiveAlpha).
    Legal: each order's estimate sums to 1 over the V candidates (c sums to C; the T unseen-mass share is
    the lower order's distribution), so the mix does (C2); the weight reads only H, the context's counts and
    earlier targets' scores, the counts only tokens before the target (C1, C3); nll() takes each target
    once, in order (C4)."""

    def __init__(self, vocab_size: int, max_order: int, alpha: float, alpha_mode: str = "fixed",
                 max_memory_mb: float = 4096, group=None, grid: str = NGRAM_ALPHA_GRID, prior_zero: float = 0.5,
                 conf_bins: int = 3, entropy_bins: int = 1):
        self.V = vocab_size
        self.K = max_order
        self.alpha = alpha
        self.mode = alpha_mode
        self.cap = int(max_memory_mb * 2**20)
        self.group = group
        self.adaptive = None
        if alpha_mode == "adaptive":
            self.adaptive = AdaptiveAlpha(parse_alpha_grid(grid), prior_zero, max_order, conf_bins, entropy_bins,
                                          vocab_size)
        self.p = self.conf = self.top = None  # the statistics per target: p_ngram, C/(C+T), highest seen order
        self.n_tokens = self.next = None  # the split they were computed for; the next target nll() takes
        self._worker = self._error = None

    @property
    def needs_entropy(self) -> bool:
        """Whether nll() reads the model's entropy H (else zeros will do)."""
        return self.mode == "entropy" or (self.adaptive is not None and self.adaptive.entropy_bins > 1)

    @staticmethod
    def peak_nbytes(n_tokens: int) -> int:
        """Upper bound of the statistics' peak memory for a split of n_tokens (any order, any vocabulary)."""
        return MIXER_BYTES_PER_TOKEN * n_tokens + MIXER_BYTES_PER_BLOCK_ELEMENT * min(n_tokens, MIXER_BLOCK)

    def prepare(self, tokens: np.ndarray, background: bool = False, like: "BackoffNgramMixer | None" = None):
        """Compute the statistics of the whole split, checked against the cap first; in a worker thread
        with `background` (numpy sorts release the GIL, so they overlap the model's scoring). `like`: a
        mixer of the same split and order whose statistics are taken as they are (computed once per run)."""
        if like is not None:
            self.p, self.conf, self.top = like.stats(tokens)
            self.n_tokens = like.n_tokens
            return
        need = self.peak_nbytes(tokens.size)
        if need > self.cap:
            raise MemoryError(f"the n-gram mixer needs {need / 2**20:.0f} MiB for {tokens.size} tokens, above "
                              f"NGRAM_MAX_MEMORY_MB={self.cap / 2**20:.0f}: raise it or evaluate fewer tokens")
        self.n_tokens = tokens.size
        if not background or (self.group is not None and self.group.size() > 1):  # collectives: main thread
            self._compute(tokens)
            return
        self._worker = threading.Thread(target=self._compute, args=(tokens,), daemon=True)
        self._worker.start()

    def _compute(self, tokens):
        try:
            self.p, self.conf, self.top = mixer_stats(np.asarray(tokens), self.V, self.K, self.group)
        except BaseException as e:  # re-raised in the thread that reads the statistics
            self._error = e

    def stats(self, tokens) -> tuple:
        """(p_ngram, confidence, highest seen order) per target, waiting for the worker if it still runs."""
        if self.n_tokens is None:
            self.prepare(np.asarray(tokens))
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._error is not None:
            raise self._error
        if len(tokens) != self.n_tokens:
            raise RuntimeError(f"mixer prepared for {self.n_tokens} tokens, called with {len(tokens)}")
        return self.p, self.conf, self.top

    def nll(self, tokens, start: int, lp: mx.array, H: mx.array) -> mx.array:
        """Mixed NLL (nats) float32 [M] of targets start..start+M-1, given the model's log-prob of
        each target (lp) and entropy (H). Calls must continue exactly where the last one ended."""
        if (self.next is not None and start != self.next) or start < 1 or lp.shape != H.shape or lp.ndim != 1:
            raise RuntimeError(f"mixer calls must continue in order: expected start {self.next}, got {start}")
        p_all, conf_all, top_all = self.stats(tokens)
        M = lp.shape[0]
        p = p_all[start:start + M]
        conf = conf_all[start:start + M]
        lp = np.array(lp, np.float64)
        if self.adaptive is not None:
            a = self.adaptive.weights(lp, p, conf, top_all[start:start + M], np.array(H, np.float64))
        else:
            a = self.alpha * conf
        if self.mode == "entropy":
            a = a * np.minimum(1.0, np.array(H, np.float64) / math.log(self.V))
        with np.errstate(divide="ignore"):
            mixed = -np.logaddexp(np.log1p(-a) + lp, np.log(a) + np.log(p))
        self.next = start + M
        return mx.array(np.where(a > 0, mixed, -lp).astype(np.float32))  # alpha = 0 (or nothing seen): -lp


class AdaptiveAlpha:
    """NGRAM_ALPHA_MODE=adaptive: a Bayesian mixture over a grid of alpha values, one posterior per bucket
    (highest seen order x confidence bin x model-entropy bin). Grid value g mixes q_g = (1 - g c) p_model +
    g c p_ngram (c the confidence, as in fixed mode); its weight at target j is prior(g) x the product of the
    q_g of the earlier targets of j's bucket. The mixture of the q_g is linear in g, so it is fixed mode
    with alpha = the posterior mean: a full distribution, set before the target is seen. Its total log-loss
    is within ln(1/prior(g*)) nats per bucket of the best grid value g* per bucket in hindsight, and so of
    every fixed alpha of the grid: ln(1/NGRAM_PRIOR_ZERO) per bucket against the model alone.
    Each bucket keeps, per grid value, the running sum of ln(q_g / p_model) over its targets in fixed point
    (ADAPTIVE_FIXED_POINT): integer sums are exact in any order, so the segmented cumulative sum of a call
    is one sort by bucket and one cumsum, and a target's weight does not depend on how calls cut the stream."""

    def __init__(self, grid: tuple, prior_zero: float, max_order: int, conf_bins: int, entropy_bins: int,
                 V: int):
        self.grid = np.array(grid[1:], np.float32)  # the values past 0: alpha = 0 is the reference, ratio 1
        G = self.grid.size
        self.prior_zero = prior_zero
        self.log_prior = np.int64(np.log((1.0 - prior_zero) / G / prior_zero) * ADAPTIVE_FIXED_POINT)  # vs 0's
        self.conf_bins = conf_bins
        self.entropy_bins = entropy_bins
        self.log_v = math.log(V)
        self.n_buckets = (max_order + 1) * conf_bins * entropy_bins
        self.loglik = np.full((G, self.n_buckets), self.log_prior)  # per grid value and bucket: ln prior ratio +
        # the sum of ln(q_g / p_model) over the bucket's targets so far (alpha = 0's: 0)

    def buckets(self, conf, top, H) -> np.ndarray:
        """Bucket of each target: reads its context's counts and the model's entropy, never the target."""
        b = top.astype(np.int16)
        b *= self.conf_bins
        b += np.minimum(self.conf_bins - 1, (conf * self.conf_bins).astype(np.int16))
        if self.entropy_bins > 1:
            b *= self.entropy_bins
            b += np.clip((H / self.log_v * self.entropy_bins).astype(np.int16), 0, self.entropy_bins - 1)
        return b

    def scores(self, lp, p, conf) -> np.ndarray:
        """ln(q_g / p_model) = ln(1 + g c (p_ngram / p_model - 1)) per grid value and target, in fixed point
        (float32 is plenty for a weight; a model probability below e^-80 counts as e^-80, so every sum fits)."""
        z = self.grid[:, None] * (conf * (p / np.exp(np.maximum(lp, -80.0)) - 1.0)).astype(np.float32)[None, :]
        z += 1.0
        np.log(z, out=z)
        z *= ADAPTIVE_FIXED_POINT
        return z.astype(np.int64)

    def weights(self, lp, p, conf, top, H) -> np.ndarray:
        """a = posterior-mean alpha x confidence per target, from the earlier targets only; then the
        targets' own scores join their buckets' running sums. Work in bucket order, [grid, targets]."""
        b = self.buckets(conf, top, H)
        order = np.argsort(b, kind="stable")
        sb = b[order]
        mine = np.take(self.scores(lp, p, conf), order, axis=1)
        first = np.ones(b.size, bool)
        first[1:] = sb[1:] != sb[:-1]
        starts = np.flatnonzero(first)
        keys = sb[starts]
        lengths = np.diff(np.append(starts, b.size))  # each segment's targets: its bucket's run in this call
        before = np.zeros_like(mine)
        np.cumsum(mine[:, :-1], axis=1, out=before[:, 1:])  # exclusive, across segments: integers, so exact
        offset = self.loglik[:, keys] - before[:, starts]  # restarts each segment at its bucket's carried sum
        ends = np.append(starts[1:], b.size) - 1
        self.loglik[:, keys] = before[:, ends] + mine[:, ends] + offset
        before += np.repeat(offset, lengths, axis=1)
        top_w = np.maximum(before.max(axis=0), 0)  # alpha = 0's log-weight is 0
        before -= top_w
        w = np.exp(before.astype(np.float32) * np.float32(1.0 / ADAPTIVE_FIXED_POINT))
        num = np.zeros(b.size, np.float32)
        den = np.exp(-top_w.astype(np.float32) * np.float32(1.0 / ADAPTIVE_FIXED_POINT))
        for g in range(self.grid.size):  # a fixed order of additions per target, whatever the call's size
            num += w[g] * self.grid[g]
            den += w[g]
        alpha = np.empty(b.size)
        alpha[order] = num / den
        return alpha * conf


# ======== Compiled functions: one builder for all of them ============================================================
class Compiled:
    """Every compiled function, in one place: a change of mode builds a new Compiled, never a stale graph."""

    def __init__(self, model: GPT, opt: Optimizers, compile_fns: bool = True, qat_bits=0,
                 complement: mx.array | None = None, ttt: "TestTimeTrainer | None" = None, recur: bool = True,
                 doc: "DocLoRA | None" = None):
        c = mx.compile if compile_fns else (lambda f, **kw: f)
        hp = opt.hp
        state = [model.state, opt.state]

        def moded(f):  # traced with this set's recurrence mode; the model is left in the full (artifact) mode
            def in_mode(*args):
                model.recur_on = recur
                try:
                    return f(*args)
                finally:
                    model.recur_on = True
            return in_mode

        def train_loss(params, x, y):
            if qat_bits:  # forward through the artifact's quantizer, straight-through gradient
                params = tree_unflatten([(n, fake_quant(p, tensor_bits(n, qat_bits)) if is_quantized(n, p.shape)
                                          else p) for n, p in tree_flatten(params)])
            model.update(params)
            nll = moded(model.token_nll)(x, y)
            if complement is None:
                return nll.mean()
            w = complement_weights(x, y, complement, hp.complement_alpha, hp.complement_floor)
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
        self.token_nll = c(moded(model.token_nll), inputs=state)
        self.token_stats = c(moded(model.token_stats), inputs=state)
        self.build_ttt(c, moded, state, ttt, doc)

    def build_ttt(self, c, moded, state: list, ttt, doc):
        """Test-time training's graphs: chunk TTT's step (two graphs around the all-reduce on several ranks) and
        TTT_MODE=doc_lora's score-then-adapt step and score-only pass."""
        both = state + (ttt.state if ttt else [])
        if ttt and ttt.group is not None and ttt.group.size() > 1:  # the all-reduce runs between the two graphs
            self.ttt_step = partial(ttt.dp_step, c(moded(ttt.grad), inputs=both, outputs=both),
                                    c(ttt.update, inputs=both, outputs=both))
        elif ttt:
            self.ttt_step = c(moded(ttt.step), inputs=both, outputs=both)
        if doc:  # one graph per window width
            mine = state + doc.state
            self.doc_step = c(moded(doc.step), inputs=mine, outputs=mine)
            self.doc_score = c(moded(doc.score), inputs=mine)


def train_step(fns: Compiled, x: np.ndarray, y: np.ndarray, micro_seqs: int, lr_mul: float, momentum: float,
               group=None, bucket_bytes: int = 32 << 20):
    """One optimizer step in microbatches of <= micro_seqs rows; with W ranks, on this rank's 1/W of the rows,
    gradients and loss averaged in bucket_bytes buckets. Returns the mean loss (unevaluated)."""
    lr = mx.array(lr_mul)
    mom = mx.array(momentum)
    W = 1 if group is None else group.size()
    if W > 1:  # this rank's rows
        x, y = (a[group.rank() * (len(a) // W):(group.rank() + 1) * (len(a) // W)] for a in (x, y))
    n = x.shape[0]
    if n <= micro_seqs and W == 1:
        return fns.step(mx.array(x), mx.array(y), lr, mom)
    acc = None
    loss = mx.array(0.0)
    for lo in range(0, n, micro_seqs):
        share = min(micro_seqs, n - lo) / n
        micro_loss, grads = fns.grads(mx.array(x[lo:lo + micro_seqs]), mx.array(y[lo:lo + micro_seqs]))
        grads = tree_map(lambda a: a * share, grads)
        acc = grads if acc is None else tree_map(mx.add, acc, grads)
        loss = loss + micro_loss * share
        mx.eval(acc, loss)
    if W > 1:  # the loss rides in the gradients' all-reduce; evaluated here, so every rank issues it at once
        avg = nn.average_gradients(dict(g=acc, loss=loss), group, bucket_bytes)
        acc = avg["g"]
        loss = avg["loss"]
        mx.eval(acc, loss)
    fns.update(acc, lr, mom)
    return loss


# ======== Main: set up, warm up, train, write the artifact and prove it ==============================================
class SetupError(ValueError):
    """Something outside the environment's values makes the run impossible (a path, memory)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Logger:
    """Console + log file. A log that cannot be written (disk full) warns once and goes on."""

    def __init__(self, path: str | None, rank: int = 0):
        self.path = path
        self.f = None
        self.rank = rank
        try:
            self.f = open(path, "a", encoding="utf-8") if path else None
        except OSError:  # OUT_DIR unwritable: check_out_dir names it, on every rank at once
            pass

    def __call__(self, msg: str):
        if not self.rank or msg.startswith("error"):  # rank 0 logs; the others only say why they stop
            print(f"[rank {self.rank}] {msg}" if self.rank else msg, flush=True)
        if self.f:
            try:
                print(msg, file=self.f, flush=True)
            except OSError as e:
                self.f = None
                print(f"WARNING: cannot write the log {self.path} ({e.strerror}); console only", file=sys.stderr)


@dataclass
class Run:
    """One training run's state: what the driver's steps pass between them."""
    hp: Hyperparameters
    log: Logger
    run_id: str
    code_bytes: int  # what the challenge counts: the packed train_gpt.py (counted_script)
    model: GPT = None
    opt: Optimizers = None
    graphs: dict = None  # {(qat_on, recur_on): Compiled}
    tables: tuple = None
    val_tokens: np.ndarray = None
    stream: TokenStream = None
    micro_seqs: int = 1
    step: int = 0
    train_ms: float = 0.0
    calib_ms: float = 0.0  # GPTQ's calibration on training tokens (counts toward the cap with train_ms)
    qat_on: bool = False
    recur_on: bool = True  # False until RECUR_START_FRAC
    phase: str = "setup"
    group: mx.distributed.Group = None  # the ranks mlx.launch started (size 1: one process)
    local_ranks: int = 1  # ranks on this host: they share its memory
    backend: str = "none"
    pre_quant: tuple = (math.nan, math.nan)  # the last full-precision (val_loss, val_bpb)
    stop_asked: bool = False  # a first Ctrl-C or SIGTERM arrived (set by the signal handler; read at safe points)
    stop_signal: int = 0  # which signal asked to stop (or aborted): the run exits 128 + it (130 SIGINT, 143 SIGTERM)
    interrupted: bool = False  # training stopped on it: the run exits 128 + signal after writing its artifact (no seed)
    checkpoint: str = ""  # the last checkpoint written
    stop_at: int | None = None  # the step where the wall-clock cap was reached: training ends there (checkpointed)
    warned_loss: bool = False  # the loss-above-chance warning is given once
    resumed_from: str = ""  # RUN_ID of the run whose checkpoint this one continued
    train_shards: list = None  # [name, tokens] of each train shard (check_train_shards), kept in checkpoints
    val_split: dict = None  # SUBMISSION_DIR: what the validation split is (val_split_facts)
    last_step_from_ms: float = 0.0  # train time when the last step began: a track's limit binds it (unfinished_reason)
    train_data: dict = None  # SUBMISSION_DIR: how much training data DATA_PATH holds (train_data_facts)
    mixer_stats: dict = field(default_factory=dict)  # the n-gram mixer's statistics of the split, counted once

    @property
    def graph(self) -> "Compiled":
        return self.graphs[self.qat_on, self.recur_on]

    def path(self, suffix: str) -> str:
        return os.path.join(self.hp.out_dir, f"{self.run_id}{suffix}")


def count_params(model) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def eval_batch_seqs(hp: Hyperparameters, seq_len: int) -> int:
    return max(1, hp.val_batch_size // hp.grad_accum_steps // seq_len)


def init_world(backend: str):
    """(group, backend name) of the ranks mlx.launch started; one process is a group of size 1."""
    for b in ("jaccl", "nccl", "ring", "mpi") if backend == "any" else (backend,):
        try:
            return mx.distributed.init(strict=True, backend=b), b
        except RuntimeError as e:
            if backend != "any":
                raise SetupError(f"DIST_BACKEND={backend}: {e} (start the ranks with mlx.launch)") from None
    return mx.distributed.init(), "none"


def ranks_on_this_host(group) -> int:
    """Ranks that mlx.launch started on one host share its memory and cores: the memory check multiplies by their
    number, and the BLAS threads divide by it."""
    if group.size() == 1:
        return 1
    mine = zlib.crc32(socket.gethostname().encode())
    hosts = mx.distributed.all_gather(mx.array([mine], mx.uint32), group=group).tolist()
    return hosts.count(mine)


def share_blas_threads(local_ranks: int, log):
    """Ranks on one host that each run OpenBLAS on all its cores fight over them (2 ranks on 2 cores: each step
    ~1.65x slower, measured): each rank takes its share of the cores. Only where OpenBLAS is loaded."""
    if local_ranks == 1:
        return
    try:
        blas = ctypes.CDLL(None)
        now = blas.openblas_get_num_threads()
        set_threads = blas.openblas_set_num_threads
    except (OSError, AttributeError):  # MLX's own BLAS (Accelerate on a Mac, the wheel's reference BLAS)
        return
    share = min(now, max(1, (os.cpu_count() or 1) // local_ranks))
    set_threads(share)
    log(f"blas_threads:{share} per rank ({local_ranks} ranks on this host, OpenBLAS had {now})")


BLAS_SLOW_GFLOPS = 20.0  # 256 x 256 float32 matmuls: MLX's bundled reference BLAS ~6 GFLOP/s, OpenBLAS ~170 (2 cores)


def blas_name() -> str:
    try:
        ctypes.CDLL(None).openblas_get_num_threads
        return "OpenBLAS"
    except (OSError, AttributeError):
        return "Accelerate" if sys.platform == "darwin" else "MLX's bundled BLAS"


def matmul_gflops(n: int = 256, seconds: float = 0.05) -> float:
    """The CPU's float32 matmul rate, timed for about `seconds` (a fixed key: the global RNG is left alone)."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    mx.eval(a @ a)
    k = 0
    t0 = time.perf_counter()
    while k < 2 or time.perf_counter() - t0 < seconds:
        mx.eval(a @ a)
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def check_blas(log):
    """On a CPU the BLAS sets the step time: MLX's Linux wheel bundles a reference BLAS that makes every step
    several times slower than OpenBLAS, and nothing else would say so. Log which BLAS runs and how fast; warn
    with the README's fix where it is the slow one."""
    if _on_gpu():
        return
    name = blas_name()
    rate = matmul_gflops()
    log(f"blas: {name} {rate:.1f} GFLOP/s (256x256 float32 matmul)")
    if name == "OpenBLAS" or not sys.platform.startswith("linux") or rate >= BLAS_SLOW_GFLOPS:
        return
    found = sorted(glob.glob("/usr/lib/*-linux-gnu/libopenblas.so.0"))
    fix = (f"It is installed here: run with LD_PRELOAD={found[0]}" if found else "apt-get install "
           "libopenblas0-pthread, then run with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    log(f"WARNING: matmuls run at {rate:.1f} GFLOP/s on {name} (a reference BLAS): every training step is several "
        f"times slower than with OpenBLAS (README, Set-up). {fix}")


def ranks_max(r: Run, v: float) -> float:
    """Rank 0's view is not enough where ranks must decide alike (the wall-clock cap, its warmdown, a Ctrl-C)."""
    return v if r.group.size() == 1 else mx.distributed.all_max(mx.array(v, mx.float32), group=r.group).item()


def check_ranks_agree(r: Run, what: str) -> bool:
    """Data parallelism is only correct while every rank holds the same weights: compare CRC32s."""
    if r.group.size() == 1:  # one process: nothing to compare
        return True
    crc = zlib.crc32(b"".join(np.array(p).tobytes() for _, p in tree_flatten(r.model.parameters())))
    crcs = mx.distributed.all_gather(mx.array([crc], mx.uint32), group=r.group).tolist()
    agree = len(set(crcs)) == 1
    r.log(f"ranks_checksum {what}: crc32:{crc:08x} world_size:{len(crcs)} agree:{agree}" +
          ("" if agree else f" (ranks: {' '.join(f'{c:08x}' for c in crcs)})"))
    return agree


AGREE_MSG_BYTES = 1024  # the longest error message one rank tells the others


def ranks_agree_on(r: Run, error: Exception | None):
    """A check that fails on one rank must stop all of them, or the others wait forever in their next collective.
    Every rank says how its check went (one all_gather); if any failed, all raise, naming the first that did."""
    if r.group.size() == 1:
        return
    mine = np.zeros(AGREE_MSG_BYTES, np.uint8)
    text = f"{type(error).__name__}: {error}".encode()[:AGREE_MSG_BYTES] if error else b""
    mine[:len(text)] = np.frombuffer(text, np.uint8)
    every = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=r.group))
    failed = [(k, bytes(row).rstrip(b"\0").decode(errors="replace")) for k, row in enumerate(every) if row.any()]
    if failed and error is None:
        rank, msg = failed[0]
        raise SetupError(f"rank {rank} failed, so every rank stops: {msg}")


@contextmanager
def on_every_rank(r: Run):
    """A block of checks whose outcome all ranks agree on at its end (see ranks_agree_on). The block must hold no
    collective: a rank that failed early would be waiting in the agreement's."""
    try:
        yield
    except (ConfigError, SetupError, ArtifactError, ValueError, OSError) as e:
        ranks_agree_on(r, e)
        raise
    ranks_agree_on(r, None)


def main(env=None) -> int:
    try:
        hp = Hyperparameters.from_env(env)
        group, backend = init_world(hp.dist_backend)
        if group.size() == 1:  # several ranks check it together, in run()
            check_out_dir(hp.out_dir)
        else:
            make_out_dir(hp.out_dir)
    except (ConfigError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_id = hp.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    log_path = os.path.join(hp.out_dir, f"{run_id}.txt")
    reused = os.path.exists(log_path) and not group.rank()
    try:
        lock = None if group.rank() else lock_run_id(log_path, run_id)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = Logger(None if group.rank() else log_path, group.rank())
    if reused:
        log(f"note: RUN_ID={run_id} was used before in {hp.out_dir}: this run's lines follow in this log, "
            "and its artifact and checkpoint are replaced")
    log(f"world_size:{group.size()} backend:{backend}")
    for note in hp.env_notes:
        log(f"WARNING: {note}  (STRICT_ENV=1 makes this an error)")
    r = Run(hp, log, run_id, len(counted_script()), group=group, backend=backend)
    try:
        with abort_on_sigterm(r):
            return run(r)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (abort_now), outside training or a second time
        done = ("the artifact above is complete" if r.phase == "the round-trip evaluation" else
                f"no artifact was written; the checkpoint {r.checkpoint} holds the last saved step" if r.checkpoint
                else "nothing was written")
        log(f"interrupted ({signal_label(r.stop_signal)}) during {r.phase}; {done}")
        return 128 + (r.stop_signal or signal.SIGINT)
    except (ArtifactError, SetupError, TrainingDiverged, ValueError, OSError) as e:  # ConfigError included: exit 2
        log(f"error: {e}")
        return 2 if isinstance(e, ConfigError) else 1
    except RuntimeError as e:  # with several ranks: a peer stopped (its own message says why) and its socket closed
        if group.size() == 1:
            raise
        log(f"error: {e} during {r.phase}: another rank stopped; its message says why")
        return 1
    finally:
        if lock:
            lock.close()


def run(r: Run) -> int:
    """The method, one line per step."""
    hp = r.hp
    r.local_ranks = ranks_on_this_host(r.group)
    share_blas_threads(r.local_ranks, r.log)
    check_blas(r.log)
    with on_every_rank(r):
        check_out_dir(hp.out_dir)
        sp = load_tokenizer(hp.tokenizer_path)
        preflight_paths(hp)
        if hp.submission_dir:
            preflight_submission(r)
        checkpoint = read_checkpoint(hp.resume_from, hp) if hp.resume_from and not hp.eval_only else None
        if not hp.eval_only:
            setup(r, sp)
        if checkpoint:
            check_resume_data(r, checkpoint[0])
    if hp.eval_only:
        return eval_only(r, sp)
    warmup(r)
    if checkpoint:
        resume(r, *checkpoint)
    train(r)
    if not check_ranks_agree(r, "after training"):
        raise TrainingDiverged(f"ranks hold different weights after training; {rescue_weights(r)} (rank 0's)")
    mx.clear_cache()  # the training activations' buffers go back before numpy's copies for the artifact
    write_and_prove_artifact(r)
    if r.stop_asked:  # Ctrl-C or SIGTERM: not a success, though the artifact is complete
        code = 128 + r.stop_signal
        r.log(f"exit {code}: interrupted ({signal_label(r.stop_signal)}) at step {r.step}/{r.hp.iterations}; the "
              "artifact above is complete; "
              + (f"to go on, RESUME_FROM={r.checkpoint}" if r.interrupted else "training had already finished"))
        return code
    return 0


# ---------------------------------------------------------------------------- before any work
def check_out_dir(out_dir: str):
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_test"):
            pass
    except OSError as e:
        raise SetupError(f"OUT_DIR={out_dir} is not a writable folder ({e.strerror or e})") from None


def make_out_dir(out_dir: str):
    """With several ranks, each makes OUT_DIR before rank 0 opens its log there; one that cannot is named on every
    rank by check_out_dir, in run() (where they agree on it), not by a traceback here."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        pass


def lock_run_id(log_path: str, run_id: str):
    """Two runs with one RUN_ID would interleave one log and overwrite each other's artifact and checkpoint:
    the first holds an exclusive lock on its log file (OUT_DIR/RUN_ID.txt) until it ends; a second is refused.
    None where the log cannot be opened: check_out_dir, run on every rank, names the folder."""
    try:
        f = open(log_path, "a")
    except OSError:
        return None
    if not take_flock(f, 0.0):
        f.close()
        raise SetupError(f"RUN_ID={run_id} is in use by a run still going (it holds {log_path}): pick another "
                         "RUN_ID, or wait for that run to end")
    return f


def take_flock(f, wait_s: float) -> bool:
    """An exclusive flock on the open file f, waiting up to wait_s for another process to release it (False: it
    did not). The OS releases a flock when its holder dies, so no lock goes stale."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def preflight_paths(hp: Hyperparameters):
    """Every path the run will read or write is checked before the first step."""
    for var, path in (("LOAD_ARTIFACT", hp.load_artifact), ("RESUME_FROM", hp.resume_from)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise SetupError(f"{var}={path} is not a readable file")
    if hp.eval_token_nll_path:
        folder = os.path.dirname(os.path.abspath(hp.eval_token_nll_path))
        if os.path.isdir(hp.eval_token_nll_path) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise SetupError(f"EVAL_TOKEN_NLL_PATH={hp.eval_token_nll_path}: its folder {folder} must exist and "
                             "be writable, and the path must not be a folder")


def check_mixer_cap(hp: Hyperparameters, n_val: int):
    """The n-gram mixer's statistics for the whole split must fit NGRAM_MAX_MEMORY_MB. The mixer checks it
    itself, but only at the final evaluation: after the whole training, with nothing written."""
    if not hp.ngram_mixer_enabled:
        return
    need_mib = math.ceil(BackoffNgramMixer.peak_nbytes(n_val) / 2**20)
    if need_mib > hp.ngram_max_memory_mb:
        raise ConfigError(f"NGRAM_MAX_MEMORY_MB={hp.ngram_max_memory_mb}: the n-gram mixer needs {need_mib} MiB for "
                          f"the {n_val} validation tokens; raise NGRAM_MAX_MEMORY_MB to at least {need_mib}, or "
                          "evaluate fewer tokens (VAL_MAX_TOKENS)")


def micro_seqs(hp: Hyperparameters) -> int:
    """Rows in one microbatch: a GRAD_ACCUM_STEPS share of the batch, at most MLX_MAX_MICROBATCH_TOKENS."""
    return max(1, min(hp.train_batch_tokens // hp.grad_accum_steps, hp.mlx_max_microbatch_tokens) // hp.train_seq_len)


def micro_tokens(hp: Hyperparameters, ranks: int) -> int:
    """Tokens in one rank's microbatch: train_step gives each rank 1/ranks of the batch's rows."""
    seq = hp.train_seq_len
    return min(micro_seqs(hp), max(1, hp.train_batch_tokens // seq // ranks)) * seq


def activation_floats(cfg: ModelConfig, seq: int, backward: bool) -> int:
    """Floats live per token at the peak of one forward (+ backward) pass, as measured on CPU
    (tests/bench_memory.py). Training keeps every virtual layer (recurrence runs layers twice): (16 + 4 MLP_MULT) d
    and the attention's 2 H x T (scores and their gradient: MLX's CPU attention is not fused), 4 d more on each
    second parallel lane, 8 V for the logits and their gradient. Evaluation keeps one layer (H x T scores) and 2 V."""
    d = cfg.model_dim
    V = cfg.vocab_size
    span = recur_span(cfg.recur_layers, cfg.num_layers)
    virtual = virtual_depth(cfg.num_layers, span, cfg.recur_passes)
    second_lanes = cfg.num_layers - (cfg.parallel_start_layer or cfg.num_layers)  # GPT.n_parallel
    layer = (16 + 4 * cfg.mlp_mult) * d + 2 * cfg.num_heads * seq
    hashed = 2 * cfg.engram_heads * cfg.engram_dim * cfg.engram_lite_enabled
    hashed += cfg.bigram_dim * bool(cfg.bigram_hash_size)
    if cfg.skipgram_hash_size:
        hashed += cfg.skipgram_dim * len(parse_patterns(cfg.skipgram_patterns))
    logit_biases = 2 * V * ((cfg.engram_lite_enabled and cfg.engram_mode == "logit") + bool(cfg.skipgram_hash_size))
    features = 4 * hashed + logit_biases  # the hashed lookups and their logit biases
    if not backward:  # one layer at a time: its scores without their gradient
        return (16 + 4 * cfg.mlp_mult) * d + cfg.num_heads * seq + 2 * V + features
    return virtual * layer + second_lanes * 4 * d + 8 * V + 32 * d + features  # 32 d: embeddings, final norm


def memory_needs(hp: Hyperparameters, cfg: ModelConfig, micro_tokens: int, n_val: int | None = None,
                 world: int = 1) -> dict:
    """Peak bytes of each big allocation on one rank, keyed by the knob that sets it, by phase: "always" lives
    through the run; "train" (a microbatch) is freed before "eval" (a batch, the mixer, TTT) starts. n_val: the
    validation tokens, when known (a short split makes a short batch); world: the ranks."""
    n_params = count_params(GPT(cfg))  # built lazily: MLX allocates an array only when it is evaluated
    copies = 6 + (hp.ema_decay > 0)  # weights, gradient, its accumulator, update, optimizer state (<= 2), EMA
    eval_seq = hp.eval_seq_len or hp.train_seq_len
    windows = -(-(n_val - 1) // (hp.eval_stride_resolved or eval_seq)) if n_val else 1 << 40
    eval_tokens = min(hp.eval_batch_seqs or eval_batch_seqs(hp, eval_seq), windows) * eval_seq
    need = {"always": {"NUM_LAYERS/MODEL_DIM/hash tables (weights, gradients, optimizer state, EMA)":
                       n_params * 4 * copies,
                       # numpy's float32 + float64 copies that quantize the artifact, counted on top of training:
                       # Linux's allocator keeps the training peak resident after MLX frees it
                       "NUM_LAYERS/MODEL_DIM/hash tables (quantizing the artifact)": n_params * (4 + 8 + 8 + 8),
                       "(the process: compiled graphs, tokenizer, data)": 32 * 2**20},
            "train": {"MLX_MAX_MICROBATCH_TOKENS (one microbatch's activations)":
                      micro_tokens * 4 * activation_floats(cfg, hp.train_seq_len, True) * (not hp.eval_only)},
            "eval": {"VAL_BATCH_SIZE/EVAL_BATCH_SEQS (one evaluation batch)":
                     eval_tokens * 4 * activation_floats(cfg, eval_seq, False)}}
    if world > 1:  # measured: a rank's resident memory outside MLX's arrays, above one process's
        need["always"]["(the communication backend's buffers, per rank)"] = 64 * 2**20
    if cfg.engram_lite_enabled and not hp.eval_only:  # each head's lookup has its own table-sized gradient
        need["train"]["ENGRAM_HEADS/ENGRAM_HASH_SIZE (a gradient per hashed lookup)"] = (
            cfg.engram_heads * 2 * cfg.engram_hash_size * cfg.engram_dim * 4)
    if hp.complement_alpha > 0 and not hp.eval_only:
        need["always"]["COMPLEMENT_ALPHA/VOCAB_SIZE (bigram table, V x V)"] = cfg.vocab_size ** 2 * (4 + 8)
    if hp.ttt_enabled and hp.ttt_mode == "doc_lora":
        need["eval"]["TTT_DOC_BATCH/TTT_RANK/TTT_PHASES (per-document TTT)"] = doc_ttt_bytes(hp, cfg, eval_seq,
                                                                                              n_params)
    elif hp.ttt_enabled:
        stride = hp.eval_stride_resolved or eval_seq
        rows = min(hp.ttt_batch_seqs, -(-(eval_seq + (max(1, hp.ttt_chunk // stride) - 1) * stride) // eval_seq))
        full = 3 * n_params * 4 if hp.ttt_mode == "full" else 0  # adapted weights, momentum, gradient
        need["eval"]["TTT_BATCH_SEQS/TTT_MODE (a test-time training step)"] = full + rows * eval_seq * (
            4 * activation_floats(cfg, eval_seq, True))  # rows: as TestTimeTrainer sizes them
    if hp.ngram_mixer_enabled:  # its statistics' peak for the split, never above the cap (it refuses)
        mixer_peak = BackoffNgramMixer.peak_nbytes(n_val) if n_val else math.inf
        need["eval"]["NGRAM_MAX_MEMORY_MB (the n-gram mixer's statistics)"] = min(mixer_peak,
                                                                                 hp.ngram_max_memory_mb * 2**20)
    return need


def doc_ttt_bytes(hp: Hyperparameters, cfg: ModelConfig, seq: int, n_params: int) -> int:
    """TTT_MODE=doc_lora's peak, an upper bound: one adapter step's activations over TTT_DOC_BATCH rows, the
    adapters with their gradient and AdamW moments, and with TTT_PHASES the global step (weights, momentum,
    gradient, its rows' activations)."""
    d = cfg.model_dim
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    n_virtual = virtual_depth(cfg.num_layers, recur_span(cfg.recur_layers, cfg.num_layers))
    adapter_floats = hp.ttt_rank * (n_virtual * (8 * d + 2 * kv) + d + cfg.vocab_size)  # per document
    step = hp.ttt_doc_batch * (seq * activation_floats(cfg, seq, True) + 4 * adapter_floats)
    mask = hp.ttt_doc_batch * seq * seq if cfg.attn_doc_isolated else 0  # booleans
    phase = 0
    if hp.ttt_phases:
        rows = min(hp.ttt_batch_seqs, max(1, hp.ttt_phase_chunk // seq))
        phase = 3 * n_params + rows * seq * activation_floats(cfg, seq, True)
    return 4 * (step + phase) + mask


def memory_total(need: dict, local_ranks: int = 1) -> int:
    """Training and evaluation transients never coexist; the ranks on one host each hold all of it."""
    return local_ranks * (sum(need["always"].values()) + max(sum(need["train"].values()),
                                                             sum(need["eval"].values())))


def check_memory(need: dict, log, local_ranks: int = 1):
    total = memory_total(need, local_ranks)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    ranks = f" for {local_ranks} ranks on this host" if local_ranks > 1 else ""
    log(f"memory_estimate:{total / 2**30:.2f}GiB{ranks} of {have / 2**30:.1f}GiB")
    if total > 0.85 * have:
        knob, big = max((kv for part in need.values() for kv in part.items()), key=lambda kv: kv[1])
        raise SetupError(f"this run needs about {total / 2**30:.1f} GiB{ranks} but the machine has "
                         f"{have / 2**30:.1f} GiB; "
                         f"the largest part is {big / 2**30:.1f} GiB from {knob}: lower it"
                         + (", or start fewer ranks on this host" if local_ranks > 1 else ""))


def check_artifact_estimate(r: Run):
    """A recipe whose artifact cannot fit is refused before any training; any other configuration is warned.
    Under SDClip the estimate counts Gaussian codes, an upper bound: the real artifact came out 4-10% smaller
    at the full shapes (README "Artifact size and quantization"), so a recipe within SDCLIP_ESTIMATE_SLACK of
    the cap is warned, not refused, and the artifact line at the end says whether it fit."""
    hp = r.hp
    spec = QuantSpec.from_hparams(hp)
    total = r.code_bytes + estimate_model_bytes(r.model, quant_plan(hp), spec, hp.compressor)
    r.log(f"artifact_estimate: ~{total} bytes with code (cap {ARTIFACT_CAP_BYTES}; from the shapes, with random "
          "stand-in weights: trained ones usually compress a little better)")
    if total <= ARTIFACT_CAP_BYTES:
        return
    why = (f"the artifact would be about {total / 1e6:.1f} MB, over the {ARTIFACT_CAP_BYTES:,}-byte cap; "
           "lower NUM_LAYERS, MODEL_DIM or MLP_MULT")
    slack = SDCLIP_ESTIMATE_SLACK if spec.clip == "sdclip" else 0.0
    if hp.recipe != "baseline" and total > ARTIFACT_CAP_BYTES * (1 + slack):
        raise ConfigError(f"RECIPE={hp.recipe} at NUM_LAYERS={hp.num_layers}: {why}")
    if slack:
        why += (f" (or raise SDCLIP_K_*); within the estimate's {slack:.0%} margin under SDClip, so it may fit")
    r.log(f"WARNING: {why} (the run goes on: the artifact line at the end has the real size)")


def log_run_header(r: Run, hp: Hyperparameters):
    r.log(f"run_id:{r.run_id} mlx:{mx.__version__} device:{mx.default_device()} compute_dtype:{hp.dtype()}")
    r.log("hparams: " + " ".join(hparam_text(hp, env_name(f), getattr(hp, f.name)) for f in env_fields()))
    if hp.derived:
        r.log(f"recipe: {hp.recipe} at NUM_LAYERS={hp.num_layers}; [derived] values follow from NUM_LAYERS "
              "(set them to override)")


def hparam_text(hp: Hyperparameters, name: str, value) -> str:
    return f"{name}={value}" + ("[derived]" if name in hp.derived else "")


# ---------------------------------------------------------------------------- set up and warm up
def setup(r: Run, sp):
    hp = r.hp
    log = r.log
    log_run_header(r, hp)
    cfg = ModelConfig.from_hparams(hp)
    seq = hp.train_seq_len
    W = r.group.size()
    if hp.train_batch_tokens // seq % W:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN x {W} ranks")
    r.micro_seqs = micro_seqs(hp)
    r.val_tokens = load_validation_tokens(hp.data_path, hp.val_max_tokens, cfg.vocab_size)
    check_mixer_cap(hp, r.val_tokens.size)
    check_memory(memory_needs(hp, cfg, micro_tokens(hp, W), r.val_tokens.size, W), log, r.local_ranks)
    mx.random.seed(hp.seed)
    np.random.seed(hp.seed)
    r.tables = build_byte_tables(sp, cfg.vocab_size)
    log(check_tokenizer(sp, hp.data_path, hp.tokenizer_path))
    files = shard_files(hp.data_path, "train")
    r.train_shards = check_train_shards(files)
    log(f"train_tokens:{sum(n for _, n in r.train_shards)} (every train shard's header checked)")
    r.model = GPT(cfg, hp.dtype())
    r.opt = Optimizers(r.model, hp)
    check_artifact_estimate(r)
    log(f"val_tokens:{r.val_tokens.size} params:{count_params(r.model)} " + " ".join(
        f"params_{k}:{count_params(getattr(r.model, k))}" for k in ("engram", "skipgram") if k in r.model))
    complement = None
    if hp.complement_alpha > 0:
        t0 = time.perf_counter()
        complement = mx.array(bigram_table(files, cfg.vocab_size, hp.complement_max_tokens))
        log(f"complement: bigram table from <= {hp.complement_max_tokens} train tokens in "
            f"{time.perf_counter() - t0:.1f}s (alpha:{hp.complement_alpha} floor:{hp.complement_floor})")
    # one complete graph set per training mode: switching QAT or recurrence on swaps sets, never a baked-in flag
    r.recur_on = not (hp.recur_start_frac and r.model.span)
    r.graphs = {(qat, rec): Compiled(r.model, r.opt, qat_bits=quant_plan(hp) if qat else 0, complement=complement,
                                     recur=rec) for qat in ((False, True) if hp.qat_start_frac < 1.0 else (False,))
                for rec in sorted({r.recur_on, True})}
    r.stream = TokenStream(files, cfg.vocab_size, log)
    log(f"train_shards:{len(files)} batch_tokens:{hp.train_batch_tokens} seq_len:{seq} "
        f"microbatch_seqs:{r.micro_seqs} iterations:{hp.iterations} max_wallclock:{hp.max_wallclock_seconds}s")
    log(f"warmdown: {describe_warmdown(hp)}")
    log_eval_config(hp, hp.train_seq_len, log)


def warmup(r: Run):
    """Prime every compiled graph on training tokens, then restore weights, optimizer state and data order."""
    hp = r.hp
    log = r.log
    if not hp.warmup_steps or not hp.iterations:
        return
    r.phase = "warmup"
    init_params = dict(tree_flatten(r.model.parameters()))
    first = (False, r.recur_on)
    later = [mode for mode in r.graphs if mode != first]  # each later mode's graphs once
    modes = [first] * max(hp.warmup_steps - len(later), 1) + later
    t0 = time.perf_counter()
    for i, (qat, rec) in enumerate(modes):
        x, y = r.stream.next_batch(hp.train_batch_tokens, hp.train_seq_len)
        mx.eval(train_step(r.graphs[qat, rec], x, y, r.micro_seqs, 1.0, muon_momentum_at(0, hp), r.group))
        log(f"warmup_step:{i + 1}/{len(modes)}{' (qat graphs)' if qat else ''}"
            f"{' (recurrence graphs)' if rec != r.recur_on else ''} {time.perf_counter() - t0:.1f}s")
    r.model.update(tree_unflatten(list(init_params.items())))
    r.opt.reset(dict(tree_flatten(r.model.trainable_parameters())))
    seq = hp.train_seq_len
    n_windows = -(-(r.val_tokens.size - 1) // hp.train_seq_len)
    mx.eval(r.graphs[first].token_nll(*[mx.zeros((min(eval_batch_seqs(hp, seq), n_windows), seq), mx.int32)] * 2))
    r.stream = TokenStream(r.stream.files, r.stream.vocab_size, log)
    log(f"warmup:{len(modes)} steps {time.perf_counter() - t0:.1f}s (compile; state restored)")


def check_resume_data(r: Run, meta: dict):
    """DATA_PATH may move, but its train shards must be the checkpoint's (names and token counts), else refused
    like other result-changing settings; RESUME_OVERRIDE=1 trains on with them, and the log says so."""
    saved = meta.get("train_shards")
    mine = r.train_shards
    if saved is None or saved == mine:  # None: a checkpoint from before shards were recorded
        return
    differ = [f"{a[0]}:{a[1]} tokens (checkpoint: {b[0]}:{b[1]})" for a, b in zip(mine, saved) if a != b][:3]
    why = (f"DATA_PATH={r.hp.data_path} has {len(mine)} train shard(s), {sum(n for _, n in mine)} tokens, but the "
           f"checkpoint was trained on {len(saved)}, {sum(n for _, n in saved)} tokens" +
           (f"; first differences: {', '.join(differ)}" if differ else ""))
    if not r.hp.resume_override:
        raise ConfigError(f"RESUME_FROM={r.hp.resume_from}: {why}. The train stream would go on over other data: "
                          "point DATA_PATH at the checkpoint's shards, or set RESUME_OVERRIDE=1 to train on with these")
    r.log(f"resume: {why} (RESUME_OVERRIDE=1: training goes on over these shards)")


def resume(r: Run, meta: dict, params: dict, state: dict):
    """Continue from a checkpoint: weights, optimizer state, EMA, step, time, data position, QAT, recurrence, and
    the wall-clock stop if its run had reached the cap (unless MAX_WALLCLOCK_SECONDS now differs)."""
    load_flat_into(r.model, params)
    r.opt.load_arrays(state)
    r.step = meta["step"]
    r.train_ms = meta["train_ms"]
    r.qat_on = meta["qat_on"]
    r.recur_on = meta["recur_on"]
    r.resumed_from = meta.get("run_id", "")
    r.stream.restore(meta["stream"])
    r.stop_at = meta.get("stop_at")
    if r.stop_at is not None and r.hp.max_wallclock_seconds != meta["hparams"]["max_wallclock_seconds"]:
        r.log(f"resume: the checkpoint's run stopped at the wall-clock cap at step {r.stop_at}; "
              f"MAX_WALLCLOCK_SECONDS={r.hp.max_wallclock_seconds} lifts that stop")
        r.stop_at = None
    for note in r.hp.resume_notes:
        r.log(f"resume: {note}")
    r.log(f"resumed from {r.hp.resume_from}: step:{r.step} train_time:{r.train_ms:.0f}ms qat:{r.qat_on} "
          f"recurrence:{r.recur_on}")


def save_checkpoint(r: Run, path: str | None = None) -> str:
    path = path or r.path("_ckpt.pgck")
    if r.group.rank():  # rank 0 saves; every rank holds the same state
        return path
    meta = dict(step=r.step, train_ms=r.train_ms, qat_on=r.qat_on, recur_on=r.recur_on, stream=r.stream.state(),
                stop_at=r.stop_at, train_shards=r.train_shards, run_id=r.run_id,
                hparams={f.name: getattr(r.hp, f.name) for f in env_fields()})
    n = write_checkpoint(path, r.model, r.opt, meta)
    r.checkpoint = path
    r.log(f"checkpoint: step:{r.step} {path} ({n} bytes)")
    return path


def checkpoint(r: Run) -> str:
    """A checkpoint is also where the ranks prove they still hold the same weights: a divergence is caught here,
    not after the whole run, and rank 0's state is kept in the checkpoint before the run stops."""
    same = check_ranks_agree(r, f"at step {r.step}")
    path = save_checkpoint(r)
    if not same:
        raise TrainingDiverged(f"ranks hold different weights at step {r.step}; rank 0's state is saved in {path}")
    return path


# ---------------------------------------------------------------------------- train
def train(r: Run):
    """Step until ITERATIONS, the wall-clock cap, Ctrl-C or SIGTERM; evaluate periodically and at the end. A first
    signal only asks to stop (catch_stop_signals): the step, evaluation or checkpoint in flight completes."""
    previous = catch_stop_signals(r)
    try:
        train_loop(r)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what schedulers and `timeout` send


def signal_label(signum: int) -> str:
    return "Ctrl-C" if signum in (0, signal.SIGINT) else signal.Signals(signum).name


def catch_stop_signals(r: Run) -> dict:
    """A KeyboardInterrupt raised inside the compiled step would surface after the step has already updated the
    weights, so a checkpoint taken then would hold step s+1 under step s. A first Ctrl-C or SIGTERM only sets a
    flag, read at safe points; a second one of either aborts (abort_now). Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        r.stop_asked = True
        r.stop_signal = signum
        for s in STOP_SIGNALS:
            signal.signal(s, partial(abort_now, r))

    return {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}


def abort_now(r: Run, signum, frame):
    """Stop at once, as Ctrl-C does by default: main says what was written, and exits 128 + the signal."""
    r.stop_signal = signum
    raise KeyboardInterrupt


@contextmanager
def abort_on_sigterm(r: Run):
    """Outside training (set-up, warm-up, the artifact and its evaluation) SIGTERM aborts like Ctrl-C, with a line
    saying what was written, instead of ending the process without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, partial(abort_now, r))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_now(r: Run) -> bool:
    """At a safe point (no step in flight): did Ctrl-C or SIGTERM arrive on any rank? Then save the exact state."""
    if r.interrupted:
        return False
    asked = int(ranks_max(r, float(r.stop_signal) if r.stop_asked else 0.0))
    if not asked:
        return False
    r.interrupted = True
    r.stop_signal = asked
    label = signal_label(asked)
    r.log(f"interrupted ({label}) at step {r.step}: saving a checkpoint, then evaluating and writing the "
          f"artifact ({label} again to abort)")
    checkpoint(r)
    return True


def train_loop(r: Run):
    hp = r.hp
    max_ms = train_budget_ms(hp)
    t_last = time.perf_counter()
    r.phase = "training"
    while True:
        last = r.step >= hp.iterations or (r.stop_at is not None and r.step >= r.stop_at) or r.interrupted
        progress = max(r.step / max(hp.iterations, 1), r.train_ms / max_ms if max_ms > 0 else 0.0)
        switch_modes(r, progress, last)
        if last or (hp.val_loss_every and r.step and r.step % hp.val_loss_every == 0):
            r.train_ms = ranks_max(r, r.train_ms + (time.perf_counter() - t_last) * 1000)
            periodic_eval(r, final=last)
            t_last = time.perf_counter()
        if last:
            break
        if stop_now(r):
            continue
        r.last_step_from_ms = r.train_ms + (time.perf_counter() - t_last) * 1000
        loss = one_step(r)
        now = time.perf_counter()
        r.train_ms = ranks_max(r, r.train_ms + (now - t_last) * 1000)
        t_last = now
        if max_ms > 0 and r.train_ms >= max_ms and r.stop_at is None:
            r.stop_at = r.step
        log_step(r, loss, r.stop_at == r.step)
        if hp.checkpoint_every and r.step % hp.checkpoint_every == 0 and r.step < hp.iterations:
            checkpoint(r)
            t_last = time.perf_counter()  # writing the checkpoint is not training time
    if r.stop_at is not None and r.stop_at < hp.iterations:
        r.log(f"stopping_early: wallclock_cap train_time:{r.train_ms:.0f}ms step:{r.step}/{hp.iterations}")
    r.log(f"peak_memory:{mx.get_peak_memory() / 2**20:.0f}MiB")


def switch_modes(r: Run, progress: float, last: bool):
    """Late QAT and delayed recurrence: move to the next graph set once training is that far along. A run that
    stops before RECUR_START_FRAC keeps the plain order it trained, and so does its artifact (plain_order)."""
    hp = r.hp
    if not r.qat_on and hp.qat_start_frac < 1.0 and progress >= hp.qat_start_frac and not last:
        r.qat_on = True
        r.log(f"qat:on step:{r.step} (bits {quant_plan(hp)} fake quantization, max-abs clip, straight-through)")
    if not r.recur_on and progress >= hp.recur_start_frac and not last:
        r.recur_on = True
        if "recur_mlps" in r.model:  # the second pass's MLPs (and their EMA) start as copies of the first's
            copies = r.model.untie_copies()
            r.model.update(tree_unflatten(list(copies.items())))
            if r.opt.ema:
                r.opt.ema.update(copies)
        times = "twice" if hp.recur_passes == 1 else f"{1 + hp.recur_passes} times"
        r.log(f"recurrence:on step:{r.step} layers {hp.recur_layers} run {times}")


def one_step(r: Run) -> float:
    hp = r.hp
    x, y = r.stream.next_batch(hp.train_batch_tokens, hp.train_seq_len)
    loss = float(train_step(r.graph, x, y, r.micro_seqs, lr_multiplier(r.step, r.train_ms, hp),
                            muon_momentum_at(r.step, hp), r.group))
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"train loss is {loss} at step {r.step + 1}: training diverged; nothing is written. Lower the "
            f"learning rates (MATRIX_LR={hp.matrix_lr}, SCALAR_LR={hp.scalar_lr}, TIED_EMBED_LR={hp.tied_embed_lr}) "
            f"or set GRAD_CLIP_NORM (now {hp.grad_clip_norm})")
    r.step += 1
    warn_if_above_chance(r, loss)
    return loss


def warn_if_above_chance(r: Run, loss: float):
    """A loss well above ln(VOCAB_SIZE), a uniform guess, after the first steps means the run is diverging while
    still finite (too high a learning rate for this batch): say so once, naming the variables."""
    hp = r.hp
    chance = math.log(r.hp.vocab_size)
    if r.step > 2 and loss > chance + 1.0 and not r.warned_loss:
        r.warned_loss = True
        r.log(f"WARNING: train loss {loss:.2f} at step {r.step} is above ln(VOCAB_SIZE)={chance:.2f} + 1, worse than "
              f"a uniform guess: training is diverging. Lower MATRIX_LR={hp.matrix_lr}, SCALAR_LR={hp.scalar_lr}, "
              f"TIED_EMBED_LR={hp.tied_embed_lr} (EMBED_LR, HEAD_LR untied), or raise TRAIN_BATCH_TOKENS")


def log_step(r: Run, loss: float, capped: bool):
    hp = r.hp
    step = r.step
    if step <= 10 or step % hp.train_log_every == 0 or step == hp.iterations or capped:
        avg = r.train_ms / step
        left = hp.iterations - step
        if hp.max_wallclock_seconds > 0:
            left = min(left, max(train_budget_ms(hp) - r.train_ms, 0) / avg)
        r.log(f"step:{step}/{hp.iterations} train_loss:{loss:.4f} train_time:{r.train_ms:.0f}ms "
              f"step_avg:{avg:.2f}ms tok_s:{hp.train_batch_tokens / (avg / 1000):.0f} eta:{left * avg / 1000:.0f}s")


def periodic_eval(r: Run, final: bool):
    """The val line of the baseline's log."""
    loss, bpb, _ = run_eval(r.hp, r.model, r.opt, r.graph, r.val_tokens, r.tables, r.log,
                            "val", final=final, seq=r.hp.train_seq_len, group=r.group, cache=r.mixer_stats)
    r.pre_quant = (loss, bpb)
    r.log(f"step:{r.step}/{r.hp.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
          f"train_time:{r.train_ms:.0f}ms step_avg:{r.train_ms / max(r.step, 1):.2f}ms")


# ---------------------------------------------------------------------------- evaluate
def log_eval_config(hp: Hyperparameters, trained_seq: int, log):
    eval_seq = hp.eval_seq_len or trained_seq
    ttt = ",".join(f"{f.name[4:]}={getattr(hp, f.name)}" for f in env_fields() if f.name.startswith("ttt_"))
    if hp.ngram_alpha_mode == "adaptive":
        weight = (f"adaptive/grid{hp.ngram_alpha_grid}/prior_zero{hp.ngram_prior_zero}/"
                  f"bins{hp.ngram_conf_bins}x{hp.ngram_entropy_bins}")
    else:
        weight = f"{hp.ngram_alpha_mode}/alpha{hp.ngram_alpha}"
    log(f"final_eval: seq_len:{eval_seq} stride:{hp.eval_stride_resolved or eval_seq} "
        f"batch_seqs:{hp.eval_batch_seqs or eval_batch_seqs(hp, eval_seq)} mixer:" + (
            f"order{hp.ngram_max_order}/{weight}/cap{hp.ngram_max_memory_mb}MiB"
            if hp.ngram_mixer_enabled else "off") + f" ttt:{ttt if hp.ttt_enabled else 'off'}")


def make_mixer(hp: Hyperparameters, vocab: int, tokens: np.ndarray, log, group=None, cache: dict | None = None):
    """The mixer, its statistics started from the tokens alone (a worker thread on one process), so they
    are ready by the time the model's first scores arrive. `cache` (one per run) keeps them: the pre-quant
    and the round-trip evaluations of a run count the same split once."""
    mixer = BackoffNgramMixer(vocab, hp.ngram_max_order, hp.ngram_alpha, hp.ngram_alpha_mode,
                              hp.ngram_max_memory_mb, group, hp.ngram_alpha_grid, hp.ngram_prior_zero,
                              hp.ngram_conf_bins, hp.ngram_entropy_bins)
    key = (vocab, hp.ngram_max_order, tokens.size)
    if cache is not None and key in cache:
        log(f"ngram_mixer: the per-token statistics of this split's {tokens.size} tokens, counted once per run")
        mixer.prepare(tokens, like=cache[key])
        return mixer
    need = mixer.peak_nbytes(tokens.size) / 2**20
    W = 1 if group is None else group.size()
    log(f"ngram_mixer: per-token statistics for {tokens.size} tokens, peak {need:.0f} MiB "
        f"(cap NGRAM_MAX_MEMORY_MB={hp.ngram_max_memory_mb}), " + (
            f"counting split over {W} ranks by last token" if W > 1 else "in a worker thread"))
    mixer.prepare(tokens, background=True)
    if cache is not None:
        cache[key] = mixer
    return mixer


def run_eval(hp, model, opt, fns, val_tokens, tables, log, label, final, seq, group=None, cache=None):
    """Evaluate the weights that would be saved (the EMA when it is on). Final evaluations use the
    configured sliding window and n-gram mixer (its statistics kept in `cache` for the run's next final
    evaluation); periodic ones the cheap standard eval."""
    t0 = time.perf_counter()
    raw = None
    if opt is not None and opt.ema and label == "val":
        raw = model.trainable_parameters()
        model.update(tree_unflatten(list(opt.ema.items())))
    mixer = None
    ttt = None
    kw = dict(seq_len=seq, batch_seqs=eval_batch_seqs(hp, seq))
    if final:
        eval_seq = hp.eval_seq_len or seq
        kw = dict(seq_len=eval_seq, stride=hp.eval_stride_resolved,
                  batch_seqs=hp.eval_batch_seqs or eval_batch_seqs(hp, eval_seq))
        if hp.ttt_enabled and hp.ttt_mode == "doc_lora":  # its own loop; the mixer reads its queue's stream
            return run_doc_eval(hp, model, opt, val_tokens, tables, log, label, eval_seq, group, raw, t0)
        if hp.ngram_mixer_enabled:
            mixer = make_mixer(hp, model.cfg.vocab_size, val_tokens, log, group, cache)
        if hp.ttt_enabled:  # adapts the weights evaluated here (the EMA when on); close() restores them
            ttt = TestTimeTrainer(model, hp, eval_seq, hp.eval_stride_resolved or eval_seq, group)
            fns = Compiled(model, opt or Optimizers(model, hp), ttt=ttt)
            ttt.prime(fns.ttt_step)
    fn = fns.token_stats if mixer and mixer.needs_entropy else fns.token_nll
    try:
        loss, bpb, nll = evaluate(fn, val_tokens, tables=tables, mixer=mixer, log=log, label=label, group=group,
                                  ttt=ttt, **kw)
    finally:
        if ttt:
            ttt.close()
        if raw is not None:
            model.update(raw)
    write_token_nll(hp, nll, log, label, group)
    return loss, bpb, (time.perf_counter() - t0) * 1000


def write_token_nll(hp, nll: np.ndarray, log, label: str, group):
    if hp.eval_token_nll_path and label != "val" and not (group and group.rank()):
        atomic_write(hp.eval_token_nll_path, nll.astype("<f4").tobytes())
        log(f"per-token NLL (float32 nats, {nll.size} targets in order) written to {hp.eval_token_nll_path}")


def run_doc_eval(hp, model, opt, val_tokens, tables, log, label, seq, group, raw, t0):
    """run_eval's final evaluation under TTT_MODE=doc_lora (README "Test-time training"); restores the weights
    (the phases', and `raw` when run_eval swapped the EMA in)."""
    need_ent = hp.ngram_mixer_enabled and hp.ngram_alpha_mode == "entropy"
    doc = None
    try:
        doc = DocTTT(model, hp, seq, opt, val_tokens, need_ent, group)
        mixer = make_mixer(hp, model.cfg.vocab_size, doc.plan.stream, log, group) if hp.ngram_mixer_enabled else None
        log(f"ttt_doc_lora: {doc.plan.queue.size} documents, {-(-doc.plan.queue.size // doc.rows)} batches of "
            f"{doc.rows}, chunk {hp.ttt_doc_chunk}, phases at {phase_bounds(hp) if hp.ttt_phases else 'none'}")
        loss, bpb, nll = evaluate_docs(doc, val_tokens, tables, mixer, log, label, group)
    finally:
        if doc:
            doc.close()
        if raw is not None:
            model.update(raw)
    write_token_nll(hp, nll, log, label, group)
    return loss, bpb, (time.perf_counter() - t0) * 1000


def eval_only(r: Run, sp) -> int:
    """Score an artifact. The model shape and default window come from its header, and every
    evaluation variable is re-validated against that shape, not the environment's."""
    with on_every_rank(r):  # a host whose copy or memory fails stops every rank
        cfg, flat, header = read_artifact(r.hp.load_artifact)
        trained_seq = int(header["meta"].get("train_seq_len", r.hp.train_seq_len))
        hp = replace(r.hp, **asdict(cfg), train_seq_len=trained_seq)
        log = r.log
        hp.check_relations()
        log_run_header(r, hp)
        val_tokens = load_validation_tokens(hp.data_path, hp.val_max_tokens, cfg.vocab_size)
        check_mixer_cap(hp, val_tokens.size)
        check_memory(memory_needs(hp, cfg, 0, val_tokens.size, r.group.size()), log, r.local_ranks)
        model = GPT(cfg, hp.dtype())
        load_flat_into(model, flat)
        tables = build_byte_tables(sp, cfg.vocab_size)
        log(check_tokenizer(sp, hp.data_path, hp.tokenizer_path))
    log(f"val_tokens:{val_tokens.size} params:{count_params(model)} artifact:{hp.load_artifact}")
    log_eval_config(hp, trained_seq, log)
    r.phase = "evaluation"
    loss, bpb, ms = run_eval(hp, model, None, Compiled(model, Optimizers(model, hp)), val_tokens, tables, log,
                             "eval", final=True, seq=trained_seq, group=r.group)
    log(f"eval_only val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"eval_only_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    return 0


# ---------------------------------------------------------------------------- write and prove
def write_and_prove_artifact(r: Run):
    """Quantize + compress the saved weights (the EMA when on), then reload the file and score it."""
    hp = r.hp
    log = r.log
    raw = dict(tree_flatten(r.model.parameters()))  # a rescue checkpoint holds these, the EMA beside them
    if r.opt.ema:
        r.model.update(tree_unflatten(list(r.opt.ema.items())))
        log(f"ema: saving the EMA weights (decay {hp.ema_decay})")
    flat = flat_numpy(r.model)
    cfg = r.model.cfg
    if r.model.span and not r.recur_on:
        flat, cfg = plain_order(flat, cfg)
        log(f"recurrence: never trained (the run stopped before RECUR_START_FRAC={hp.recur_start_frac}): the "
            "artifact holds the plain layer order the model was trained in")
    path = r.path(f"_model.int{hp.quant_bits}.ptz") if not r.group.rank() else os.path.join(  # ranks > 0: a private
        tempfile.gettempdir(), f"{r.run_id}_rank{r.group.rank()}.ptz")  # copy to round-trip
    spec = QuantSpec.from_hparams(hp, calibrate(r) if hp.quant_method_resolved == "gptq" else None)
    log(f"writing artifact {path} (bits {quant_plan(hp)} quant:{spec.method} clip:{spec.clip} "
        f"lqer_top_k:{spec.lqer_top_k} {hp.compressor})...")
    r.phase = "writing the artifact"
    timings = {}
    with on_every_rank(r):  # a rank that cannot write stops them all, before the round-trip's collectives
        try:
            model_bytes = write_artifact(path, flat, cfg, quant_plan(hp),
                                         dict(run_id=r.run_id, step=r.step, train_seq_len=hp.train_seq_len),
                                         codec=hp.compressor, spec=spec, timings=timings)
        except OSError as e:
            r.model.update(tree_unflatten(list(raw.items())))
            raise OSError(f"cannot write the artifact {path} ({e.strerror or e}); {rescue_weights(r)}") from None
    log(f"artifact_time: quantize:{timings['quantize_s']:.1f}s compress:{timings['compress_s']:.1f}s "
        "(after training, reading no data)")
    _, flat, header = read_artifact(path)
    total = r.code_bytes + model_bytes
    source = readable_source()
    log(f"artifact: code_bytes:{r.code_bytes} model_bytes:{model_bytes} total_bytes:{total} "
        f"source_bytes:{len(source.encode()) if source else 'unknown'} cap:{ARTIFACT_CAP_BYTES} "
        f"{'OK' if total <= ARTIFACT_CAP_BYTES else 'OVER'} codec:{header['codec']}")
    if total > ARTIFACT_CAP_BYTES:
        log(f"WARNING: artifact is OVER the {ARTIFACT_CAP_BYTES}-byte cap by {total - ARTIFACT_CAP_BYTES} bytes: "
            "this cannot be submitted; shrink the model (NUM_LAYERS, MODEL_DIM, MLP_MULT)")
    r.phase = "the round-trip evaluation"
    if r.group.rank():
        os.unlink(path)
    model = r.model
    opt = r.opt
    fns = r.graphs[False, True]
    if cfg != r.model.cfg:  # the plain order: score the model the artifact describes
        model = GPT(cfg, hp.dtype())
        opt = None
        fns = Compiled(model, Optimizers(model, hp))
    load_flat_into(model, flat)
    loss, bpb, ms = run_eval(hp, model, opt, fns, r.val_tokens, r.tables, log, "roundtrip",
                             final=True, seq=hp.train_seq_len, group=r.group, cache=r.mixer_stats)
    tag = f"final_int{hp.quant_bits}_{header['codec']}_roundtrip"
    log(f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    if hp.submission_dir and not r.group.rank():
        write_submission(r, loss, bpb, ms, model_bytes)


def calibrate(r: Run) -> dict:
    """GPTQ's Hessians from a fresh read of the training shards (never validation tokens): GPTQ_CALIBRATION_TOKENS,
    but never more than the run trained on, so a short run does not calibrate for minutes. Its time counts toward
    the cap with training's (GPTQ_RESERVE_SECONDS left room for it)."""
    hp = r.hp
    seq = hp.train_seq_len
    n = min(hp.gptq_calibration_tokens, r.step * hp.train_batch_tokens) // seq * seq
    t0 = time.perf_counter()
    stream = TokenStream(shard_files(hp.data_path, "train"), r.model.cfg.vocab_size)
    r.model.recur_on = r.recur_on  # the order the artifact holds (plain_order when recurrence never started)
    try:
        hessians = collect_hessians(r.model, stream, n, seq, max(hp.mlx_max_microbatch_tokens, seq))
    finally:
        r.model.recur_on = True
    r.calib_ms = (time.perf_counter() - t0) * 1000
    cap_ms = hp.max_wallclock_seconds * 1000
    r.log(f"gptq: calibration on {n} train tokens ({len(hessians)} Hessians) in {r.calib_ms / 1000:.1f}s" + (
        f"; training + calibration {(r.train_ms + r.calib_ms) / 1000:.1f}s of the {cap_ms / 1000:g}s cap"
        if cap_ms > 0 else ""))
    if cap_ms > 0 and r.train_ms + r.calib_ms > cap_ms:
        r.log("WARNING: training + GPTQ calibration ran past MAX_WALLCLOCK_SECONDS: raise GPTQ_RESERVE_SECONDS or "
              "lower GPTQ_CALIBRATION_TOKENS")
    return hessians


def plain_order(flat: dict, cfg: ModelConfig):
    """(weights, config) of the same network without RECUR_LAYERS: the second pass's MLPs dropped, the U-Net skip
    rows cut to the plain order's (it reads only those: rows 0..L//2-1), XSA capped at L (same layers)."""
    L = cfg.num_layers
    plain = replace(cfg, recur_layers="", recur_untied_mlp=False, recur_passes=1, xsa_last_n=min(cfg.xsa_last_n, L))
    flat = {n: a for n, a in flat.items() if not n.startswith("recur_mlps.")}
    for name in ("skip_weights", "skip_gates"):
        if L // 2 and name in flat:
            flat[name] = flat[name][:L // 2]
        else:
            flat.pop(name, None)
    return flat, plain


def rescue_weights(r: Run) -> str:
    """Save the trained state somewhere (OUT_DIR, else the temp folder) and say where. Only rank 0 writes."""
    if r.group.rank():
        return f"rank {r.group.rank()} saves nothing: rank 0 saves its weights"
    for folder in (r.hp.out_dir, tempfile.gettempdir()):
        try:
            path = save_checkpoint(r, os.path.join(folder, f"{r.run_id}_ckpt.pgck"))
            return f"the trained weights are saved in the checkpoint {path}"
        except OSError:
            continue
    return "the trained weights could not be saved anywhere (disk full?)"


# ======== The challenge's record folder: the counted script, submission.json, README ================================
TRACKS = {"track_10min_16mb": "10min_16mb", "track_non_record_16mb": "non_record_16mb"}  # folder -> json name
TRACK_LIMIT_S = 600.0  # track_10min_16mb: training, and evaluation, each within 10 minutes
# The challenge's validation split: the first 50,000 FineWeb documents, each opened by BOS. For sp1024 its
# fineweb_val_000000.bin holds 62,021,846 tokens (the data manifest's tokens_val; 124,044,716 bytes): the check.
# For sp8192 (kevclark/parameter-golf) the records log only the count cut to whole 2,048-token windows plus one
# target, `val_tokens: 40540160` (= ((n - 1) // 2048) * 2048, so n is 40,540,161..40,542,208): the check is that
# cut and the 50,000 documents. For other tokenizers, the number of documents (BOS tokens) is.
OFFICIAL_VAL_DOCS = 50_000
OFFICIAL_VAL_TOKENS = {1024: 62_021_846}
OFFICIAL_VAL_WINDOWED = {8192: (2048, 40_540_160)}  # vocab -> (window, tokens in whole windows)
# Fields that do not change the result: a seed run with other values is the same configuration. Those a resumed
# run may change (RESUME_FREE), the seed, and evaluation-only runs' (a seed is a training run).
NOT_RESULT_FIELDS = set(RESUME_FREE) | {"seed", "eval_only", "load_artifact"}
PACKED_MARK = "# train_gpt_mlx.py packed"
# The name the packed code is compiled under: not a file, so a traceback shows no line of an unrelated file (under
# train_gpt_mlx.py's name it showed the readable copy's lines at the packed code's line numbers).
PACKED_CODE_NAME = "<train_gpt.py, packed>"
SUBMISSION_LOCK_WAIT_S = 300.0  # a seed waits this long for another seed writing into the same track
# What a submission.json written by this script holds (read_submission_json refuses one without them)
SUBMISSION_KEYS = ("seed_results", "config", "validation", "train_data")
SEED_KEYS = ("val_loss", "val_bpb", "pre_quant_val_loss", "pre_quant_val_bpb", "artifact_bytes", "bytes_model",
             "steps", "train_seconds", "eval_seconds", "run_id")


def stripped_tree(source: str) -> ast.Module:
    """The script without docstrings and function annotations: neither changes what it does (annotations are
    never evaluated under `from __future__ import annotations`; dataclass fields keep theirs)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                arg.annotation = None
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not body:
            continue
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                  str):
            node.body = body[1:] or [ast.Pass()]
    return tree


# The packer itself: only the readable script packs itself. Run as train_gpt.py, counted_script counts the file's
# own bytes, so none of these can be reached there, and they are left out of it (packed_tree). stripped_tree and
# packed_tree stay: a packed script checks with them that the readable copy beside it is its source.
PACKER_ONLY = ("packed_code", "tight_tokens", "source_span", "packed_script")


def packed_tree(source: str) -> ast.Module:
    """What train_gpt.py runs: stripped_tree without the packer (PACKER_ONLY), which a packed script never calls."""
    tree = stripped_tree(source)
    tree.body = [node for node in tree.body if getattr(node, "name", None) not in PACKER_ONLY]
    return tree


def packed_code(source: str) -> str:
    """packed_tree as source (ast.unparse also drops comments), indented one space a level and without the
    spaces a parser ignores (tight_tokens); kept as unparsed where that would change the program: the packed code
    must parse to the same tree."""
    code = ast.unparse(packed_tree(source))
    narrow = re.sub(r"(?m)^(?:    )+", lambda m: " " * (len(m[0]) // 4), code)
    for tighter in (narrow, tight_tokens(narrow)):
        if ast.dump(ast.parse(tighter)) == ast.dump(ast.parse(code)):
            code = tighter
    return code


def tight_tokens(code: str) -> str:
    """The code's tokens with a space only where two would merge (names, keywords, numbers); each line keeps its
    indentation, and an f-string (several tokens from Python 3.12 on) is copied as written."""
    lines = code.splitlines(keepends=True)
    out = []
    prev = None
    fstring_from = None
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        name = tokenize.tok_name[tok.type]
        if name in ("INDENT", "DEDENT", "ENDMARKER"):
            continue
        if name == "FSTRING_START":
            depth += 1
            fstring_from = fstring_from or tok
        if depth:
            depth -= name == "FSTRING_END"
            if depth:
                continue
            tok = tok._replace(string=source_span(lines, fstring_from.start, tok.end), start=fstring_from.start)
            fstring_from = None
        if name in ("NEWLINE", "NL"):
            out.append("\n")
        elif prev is None or prev.string == "\n" or tokenize.tok_name[prev.type] in ("NEWLINE", "NL"):
            out.append(lines[tok.start[0] - 1][:tok.start[1]] + tok.string)
        else:
            word = prev.string[-1:].isalnum() or prev.string[-1:] == "_"
            merge = word and (tok.string[:1].isalnum() or tok.string[:1] == "_") or (
                prev.type == tokenize.NUMBER and tok.string[:1] == ".")
            out.append((" " if merge else "") + tok.string)
        prev = tok
    return "".join(out)


def source_span(lines: list, start: tuple, end: tuple) -> str:
    if start[0] == end[0]:
        return lines[start[0] - 1][start[1]:end[1]]
    return lines[start[0] - 1][start[1]:] + "".join(lines[start[0]:end[0] - 1]) + lines[end[0] - 1][:end[1]]


PACKED_FILTERS = [dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, lc=3, lp=0, pb=0, nice_len=273)]


def packed_script(source: str) -> str:
    """The record folder's train_gpt.py: the challenge counts its bytes, so it holds packed_code as a raw LZMA2
    stream (no container: its headers and checksum would be counted too), base85-encoded (ASCII: the file stays
    UTF-8 text, as the challenge reads it). It runs in the wrapper's own globals, so `__name__ == "__main__"`
    holds and `__file__` is train_gpt.py."""
    raw = lzma.compress(packed_code(source).encode("utf-8"), lzma.FORMAT_RAW, filters=PACKED_FILTERS)
    blob = base64.b85encode(raw).decode("ascii")
    return (f"{PACKED_MARK}; the readable script is train_gpt_mlx.py beside this file\n"
            "import base64, lzma\n"
            f'exec(compile(lzma.decompress(base64.b85decode("{blob}"), lzma.FORMAT_RAW, filters=[{{"id": '
            f'lzma.FILTER_LZMA2}}]), "{PACKED_CODE_NAME}", "exec"))\n')


def running_packed() -> bool:
    with open(__file__, "rb") as f:
        return f.read(len(PACKED_MARK)) == PACKED_MARK.encode()


@lru_cache(maxsize=None)
def running_code() -> str:
    """The code this process runs: this file's text, or, run as a packed train_gpt.py, the code it unpacks."""
    text = Path(__file__).read_text(encoding="utf-8")
    if not running_packed():
        return text
    blob = re.search(r'b85decode\("([^"]+)"\)', text)[1]
    return lzma.decompress(base64.b85decode(blob), lzma.FORMAT_RAW, filters=PACKED_FILTERS).decode("utf-8")


@lru_cache(maxsize=None)
def readable_source() -> str | None:
    """train_gpt_mlx.py's text: this file; run as a packed train_gpt.py, the readable copy beside it when the code
    that runs is that copy packed. None otherwise: the packed code itself is no readable copy (it lacks the
    packer, so it cannot run as train_gpt_mlx.py), nor is another version of the script."""
    if not running_packed():
        return running_code()
    beside = Path(__file__).with_name("train_gpt_mlx.py")
    if not beside.is_file():
        return None
    text = beside.read_text(encoding="utf-8")
    try:
        same = ast.dump(packed_tree(text)) == ast.dump(ast.parse(running_code()))
    except SyntaxError:
        same = False
    return text if same else None


@lru_cache(maxsize=None)
def counted_script() -> bytes:
    """The bytes the challenge counts as code: the record folder's train_gpt.py. Computed once per process."""
    if running_packed():
        return Path(__file__).read_bytes()
    return packed_script(readable_source()).encode("utf-8")


def result_config(hp: Hyperparameters) -> dict:
    """The variables set away from their defaults that change the result: what makes seeds one configuration."""
    out = {}
    for f in env_fields():
        if f.name in NOT_RESULT_FIELDS or f.name.startswith("submission_") or getattr(hp, f.name) == f.default:
            continue
        out[env_name(f)] = getattr(hp, f.name)
    return out


def config_differences(folder_config: dict, mine: dict) -> list[str]:
    """'NAME (folder: a, this run: b)' for each result-changing variable on which the two disagree."""
    defaults = {env_name(f): f.default for f in env_fields()}
    diffs = []
    for name in sorted(set(folder_config) | set(mine)):  # both result_config's: result variables only
        theirs = folder_config.get(name, defaults.get(name))
        ours = mine.get(name, defaults.get(name))
        if theirs != ours:
            diffs.append(f"{name} (folder: {theirs}, this run: {ours})")
    return diffs


def read_submission_json(d: Path) -> dict | None:
    """The folder's submission.json (None: there is none). One this script did not write is refused here, before
    any work: merging a seed into it would fail only after training."""
    path = d / "submission.json"
    if not path.exists():
        return None
    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SetupError(f"SUBMISSION_DIR={d}: its submission.json is not JSON ({e}); move the folder away") from None
    gaps = submission_gaps(sub)
    if gaps:
        raise SetupError(f"SUBMISSION_DIR={d}: its submission.json was not written by this version of "
                         f"train_gpt_mlx.py ({gaps}); use a new folder, or move this one away")
    return sub


def submission_gaps(sub) -> str:
    """What a submission.json written by this script holds and `sub` lacks ('': nothing)."""
    if not isinstance(sub, dict):
        return "it is not a JSON object"
    gaps = [f"no {k}" for k in SUBMISSION_KEYS if not isinstance(sub.get(k), dict)]
    for seed, res in sub["seed_results"].items() if not gaps else ():
        lacks = [k for k in SEED_KEYS if k not in res] if isinstance(res, dict) else ["its results"]
        if not seed.isdigit() or lacks:
            gaps.append(f"seed {seed!r} lacks {', '.join(lacks) or 'a number as its name'}")
    return "; ".join(gaps)


def val_split_facts(hp: Hyperparameters) -> dict:
    """Token and document counts of the validation split, and whether they are the challenge's."""
    toks = load_validation_tokens(hp.data_path, 0, hp.vocab_size)
    docs = int(np.count_nonzero(toks == BOS_ID))
    official = docs == OFFICIAL_VAL_DOCS
    if hp.vocab_size in OFFICIAL_VAL_TOKENS:
        official = toks.size == OFFICIAL_VAL_TOKENS[hp.vocab_size]
    elif hp.vocab_size in OFFICIAL_VAL_WINDOWED:
        window, whole = OFFICIAL_VAL_WINDOWED[hp.vocab_size]
        official = official and (toks.size - 1) // window * window == whole
    return dict(tokens=int(toks.size), documents=docs, official=official)


def official_split_text() -> str:
    """The challenge's validation splits as an error message names them."""
    known = [f"{n:,} tokens for sp{v}" for v, n in OFFICIAL_VAL_TOKENS.items()]
    known += [f"{n:,} in whole {w:,}-token windows for sp{v}" for v, (w, n) in OFFICIAL_VAL_WINDOWED.items()]
    return f"{OFFICIAL_VAL_DOCS:,} documents; " + ", ".join(known)


def train_data_facts(hp: Hyperparameters) -> dict:
    """How much training data DATA_PATH holds: seeds trained on 1 and on 80 shards are not one configuration."""
    facts = check_train_shards(shard_files(hp.data_path, "train"))
    return dict(shards=len(facts), tokens=sum(n for _, n in facts))


def train_data_words(facts: dict) -> str:
    return f"{facts['shards']} train shard(s) ({facts['tokens']} tokens)"


# ---------------------------------------------------------------------------- refusals: before any work, at the end
def preflight_submission(r: Run):
    """Refuse before any work a seed that the folder would not take: the wrong track for the time cap, a
    validation split that is not the challenge's, another configuration or script version in the folder."""
    hp = r.hp
    d = Path(r.hp.submission_dir)
    errs = []
    if d.parent.name == "track_10min_16mb" and not 0 < hp.max_wallclock_seconds <= TRACK_LIMIT_S:
        errs.append(f"track_10min_16mb needs MAX_WALLCLOCK_SECONDS in (0, {TRACK_LIMIT_S:.0f}] (now "
                    f"{hp.max_wallclock_seconds}); longer runs go to track_non_record_16mb")
    r.val_split = val_split_facts(hp)
    r.train_data = train_data_facts(hp)
    if readable_source() is None:
        errs.append("train_gpt.py runs packed code and no train_gpt_mlx.py beside it is the source of that code; the "
                    "folder needs that readable script (the packed code lacks the packer, so it cannot be the "
                    "readable copy): put the train_gpt_mlx.py it was packed from beside it")
    if not r.val_split["official"] and not hp.submission_unofficial_data:
        variant = f"sp{hp.vocab_size}" if hp.vocab_size in OFFICIAL_VAL_WINDOWED else "sp1024"
        errs.append(f"the validation split in DATA_PATH={hp.data_path} is not the challenge's "
                    f"({r.val_split['tokens']} tokens, {r.val_split['documents']} documents; the challenge's has "
                    f"{official_split_text()}). Download it (data/cached_challenge_fineweb.py --variant {variant}), "
                    "or set SUBMISSION_UNOFFICIAL_DATA=1")
    old = read_submission_json(d)
    if old:
        errs += folder_mismatches(old, r)
    if errs:
        raise SetupError(f"SUBMISSION_DIR={d} refused before any work:\n  " + "\n  ".join(errs))


def folder_mismatches(old: dict, r: Run) -> list[str]:
    """Why this run's seed cannot join the seeds already in the folder (empty: it can)."""
    errs = []
    diffs = config_differences(old.get("config", {}), result_config(r.hp))
    if diffs:
        errs.append("it holds seeds of another configuration; these variables differ: " + ", ".join(diffs))
    folder_official = old.get("validation", {}).get("official", True)
    if r.val_split and folder_official != r.val_split["official"]:
        errs.append("its seeds were scored on " + ("the challenge's" if folder_official else "an unofficial")
                    + " validation split and this run's is " + ("the challenge's" if r.val_split["official"]
                                                               else "unofficial"))
    theirs = old.get("train_data")
    if r.train_data and theirs != r.train_data:
        errs.append(f"its seeds trained with {train_data_words(theirs)} in DATA_PATH and this run has "
                    f"{train_data_words(r.train_data)}")
    copy = Path(r.hp.submission_dir, "train_gpt_mlx.py")  # readable_source: the source of the code that runs
    if copy.exists() and copy.read_text(encoding="utf-8") != readable_source():
        errs.append(f"its {copy.name} is another version of the script; use a new folder")
    return errs


def unfinished_reason(r: Run, eval_ms: float) -> str:
    """Why this run cannot be a seed ('' when it can): interrupted, stopped short, or over the track's time."""
    hp = r.hp
    if r.interrupted:
        return f"the run was interrupted ({signal_label(r.stop_signal)}) at step {r.step} of ITERATIONS={hp.iterations}"
    capped = hp.max_wallclock_seconds > 0 and r.train_ms >= train_budget_ms(hp)
    if r.step < hp.iterations and not capped:
        return f"training stopped at step {r.step} of ITERATIONS={hp.iterations}"
    if Path(hp.submission_dir).parent.name != "track_10min_16mb":
        return ""
    # the cap is checked after each step (as the baseline does), so the last step may end past 600 s, but not begin
    if r.last_step_from_ms > TRACK_LIMIT_S * 1000:
        return (f"training took {r.train_ms / 1000:.1f}s and its last step began at {r.last_step_from_ms / 1000:.1f}s, "
                f"past track_10min_16mb's {TRACK_LIMIT_S:.0f}s")
    if r.calib_ms and r.train_ms + r.calib_ms > TRACK_LIMIT_S * 1000:  # GPTQ's calibration reads training data: inside the cap
        return (f"training and GPTQ calibration took {(r.train_ms + r.calib_ms) / 1000:.1f}s, over "
                f"track_10min_16mb's {TRACK_LIMIT_S:.0f}s (raise GPTQ_RESERVE_SECONDS or lower "
                "GPTQ_CALIBRATION_TOKENS)")
    if eval_ms > TRACK_LIMIT_S * 1000:
        return f"evaluation took {eval_ms / 1000:.1f}s, over track_10min_16mb's {TRACK_LIMIT_S:.0f}s"
    return ""


# ---------------------------------------------------------------------------- the seed, the json, the README
def write_submission(r: Run, loss: float, bpb: float, eval_ms: float, model_bytes: int):
    """Add this SEED to the record folder: submission.json (mean and sample std over the seeds), README, this
    seed's log, the counted train_gpt.py and its readable source, requirements.txt. One seed writes at a time."""
    hp = r.hp
    d = Path(r.hp.submission_dir)
    why = unfinished_reason(r, eval_ms)
    total = r.code_bytes + model_bytes
    if not why and total > ARTIFACT_CAP_BYTES:
        why = f"{total} bytes are over the cap"
    if why:
        refusal = (f"SUBMISSION_DIR={d} refused: {why}; the seed was not written (the artifact and log are in "
                   f"OUT_DIR={hp.out_dir}; a run stopped early can finish with RESUME_FROM)")
        if r.interrupted:  # the run exits 130 for the Ctrl-C; the refusal is said, not raised
            r.log(f"submission: {refusal}")
            return
        raise ArtifactError(refusal)
    seed = seed_result(r, loss, bpb, eval_ms, model_bytes)
    with folder_lock(d):
        old = read_submission_json(d)
        errs = folder_mismatches(old, r) if old else []
        if errs:  # another seed landed while this one trained
            raise ArtifactError(f"SUBMISSION_DIR={d} refused: " + "; ".join(errs))
        sub = merged_submission(old, seed, r)
        write_folder(d, folder_files(sub, r))
    r.log(f"submission: {d} seeds:{sub['seeds']} val_bpb:{sub['val_bpb']:.8f} std:{sub['val_bpb_std']:.8f} "
          f"bytes_code:{sub['bytes_code']} bytes_total:{sub['bytes_total']}")


def finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None  # strict JSON has no NaN


def seed_result(r: Run, loss: float, bpb: float, eval_ms: float, model_bytes: int) -> dict:
    res = dict(val_loss=loss, val_bpb=bpb, pre_quant_val_loss=finite_or_none(r.pre_quant[0]),
               pre_quant_val_bpb=finite_or_none(r.pre_quant[1]), artifact_bytes=r.code_bytes + model_bytes,
               bytes_model=model_bytes, steps=r.step, train_seconds=round(r.train_ms / 1000, 3),
               eval_seconds=round(eval_ms / 1000, 3), run_id=r.run_id)
    if r.resumed_from:
        res["resumed_from"] = r.resumed_from
    return res


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (0 for one seed); None where no seed has the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def merged_submission(old: dict | None, seed: dict, r: Run) -> dict:
    """submission.json as the records write it, with this seed added (or replaced) among the folder's seeds."""
    hp = r.hp
    results = dict(old["seed_results"]) if old else {}
    results[str(hp.seed)] = seed
    seeds = sorted(results, key=int)
    runs = [results[s] for s in seeds]
    sub = dict(author=hp.submission_author, github_id=hp.submission_github_id, name=hp.submission_name,
               blurb=hp.submission_blurb, date=time.strftime("%Y-%m-%d"),
               track=TRACKS[Path(hp.submission_dir).parent.name])
    for key in ("val_loss", "val_bpb", "pre_quant_val_loss", "pre_quant_val_bpb"):
        mean, std = mean_std([s[key] for s in runs])
        sub[key] = mean
        if key in ("val_loss", "val_bpb"):
            sub[f"{key}_std"] = std
    sub["seeds"] = [int(s) for s in seeds]
    sub["seed_results"] = {s: results[s] for s in seeds}
    sub["step_stop"] = min(s["steps"] for s in runs)  # times and bytes: the largest seed's
    sub["wallclock_seconds"] = max(s["train_seconds"] for s in runs)
    sub["eval_time_seconds"] = max(s["eval_seconds"] for s in runs)
    sub["bytes_total"] = max(s["artifact_bytes"] for s in runs)
    sub["bytes_model"] = max(s["bytes_model"] for s in runs)
    sub["bytes_code"] = r.code_bytes
    sub["python_version"] = python_version()  # the packed bytes depend on it (ast.unparse)
    sub["hardware"] = hardware_name(r)
    sub["mlx_version"] = mx.__version__
    sub["validation"] = r.val_split
    sub["train_data"] = r.train_data
    sub["config"] = result_config(hp)
    return sub


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def hardware_name(r: Run) -> str:
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or "unknown"
    ranks = f", {r.group.size()} ranks over MLX's {r.backend} backend" if r.group.size() > 1 else ""
    if not _on_gpu():  # the ranks share one CPU
        return f"{name} (CPU{ranks})"
    return f"{r.group.size()}x {name} (GPU{ranks})"


def mlx_requirement() -> str:
    """The MLX package this run used: the CUDA and CPU builds are extras of `mlx` (mlx[cuda12], mlx[cpu])."""
    from importlib import metadata
    for dist, extra in (("mlx-cuda-13", "cuda13"), ("mlx-cuda-12", "cuda12"), ("mlx-cuda", "cuda"),
                        ("mlx-cpu", "cpu")):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return f"mlx[{extra}]=={mx.__version__}"
    return f"mlx=={mx.__version__}"


def requirements_text() -> str:
    """What train_gpt.py imports beyond the standard library, at the versions this run used."""
    import brotli
    import sentencepiece
    import zstandard
    return "\n".join([mlx_requirement(), f"numpy=={np.__version__}", f"sentencepiece=={sentencepiece.__version__}",
                      f"zstandard=={zstandard.__version__}", f"brotli=={brotli.__version__}"]) + "\n"


def seed_log(r: Run) -> bytes:
    """This seed's log; a resumed run's starts with the log of the run it resumed, so it covers the whole run."""
    mine = Path(r.path(".txt")).read_bytes()
    earlier = Path(r.hp.out_dir, f"{r.resumed_from}.txt")
    if not r.resumed_from or r.resumed_from == r.run_id or not earlier.is_file():
        return mine  # the same RUN_ID appends to one log
    return earlier.read_bytes() + f"# resumed by RUN_ID={r.run_id}\n".encode() + mine


def folder_files(sub: dict, r: Run) -> dict:
    """{name: bytes} this seed writes into the folder; other seeds' logs stay as they are."""
    return {"train_gpt.py": counted_script(), "train_gpt_mlx.py": readable_source().encode("utf-8"),
            "requirements.txt": requirements_text().encode(), f"train_seed{r.hp.seed}.log": seed_log(r),
            "README.md": render_readme(sub, r).encode("utf-8"),
            "submission.json": (json.dumps(sub, indent=2, allow_nan=False) + "\n").encode()}


def run_command(r: Run, seed: int) -> str:
    """The command that reproduces a seed from inside the folder: every variable it needs, paths included."""
    hp = r.hp
    d = os.path.abspath(r.hp.submission_dir)
    env = result_config(hp)
    for name in ("data_path", "tokenizer_path", "out_dir"):  # logs and artifacts stay out of the folder
        env[ENV_NAMES[name]] = os.path.relpath(os.path.abspath(getattr(hp, name)), d)
    env["SEED"] = seed
    assigns = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    W = r.group.size()
    launch = f"mlx.launch -n {W} --backend {r.backend} -- " if W > 1 else ""
    return f"{assigns} {launch}python train_gpt.py"


def render_readme(sub: dict, r: Run) -> str:
    """The folder's README: what the run is, set-up, the command per seed, the results."""
    code_kb = len(readable_source().encode()) / 1000
    split = sub["validation"]
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"- **val_bpb {sub['val_bpb']:.8f}** (mean of {len(sub['seeds'])} seed(s), sample std "
             f"{sub['val_bpb_std']:.8f}); val_loss {sub['val_loss']:.8f}",
             f"- track: `{sub['track']}`; author: {sub['author']} (@{sub['github_id']}); date: {sub['date']}",
             f"- hardware: {sub['hardware']}; MLX {sub['mlx_version']}",
             f"- bytes: {sub['bytes_total']} total (the largest seed's) = {sub['bytes_code']} code (packed by "
             f"Python {sub['python_version']}) + {sub['bytes_model']} model, of the {ARTIFACT_CAP_BYTES} cap",
             f"- validation split: {split['tokens']} tokens, {split['documents']} document(s); training data: "
             f"{train_data_words(sub['train_data'])}"]
    if not split["official"]:
        lines += ["", "**UNOFFICIAL DATA: these scores are not on the challenge's validation split "
                  f"({OFFICIAL_VAL_DOCS} documents) and are not comparable with the leaderboard's.** "
                  "(SUBMISSION_UNOFFICIAL_DATA=1)"]
    lines += ["", "## Files", "",
              f"- `train_gpt.py` ({sub['bytes_code']} bytes) is the counted code: the readable `train_gpt_mlx.py` "
              f"beside it ({code_kb:.0f} KB) without comments, docstrings and its packer, LZMA-compressed and "
              "base85-encoded; it runs as that script does.",
              "- `train_seed<N>.log`: each seed's training log; `submission.json`: the results; `requirements.txt`: "
              "the packages the script imports, at the versions used.",
              "", "## Set-up", "", "```bash",
              f"pip install -r requirements.txt  # from this folder: {mlx_requirement()} and the rest",
              "python data/cached_challenge_fineweb.py --variant sp1024  # from the repository root: the tokenizer, "
              "the validation split and 80 train shards (--train-shards N for another number)",
              "```", "", "## Run", "",
              "From this folder (unset, `DATA_PATH` and `TOKENIZER_PATH` default to the repository's `data/`, "
              "found from here):", "", "```bash"]
    lines += [run_command(r, int(s)) for s in sub["seeds"]]
    lines += ["```", "", "## Results", "", "| seed | val_loss | val_bpb | steps | train s | eval s | bytes |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in sub["seeds"]:
        p = sub["seed_results"][str(s)]
        lines.append(f"| {s} | {p['val_loss']:.8f} | {p['val_bpb']:.8f} | {p['steps']} | {p['train_seconds']:.1f} "
                     f"| {p['eval_seconds']:.1f} | {p['artifact_bytes']} |")
    lines.append(f"| mean ± std | {sub['val_loss']:.8f} ± {sub['val_loss_std']:.8f} | "
                 f"{sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f} | | | | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- writing the folder
@contextmanager
def folder_lock(d: Path):
    """Seeds writing into one track take turns (take_flock). The lock is on the track folder itself, so no lock file
    lies in records/<track>/ to be committed with a record. Whoever holds it first tidies what a write killed part
    way left there (tidy_after_kill)."""
    d.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(d.parent, os.O_RDONLY)
    try:
        if not take_flock(fd, SUBMISSION_LOCK_WAIT_S):
            raise ArtifactError(f"SUBMISSION_DIR={d} refused: another run has been writing its seed into {d.parent} "
                                f"for {SUBMISSION_LOCK_WAIT_S:.0f}s (it holds the folder's lock): rerun this seed "
                                "once it has finished")
        tidy_after_kill(d)
        yield
    finally:
        os.close(fd)  # releases the lock


def tidy_after_kill(d: Path):
    """Under the lock no other write is in flight, so a .<name>.new/.old folder beside d was left by a killed one:
    the half-written new folder goes; an old folder that two renames (swap_in) had moved away comes back."""
    for left in sorted(d.parent.iterdir()):
        if left.name.startswith(f".{d.name}.old") and not d.exists():
            os.rename(left, d)
        elif left.name.startswith((f".{d.name}.new", f".{d.name}.old")):
            shutil.rmtree(left, ignore_errors=True)


def write_folder(d: Path, files: dict):
    """Build the new folder beside the old one, then swap it in: a failure part way leaves the old one as it was."""
    new = d.parent / f".{d.name}.new{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    try:
        if d.exists():
            shutil.copytree(d, new)
        else:
            new.mkdir(parents=True)
        for name, data in files.items():
            (new / name).write_bytes(data)
        swap_in(new, d)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def swap_in(new: Path, d: Path):
    """Put the folder `new` in d's place. Where the system swaps two folders in one step (exchange_folders), d is
    whole at every instant, the old or the new one. Elsewhere two renames: between them d is missing (a kill
    there leaves the old folder at .<name>.old<pid>, which the next seed's write puts back); the second failing
    puts the old one back at once."""
    if not d.exists():
        os.rename(new, d)
        return
    if exchange_folders(new, d):
        return  # `new` now holds the old folder: write_folder removes it
    old = d.parent / f".{d.name}.old{os.getpid()}"
    os.rename(d, old)
    try:
        os.rename(new, d)
    except OSError:
        os.rename(old, d)
        raise
    shutil.rmtree(old, ignore_errors=True)


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap two folders atomically: Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP). False where
    the system or the file system cannot (then nothing was changed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        done = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif hasattr(libc, "renamex_np"):
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


if __name__ == "__main__":
    sys.exit(main())
