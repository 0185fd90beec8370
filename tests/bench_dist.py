"""Benchmark (prints numbers; not a test): data parallelism over mx.distributed on this machine.

  1. the gradient all-reduce of the default 9x512 model (its real gradient shapes, random values),
     2 ranks over the ring backend: one all_sum per tensor vs nn.average_gradients' 32 MiB buckets
     (the script's default) vs one fused all_sum of all flattened gradients;
  2. the training-step time at a tiny config, one process vs 2 ranks with the same global batch
     (interleaved runs; both ranks share this machine's cores, so read it as overhead).

    python tests/bench_dist.py [--reps 10] [--rounds 2]
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt_mlx as T  # noqa: E402

LAUNCH = [str(Path(sys.executable).with_name("mlx.launch")), "-n", "2", "--backend", "ring", "--"]
TINY = dict(VOCAB_SIZE="1024", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="256")


def worker_allreduce(reps: int):
    group = mx.distributed.init(strict=True, backend="ring")
    model = T.GPT(T.ModelConfig.from_hparams(T.Hyperparameters.from_env({})))
    shapes = [(n, p.shape) for n, p in tree_flatten(model.trainable_parameters())]
    grads = tree_unflatten([(n, mx.random.normal(s)) for n, s in shapes])
    mx.eval(grads)
    total = sum(int(np.prod(s)) * 4 for _, s in shapes)
    modes = {"per-tensor all_sum": 0, "32 MiB buckets (default)": 32 << 20, "one fused all_sum": total + 1}
    times = {m: [] for m in modes}
    for _ in range(reps):
        for m, b in modes.items():
            t0 = time.perf_counter()
            mx.eval(nn.average_gradients(grads, group, b))
            times[m].append(time.perf_counter() - t0)
    if group.rank() == 0:
        print(f"9x512 gradients: {len(shapes)} tensors, {total / 2**20:.1f} MiB float32, 2 ranks, ring, {reps} reps")
        for m, t in times.items():
            print(f"  {m:28s} median {np.median(t) * 1000:8.1f} ms  (min {min(t) * 1000:.1f}, max {max(t) * 1000:.1f})")


def worker_step(steps: int):
    group = mx.distributed.init()
    hp = T.Hyperparameters.from_env(TINY)
    mx.random.seed(0)
    model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
    fns = T.Compiled(model, T.Optimizers(model, hp))
    x = np.random.default_rng(0).integers(0, 1024, (16, 256)).astype(np.int32)  # 4096 tokens, global batch
    for _ in range(2):
        float(T.train_step(fns, x, x, 16, 1.0, 0.95, group))
    t = []
    for _ in range(steps):
        t0 = time.perf_counter()
        float(T.train_step(fns, x, x, 16, 1.0, 0.95, group))
        t.append(time.perf_counter() - t0)
    if group.rank() == 0:
        print(f"step_ms {np.median(t) * 1000:.1f}")


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), check=True).stdout
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", choices=("allreduce", "step"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if a.worker == "allreduce":
        return worker_allreduce(a.reps)
    if a.worker == "step":
        return worker_step(a.steps)
    me = [sys.executable, __file__]
    print(run(LAUNCH + me + ["--worker", "allreduce", "--reps", str(a.reps)]), end="")
    one, two = [], []
    for _ in range(a.rounds):  # interleaved A/B
        one.append(float(run(me + ["--worker", "step", "--steps", str(a.steps)]).split()[-1]))
        two.append(float(run(LAUNCH + me + ["--worker", "step", "--steps", str(a.steps)],
                             dict(OPENBLAS_NUM_THREADS="1")).split()[-1]))
    print("tiny config (2x128, seq 256, 4096 tokens/step), median step ms per run:")
    print(f"  1 process:            {one}")
    print(f"  2 ranks (ring, 1 BLAS thread each): {two}")
    print(f"  ratio 2 ranks / 1 process: mean {np.mean(two) / np.mean(one):.2f} "
          f"(per round {[round(b / a_, 2) for a_, b in zip(one, two)]})")


if __name__ == "__main__":
    main()
