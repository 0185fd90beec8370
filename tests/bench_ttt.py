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


def cfg(*parts, **over) -> dict:
    return {k: v for d in parts + (over,) for k, v in d.items()}


TABLE = [("plain", dict(EVAL_BATCH_SEQS="64")), ("sliding 64", SLIDING),
         ("sliding 64 + TTT lora", cfg(SLIDING, LORA)), ("sliding 64 + TTT full", cfg(SLIDING, FULL)),
         ("sliding 64 + mixer", cfg(SLIDING, MIXER)), ("sliding 64 + TTT lora + mixer", cfg(SLIDING, LORA, MIXER))]
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
    p.add_argument("--workdir", default="", help="keep shards and trained artifacts here (reused) instead of a temp folder")
    a = p.parse_args()
    rows = SWEEP if a.sweep else TABLE
    seeds = a.seeds[:1] if a.sweep else a.seeds
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
    print("| eval | " + " | ".join(f"bpb seed {s}" for s in seeds) + " | mean | Δ vs sliding (spread) | tokens/s |")
    print("|---|" + "---|" * (len(seeds) + 4))
    base = np.array([res["sliding 64", s][0] for s in seeds])
    for name, _ in rows:
        b = np.array([res[name, s][0] for s in seeds])
        d = b - base
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in b) + f" | {b.mean():.4f} | {d.mean():+.4f} "
              f"({d.min():+.4f}..{d.max():+.4f}) | {np.mean([res[name, s][1] for s in seeds]):,.0f} |")


if __name__ == "__main__":
    main()
