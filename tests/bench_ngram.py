"""N-gram mixer benchmark (prints markdown tables; not a test).

  --part bpb    trains the tiny full-stack model (2 x 128, 100 steps, every training-side piece on)
                per seed on shards built from ../shared/fineweb_sample, records the sliding-window
                model outputs over the whole val split once, then replays evaluate()'s exact mixer
                calls through every mixer config (the hashed mixer of --old-rev for comparison).
  --part speed  plain sliding eval vs sliding + default mixer at 40k, 130k and 1M tokens of a stream
                of the sample's train and val shards (past the sample's ~586k tokens: a copy with the
                vocabulary relabeled, so its contexts are all new), interleaved, and the mixer alone
                on a 4M-token stream: cost per token per band, memory, the projection to 62M tokens.

    python tests/bench_ngram.py [--part bpb speed] [--seeds 1337 1338] [--old-rev a3d05d2]
"""
import argparse
import contextlib
import importlib.util
import io
import subprocess
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
from bench_ablation import FULL, make_data  # noqa: E402

FULL_VAL_TOKENS = 62_021_846
SEQ, STRIDE, BATCH = 128, 64, 64


def train(tmp: Path, data: dict, seed: int, steps: int):
    """The tiny full-stack model of the issue's measurement; returns (fns, tables, V)."""
    env = dict(data, **{k: str(v) for k, v in FULL.items()}, COMPLEMENT_ALPHA="0.5", ITERATIONS=str(steps),
               TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN=str(SEQ), GRAD_ACCUM_STEPS="1", NUM_LAYERS="2",
               MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", WARMUP_STEPS="2", WARMDOWN_ITERS=str(steps // 3),
               MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="32768", VAL_BATCH_SIZE="16384", MATRIX_LR="0.04",
               SEED=str(seed), RUN_ID=f"s{seed}", OUT_DIR=str(tmp))
    with contextlib.redirect_stdout(io.StringIO()):
        assert T.main(env) == 0
    cfg, flat, _ = T.read_artifact(str(tmp / f"s{seed}_model.int6.ptz"))
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


class Timed:
    """Wraps a mixer and adds up the seconds spent inside nll()."""

    def __init__(self, mixer):
        self.m, self.s = mixer, 0.0

    def nll(self, tokens, start, lp, H):
        mx.eval(lp, H)  # the model's lazy forward pass is not the mixer's time
        t = time.perf_counter()
        out = self.m.nll(tokens, start, lp, H)
        mx.eval(out)
        self.s += time.perf_counter() - t
        return out


def replay(mixer, toks, calls) -> np.ndarray:
    return np.concatenate([np.array(mixer.nll(toks, s, mx.array(lp), mx.array(H))) for s, lp, H in calls])


