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

    python tests/bench_ngram.py [--part bpb speed] [--seeds 1337 1338] [--old-rev 15f8067]
"""
import argparse
import contextlib
import importlib.util
import io
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
MODELS = {"2x64, 60 steps": (64, 60), "2x128, 300 steps": (128, 300), "2x128, 600 steps": (128, 600)}


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


def model_bpb(a, tmp, data, name, seed, old, res):
    """Every mixer config on one trained model's recorded sliding-window outputs, into res[config][name]."""
    width, steps = MODELS[name]
    t0 = time.time()
    fns, tables, V = train(tmp, data, seed, width, steps, dict(kv.split("=", 1) for kv in a.extra))
    val = T.load_validation_tokens(data["DATA_PATH"], 0, V)
    rec = Recorder()
    T.evaluate(fns.token_stats, val, SEQ, BATCH, tables, stride=STRIDE, mixer=rec)
    bpb = lambda nll: T.summarize_nll(nll, val, tables)[1]  # noqa: E731
    put = lambda cfg, v: res.setdefault(cfg, {}).setdefault(name, []).append(v)  # noqa: E731
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


def part_bpb(a, tmp, data):
    old = old_module(a.old_rev)
    res = {}
    for name in a.models:
        for seed in a.seeds:
            model_bpb(a, tmp, data, name, seed, old, res)
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
    p.add_argument("--part", nargs="+", default=["bpb", "speed"], choices=["bpb", "speed", "overhead"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--models", nargs="+", default=["2x64, 60 steps", "2x128, 600 steps"], choices=list(MODELS))
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.4, 0.55, 0.7, 0.85])
    p.add_argument("--old-rev", default="15f8067")
    p.add_argument("--old-chunks", type=int, nargs="*", default=[2048, 256, 32])
    p.add_argument("--extra", nargs="*", default=["COMPLEMENT_ALPHA=0.5"], help="training variables, KEY=VALUE")
    p.add_argument("--tokens", type=int, default=FULL_VAL_TOKENS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speed-configs", type=lambda s: tuple(int(x) for x in s.split(",")), nargs="+",
                   default=[(4, 1024), (6, 1024), (4, 8192)], help="order,vocab pairs")
    a = p.parse_args()
    if "speed" in a.part:
        part_speed(a)
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
