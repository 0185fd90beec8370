"""Artifact-size estimate (prints numbers; not a test) for the default 9x512 model with and without
the moonshot stack. Untrained weights compress too well (zero-initialised projections), so every
2-D weight is replaced by a Gaussian of its layer's init scale, a pessimistic stand-in for trained
weights (heavy-tailed trained rows quantize to fewer distinct int6 levels and compress better).

    python tests/bench_artifact_size.py [KEY=VALUE ...] [--only=SUBSTRING ...]  # extra env for every config
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt_mlx as T  # noqa: E402

FULL = dict(ENGRAM_LITE_ENABLED="1", SKIPGRAM_HASH_SIZE="4096")
CONFIGS = {"baseline (9x512)": {}, "engram (logit, defaults)": dict(ENGRAM_LITE_ENABLED="1"),
           "engram (input)": dict(ENGRAM_LITE_ENABLED="1", ENGRAM_MODE="input"),
           "skipgram 4096x32": dict(SKIPGRAM_HASH_SIZE="4096"), "full stack": FULL,
           "full stack, engram input": dict(FULL, ENGRAM_MODE="input"),
           "full stack, MLP_MULT=3": dict(FULL, MLP_MULT="3"),
           "full stack, MLP_MULT=3, 8 layers": dict(FULL, MLP_MULT="3", NUM_LAYERS="8"),
           "RECIPE=sp1024_record (9 layers)": dict(RECIPE="sp1024_record"),
           "RECIPE=sp1024_record at #1204's 11 layers": dict(RECIPE="sp1024_record", NUM_LAYERS="11",
                                                             RECUR_LAYERS="4,5", PARALLEL_START_LAYER="7")}


def main():
    only = [a[len("--only="):] for a in sys.argv[1:] if a.startswith("--only=")]
    extra = dict(kv.split("=", 1) for kv in sys.argv[1:] if not kv.startswith("--only="))
    code = os.path.getsize(T.__file__)
    print(f"code_bytes: {code:,} (train_gpt_mlx.py)\n")
    print("| config | params | model bytes | total bytes | fits 16,000,000 |\n|---|---|---|---|---|")
    for name, over in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        hp = T.Hyperparameters.from_env(dict(over, **extra))
        mx.random.seed(0)
        cfg = T.ModelConfig.from_hparams(hp)
        flat = T.flat_numpy(T.GPT(cfg))
        rng = np.random.default_rng(0)  # the same draws for every configuration
        for n, w in flat.items():
            if T.is_quantized(n, w.shape):
                flat[n] = (rng.standard_normal(w.shape) / np.sqrt(w.shape[1])).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.time()
            nbytes = T.write_artifact(os.path.join(tmp, "a.ptz"), flat, cfg, T.quant_plan(hp), None, hp.gptq_lite,
                                      hp.compressor)
        n_params = sum(w.size for w in flat.values())
        total = code + nbytes
        print(f"| {name} | {n_params:,} | {nbytes:,} | {total:,} | {'yes' if total <= 16_000_000 else 'NO'} |",
              flush=True)
        print(f"#   {name}: compressed in {time.time() - t:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