def old_module(rev: str):
    """train_gpt_mlx.py as of rev (the hashed-bucket mixer), imported from a temporary file."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:train_gpt_mlx.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_train_gpt_mlx.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_train_gpt_mlx", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def part_bpb(a, tmp, data):
    old = old_module(a.old_rev)
    new_cfgs = [(K, al, mode) for K in a.orders for mode in ("fixed", "entropy") for al in a.alphas]
    res = {}
    for seed in a.seeds:
        t0 = time.time()
        fns, tables, V = train(tmp, data, seed, a.steps)
        val = T.load_validation_tokens(data["DATA_PATH"], 0, V)
        rec = Recorder()
        T.evaluate(fns.token_stats, val, SEQ, BATCH, tables, stride=STRIDE, mixer=rec)
        bpb = lambda nll: T.summarize_nll(nll, val, tables)[1]  # noqa: E731
        res.setdefault("off", []).append(bpb(np.concatenate([-lp for _, lp, _ in rec.calls])))
        for K, B, al, mode in ((4, 16384, 0.25, "entropy"), (4, 262144, 0.25, "fixed"), (2, 16384, 0.3, "entropy")):
            name = f"hashed (old) order {K}, {B:,} buckets, {mode} α={al}"
            res.setdefault(name, []).append(bpb(replay(old.BackoffNgramMixer(V, K, B, al, mode, 2048), val, rec.calls)))
        for K, al, mode in new_cfgs:
            m = T.BackoffNgramMixer(V, K, al, mode, 2048)
            res.setdefault(f"exact order {K}, {mode} α={al}", []).append(bpb(replay(m, val, rec.calls)))
        print(f"# seed {seed} done in {time.time() - t0:.0f}s; {val.size - 1:,} targets", file=sys.stderr, flush=True)
    print(f"\nval_bpb on the sample's val split, sliding stride {STRIDE}, seq {SEQ}; tiny full-stack model "
          f"(2x128, {a.steps} steps), seeds {a.seeds}\n")
    print("| mixer | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean | Δ vs off |")
    print("|---|" + "---|" * (len(a.seeds) + 2))
    off = np.mean(res["off"])
    for name, v in sorted(res.items(), key=lambda kv: np.mean(kv[1]) if kv[0] != "off" else -1):
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {np.mean(v):.4f} | {np.mean(v) - off:+.4f} |")


def long_stream(data_path: str, n: int, V: int) -> np.ndarray:
    """Train + val shards of the sample, then relabeled copies (BOS kept) until n + 1 tokens."""
    files = T.shard_files(data_path, "train") + T.shard_files(data_path, "val")
    base = np.concatenate([T.load_data_shard(f) for f in files]).astype(np.int64)
    parts, rng = [base], np.random.default_rng(0)
    while sum(p.size for p in parts) < n + 1:
        perm = rng.permutation(V)
        i = int(np.flatnonzero(perm == 1)[0])
        perm[i], perm[1] = perm[1], 1  # BOS stays BOS, so documents still start with it
        parts.append(perm[base])
    return np.concatenate(parts)[:n + 1].astype(np.uint16)


def part_speed(a, tmp, data):
    fns, tables, V = train(tmp, data, a.seeds[0], a.steps)
    K, al, mode = T.Hyperparameters.ngram_max_order, T.Hyperparameters.ngram_alpha, T.Hyperparameters.ngram_alpha_mode
    fn_mix = fns.token_stats if mode == "entropy" else fns.token_nll
    stream = long_stream(data["DATA_PATH"], 1_000_000, V)
    T.evaluate(fns.token_nll, stream[:SEQ * BATCH + 1], SEQ, BATCH, tables, stride=STRIDE)  # compile
    T.evaluate(fns.token_stats, stream[:SEQ * BATCH + 1], SEQ, BATCH, tables, stride=STRIDE)
    print(f"\n{mx.default_device()}, mlx {mx.__version__}; default mixer: order {K}, {mode} α={al}, chunk 2048; "
          f"sliding stride {STRIDE}, seq {SEQ}, batch {BATCH}; tiny full-stack model\n")
    print("| tokens | rep | plain sliding s | sliding + mixer s | ratio | mixer µs/token | mixer MiB | mixer B/token |")
    print("|---|---|---|---|---|---|---|---|")
    for n, reps in ((40_000, 3), (130_000, 2), (1_000_000, 1)):
        toks = stream[:n + 1]
        for r in range(reps):
            t = time.perf_counter()
            T.evaluate(fns.token_nll, toks, SEQ, BATCH, tables, stride=STRIDE)
            plain = time.perf_counter() - t
            m = Timed(T.BackoffNgramMixer(V, K, al, mode, 2048))
            t = time.perf_counter()
            T.evaluate(fn_mix, toks, SEQ, BATCH, tables, stride=STRIDE, mixer=m)
            mixed = time.perf_counter() - t
            print(f"| {n:,} | {r + 1} | {plain:.1f} | {mixed:.1f} | {mixed / plain:.3f} | {m.s / n * 1e6:.2f} | "
                  f"{m.m.nbytes / 2**20:.1f} | {m.m.nbytes / n:.0f} |", flush=True)
    mixer_alone(V, K, al, mode, long_stream(data["DATA_PATH"], 4_000_000, V))


def mixer_alone(V, K, al, mode, toks):
    """Cost per token per band of 500k tokens, keys and memory; projection to the full split."""
    n, band = toks.size - 1, 500_000
    rng = np.random.default_rng(0)
    lp = np.log(rng.uniform(0.01, 0.9, n)).astype(np.float32)
    H = rng.uniform(0.5, 6.0, n).astype(np.float32)
    m = T.BackoffNgramMixer(V, K, al, mode, 2048, max_memory_mb=10**6)
    print(f"\nthe mixer alone (order {K}) on {n:,} tokens, calls of 4,096 targets\n")
    print("| tokens seen | µs/token in this band | keys (ctx + pair) | MiB | B/token |\n|---|---|---|---|---|")
    t, keys = time.perf_counter(), []
    for s in range(1, n + 1, 4096):
        e = min(s + 4096, n + 1)
        m.nll(toks, s, mx.array(lp[s - 1:e - 1]), mx.array(H[s - 1:e - 1]))
        if (e - 1) % band < 4096 and e - 1 >= band:
            now = time.perf_counter()
            keys.append((e - 1, [x.n for x in m.ctx + m.pair]))
            print(f"| {e - 1:,} | {(now - t) / band * 1e6:.2f} | {sum(keys[-1][1]):,} | {m.nbytes / 2**20:.0f} | "
                  f"{m.nbytes / (e - 1):.0f} |", flush=True)
            t = now
    (n0, k0), (n1, k1) = keys[-2], keys[-1]
    proj = [a + (b - a) / (n1 - n0) * (FULL_VAL_TOKENS - n1) for a, b in zip(k0, k1)]
    mib = sum(T.ExactKeyIndex.bytes_at(int(k), 2 if i < K else 1) for i, k in enumerate(proj)) / 2**20
    print(f"\nprojection to {FULL_VAL_TOKENS:,} tokens (keys growing at the last band's rate): "
          f"{sum(proj) / 1e6:.0f}M keys, {mib:,.0f} MiB; worst case "
          f"{T.BackoffNgramMixer.worst_case_nbytes(FULL_VAL_TOKENS, K, V) / 2**20:,.0f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["bpb", "speed"], choices=["bpb", "speed"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.4, 0.55, 0.7, 0.85])
    p.add_argument("--old-rev", default="a3d05d2")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        if "bpb" in a.part:
            part_bpb(a, tmp, data)
        if "speed" in a.part:
            part_speed(a, tmp, data)


if __name__ == "__main__":
    main()
