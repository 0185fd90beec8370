"""Ablation benchmark and robustness grid (prints numbers; not a test).

Trains tiny models on shards built from ../shared/fineweb_sample (generated text when absent)
and scores val_bpb after the int6 round trip. Three modes:

  grid (default)  every config on every cell of widths x run lengths x seeds, through the real
                  script (train_gpt_mlx.main); one markdown table, each cell the mean change vs
                  the baseline of the same width, length and seed, +- half the range over seeds.
  --ema-sweep     EMA schedules: EMA never changes the trajectory, so one training run per cell
                  carries every schedule as a shadow and each is scored after the round trip.
  --timing        step time of each config, interleaved round-robin in one process, median.

    python tests/bench_ablation.py [--widths 64 128] [--steps 60 300] [--seeds 1337 1338]
                                   [--only baseline full] [--cache results.json]

Results are cached by (config, width, steps, seed) in --cache, so a grid can be extended or
re-printed without rerunning cells (delete the file after changing the training code).
"""
import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from conftest import SAMPLE, generated_docs, load_script  # noqa: E402

# Hash sizes scaled to the tiny model; ENGRAM_DIM is the script's default (128) unless named.
ENGRAM = dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=2048, ENGRAM_HEADS=2)
SKIPGRAM = dict(SKIPGRAM_HASH_SIZE=2048, SKIPGRAM_DIM=16)
EMA = dict(EMA_DECAY=0.997)  # the records' decay, with the default warm-up (EMA_WARMUP=3)
# The full stack = the pieces whose gain held on every cell of the grid (README, "Training-side
# ablation"): EngramLite in the logit form at its default width, and the warmed-up EMA. Skip-gram,
# complementary training and QAT did not pay robustly and are left out.
FULL = dict(ENGRAM, **EMA)
CONFIGS = {
    "baseline": {},
    "engram logit, dim 128": dict(ENGRAM),
    "engram logit, dim 32": dict(ENGRAM, ENGRAM_DIM=32),
    "engram input, dim 128": dict(ENGRAM, ENGRAM_MODE="input"),
    "engram input, dim 32": dict(ENGRAM, ENGRAM_MODE="input", ENGRAM_DIM=32),  # README: timing only
    "skipgram": dict(SKIPGRAM),
    "complement a=0.5": dict(COMPLEMENT_ALPHA=0.5),
    "ema 0.997 (warm-up 3)": dict(EMA),
    "qat from 0.67 (warmdown start)": dict(QAT_START_FRAC=0.67),
    "full stack": FULL,
    "issue #11 stack (old EMA, QAT 0.5)": dict(ENGRAM, ENGRAM_DIM=32, **SKIPGRAM, EMA_DECAY=0.99, EMA_WARMUP=0,
                                       QAT_START_FRAC=0.5),
}
# EMA schedules for --ema-sweep: (decay, warm-up W, start fraction); None = the raw weights.
EMA_SCHEDULES = {
    "raw weights": None,
    "0.95 const": (0.95, 0, 0.0),
    "0.99 const": (0.99, 0, 0.0),
    "0.997 const (records)": (0.997, 0, 0.0),
    "0.997 warm-up W=3": (0.997, 3, 0.0),
    "0.997 warm-up W=10": (0.997, 10, 0.0),
    "0.997 warm-up W=30": (0.997, 30, 0.0),
    "0.99 from 0.5 of the run": (0.99, 0, 0.5),
    "0.95 from 0.5 of the run": (0.95, 0, 0.5),
    "0.997 W=10 from 0.5 of the run": (0.997, 10, 0.5),
}


def make_data(tmp: Path) -> dict:
    bs = load_script("data/build_shards.py")
    if (SAMPLE / "docs_200.jsonl").exists():
        docs, tok, vocab = SAMPLE / "docs_200.jsonl", SAMPLE / "fineweb_1024_bpe.model", None
    else:
        docs = tmp / "docs.txt"
        docs.write_text("\n\n".join(generated_docs(200)))
        tok, vocab = tmp / "tok.model", 320
    s = bs.build_shards(docs, tok, tmp / "ds", val_docs=50, train_tokenizer_vocab=vocab, log=lambda *_: None)
    return dict(DATA_PATH=str(tmp / "ds"), TOKENIZER_PATH=str(tok), VOCAB_SIZE=str(s["vocab_size"]))


