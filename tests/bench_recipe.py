"""Record-base benchmark (prints numbers; not a test). Four parts:

    python tests/bench_recipe.py ablation  [--seeds 1337 1338] [--steps 100] [--only NAME ...]
    python tests/bench_recipe.py depth     [--seeds 1337 1338] [--steps 120] [--layers 3] [--dim 96]
    python tests/bench_recipe.py wallclock [--seeds 1337 1338] [--seconds 90] [--only NAME ...]
    python tests/bench_recipe.py overhead  [--reps 5]

ablation: bench_ablation's tiny config (2 x 128, seq 128, 100 steps), each piece alone, the tuned
optimizer values alone, the recipe scaled to 2 layers, the recipe minus each piece, and the recipe plus each
moonshot training piece, val_bpb after the round trip. depth: the recipe with only NUM_LAYERS set (its depth
values derived) vs the baseline at that depth. wallclock: 4 x 128, seq 256, baseline vs recipe variants for the same training seconds, interleaved.
overhead: compiled step time of each piece at equal shape, interleaved with the baseline, as ratios.
"""
import argparse
import re
import statistics
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
from bench_ablation import make_data, run_one  # noqa: E402

TUNED = dict(MATRIX_LR=0.03, TIED_EMBED_LR=0.035, SCALAR_LR=0.025, GRAD_CLIP_NORM=0.3, MUON_MOMENTUM=0.99,
             MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=1500, MUON_WEIGHT_DECAY=0.04, WARMDOWN_FRAC=0.56)
PIECES = {"smeargate": dict(SMEAR_GATE=1), "bigram 2048x32": dict(BIGRAM_HASH_SIZE=2048, BIGRAM_DIM=32),
          "xsa (all layers)": dict(XSA_LAST_N=2), "partial rope 8/32 + ln scale": dict(ROPE_DIMS=8, LN_SCALE=1),
          "leaky relu 0.5 ^2": dict(LEAKY_RELU_SLOPE=0.5), "parallel from layer 1": dict(PARALLEL_START_LAYER=1),
          "recurrence 0,0": dict(RECUR_LAYERS="0,0"), "mlp x3": dict(MLP_MULT=3)}
BASE_OPT = dict(MATRIX_LR=0.04, TIED_EMBED_LR=0.05, SCALAR_LR=0.04, GRAD_CLIP_NORM=0, MUON_MOMENTUM=0.95,
                MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=500, MUON_WEIGHT_DECAY=0, WARMDOWN_FRAC=0)
# The recipe with its shape scaled to 2 layers (and EMA to a 100-step run: 0.997 keeps 74% of the init weights),
# its recurrence from step 0 (the row "recipe, recurrence from 50%" has the recipe's RECUR_START_FRAC)
RECIPE2 = dict(RECIPE="sp1024_record", NUM_LAYERS=2, PARALLEL_START_LAYER=1, RECUR_LAYERS="0,0", RECUR_START_FRAC=0,
               XSA_LAST_N=3, ROPE_DIMS=8, BIGRAM_HASH_SIZE=2048, BIGRAM_DIM=32, EMA_DECAY=0.95, ENGRAM_LITE_ENABLED=0)
ENGRAM = dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=2048, ENGRAM_DIM=32, ENGRAM_HEADS=2)
ABLATION = {"baseline": {}, **PIECES, "tuned optimizer values only": TUNED, "recipe (2 layers)": RECIPE2,
            "recipe, EMA 0.997 as is": dict(RECIPE2, EMA_DECAY=0.997), "recipe + engram (logit)": dict(RECIPE2, **ENGRAM),
            **{f"recipe without {k}": dict(RECIPE2, **off) for k, off in (
                ("smeargate", dict(SMEAR_GATE=0)), ("bigram", dict(BIGRAM_HASH_SIZE=0)), ("xsa", dict(XSA_LAST_N=0)),
                ("recurrence", dict(RECUR_LAYERS="off", XSA_LAST_N=2)), ("parallel", dict(PARALLEL_START_LAYER=0)),
                ("partial rope + ln scale", dict(ROPE_DIMS=0, LN_SCALE=0)), ("leaky relu", dict(LEAKY_RELU_SLOPE=0)),
                ("mlp x3", dict(MLP_MULT=2)), ("tuned optimizer values", BASE_OPT))},
            "recipe, recurrence from 50%": dict(RECIPE2, RECUR_START_FRAC=0.5),
            "recipe + skipgram": dict(RECIPE2, SKIPGRAM_HASH_SIZE=2048, SKIPGRAM_DIM=16),
            "recipe + complement a=0.5": dict(RECIPE2, COMPLEMENT_ALPHA=0.5)}
# 4 layers: the record's layout scaled (parallel lanes on the last layer, the hinge layers 1,2 repeated)
RECIPE4 = dict(RECIPE="sp1024_record", NUM_LAYERS=4, PARALLEL_START_LAYER=3, RECUR_LAYERS="1,2", XSA_LAST_N=6,
               ROPE_DIMS=8, BIGRAM_HASH_SIZE=2048, BIGRAM_DIM=32, ENGRAM_HASH_SIZE=2048, ENGRAM_DIM=32,
               EMA_DECAY=0)  # EMA needs >> 1/(1-d) steps
WALLCLOCK = {"baseline": {}, "recipe (4 layers)": RECIPE4,  # recurrence from 50%, the recipe's RECUR_START_FRAC
             "recipe (4 layers), recurrence from step 0": dict(RECIPE4, RECUR_START_FRAC=0),
             "recipe (4 layers), recurrence from step 0, EMA 0.997": dict(RECIPE4, RECUR_START_FRAC=0, EMA_DECAY=0.997),
             # what the 2-layer ablation says pays at CPU scale: the recipe without SmearGate, recurrence, tuned values
             "recipe (4 layers) at CPU scale": dict(RECIPE4, SMEAR_GATE=0, RECUR_LAYERS="off", RECUR_START_FRAC=0,
                                                    XSA_LAST_N=4, **BASE_OPT)}


