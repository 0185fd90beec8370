"""Mixed-precision artifact benchmark (prints numbers; not a test).

Part 1, quantization gap: trains the ablation bench's tiny config (2x128, MLP x3, seq 128) once per seed
on shards from ../shared/fineweb_sample (generated text when absent), then scores the float weights and
each artifact setting after the write/read round trip (val_bpb; gap = post - pre).
Part 2, full size: 9x512 (MLP x2) and 11x512 (MLP x3) with synthetic trained-like weights (every 2-D
weight: Student-t(5) values, each row scaled by a log-normal(0, 0.3) factor times 1/sqrt(fan_in); the
tied embedding likewise at 0.02), bytes under zstd-22 and lzma-9e, and the time of GPTQ-lite and of
each compressor.

    python tests/bench_quant.py [--seeds 1337 1338] [--steps 200] [--skip-gap] [--skip-size]
"""
import argparse
import contextlib
import io
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
from bench_ablation import make_data  # noqa: E402

SETTINGS = {  # name -> env of the artifact knobs
    "int8": dict(QUANT_BITS=8),
    "int6 (default)": {},
    "int6 + GPTQ-lite": dict(GPTQ_LITE=1),
    "int5 MLP / int6 attn / int8 embed": dict(QUANT_BITS_MLP=5, QUANT_BITS_EMBED=8),
    "mixed 5/6/8 + GPTQ-lite": dict(QUANT_BITS_MLP=5, QUANT_BITS_EMBED=8, GPTQ_LITE=1),
    "int5 MLP / int6 attn / fp16 embed": dict(QUANT_BITS_MLP=5, QUANT_BITS_EMBED=16),
    "int5 everywhere": dict(QUANT_BITS_ATTN=5, QUANT_BITS_MLP=5, QUANT_BITS_EMBED=5),
}
SIZE_SETTINGS = ["int8", "int6 (default)", "int6 + GPTQ-lite", "int5 MLP / int6 attn / int8 embed",
                 "mixed 5/6/8 + GPTQ-lite"]


def train_tiny(base: dict, seed: int, out: Path):
    """Train through the script's own driver and keep the float weights it hands to write_artifact."""
    env = dict(base, SEED=str(seed), RUN_ID=f"q{seed}", OUT_DIR=str(out))
    caught, real = {}, T.write_artifact
    T.write_artifact = lambda path, flat, cfg, *a, **k: (caught.update(flat=dict(flat), cfg=cfg),
                                                         real(path, flat, cfg, *a, **k))[1]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert T.main(env) == 0
    finally:
        T.write_artifact = real
    return caught["flat"], caught["cfg"]


def score(flat, cfg, hp, val, tables):
    model = T.GPT(cfg)
    T.load_flat_into(model, flat)
    fns = T.Compiled(model, T.Optimizers(model, hp))
    return T.evaluate(fns.token_nll, val, hp.train_seq_len, 64, tables)[1]