def cell_env(data: dict, width: int, steps: int) -> dict:
    """The tiny config of one grid cell: 2 layers, seq 128, 2048 tokens/step, warmdown = 1/3 of the run."""
    return dict(data, ITERATIONS=str(steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="128", GRAD_ACCUM_STEPS="1",
                NUM_LAYERS="2", MODEL_DIM=str(width), NUM_HEADS="4", NUM_KV_HEADS="2", WARMUP_STEPS="2",
                WARMDOWN_ITERS=str(steps // 3), MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="32768",
                VAL_BATCH_SIZE="16384", TRAIN_LOG_EVERY="10")


def run_one(base: dict, over: dict, seed: int, out: Path, rid: str) -> dict:
    env = dict(base, **{k: str(v) for k, v in over.items()}, SEED=str(seed), RUN_ID=rid, OUT_DIR=str(out))
    with contextlib.redirect_stdout(io.StringIO()):  # the run's log goes to its file only
        assert T.main(env) == 0, f"run {rid} failed"
    log = (out / f"{rid}.txt").read_text()
    steps = re.findall(r"^step:(\d+)/\d+ train_loss:[\d.]+ train_time:(\d+)ms", log, re.M)
    (s0, t0), (s1, t1) = steps[4], steps[-1]  # skip the first steps
    return dict(bpb=float(re.search(r"^final_int6_[a-z]+_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1]),
                pre=float(re.findall(r"^step:\d+/\d+ val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[-1]),
                ms=(int(t1) - int(t0)) / (int(s1) - int(s0)),
                params=int(re.search(r"params:(\d+)", log)[1]),
                bytes=int(re.search(r"model_bytes:(\d+)", log)[1]))


def key(name, over, w, s, seed):
    return f"{name}|{json.dumps(over, sort_keys=True)}|w{w}|s{s}|seed{seed}"


def spread(xs):
    return statistics.mean(xs), (max(xs) - min(xs)) / 2


def print_grid(res: dict, configs: dict, cells: list, seeds: list, field="bpb"):
    """Rows: configs; columns: cells. Baseline row absolute; other rows paired (same seed) deltas."""
    cols = [f"{w}w × {s} steps" for w, s in cells]
    print("| config | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, over in configs.items():
        row = []
        for w, s in cells:
            got = [res.get(key(name, over, w, s, sd)) for sd in seeds]
            base = [res.get(key("baseline", {}, w, s, sd)) for sd in seeds]
            if any(g is None for g in got):
                row.append("—")
            elif name == "baseline":
                m, h = spread([g[field] for g in got])
                row.append(f"{m:.4f} ± {h:.4f}")
            elif any(b is None for b in base):
                m, h = spread([g[field] for g in got])
                row.append(f"{m:.4f} ± {h:.4f} (abs)")
            else:
                m, h = spread([g[field] - b[field] for g, b in zip(got, base)])
                row.append(f"{m:+.4f} ± {h:.4f}")
        if any(r != "—" for r in row):  # configs never run are left out
            print(f"| {name} | " + " | ".join(row) + " |")


def grid(a, configs, data, tmp, cache, res):
    t_start, cells = time.time(), [(w, s) for w in a.widths for s in a.steps]
    for seed in [] if a.print_only else a.seeds:  # seeds outermost: a drift in machine speed hits every config alike
        for w, s in cells:
            for i, (name, over) in enumerate(configs.items()):
                k = key(name, over, w, s, seed)
                if k in res:
                    continue
                res[k] = run_one(cell_env(data, w, s), over, seed, tmp, f"r{seed}_{w}_{s}_{i}")
                cache.write_text(json.dumps(res, indent=0))
                print(f"# {name} w{w} s{s} seed {seed}: {res[k]} ({time.time() - t_start:.0f}s)", file=sys.stderr)
    print(f"\n2 layers, seq 128, 2048 tokens/step, WARMDOWN_ITERS = steps // 3, vocab {data['VOCAB_SIZE']}; "
          f"val = first 32,768 tokens of the sample's val split; seeds {a.seeds}.\n"
          "val_bpb after the int6 round trip: baseline absolute, every other row the paired change vs the "
          "baseline (same cell, same seed), mean ± half-range over seeds.\n")
    print_grid(res, configs, cells, a.seeds)
    print("\nround-trip gap (roundtrip − pre-quant val_bpb), mean ± half-range:\n")
    print("| config | " + " | ".join(f"{w}w × {s} steps" for w, s in cells) + " |\n|---|" + "---|" * len(cells))
    for name, over in configs.items():
        got = [[res.get(key(name, over, w, s, sd)) for sd in a.seeds] for w, s in cells]
        if all(None in g for g in got):
            continue
        print(f"| {name} | " + " | ".join(
            "—" if None in g else "(from --ema-sweep)" if any(r.get("from_sweep") for r in g) else
            "{:+.4f} ± {:.4f}".format(*spread([r["bpb"] - r["pre"] for r in g])) for g in got) + " |")


def ema_sweep(a, data, tmp, res):
    """One baseline training per cell and seed; every schedule in EMA_SCHEDULES rides along as a
    shadow of the trainable weights (the same recursion as Optimizers.apply, via ema_decay_at)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from types import SimpleNamespace
    cells = [(w, s) for w in a.widths for s in a.steps]
    for seed in a.seeds:
        for w, s in cells:
            if all(key("ema:" + n, {}, w, s, seed) in res for n in EMA_SCHEDULES):
                continue
            hp = T.Hyperparameters.from_env(dict(cell_env(data, w, s), SEED=str(seed)))
            mx.random.seed(hp.seed)
            model = T.GPT(T.ModelConfig.from_hparams(hp))
            opt = T.Optimizers(model, hp)
            fns = T.Compiled(model, opt)
            stream = T.TokenStream(T.shard_files(hp.data_path, "train"), hp.vocab_size)
            shadows = {n: dict(tree_flatten(model.trainable_parameters())) for n, v in EMA_SCHEDULES.items() if v}
            start = {n: int(v[2] * s) for n, v in EMA_SCHEDULES.items() if v}
            for step in range(s):
                x, y = stream.next_batch(hp.train_batch_tokens, hp.train_seq_len)
                mx.eval(T.train_step(fns, x, y, 64, T.lr_multiplier(step, 0.0, hp), T.muon_momentum_at(step, hp)))
                p = dict(tree_flatten(model.trainable_parameters()))
                for n, sh in shadows.items():
                    dec, W, _ = EMA_SCHEDULES[n]
                    if step + 1 <= start[n]:  # not started yet: the shadow follows the raw weights
                        shadows[n] = dict(p)
                        continue
                    d = T.ema_decay_at(mx.array(float(step + 1 - start[n])), SimpleNamespace(ema_decay=dec, ema_warmup=W))
                    shadows[n] = {k: d * sh[k] + (1 - d) * p[k] for k in p}
                mx.eval(shadows)
            raw = dict(tree_flatten(model.trainable_parameters()))
            sp = T.load_tokenizer(hp.tokenizer_path)
            tables = T.build_byte_tables(sp, hp.vocab_size)
            val = T.load_validation_tokens(hp.data_path, hp.val_max_tokens, hp.vocab_size)
            for n in EMA_SCHEDULES:
                model.update(tree_unflatten(list((shadows.get(n) or raw).items())))
                path = str(tmp / "sweep.ptz")
                T.write_artifact(path, T.flat_numpy(model), model.cfg, hp.quant_bits)
                T.load_flat_into(model, T.read_artifact(path)[1])
                _, bpb, _ = T.evaluate(fns.token_nll, val, hp.train_seq_len, 128, tables)
                res[key("ema:" + n, {}, w, s, seed)] = dict(bpb=bpb)
                print(f"# w{w} s{s} seed {seed} {n}: {bpb:.4f}", file=sys.stderr)
                model.update(tree_unflatten(list(raw.items())))
            a.cache.write_text(json.dumps(res, indent=0))
    print(f"\nEMA schedules, one training per cell (baseline config, 2 layers, seq 128, 2048 tokens/step, "
          f"warmdown = steps // 3); seeds {a.seeds}. Raw weights absolute; schedules as the paired change vs "
          "the raw weights, mean ± half-range; in brackets, the share of the final EMA still on the weights it "
          "started from (the initialisation, or the weights at the start fraction).\n")
    print("| schedule | " + " | ".join(f"{w}w × {s} steps" for w, s in cells) + " |\n|---|" + "---|" * len(cells))
    for n, v in EMA_SCHEDULES.items():
        row = []
        for w, s in cells:
            got = [res[key("ema:" + n, {}, w, s, sd)]["bpb"] for sd in a.seeds]
            raw = [res[key("ema:raw weights", {}, w, s, sd)]["bpb"] for sd in a.seeds]
            if v is None:
                row.append("{:.4f} ± {:.4f}".format(*spread(got)))
                continue
            m, h = spread([g - r for g, r in zip(got, raw)])
            row.append(f"{m:+.4f} ± {h:.4f} [{init_weight(v, s):.1%}]")
        print(f"| {n} | " + " | ".join(row) + " |")


def init_weight(sched, steps):
    """Share of the EMA still on the weights it started from after `steps` updates."""
    from types import SimpleNamespace
    dec, W, f = sched
    w = 1.0
    for t in range(1, steps - int(f * steps) + 1):
        w *= float(T.ema_decay_at(float(t), SimpleNamespace(ema_decay=dec, ema_warmup=W)))
    return w


def timing(a, configs):
    """ms/step per config and width on random tokens, all configs built in one process and run
    round-robin; each round's time is divided by the baseline's in the same round (paired, so a
    drift in machine load cancels), and the median and quartiles of those ratios are reported."""
    import mlx.core as mx
    import numpy as np
    clock = time.process_time if a.cpu_time else time.perf_counter
    print(f"\nstep {'CPU' if a.cpu_time else 'wall'} time, 2 layers, seq 128, 2048 tokens/step, vocab 1024, compiled, {mx.default_device()}; "
          f"{a.rounds} interleaved rounds of {a.round_steps} steps: median ms/step, and the median ratio to the "
          "baseline of the same round [quartiles]\n")
    print("| config | " + " | ".join(f"{w}w ms/step | {w}w ratio" for w in a.widths) + " |\n|---|"
          + "---|---|" * len(a.widths))
    x = np.random.default_rng(0).integers(0, 1024, (16, 128)).astype(np.int32)
    out = {}
    for w in a.widths:
        built = {}
        for name, over in configs.items():
            env = dict(VOCAB_SIZE="1024", NUM_LAYERS="2", MODEL_DIM=str(w), NUM_HEADS="4", NUM_KV_HEADS="2",
                       TRAIN_SEQ_LEN="128", **{k: str(v) for k, v in over.items()})
            hp = T.Hyperparameters.from_env(env)
            mx.random.seed(0)
            model = T.GPT(T.ModelConfig.from_hparams(hp))
            comp = mx.full((1024 * 1024,), 1.0 / 1024) if hp.complement_alpha > 0 else None
            fns = T.Compiled(model, T.Optimizers(model, hp), qat_bits=6 if hp.qat_start_frac < 1 else 0,
                             complement=comp)
            for _ in range(2):
                mx.eval(T.train_step(fns, x, x, 16, 1.0, 0.95))
            built[name] = (fns, [])
        for _ in range(a.rounds):
            for name, (fns, ts) in built.items():
                t0 = clock()
                for _ in range(a.round_steps):
                    mx.eval(T.train_step(fns, x, x, 16, 1.0, 0.95))
                ts.append((clock() - t0) / a.round_steps * 1000)
        base = built["baseline"][1]
        out[w] = {n: (statistics.median(ts), statistics.quantiles([t / b for t, b in zip(ts, base)], n=4))
                  for n, (_, ts) in built.items()}
    for name in configs:
        print(f"| {name} | " + " | ".join(
            f"{out[w][name][0]:.1f} | {out[w][name][1][1]:.2f}× [{out[w][name][1][0]:.2f}, {out[w][name][1][2]:.2f}]"
            for w in a.widths) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--steps", type=int, nargs="+", default=[60, 300])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--only", nargs="*", default=None, help="config names (substring match)")
    p.add_argument("--cache", type=Path, default=None, help="JSON file of results to reuse and extend")
    p.add_argument("--ema-sweep", action="store_true")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--print-only", action="store_true", help="print the tables from --cache, run nothing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-steps", type=int, default=4)
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time (for a loaded machine; "
                   "run single-threaded: OPENBLAS_NUM_THREADS=1)")
    a = p.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not a.only or k == "baseline" or any(o in k for o in a.only)}
    if a.timing:
        return timing(a, configs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a.cache = a.cache or tmp / "results.json"
        res = json.loads(a.cache.read_text()) if a.cache.exists() else {}
        data = dict(VOCAB_SIZE="1024") if a.print_only else make_data(tmp)
        if a.ema_sweep:
            return ema_sweep(a, data, tmp, res)
        grid(a, configs, data, tmp, a.cache, res)


if __name__ == "__main__":
    main()
