"""What ATTN_DOC_ISOLATED=1 costs (prints numbers; not a test): the tiny model's forward (evaluation) and
forward + backward (training) with mask="causal" against doc_mask()'s boolean [B,1,T,T] array, run interleaved
(A, B, A, B, ...) so the machine's load hits both alike; the ratio of medians per shape.

    python tests/bench_doc_attn.py [--reps 7] [--width 128] [--tokens 8192] [--seqs 128 512 1024 2048]
"""
import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt_mlx as T  # noqa: E402


def make(width: int, isolated: bool):
    env = dict(NUM_LAYERS="2", MODEL_DIM=str(width), NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="1024",
               ATTN_DOC_ISOLATED=str(int(isolated)))
    mx.random.seed(0)
    hp = T.Hyperparameters.from_env(env)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    fns = T.Compiled(model, T.Optimizers(model, hp))
    return fns.token_nll, fns.grads


def timed(fn, x, y) -> float:
    t0 = time.perf_counter()
    mx.eval(fn(x, y))
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 1024, 2048])
    a = p.parse_args()
    plain = make(a.width, False)
    iso = make(a.width, True)
    rng = np.random.default_rng(0)
    print(f"{mx.default_device()}, mlx {mx.__version__}; 2x{a.width} model, {a.tokens} tokens per call, documents of "
          f"~300 tokens (BOS every 300 on average); median and minimum of {a.reps} interleaved calls\n")
    print("| seq | pass | causal ms (median, min) | doc mask ms (median, min) | ratio of medians | ratio of minima |")
    print("|---|---|---|---|---|---|")
    for T_ in a.seqs:
        B = max(1, a.tokens // T_)
        ids = rng.integers(2, 1024, (B, T_ + 1)).astype(np.int32)
        ids[rng.random(ids.shape) < 1 / 300] = T.BOS_ID
        x, y = mx.array(ids[:, :-1]), mx.array(ids[:, 1:])
        for k, name in ((0, "forward"), (1, "forward+backward")):
            fa, fb = plain[k], iso[k]
            timed(fa, x, y)
            timed(fb, x, y)  # compile both first
            ta, tb = [], []
            for _ in range(a.reps):
                ta.append(timed(fa, x, y))
                tb.append(timed(fb, x, y))
            ma, mb = np.median(ta) * 1e3, np.median(tb) * 1e3
            na, nb = min(ta) * 1e3, min(tb) * 1e3
            print(f"| {T_} | {name} | {ma:.0f}, {na:.0f} | {mb:.0f}, {nb:.0f} | {mb / ma:.2f}x | {nb / na:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
