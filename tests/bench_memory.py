"""Benchmark (prints a table; not a test): the memory check's estimate against the measured peak of real runs,
one subprocess per configuration (MLX's peak and the process's peak RSS above the interpreter's own).

    python tests/bench_memory.py            # the 9x512 recipe at a 2,048-token batch, and larger pieces
The pytest in test_memory.py runs the same measurement on tiny configurations.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt_mlx as T  # noqa: E402

LAUNCH = Path(sys.executable).with_name("mlx.launch")
CHILD = f"""import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
import mlx.core as mx
import train_gpt_mlx as T
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rc = T.main()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("MEMORY_JSON " + json.dumps(dict(rc=rc, mlx_peak=mx.get_peak_memory(), rss_run=peak - base, rss_base=base)),
      flush=True)
"""


def measure(env: dict, ranks: int = 1) -> dict:
    """The run's peaks; with several ranks (mlx.launch, this host), their sums."""
    cmd = [sys.executable, "-c", CHILD]
    if ranks > 1:
        cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--"] + cmd
    full = dict(os.environ, OPENBLAS_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    p = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=1800)
    # mlx.launch relays the ranks' output as it comes, so two ranks' lines can share one: find each record
    rows = [json.loads(found) for found in re.findall(r"MEMORY_JSON (\{[^{}]*\})", p.stdout)]
    assert len(rows) == ranks and all(r["rc"] == 0 for r in rows), p.stdout[-3000:] + p.stderr[-3000:]
    return {k: sum(r[k] for r in rows) for k in ("mlx_peak", "rss_run")}


def estimate(env: dict, ranks: int = 1) -> int:
    """The memory check's total for this run (every rank on this host)."""
    hp = T.Hyperparameters.from_env({k: str(v) for k, v in env.items()})
    n_val = T.load_validation_tokens(hp.data_path, hp.val_max_tokens, hp.vocab_size).size
    need = T.memory_needs(hp, T.ModelConfig.from_hparams(hp), T.micro_tokens(hp, ranks), n_val, ranks)
    return T.memory_total(need, ranks)


# Each piece the memory check counts, on, large enough to be seen above the rest (tiny otherwise: 2 x 128).
PIECES = {
    "plain": {},
    "bigram hash": dict(BIGRAM_HASH_SIZE=65536, BIGRAM_DIM=64),
    "skip-gram": dict(SKIPGRAM_HASH_SIZE=32768, SKIPGRAM_DIM=32),
    "EngramLite": dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=32768, ENGRAM_DIM=64),
    "untied recurrence": dict(NUM_LAYERS=4, RECUR_LAYERS="1,2", RECUR_UNTIED_MLP=1, MLP_MULT=4),
    "parallel lanes": dict(NUM_LAYERS=4, PARALLEL_START_LAYER=1),
    "EMA": dict(EMA_DECAY=0.99),
    "TTT full": dict(TTT_ENABLED=1, TTT_MODE="full", TTT_CHUNK=256, TTT_BATCH_SEQS=4, MODEL_DIM=256),
    "TTT lora": dict(TTT_ENABLED=1, TTT_MODE="lora", TTT_CHUNK=256, TTT_BATCH_SEQS=4),
    "n-gram mixer": dict(NGRAM_MIXER_ENABLED=1, NGRAM_MAX_ORDER=4),
    "complement": dict(COMPLEMENT_ALPHA=0.5),
    # the 8192-piece vocabulary: 8x the logits (shards of a smaller vocabulary still fit it)
    "vocab 8192": dict(VOCAB_SIZE=8192, TRAIN_BATCH_TOKENS=4096, VAL_MAX_TOKENS=4096, VAL_BATCH_SIZE=4096),
}


def tiny(data_path: str, tokenizer: str, out_dir: str, **over) -> dict:
    env = dict(DATA_PATH=data_path, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=1024, OUT_DIR=out_dir, RUN_ID="mem",
               ITERATIONS=2, WARMUP_STEPS=1, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=1024, GRAD_ACCUM_STEPS=1,
               NUM_LAYERS=2, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, VAL_MAX_TOKENS=2048, VAL_BATCH_SIZE=2048,
               MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=100)
    env.update(over)
    return env


def row(name: str, env: dict, ranks: int = 1) -> str:
    m, e = measure(env, ranks), estimate(env, ranks)
    peak = max(m["mlx_peak"], m["rss_run"])
    return (f"| {name} | {e / 2**20:.0f} | {m['mlx_peak'] / 2**20:.0f} | {m['rss_run'] / 2**20:.0f} | "
            f"{e / peak:.2f} |")


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / "data" / "datasets" / "fineweb10B_sp1024"))
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"))
    ap.add_argument("--out", default="/tmp/bench_memory")
    ap.add_argument("--only", default="", help="comma-separated names")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    recipe = dict(RECIPE="sp1024_record", TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1, ITERATIONS=2,
                  WARMUP_STEPS=1, VAL_MAX_TOKENS=16384, MAX_WALLCLOCK_SECONDS=0)
    cases = [(f"{k} (2 x 128)", tiny(a.data, a.tokenizer, a.out, **v), 1) for k, v in PIECES.items()]
    cases += [("plain, 2 ranks on this host", tiny(a.data, a.tokenizer, a.out), 2),
              ("9x512 recipe, 2,048-token batch", dict(DATA_PATH=a.data, TOKENIZER_PATH=a.tokenizer, OUT_DIR=a.out,
                                                       RUN_ID="mem", **recipe), 1)]
    print("| config | estimate MiB | MLX peak MiB | RSS above the interpreter MiB | estimate / peak |")
    print("|---|---|---|---|---|")
    for name, env, ranks in cases:
        if not a.only or any(o in name for o in a.only.split(",")):
            print(row(name, env, ranks), flush=True)


if __name__ == "__main__":
    main()
