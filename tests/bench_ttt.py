"""Test-time training benchmark (prints numbers; not a test). Trains bench_eval.py's tiny model (2x128,
seq 128) on shards built from ../shared/fineweb_sample (generated text when absent), once per seed, then
scores its artifact on the sample's val split through run_eval (the path a run's final line takes):
plain, sliding, sliding + TTT (lora, full), sliding + TTT + mixer: val_bpb and tokens/s.

    python tests/bench_ttt.py [--seeds 1337 42] [--steps 150] [--val-tokens 0]
    python tests/bench_ttt.py --sweep --val-tokens 40000   # TTT_LR / TTT_EPOCHS / TTT_CHUNK, one seed
"""
import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from bench_ablation import make_data  # noqa: E402

SLIDING = dict(EVAL_STRIDE="64", EVAL_BATCH_SEQS="64")
MIXER = dict(NGRAM_MIXER_ENABLED="1", NGRAM_MAX_ORDER="2", NGRAM_ALPHA="0.3")
LORA = dict(TTT_ENABLED="1", TTT_MODE="lora", TTT_LR="0.01", TTT_EPOCHS="1", TTT_CHUNK="2048")
FULL = dict(TTT_ENABLED="1", TTT_MODE="full", TTT_LR="0.01", TTT_EPOCHS="1", TTT_CHUNK="2048")
# TTT_MODE=doc_lora at the records' settings (RECORDS_SP8192 §10) scaled to the 2x128 model and seq 128: rank 80
# of 512 -> 16 of 128 with the same alpha/r = 1.8; chunk 48 of a 2048 context -> 32 of 128; 64 documents per batch
# of ~50K -> 2 of the ~11 in 40K tokens; 3 phases over the first 2,500 documents (5%, 20% of the tokens) -> 6;
# 32K-token SGD chunks of 16 sequences -> 2,048 tokens (16 x 128). LRs: --doc-sweep.
DOC = dict(TTT_ENABLED="1", TTT_MODE="doc_lora", TTT_RANK="16", TTT_ALPHA="28.8", TTT_LR="0.01", TTT_DOC_CHUNK="32",
           TTT_DOC_BATCH="2", TTT_WEIGHT_DECAY="0.5")
PHASES = dict(TTT_PHASES="3", TTT_PREFIX_DOCS="6", TTT_PHASE_CHUNK="2048", TTT_PHASE_LR="0.003", TTT_BATCH_SEQS="16")


def cfg(*parts, **over) -> dict:
    return {k: v for d in parts + (over,) for k, v in d.items()}


TABLE = [("plain", dict(EVAL_BATCH_SEQS="64")), ("sliding 64", SLIDING),
         ("sliding 64 + TTT lora", cfg(SLIDING, LORA)), ("sliding 64 + TTT full", cfg(SLIDING, FULL)),
         ("sliding 64 + mixer", cfg(SLIDING, MIXER)), ("sliding 64 + TTT lora + mixer", cfg(SLIDING, LORA, MIXER))]
DOC_TABLE = [("sliding 64", SLIDING), ("chunk TTT lora", cfg(SLIDING, LORA)),
             ("documents alone (doc_lora, TTT_LR=0)", cfg(DOC, TTT_LR="0")), ("doc_lora", DOC),
             ("doc_lora + phases", cfg(DOC, PHASES)), ("sliding 64 + mixer", cfg(SLIDING, MIXER)),
             ("chunk TTT lora + mixer", cfg(SLIDING, LORA, MIXER)), ("doc_lora + mixer", cfg(DOC, MIXER)),
             ("doc_lora + phases + mixer", cfg(DOC, PHASES, MIXER))]
DOC_SWEEP = [("sliding 64", SLIDING)] + [
    (f"doc_lora + phases lr {lr}", cfg(DOC, PHASES, TTT_PHASE_LR=lr)) for lr in ("0.001", "0.003", "0.01")] + [
    (f"doc_lora lr {lr}", cfg(DOC, TTT_LR=lr)) for lr in ("0.001", "0.003", "0.01")] + [
    (f"doc_lora chunk {c}", cfg(DOC, TTT_DOC_CHUNK=c)) for c in ("16", "64")] + [
    ("doc_lora cold A", cfg(DOC, TTT_WARM_A="0")), ("doc_lora no wd", cfg(DOC, TTT_WEIGHT_DECAY="0"))]
