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

    python tests/bench_recipe.py sp8192_ms     [--reps 3] [--out ms.json]
    python tests/bench_recipe.py sp8192        [--seeds 1337 1338] [--steps 60] [--only NAME ...] [--ms ms.json]
                                               [--out part.json]   (several at once, each with its own --only/--out)
    python tests/bench_recipe.py sp8192_report --files part*.json --ms ms.json [--steps 60] [--seeds ...]
    python tests/bench_recipe.py sp8192_cost   [--reps 3]

sp8192 (issue 23): 3 x 96, seq 128, each sp8192 piece alone and RECIPE=sp8192_record (3 layers) minus each piece,
at equal steps and at equal wall clock (each config's step time measured interleaved, converted to steps).
sp8192_cost: the two recipes at their full shapes, step time per 1024-token microbatch and the memory estimate.
"""
import argparse
import json
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

# sp8192 (issue 23): the records' later pieces at 3 x 96, each alone on the baseline and each taken out of
# RECIPE=sp8192_record at 3 layers (its depth values derived: loop 1,1 run three times, sp8192 lanes from layer 2,
# XSA on all 5 virtual layers), RoPE on 8 of the 24 head dims, EMA scaled to a short run (0.9965 would keep ~60% of
# the init weights after 150 steps)
S8_PIECES = {"skip gates": dict(SKIP_GATES=1),
             "loop 1,1 x3 from 35%": dict(RECUR_LAYERS="1,1", RECUR_PASSES=2, RECUR_START_FRAC=0.35),
             "sp8192 lanes from layer 2": dict(PARALLEL_START_LAYER=2, PARALLEL_FORM="sp8192"),
             "input SmearGate": dict(SMEAR_GATE=1, SMEAR_MODE="input"), "attention gate": dict(ATTN_GATE=1),
             "mlp x4": dict(MLP_MULT=4), "qk gain 5": dict(QK_GAIN_INIT=5.0)}
S8_RECIPE = dict(RECIPE="sp8192_record", ROPE_DIMS=8, EMA_DECAY=0.95)
S8_BASE_OPT = dict(BASE_OPT, BETA2=0.95, MUON_MOMENTUM_WARMUP_START=0.85, MUON_ROW_NORMALIZE=0,
                   MUON_NS_COEFFS="quintic", MIN_LR=0, EMBED_WD=0, ADAM_WD=0)
S8_OFF = {"skip gates": dict(SKIP_GATES=0), "loop": dict(RECUR_LAYERS="off", XSA_LAST_N=3),
          "sp8192 lanes": dict(PARALLEL_START_LAYER=0), "input SmearGate": dict(SMEAR_GATE=0, SMEAR_MODE="channel"),
          "attention gate": dict(ATTN_GATE=0), "mlp x4": dict(MLP_MULT=2), "qk gain 5": dict(QK_GAIN_INIT=1.5),
          "optimizer values": S8_BASE_OPT}
S8_CONFIGS = {"baseline": {}, **S8_PIECES, "recipe (3 layers)": S8_RECIPE,
              **{f"recipe without {k}": dict(S8_RECIPE, **v) for k, v in S8_OFF.items()},
              "sp1024_record (3 layers)": dict(RECIPE="sp1024_record", ROPE_DIMS=8, EMA_DECAY=0.95,
                                               BIGRAM_HASH_SIZE=2048, BIGRAM_DIM=32, ENGRAM_HASH_SIZE=2048,
                                               ENGRAM_DIM=32)}


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


def s8_base(a, data) -> dict:
    return dict(ablation_base(a, data), NUM_LAYERS="3", MODEL_DIM="96", VAL_MAX_TOKENS="16384")


def s8_step_ms(base: dict, configs: dict, reps: int) -> dict:
    """CPU milliseconds per compiled step of each config at its shape, interleaved (process time: the machine is
    shared, and wall time under other people's load measured noise); a delayed loop is weighted by the share of
    the run it is on for (RECUR_START_FRAC)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1024, (16, 129)).astype(np.int32)
    fns = {}
    for name, over in configs.items():
        hp = T.Hyperparameters.from_env(dict(base, **{k: str(v) for k, v in over.items()}))
        model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
        opt = T.Optimizers(model, hp)
        frac = hp.recur_start_frac if model.span else 0.0
        fns[name] = [(T.Compiled(model, opt, recur=rec), w) for rec, w in ((False, frac), (True, 1 - frac)) if w]
        for f, _ in fns[name]:
            mx.eval(T.train_step(f, x[:, :-1], x[:, 1:], 16, 1.0, 0.95))  # compile
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, graphs in fns.items():
            ms = 0.0
            for f, w in graphs:
                t = time.process_time()
                for _ in range(3):
                    mx.eval(T.train_step(f, x[:, :-1], x[:, 1:], 16, 1.0, 0.95))
                ms += w * (time.process_time() - t) / 3 * 1000
            times[name].append(ms)
    return {k: statistics.median(v) for k, v in times.items()}


def s8_reference(name: str) -> str:
    return "recipe (3 layers)" if name.startswith("recipe without") else "baseline"


def sp8192_ms(a, tmp, data):
    """Step times of every sp8192 config, one process, written to --out (the runs' equal-time steps read it)."""
    ms = s8_step_ms(s8_base(a, data), S8_CONFIGS, a.reps)
    Path(a.out).write_text(json.dumps(ms, indent=1))
    print(ms)


def sp8192(a, tmp, data):
    """Equal steps, then equal wall clock as steps: a config whose step costs r times its reference's runs
    steps / r (a rerun only where r is outside the timing noise, --noise). Results go to --out after every run (sp8192_report
    merges the files of several such processes); the step times come from --ms (sp8192_ms), waited for."""
    base = s8_base(a, data)
    configs = {k: S8_CONFIGS[k] for k in a.only} if a.only else S8_CONFIGS
    res = dict(same={k: [] for k in configs}, timed={k: [] for k in configs}, steps=a.steps, seeds=a.seeds)
    for seed in a.seeds if not a.timed_only else ():
        for i, (name, over) in enumerate(configs.items()):
            res["same"][name].append(dict(run_one(base, over, seed, tmp, f"s{seed}_{i}"), steps=a.steps))
            print(f"# {name} seed {seed}: {res['same'][name][-1]}", file=sys.stderr, flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    while not Path(a.ms).exists():
        time.sleep(10)
    ms = json.loads(Path(a.ms).read_text())
    for seed in a.seeds:
        for i, (name, over) in enumerate(configs.items()):
            ratio = ms[name] / ms[s8_reference(name)]
            if abs(ratio - 1) <= a.noise and not a.timed_only:  # within the step-time noise: equal cost, the equal-steps run stands
                res["timed"][name].append(res["same"][name][a.seeds.index(seed)])
                continue
            n = round(a.steps / ratio)
            b = dict(base, ITERATIONS=str(n), WARMDOWN_ITERS=str(n // 3))
            res["timed"][name].append(dict(run_one(b, over, seed, tmp, f"t{seed}_{i}"), steps=n))
            print(f"# {name} seed {seed} ({n} steps): {res['timed'][name][-1]}", file=sys.stderr, flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


def sp8192_report(a):
    """The table from sp8192's --out files (and sp8192_ms's step times): missing runs show as —."""
    same, timed = {}, {}
    for f in a.files:
        r = json.loads(Path(f).read_text())
        same.update({k: v for k, v in r["same"].items() if v})
        timed.update({k: v for k, v in r["timed"].items() if v})
    ms = json.loads(Path(a.ms).read_text())
    for name in same:  # equal cost within the timing noise: the equal-steps runs are the equal-time ones
        if abs(ms[name] / ms[s8_reference(name)] - 1) <= a.noise:
            timed[name] = same[name]
    print(f"\n3 x 96, seq 128, 2048 tokens/step, {a.steps} steps (equal wall clock: steps x the reference's CPU "
          f"time per step / the config's), seeds {a.seeds}, {mx.default_device()}; Δ paired by seed vs the "
          "reference (pieces: the baseline; 'recipe without': the recipe), mean ± half-range\n")
    print("| config | step time vs ref | val_bpb, equal steps | Δ equal steps | steps at equal time | Δ equal time |")
    print("|---|---|---|---|---|---|")
    for name in S8_CONFIGS:
        ref = s8_reference(name)
        row = [name, f"{ms[name] / ms[ref]:.2f}×" if name in ms and ref in ms else "—"]
        for res in (same, timed):
            if name not in res:
                row += ["—", "—"]
                continue
            bp = [r["bpb"] for r in res[name]]
            row.append(f"{statistics.mean(bp):.4f} ± {(max(bp) - min(bp)) / 2:.4f}" if res is same
                       else "/".join(str(r["steps"]) for r in res[name]))
            d = [r["bpb"] - b["bpb"] for r, b in zip(res[name], same.get(ref, []))]  # the ref at equal steps
            row.append("—" if name == ref or not d else f"{statistics.mean(d):+.4f} ± {(max(d) - min(d)) / 2:.4f}")
        print("| " + " | ".join(row) + " |")


def s8_cost(a):
    """RECIPE=sp8192_record vs sp1024_record: compiled CPU time per microbatch at the full shapes (one row of
    1024 tokens, looped graphs), interleaved, and the memory estimate at the recipes' own batch."""
    rows = {}
    for name, v in (("sp1024_record", 1024), ("sp8192_record", 8192)):
        env = dict(RECIPE=name, VOCAB_SIZE=str(v), TRAIN_SEQ_LEN="1024")
        hp = T.Hyperparameters.from_env(env)
        model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
        full = T.Hyperparameters.from_env(dict(RECIPE=name, VOCAB_SIZE=str(v)))
        need = T.memory_needs(full, T.ModelConfig.from_hparams(full), T.micro_tokens(full, 1))
        x = np.random.default_rng(0).integers(0, v, (1, 1025)).astype(np.int32)
        rows[name] = dict(fn=T.Compiled(model, T.Optimizers(model, hp)), x=x, ms=[], params=T.count_params(model),
                          mem=T.memory_total(need), micro=T.micro_tokens(full, 1))
        mx.eval(T.train_step(rows[name]["fn"], x[:, :-1], x[:, 1:], 1, 1.0, 0.95))
    for _ in range(a.reps):
        for r in rows.values():
            t = time.process_time()  # CPU time: the machine is shared
            mx.eval(T.train_step(r["fn"], r["x"][:, :-1], r["x"][:, 1:], 1, 1.0, 0.95))
            r["ms"].append((time.process_time() - t) * 1000)
    b = statistics.median(rows["sp1024_record"]["ms"])
    print("\n| recipe (full shape, 1024 tokens/microbatch, compiled, CPU) | params | median CPU ms | vs sp1024_record | "
          "memory estimate (its batch) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {statistics.median(r['ms']):.0f} | {statistics.median(r['ms']) / b:.2f}× | "
              f"{r['mem'] / 2**30:.2f} GiB ({r['micro']} tokens/microbatch) |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("ablation", "depth", "wallclock", "overhead", "sp8192", "sp8192_ms",
                                     "sp8192_report", "sp8192_cost"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=3, help="depth: NUM_LAYERS")
    p.add_argument("--dim", type=int, default=96, help="depth: MODEL_DIM")
    p.add_argument("--only", nargs="*", default=None, help="exact config names (ablation, wallclock), in this order")
    p.add_argument("--out", default="sp8192.json", help="sp8192, sp8192_ms: the results file")
    p.add_argument("--ms", default="sp8192_ms.json", help="sp8192, sp8192_report: sp8192_ms's step times")
    p.add_argument("--files", nargs="*", default=[], help="sp8192_report: sp8192's results files")
    p.add_argument("--timed-only", action="store_true", help="sp8192: only the equal-time reruns")
    p.add_argument("--noise", type=float, default=0.07, help="sp8192: step-time ratios within 1 +- this count as "
                   "equal (CPU time under shared load: QK gain 5, identical work, measured 1.04x and 1.07x)")
    a = p.parse_args()
    if a.part == "overhead":
        overhead(a)
    elif a.part == "sp8192_cost":
        s8_cost(a)
    elif a.part == "sp8192_report":
        sp8192_report(a)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            parts = dict(ablation=ablation, depth=depth, wallclock=wallclock, sp8192=sp8192, sp8192_ms=sp8192_ms)
            parts[a.part](a, tmp, make_data(tmp))
