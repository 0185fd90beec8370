"""N-gram mixer benchmark (prints markdown tables; not a test).

  --part bpb    trains tiny models per seed on shards built from ../shared/fineweb_sample (the 2 x 64,
                60-step artifact of issue #17 and a 2 x 128, 600-step model of the recipe ablation bench's
                shape; EngramLite on), records the sliding-window model outputs over the whole val split
                once, then replays evaluate()'s exact mixer calls through every (order, alpha, mode) at
                per-token resolution; the chunked mixer of --old-rev (chunk 2048, 256, 32) and a plain
                per-token dict reference for comparison at order 4, fixed alpha 0.25.
  --part overhead  the sliding eval's wall time alone and with the default mixer (worker thread), on
                the first --models model and the sample's val split, interleaved --repeats times.
  --part speed  the statistics alone on synthetic Zipf tokens at the full split's size (62M tokens):
                wall and CPU seconds and tracemalloc's peak, per (order, vocabulary), repeated.
  --part cost   the statistics once, then the per-call mix of every target in fixed, entropy and adaptive
                mode (interleaved, repeated): CPU seconds per mode, and the ratio to fixed mode.
  --adaptive-table  with --part bpb: order 5 only; the mixer off, each fixed alpha, entropy and the adaptive
                variants, on the whole split and its first 10k targets; the "2x128, 150 steps on the scored
                text" model trains on the very tokens it is scored on (the val split's first 32,768).
                Seeds can run as separate processes (--save each, then --load them all to print one table).

    python tests/bench_ngram.py [--part bpb speed] [--seeds 1337 1338] [--old-rev 15f8067]
"""
import argparse
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from bench_ablation import FULL, make_data  # noqa: E402

FULL_VAL_TOKENS = 62_021_846
SEQ, STRIDE, BATCH = 128, 64, 64
MODELS = {"2x64, 60 steps": (64, 60), "2x128, 300 steps": (128, 300), "2x128, 600 steps": (128, 600),
          "2x128, 150 steps on the scored text": (128, 150)}
ON_SCORED_TEXT = 32768  # the "on the scored text" model trains on (and is scored on) the val split's first tokens
SHORT = 10_000  # the short evaluation: the first targets only (VAL_MAX_TOKENS of some ten thousand)
ADAPTIVE = {  # adaptive variants measured (the first is the default: prior_zero 0.5, conf bins 3 x entropy bins 1)
    "adaptive (default)": {},
    "adaptive, prior_zero 0.8": dict(prior_zero=0.8),
    "adaptive, conf bins 1 x entropy bins 2": dict(conf_bins=1, entropy_bins=2),
    "adaptive, conf bins 1 x entropy bins 2, prior_zero 0.9": dict(conf_bins=1, entropy_bins=2, prior_zero=0.9),
    "adaptive, conf bins 1 x entropy bins 1": dict(conf_bins=1),
    "adaptive, conf bins 1 x entropy bins 4": dict(conf_bins=1, entropy_bins=4),
    "adaptive, conf bins 2 x entropy bins 2": dict(conf_bins=2, entropy_bins=2),
    "adaptive, conf bins 3 x entropy bins 2": dict(entropy_bins=2),
    "adaptive, conf bins 3 x entropy bins 3": dict(entropy_bins=3),
    "adaptive, conf bins 3 x entropy bins 3, prior_zero 0.8": dict(entropy_bins=3, prior_zero=0.8),
    "adaptive, conf bins 4": dict(conf_bins=4),
}


def scored_text_data(tmp: Path, data: dict) -> dict:
    """A dataset whose train shard is the val split's first ON_SCORED_TEXT tokens, and so is its val split:
    a model trained there is strong for the text it scores (the far end of what a cache can add to)."""
    ds = tmp / "ds_scored"
    if not ds.exists():
        ds.mkdir()
        val = T.load_validation_tokens(data["DATA_PATH"], 0, int(data["VOCAB_SIZE"]))[:ON_SCORED_TEXT + 1]
        header = np.zeros(256, "<i4")
        header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, val.size)
        for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
            (ds / name).write_bytes(header.tobytes() + val.astype("<u2").tobytes())
    return dict(data, DATA_PATH=str(ds))