def gap_env(data: dict, steps: int) -> dict:
    """The tiny 2 x 128 (MLP x3, seq 128) run whose weights the gap tables quantize (also bench_gptq's)."""
    return dict(data, ITERATIONS=str(steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="128", GRAD_ACCUM_STEPS="1",
                NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3", WARMUP_STEPS="2",
                WARMDOWN_ITERS=str(steps // 3), MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="32768",
                VAL_BATCH_SIZE="16384", TRAIN_LOG_EVERY="50")


def gap_table(seeds, steps):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = gap_env(make_data(tmp), steps)
        hp0 = T.Hyperparameters.from_env(base)
        tables = T.build_byte_tables(T.load_tokenizer(hp0.tokenizer_path), hp0.vocab_size)
        val = T.load_validation_tokens(hp0.data_path, hp0.val_max_tokens, hp0.vocab_size)
        rows = {k: [] for k in SETTINGS}
        pre_all = []
        for seed in seeds:
            flat, cfg = train_tiny(base, seed, tmp)
            pre = score(flat, cfg, hp0, val, tables)
            pre_all.append(pre)
            for name, over in SETTINGS.items():
                hp = T.Hyperparameters.from_env(dict(base, **{k: str(v) for k, v in over.items()}))
                path = str(tmp / "a.ptz")
                nbytes = T.write_artifact(path, flat, cfg, T.quant_plan(hp), None, hp.gptq_lite)
                post = score(T.read_artifact(path)[1], cfg, hp0, val, tables)
                rows[name].append((post - pre, post, nbytes))
                print(f"#   seed {seed} {name}: pre {pre:.4f} post {post:.4f} bytes {nbytes}", file=sys.stderr)
    ms = lambda xs: f"{statistics.mean(xs):+.4f} ± {(max(xs) - min(xs)) / 2:.4f}"  # noqa: E731
    print(f"\nquantization gap, tiny 2x128 MLPx3, {steps} steps, seeds {seeds}; pre-quant val_bpb "
          f"{statistics.mean(pre_all):.4f} ({', '.join(f'{p:.4f}' for p in pre_all)})\n")
    print("| artifact setting | gap (post - pre) mean ± half-range | post val_bpb | artifact bytes (zstd) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {ms([x[0] for x in r])} | {statistics.mean(x[1] for x in r):.4f} | "
              f"{statistics.mean(x[2] for x in r):,.0f} |")


def trained_like(cfg, seed=0):
    rng = np.random.default_rng(seed)
    flat = T.flat_numpy(T.GPT(cfg))
    for n, w in flat.items():
        if T.is_quantized(n, w.shape):
            rows = rng.lognormal(0.0, 0.3, (w.shape[0], 1)) * (0.02 if n == "tok_emb.weight" else w.shape[1] ** -0.5)
            flat[n] = (rng.standard_t(5, w.shape) * rows).astype(np.float32)
    return flat


def size_table(only):
    print("\nfull size, synthetic trained-like weights (Student-t(5), log-normal row scales); code bytes "
          f"{Path(T.__file__).stat().st_size:,} not included\n")
    print("| shape | setting | zstd-22 bytes | lzma-9e bytes | auto picks | pack s (GPTQ-lite incl.) | zstd s | lzma s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, over in (("9x512 MLPx2", {}), ("11x512 MLPx3", dict(NUM_LAYERS="11", MLP_MULT="3"))):
        cfg = T.ModelConfig.from_hparams(T.Hyperparameters.from_env(over))
        flat = trained_like(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            for name in [n for n in SIZE_SETTINGS if not only or any(o in f"{shape} {n}" for o in only)]:
                hp = T.Hyperparameters.from_env(dict(over, **{k: str(v) for k, v in SETTINGS[name].items()}))
                t0 = time.perf_counter()
                arrays = T.pack_state(flat, T.quant_plan(hp), hp.gptq_lite)
                t_pack, res = time.perf_counter() - t0, {}
                for codec in ("zstd", "lzma"):
                    t0 = time.perf_counter()
                    n = T.write_container(f"{tmp}/a", T.ARTIFACT_MAGIC, dict(quant_bits=T.quant_plan(hp)), arrays,
                                          22, codec)
                    res[codec] = (n, time.perf_counter() - t0)
                pick = min(res, key=lambda c: res[c][0])
                print(f"| {shape} | {name} | {res['zstd'][0]:,} | {res['lzma'][0]:,} | {pick} | {t_pack:.1f} | "
                      f"{res['zstd'][1]:.1f} | {res['lzma'][1]:.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip-gap", action="store_true")
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="size rows: substrings of 'shape setting'")
    a = p.parse_args()
    mx.random.seed(0)
    if not a.skip_gap:
        gap_table(a.seeds, a.steps)
    if not a.skip_size:
        size_table(a.only)


if __name__ == "__main__":
    main()
