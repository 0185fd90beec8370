"""Benchmark (prints numbers; not a test): training-step tokens/s and peak memory, compiled vs
uncompiled, and evaluation tokens/s, for one fixed tiny config on random tokens.

    python tests/bench_train.py [--layers 2 --dim 128 --seq 256 --batch-tokens 4096 --steps 8]
"""
import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt_mlx as T  # noqa: E402


def setup(a, compiled):
    env = dict(VOCAB_SIZE=str(a.vocab), NUM_LAYERS=str(a.layers), MODEL_DIM=str(a.dim), NUM_HEADS=str(a.heads),
               NUM_KV_HEADS=str(max(1, a.heads // 2)), TRAIN_SEQ_LEN=str(a.seq), **dict(kv.split("=", 1) for kv in a.env))
    hp = T.Hyperparameters.from_env(env)
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
    comp = mx.full((a.vocab * a.vocab,), 1.0 / a.vocab) if hp.complement_alpha > 0 else None  # cost only
    qat = hp.quant_bits if hp.qat_start_frac < 1.0 else 0  # time the QAT graphs when QAT is asked for
    return hp, model, T.Compiled(model, T.Optimizers(model, hp), compile_fns=compiled, qat_bits=qat,
                                 complement=comp)


def bench_train(a, compiled):
    hp, model, fns = setup(a, compiled)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, a.vocab, (a.batch_tokens // a.seq, a.seq)).astype(np.int32),) * 2 for _ in range(2)]
    micro = max(1, a.micro_tokens // a.seq)
    for i in range(2):  # warmup / compile
        mx.eval(T.train_step(fns, *batches[i % 2], micro, 1.0, 0.95))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for i in range(a.steps):
        mx.eval(T.train_step(fns, *batches[i % 2], micro, 1.0, 0.95))
    dt = (time.perf_counter() - t0) / a.steps
    return a.batch_tokens / dt, dt * 1000, mx.get_peak_memory() / 2**20, T.count_params(model)


def bench_eval(a):
    hp, model, fns = setup(a, True)
    toks = np.random.default_rng(1).integers(0, a.vocab, a.eval_tokens + 1).astype(np.uint16)
    tables = (np.ones(a.vocab, np.int64), np.zeros(a.vocab, bool), np.zeros(a.vocab, bool))
    bseqs = max(1, a.micro_tokens // a.seq)
    T.evaluate(fns.token_nll, toks[: bseqs * a.seq + 1], a.seq, bseqs, tables)  # compile
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    T.evaluate(fns.token_nll, toks, a.seq, bseqs, tables)
    dt = time.perf_counter() - t0
    return a.eval_tokens / dt, mx.get_peak_memory() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--micro-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--env", nargs="*", default=[], help="extra KEY=VALUE hyperparameters")
    a = p.parse_args()
    print(f"device:{mx.default_device()} mlx:{mx.__version__} config: vocab={a.vocab} layers={a.layers} dim={a.dim} "
          f"seq={a.seq} batch_tokens={a.batch_tokens} micro_tokens={a.micro_tokens} {' '.join(a.env)}")
    res = {True: [], False: []}
    for _ in range(a.reps):  # interleaved, median: this machine's load drifts
        for compiled in (True, False):
            res[compiled].append(bench_train(a, compiled))
    print("| step | tokens/s (median) | ms/step | peak MiB | params |\n|---|---|---|---|---|")
    for compiled, rs in res.items():
        tps, ms, mem, n = sorted(rs)[len(rs) // 2]
        print(f"| {'compiled' if compiled else 'uncompiled'} | {tps:,.0f} | {ms:.1f} | {mem:.0f} | {n:,} |")
    tps, mem = bench_eval(a)
    print(f"eval: {tps:,.0f} tokens/s over {a.eval_tokens:,} tokens, peak {mem:.0f} MiB")


if __name__ == "__main__":
    main()