SWEEP = [("sliding 64", SLIDING)] + [
    (f"lora lr {lr} epochs {ep}", cfg(SLIDING, LORA, TTT_LR=lr, TTT_EPOCHS=ep))
    for lr, ep in (("0.003", "1"), ("0.01", "1"), ("0.03", "1"), ("0.01", "2"))] + [
    (f"full lr {lr}", cfg(SLIDING, FULL, TTT_LR=lr)) for lr in ("0.01", "0.03")]


def train(data: dict, tmp: Path, seed: int, steps: int) -> dict:
    """The tiny model's run (its artifact is reused when the folder already has it)."""
    env = dict(data, ITERATIONS=str(steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="128", GRAD_ACCUM_STEPS="1",
               NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", WARMUP_STEPS="2",
               WARMDOWN_ITERS=str(steps // 3), MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="4096",
               RUN_ID=f"s{seed}", OUT_DIR=str(tmp), SEED=str(seed))
    if not (tmp / f"s{seed}_model.int6.ptz").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            assert T.main(env) == 0
    return env


def score(env: dict, over: dict, artifact: str, val_tokens: int):
    """(val_bpb, tokens/s) of one final evaluation of the artifact, as EVAL_ONLY runs it."""
    hp = T.Hyperparameters.from_env(cfg(env, over, VAL_MAX_TOKENS=str(val_tokens)))
    mcfg, flat, _ = T.read_artifact(artifact)
    model = T.GPT(mcfg, hp.dtype())
    T.load_flat_into(model, flat)
    tables = T.build_byte_tables(T.load_tokenizer(hp.tokenizer_path), mcfg.vocab_size)
    val = T.load_validation_tokens(hp.data_path, hp.val_max_tokens, mcfg.vocab_size)
    fns = T.Compiled(model, T.Optimizers(model, hp))
    _, bpb, ms = T.run_eval(hp, model, None, fns, val, tables, lambda *_: None, "eval", final=True, seq=128)
    return bpb, (val.size - 1) / (ms / 1000), val.size - 1


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--val-tokens", type=int, default=0, help="0 = the whole val split")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--docs", action="store_true", help="the TTT_MODE=doc_lora table (issue 24)")
    p.add_argument("--doc-sweep", action="store_true", help="doc_lora settings, one seed")
    p.add_argument("--workdir", default="", help="keep shards and trained artifacts here (reused) instead of a temp folder")
    a = p.parse_args()
    rows = SWEEP if a.sweep else DOC_SWEEP if a.doc_sweep else DOC_TABLE if a.docs else TABLE
    seeds = a.seeds[:1] if a.sweep or a.doc_sweep else a.seeds
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(a.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp / "ds", ignore_errors=True)  # rebuilt (deterministic); trained artifacts are kept
        data = make_data(tmp)
        for seed in seeds:
            t0 = time.time()
            env = train(data, tmp, seed, a.steps)
            print(f"seed {seed}: trained {a.steps} steps in {time.time() - t0:.0f}s", file=sys.stderr)
            score(env, cfg(SLIDING, LORA, MIXER), str(tmp / f"s{seed}_model.int6.ptz"), 20_000)  # warm caches
            for name, over in rows:
                res[name, seed] = score(env, over, str(tmp / f"s{seed}_model.int6.ptz"), a.val_tokens)
                print(f"  {name}: bpb {res[name, seed][0]:.4f} tok/s {res[name, seed][1]:,.0f}", file=sys.stderr)
    n = res[rows[0][0], seeds[0]][2]
    print(f"\n{mx.default_device()}, mlx {mx.__version__}; 2x128 model, {a.steps} steps, seeds {seeds}; eval seq 128, "
          f"{n:,} val targets; TTT rows: lora rank 8 all targets Adam / full SGD 0.9, chunk 2048, clip 1.0\n")
    print("| eval | " + " | ".join(f"bpb seed {s}" for s in seeds) + " | mean | Δ vs sliding (spread) | tokens/s "
          "| cost/target vs sliding |")
    print("|---|" + "---|" * (len(seeds) + 5))
    base = np.array([res["sliding 64", s][0] for s in seeds])
    base_rate = np.mean([res["sliding 64", s][1] for s in seeds])
    for name, _ in rows:
        b = np.array([res[name, s][0] for s in seeds])
        d = b - base
        rate = np.mean([res[name, s][1] for s in seeds])
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in b) + f" | {b.mean():.4f} | {d.mean():+.4f} "
              f"({d.min():+.4f}..{d.max():+.4f}) | {rate:,.0f} | {base_rate / rate:.1f}x |")


if __name__ == "__main__":
    main()