def table(res, base_name="baseline"):
    b = statistics.mean(r["bpb"] for r in res[base_name]) if base_name in res else float("nan")
    print("| config | val_bpb (int6 roundtrip), mean ± half-range | Δ vs baseline | steps | params | artifact bytes |")
    print("|---|---|---|---|---|---|")
    for name, rs in res.items():
        bp = [r["bpb"] for r in rs]
        print(f"| {name} | {statistics.mean(bp):.4f} ± {(max(bp) - min(bp)) / 2:.4f} | "
              f"{statistics.mean(bp) - b:+.4f} | {'/'.join(str(r.get('steps', '')) for r in rs)} | "
              f"{rs[0]['params']:,} | {rs[0]['bytes']:,} |")


def ablation_base(a, data) -> dict:
    return dict(data, ITERATIONS=str(a.steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="128", GRAD_ACCUM_STEPS="1",
                NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", WARMUP_STEPS="2",
                WARMDOWN_ITERS=str(a.steps // 3), MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="32768",
                VAL_BATCH_SIZE="16384", TRAIN_LOG_EVERY="10")


def run_configs(base, configs, seeds, tmp, tag) -> dict:
    res = {k: [] for k in configs}
    for seed in seeds:
        for i, (name, over) in enumerate(configs.items()):
            res[name].append(run_one(base, over, seed, tmp, f"{tag}{seed}_{i}"))
            print(f"# {name} seed {seed}: {res[name][-1]}", file=sys.stderr, flush=True)
    return res


def ablation(a, tmp, data):
    configs = {k: ABLATION[k] for k in a.only} if a.only else ABLATION  # in the order given
    res = run_configs(ablation_base(a, data), configs, a.seeds, tmp, "a")
    print(f"\n{a.steps} steps x 2048 tokens, 2 x 128, seq 128, seeds {a.seeds}, {mx.default_device()}\n")
    table(res)


def depth(a, tmp, data):
    """The recipe at another depth with nothing but NUM_LAYERS set (its depth values derived) vs the baseline."""
    base = dict(ablation_base(a, data), NUM_LAYERS=str(a.layers), MODEL_DIM=str(a.dim))
    configs = {"baseline": {}, f"RECIPE=sp1024_record, NUM_LAYERS={a.layers} only": dict(RECIPE="sp1024_record")}
    res = run_configs(base, configs, a.seeds, tmp, "d")
    print(f"\n{a.steps} steps x 2048 tokens, {a.layers} x {a.dim}, seq 128, seeds {a.seeds}, {mx.default_device()}\n")
    table(res)


def wallclock(a, tmp, data):
    base = dict(data, ITERATIONS="100000", TRAIN_BATCH_TOKENS="4096", TRAIN_SEQ_LEN="256", GRAD_ACCUM_STEPS="1",
                NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", WARMUP_STEPS="2",
                MAX_WALLCLOCK_SECONDS=str(a.seconds), VAL_MAX_TOKENS="32768", VAL_BATCH_SIZE="16384",
                TRAIN_LOG_EVERY="10")
    configs = {k: WALLCLOCK[k] for k in a.only} if a.only else WALLCLOCK
    res = {k: [] for k in configs}
    for seed in a.seeds:  # interleaved: a drift in machine load hits all alike
        for i, (name, over) in enumerate(configs.items()):
            r = run_one(base, over, seed, tmp, f"w{seed}_{i}")
            r["steps"] = int(re.findall(r"^step:(\d+)/", (tmp / f"w{seed}_{i}.txt").read_text(), re.M)[-1])
            res[name].append(r)
            print(f"# {name} seed {seed}: {r}", file=sys.stderr, flush=True)
    print(f"\n{a.seconds} s of training, 4096 tokens/step, 4 x 128, seq 256, seeds {a.seeds}, {mx.default_device()}\n")
    table(res)


def overhead(a):
    shape = dict(VOCAB_SIZE="1024", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1024, (16, 129)).astype(np.int32)
    fns = {}
    for name, over in {"baseline": {}, **PIECES}.items():
        hp = T.Hyperparameters.from_env(dict(shape, **{k: str(v) for k, v in over.items()}))
        model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
        fns[name] = T.Compiled(model, T.Optimizers(model, hp))
        mx.eval(T.train_step(fns[name], x[:, :-1], x[:, 1:], 16, 1.0, 0.95))  # compile
    times = {k: [] for k in fns}
    for _ in range(a.reps):  # interleaved
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(3):
                mx.eval(T.train_step(f, x[:, :-1], x[:, 1:], 16, 1.0, 0.95))
            times[name].append((time.perf_counter() - t) / 3 * 1000)
    b = statistics.median(times["baseline"])
    print("\n| piece (2 x 128, seq 128, 2048 tokens/step, compiled) | median ms/step | vs baseline |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {statistics.median(ts) / b - 1:+.0%} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("ablation", "depth", "wallclock", "overhead"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=3, help="depth: NUM_LAYERS")
    p.add_argument("--dim", type=int, default=96, help="depth: MODEL_DIM")
    p.add_argument("--only", nargs="*", default=None, help="exact config names (ablation, wallclock), in this order")
    a = p.parse_args()
    if a.part == "overhead":
        overhead(a)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            dict(ablation=ablation, depth=depth, wallclock=wallclock)[a.part](a, tmp, make_data(tmp))