def train(tmp: Path, data: dict, seed: int, width: int, steps: int, extra: dict):
    """A tiny model with EngramLite (logit) and EMA, the bench_ablation cell shape; (fns, tables, V)."""
    env = dict(data, **{k: str(v) for k, v in FULL.items()}, **extra, ITERATIONS=str(steps), TRAIN_BATCH_TOKENS="2048",
               TRAIN_SEQ_LEN=str(SEQ), GRAD_ACCUM_STEPS="1", NUM_LAYERS="2", MODEL_DIM=str(width), NUM_HEADS="4",
               NUM_KV_HEADS="2", WARMUP_STEPS="2", WARMDOWN_ITERS=str(steps // 3), MAX_WALLCLOCK_SECONDS="0",
               VAL_MAX_TOKENS="32768", VAL_BATCH_SIZE="16384", SEED=str(seed), RUN_ID=f"s{seed}_{width}_{steps}",
               OUT_DIR=str(tmp))
    with contextlib.redirect_stdout(io.StringIO()):
        assert T.main(env) == 0
    cfg, flat, _ = T.read_artifact(str(tmp / f"s{seed}_{width}_{steps}_model.int6.ptz"))
    hp = T.Hyperparameters.from_env(env)
    model = T.GPT(cfg, hp.dtype())
    T.load_flat_into(model, flat)
    fns = T.Compiled(model, T.Optimizers(model, hp))
    return fns, T.build_byte_tables(T.load_tokenizer(data["TOKENIZER_PATH"]), cfg.vocab_size), cfg.vocab_size


class Recorder:
    """A stand-in mixer that keeps every call evaluate() makes and returns the model's NLL."""

    def __init__(self):
        self.calls = []

    def nll(self, tokens, start, lp, H):
        self.calls.append((start, np.array(lp), np.array(H)))
        return -lp


def replay(mixer, toks, calls) -> np.ndarray:
    return np.concatenate([np.array(mixer.nll(toks, s, mx.array(lp), mx.array(H))) for s, lp, H in calls])


def old_module(rev: str):
    """train_gpt_mlx.py as of rev (the chunked mixer), imported from a temporary file."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:train_gpt_mlx.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_train_gpt_mlx.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_train_gpt_mlx", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def dict_reference_nll(toks, calls, V: int, K: int, alpha: float) -> np.ndarray:
    """Per-token dict reference (tests/test_ngram_mixer.py), fixed alpha: score a target, then count it."""
    from test_ngram_mixer import reference_stats
    p, conf, _ = reference_stats(toks, V, K)
    lp = np.concatenate([lp for _, lp, _ in calls]).astype(np.float64)
    a = alpha * conf[1:]
    return -np.log((1 - a) * np.exp(lp) + a * p[1:])


def cut_calls(calls, n: int) -> list:
    """The recorded calls of the first n targets only."""
    out = []
    for s, lp, H in calls:
        if s - 1 < n:
            out.append((s, lp[:n - (s - 1)], H[:n - (s - 1)]))
    return out


def model_bpb(a, tmp, data, name, seed, old, res):
    """Every mixer config on one trained model's recorded sliding-window outputs, into res[config][name]
    (and, for the adaptive table, res[config][name + short] over the first SHORT targets)."""
    width, steps = MODELS[name]
    t0 = time.time()
    if name.endswith("on the scored text"):
        data = scored_text_data(tmp, data)
    fns, tables, V = train(tmp, data, seed, width, steps, dict(kv.split("=", 1) for kv in a.extra))
    val = T.load_validation_tokens(data["DATA_PATH"], 0, V)
    rec = Recorder()
    T.evaluate(fns.token_stats, val, SEQ, BATCH, tables, stride=STRIDE, mixer=rec)
    bpb = lambda nll: T.summarize_nll(nll, val, tables)[1]  # noqa: E731
    put = lambda cfg, v: res.setdefault(cfg, {}).setdefault(name, []).append(v)  # noqa: E731
    if a.save_calls:  # the model's outputs, to replay more mixers later without training again
        np.savez(Path(a.save_calls) / f"{name.replace(' ', '_').replace(',', '')}_{seed}.npz",
                 starts=[s for s, _, _ in rec.calls], lp=np.concatenate([lp for _, lp, _ in rec.calls]),
                 H=np.concatenate([H for _, _, H in rec.calls]), val=val)
    if a.adaptive_table:
        adaptive_rows(a, val, rec.calls, V, tables, name, res)
        print(f"# {name} seed {seed} done in {time.time() - t0:.0f}s; {val.size - 1:,} targets", file=sys.stderr,
              flush=True)
        return
    put("off", bpb(np.concatenate([-lp for _, lp, _ in rec.calls])))
    for chunk in a.old_chunks:
        put(f"chunked ({a.old_rev}) order 4, fixed α=0.25, chunk {chunk}",
            bpb(replay(old.BackoffNgramMixer(V, 4, 0.25, "fixed", chunk), val, rec.calls)))
    put("per-token dict reference, order 4, fixed α=0.25", bpb(dict_reference_nll(val, rec.calls, V, 4, 0.25)))
    for K in a.orders:
        for mode in ("fixed", "entropy"):
            for al in a.alphas:
                put(f"order {K}, {mode} α={al}", bpb(replay(T.BackoffNgramMixer(V, K, al, mode), val, rec.calls)))
    print(f"# {name} seed {seed} done in {time.time() - t0:.0f}s; {val.size - 1:,} targets", file=sys.stderr,
          flush=True)


def adaptive_rows(a, val, calls, V: int, tables, name: str, res: dict):
    """The adaptive table's rows at order 5: off, every fixed alpha of the old grid, entropy at the old
    default alpha, the adaptive variants; on the whole split and on its first SHORT targets."""
    short = val[:SHORT + 1]
    first = cut_calls(calls, SHORT)
    mixers = {"off": lambda: T.BackoffNgramMixer(V, 5, 0.0, "fixed")}
    for al in a.alphas:
        mixers[f"order 5, fixed α={al}"] = lambda al=al: T.BackoffNgramMixer(V, 5, al, "fixed")
    mixers["order 5, entropy α=0.7"] = lambda: T.BackoffNgramMixer(V, 5, 0.7, "entropy")
    for label, kw in ADAPTIVE.items():
        mixers[f"order 5, {label}"] = lambda kw=kw: T.BackoffNgramMixer(V, 5, 0.7, "adaptive", **kw)
    for label, make in mixers.items():
        for toks, cs, col in ((val, calls, name), (short, first, name + " (first 10k)")):
            res.setdefault(label, {}).setdefault(col, []).append(T.summarize_nll(replay(make(), toks, cs), toks,
                                                                                 tables)[1])


def print_adaptive_table(a, res):
    cols = [c for m in a.models for c in (m, m + " (first 10k)")]
    print(f"\nval_bpb, sliding stride {STRIDE}, seq {SEQ}; 2-layer models with EngramLite + EMA; seeds {a.seeds}; "
          f"mean ± half the range over seeds; Δ best: each cell minus the column's best row, mean over seeds\n")
    print("| mixer | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    best = {c: np.min([np.array(res[r][c]) for r in res], axis=0) for c in cols}  # per seed
    for row in res:
        gap = {c: np.mean(np.array(res[row][c]) - best[c]) for c in cols}
        cells = [f"{np.mean(res[row][c]):.4f} ± {np.ptp(res[row][c]) / 2:.4f} ({gap[c]:+.4f})" for c in cols]
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)


def part_bpb(a, tmp, data):
    old = old_module(a.old_rev)
    res = {}
    if a.load:  # seeds run as separate processes, joined: --load a.json b.json
        for path in a.load:
            for row, cols in json.loads(Path(path).read_text()).items():
                for col, vals in cols.items():
                    res.setdefault(row, {}).setdefault(col, []).extend(vals)
        print_adaptive_table(a, res)
        return
    for name in a.models:
        for seed in a.seeds:
            model_bpb(a, tmp, data, name, seed, old, res)
            if a.save:  # after each model: a long run's finished models are kept
                Path(a.save).write_text(json.dumps(res))
    if a.adaptive_table:
        print_adaptive_table(a, res)
        return
    print(f"\nval_bpb on the sample's val split, sliding stride {STRIDE}, seq {SEQ}; 2-layer models with "
          f"EngramLite + EMA; seeds {a.seeds}; mean ± half the range over seeds\n")
    print("| mixer | " + " | ".join(a.models) + " | mean Δ vs off |")
    print("|---|" + "---|" * (len(a.models) + 1))
    off = {m: np.mean(res["off"][m]) for m in a.models}
    gain = lambda cfg: np.mean([np.mean(res[cfg][m]) - off[m] for m in a.models])  # noqa: E731
    for cfg in sorted(res, key=lambda c: gain(c) if c != "off" else -1e9):
        cells = [f"{np.mean(res[cfg][m]):.4f} ± {np.ptp(res[cfg][m]) / 2:.4f}" for m in a.models]
        print(f"| {cfg} | " + " | ".join(cells) + f" | {gain(cfg):+.4f} |")


def zipf_tokens(n: int, V: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, V + 1) ** 1.1
    return rng.choice(V, size=n, p=w / w.sum()).astype(np.uint16)


def part_speed(a):
    print(f"\nthe mixer's statistics alone, synthetic Zipf(1.1) tokens, {a.tokens:,} tokens; "
          f"{a.repeats} runs each (wall s, CPU s, tracemalloc peak)\n")
    print("| order | V | wall s (best / worst) | CPU s (best / worst) | peak GiB | B/token | bound GiB |")
    print("|---|---|---|---|---|---|---|")
    for K, V in a.speed_configs:
        toks = zipf_tokens(a.tokens, V)
        walls, cpus, peaks = [], [], []
        for _ in range(a.repeats):
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            w, c = time.perf_counter(), time.process_time()
            T.mixer_stats(toks, V, K)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            tracemalloc.stop()
        print(f"| {K} | {V} | {min(walls):.1f} / {max(walls):.1f} | {min(cpus):.1f} / {max(cpus):.1f} | "
              f"{max(peaks) / 2**30:.2f} | {max(peaks) / a.tokens:.1f} | "
              f"{T.BackoffNgramMixer.peak_nbytes(a.tokens) / 2**30:.2f} |", flush=True)


def part_cost(a):
    """The mixer's whole CPU cost on one split per mode: the statistics (the same for every mode: counted
    once) plus the per-call mix of every target, in calls of --call-targets, modes interleaved."""
    V, K = 1024, 5
    toks = zipf_tokens(a.tokens, V)
    rng = np.random.default_rng(0)
    lp = mx.array(np.log(rng.uniform(0.001, 0.9, size=toks.size - 1)).astype(np.float32))
    H = mx.array(rng.uniform(0.5, 6.0, size=toks.size - 1).astype(np.float32))
    base = T.BackoffNgramMixer(V, K, 0.7, "fixed")
    c = time.process_time()
    base.prepare(toks)
    stats = time.process_time() - c
    print(f"\nthe mixer's CPU seconds on synthetic Zipf(1.1) tokens, {a.tokens:,} tokens, order {K}, V {V}, "
          f"calls of {a.call_targets} targets; statistics (all modes, once): {stats:.1f} s\n")
    print("| mode | mix s (runs) | statistics + mix s | vs fixed |\n|---|---|---|---|")
    modes = ("fixed", "entropy", "adaptive")
    secs = {m: [] for m in modes}
    for _ in range(a.repeats):
        for mode in modes:
            m = T.BackoffNgramMixer(V, K, 0.7, mode)
            m.prepare(toks, like=base)
            c = time.process_time()
            for lo in range(1, toks.size, a.call_targets):
                hi = min(lo + a.call_targets, toks.size)
                m.nll(toks, lo, lp[lo - 1:hi - 1], H[lo - 1:hi - 1])
            secs[mode].append(time.process_time() - c)
    for mode in modes:
        total = stats + min(secs[mode])
        print(f"| {mode} | {' / '.join(f'{s:.1f}' for s in secs[mode])} | {total:.1f} | "
              f"{total / (stats + min(secs['fixed'])):.3f} |", flush=True)


def part_overhead(a, tmp, data):
    """Sliding eval alone vs with the default mixer (statistics in the worker thread), interleaved."""
    hp = T.Hyperparameters.from_env({})
    width, steps = MODELS[a.models[0]]
    fns, tables, V = train(tmp, data, a.seeds[0], width, steps, dict(kv.split("=", 1) for kv in a.extra))
    val = T.load_validation_tokens(data["DATA_PATH"], 0, V)
    T.evaluate(fns.token_stats, val[:SEQ * BATCH + 1], SEQ, BATCH, tables, stride=STRIDE)  # compile
    print(f"\n{mx.default_device()}: sliding eval (stride {STRIDE}, seq {SEQ}) of {val.size - 1:,} targets, "
          f"{a.models[0]}; mixer order {hp.ngram_max_order}, {hp.ngram_alpha_mode} α={hp.ngram_alpha}\n")
    print("| rep | plain s | with mixer s | ratio |\n|---|---|---|---|")
    for r in range(a.repeats):
        t = time.perf_counter()
        T.evaluate(fns.token_stats, val, SEQ, BATCH, tables, stride=STRIDE)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        m = T.BackoffNgramMixer(V, hp.ngram_max_order, hp.ngram_alpha, hp.ngram_alpha_mode)
        m.prepare(val, background=True)
        T.evaluate(fns.token_stats, val, SEQ, BATCH, tables, stride=STRIDE, mixer=m)
        mixed = time.perf_counter() - t
        print(f"| {r + 1} | {plain:.1f} | {mixed:.1f} | {mixed / plain:.3f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["bpb", "speed"], choices=["bpb", "speed", "overhead", "cost"])
    p.add_argument("--call-targets", type=int, default=4096, help="--part cost: targets per mixer call")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--models", nargs="+", default=["2x64, 60 steps", "2x128, 600 steps"], choices=list(MODELS))
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.4, 0.55, 0.7, 0.85])
    p.add_argument("--old-rev", default="15f8067")
    p.add_argument("--old-chunks", type=int, nargs="*", default=[2048, 256, 32])
    p.add_argument("--extra", nargs="*", default=["COMPLEMENT_ALPHA=0.5"], help="training variables, KEY=VALUE")
    p.add_argument("--save", help="--adaptive-table: also write the results (JSON) here")
    p.add_argument("--save-calls", help="--part bpb: also write each model's recorded outputs (npz) in this folder")
    p.add_argument("--load", nargs="*", help="--adaptive-table: print the table of these saved results, joined")
    p.add_argument("--adaptive-table", action="store_true", help="with --part bpb: order 5 only, the fixed "
                   "alphas, entropy and the adaptive variants, on the whole split and on its first 10k targets")
    p.add_argument("--tokens", type=int, default=FULL_VAL_TOKENS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speed-configs", type=lambda s: tuple(int(x) for x in s.split(",")), nargs="+",
                   default=[(4, 1024), (6, 1024), (4, 8192)], help="order,vocab pairs")
    a = p.parse_args()
    if "speed" in a.part:
        part_speed(a)
    if "cost" in a.part:
        part_cost(a)
    if "bpb" in a.part or "overhead" in a.part:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = make_data(tmp)
            if "bpb" in a.part:
                part_bpb(a, tmp, data)
            if "overhead" in a.part:
                part_overhead(a, tmp, data)


if __name__ == "__main__":
    main()
