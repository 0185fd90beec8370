"""Shared fixtures: challenge shards built once per session from the real FineWeb sample
(../shared/fineweb_sample) when present, else from generated text with a tiny tokenizer."""
import importlib.util
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "fineweb_sample"
sys.path.insert(0, str(ROOT))


def load_script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mixer_distribution(mix, tokens, j: int, p_model, lp=None, H=None) -> np.ndarray:
    """Full mixed distribution [V] (float64) the mixer assigns to target j: its p_ngram for every
    candidate y is the statistics of tokens[:j] + [y] (target j's statistics read nothing after it),
    and its weight a reads no target, so it is the same for every candidate. Adaptive mode: lp and H are
    the model's log-prob of every target and entropy (index i-1 for target i); only targets < j are read."""
    from train_gpt_mlx import mixer_stats
    head = np.asarray(tokens[:j + 1]).astype(np.int64)
    p = np.empty(mix.V)
    for y in range(mix.V):
        head[j] = y
        p[y] = mixer_stats(head, mix.V, mix.K)[0][j]
    conf = mixer_stats(head, mix.V, mix.K)[1][j]
    pm = np.array(p_model, np.float64)
    if mix.mode == "adaptive":
        a = adaptive_alpha_reference(mix, tokens, lp, H, j) * conf
    else:
        H_row = -(pm * np.log(np.maximum(pm, 1e-30))).sum()
        a = mix.alpha * conf * (min(1.0, H_row / math.log(mix.V)) if mix.mode == "entropy" else 1.0)
    return (1.0 - a) * pm + a * p


def adaptive_alpha_reference(mix, tokens, lp, H, j: int) -> float:
    """Posterior-mean alpha at target j, one target at a time in plain Python floats: per bucket (highest
    seen order, confidence bin, entropy bin) each grid value's log-likelihood over targets 1..j-1."""
    from train_gpt_mlx import mixer_stats
    A = mix.adaptive
    grid = [0.0] + [float(g) for g in A.grid]
    prior = [A.prior_zero] + [(1.0 - A.prior_zero) / (len(grid) - 1)] * (len(grid) - 1)
    p, conf, top = mixer_stats(np.asarray(tokens[:j + 1]).astype(np.int64), mix.V, mix.K)
    lp = [float(v) for v in np.asarray(lp, np.float64)]
    H = [float(v) for v in np.asarray(H, np.float64)]

    def bucket(i):
        cb = min(A.conf_bins - 1, math.floor(conf[i] * A.conf_bins))
        eb = min(A.entropy_bins - 1, max(0, math.floor(H[i - 1] / math.log(mix.V) * A.entropy_bins)))
        return int(top[i]), cb, eb

    loglik = {}
    for i in range(1, j):
        pm = math.exp(lp[i - 1])
        row = loglik.setdefault(bucket(i), [0.0] * len(grid))
        for g, al in enumerate(grid):
            row[g] += math.log((1 - al * conf[i]) * pm + al * conf[i] * p[i]) - lp[i - 1]
    row = loglik.get(bucket(j), [0.0] * len(grid))
    top_w = max(row[g] + math.log(prior[g]) for g in range(len(grid)))
    w = [math.exp(row[g] + math.log(prior[g]) - top_w) for g in range(len(grid))]
    return sum(wg * al for wg, al in zip(w, grid)) / sum(w)


def generated_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then",
             "slept", "under", "warm", "sun", "while", "birds", "sang", "songs", "of", "spring"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 400))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """{'data_path', 'tokenizer', 'vocab_size', 'real'}: 50 val docs, the rest train."""
    bs = load_script("data/build_shards.py")
    out = tmp_path_factory.mktemp("shards")
    if (SAMPLE / "docs_200.jsonl").exists():
        docs, tok, train_vocab, real = SAMPLE / "docs_200.jsonl", SAMPLE / "fineweb_1024_bpe.model", None, True
    else:
        docs = out / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in generated_docs(200)))
        tok, train_vocab, real = out / "tok.model", 320, False
    summary = bs.build_shards(docs, tok, out / "ds", val_docs=50, train_tokenizer_vocab=train_vocab,
                              log=lambda *_: None)
    return dict(data_path=str(out / "ds"), tokenizer=str(tok), vocab_size=summary["vocab_size"], real=real)


def tiny_env(data, tmp_path, **over) -> dict:
    """Environment for a tiny, fast CPU run."""
    env = dict(DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer"], VOCAB_SIZE=str(data["vocab_size"]),
               OUT_DIR=str(tmp_path), RUN_ID="tiny", ITERATIONS="20", TRAIN_BATCH_TOKENS="1024",
               TRAIN_SEQ_LEN="64", GRAD_ACCUM_STEPS="1", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
               NUM_KV_HEADS="2", VAL_MAX_TOKENS="4096", WARMUP_STEPS="1", WARMDOWN_ITERS="5",
               TRAIN_LOG_EVERY="1", MAX_WALLCLOCK_SECONDS="0", VAL_BATCH_SIZE="4096")
    env.update({k: str(v) for k, v in over.items()})
    return env


def ctrl_c_after(monkeypatch, module, calls: int, name: str = "train_step"):
    """This process receives a real SIGINT (Ctrl-C) as module.<name> is called for the (calls + 1)th time; the
    call then runs. Which handler sees it, and when, is the script's own: nothing is raised on its behalf."""
    real, made = getattr(module, name), []

    def step(*a, **kw):
        made.append(1)
        if len(made) == calls + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, step)


def short_split(data, ds: Path, n_val: int = 3000):
    """A dataset folder at ds: the sample's train shards linked, its validation split cut to the first n_val tokens
    (a short split keeps the whole-split evaluations of submission runs fast)."""
    import train_gpt_mlx as T
    ds.mkdir(parents=True)
    for src in Path(data["data_path"]).glob("fineweb_train_*.bin"):
        (ds / src.name).symlink_to(src)
    val = T.load_data_shard(next(Path(data["data_path"]).glob("fineweb_val_*.bin")))[:n_val]
    header = np.zeros(256, "<i4")
    header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, val.size)
    (ds / "fineweb_val_000000.bin").write_bytes(header.tobytes() + val.astype("<u2").tobytes())
